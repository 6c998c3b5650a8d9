"""The tiny teacher's committed form: a bf16 safetensors state dict plus its `ModelConfig` as YAML.

Layout of `kd_teacher/assets/tiny_teacher/`:
  model.yaml          the `ModelConfig` (TP=1, PP=1) that `build_gpt_model` turns into a Megatron-Core GPTModel
  model.safetensors   `GPTModel.state_dict()` at TP=1/PP=1 in bfloat16, minus `_extra_state` entries (none are
                      needed without FP8); safetensors metadata names the format and the tokenizer
  training.json       how it was trained (command, machine, steps, losses) and its recorded held-out loss
  TRAINING.md         the same for people

Why not a `dist_checkpointing` directory: that is several files whose `.metadata` is a pickle (torch DCP),
and fp32 doubles the size; one bf16 safetensors file keeps the embedded teacher under 10 MB, pickle-free and
readable by anything. Loading upcasts to the model's parameter dtype, so the loaded teacher is
exactly the bf16-rounded weights, on every machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kd_teacher.assets import TINY_TEACHER_DIR
from kd_teacher.config import load_config, to_dict
from kd_teacher.engine.model import ModelConfig, build_gpt_model

FORMAT = "kd-teacher/gpt-state-dict-v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.yaml"
TRAINING_FILE = "training.json"


class TeacherCheckpointError(ValueError):
    """The committed teacher does not fit its model config (or the files are not a teacher checkpoint)."""


def load_model_config(directory: str | Path = TINY_TEACHER_DIR, overrides: list[str] | None = None) -> ModelConfig:
    return load_config(ModelConfig, Path(directory) / CONFIG_FILE, overrides)


def load_training_record(directory: str | Path = TINY_TEACHER_DIR) -> dict:
    path = Path(directory) / TRAINING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return json.loads(path.read_text())


def _weights_to_save(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        name: t.detach().to("cpu", dtype).contiguous()
        for name, t in model.state_dict().items()
        if isinstance(t, torch.Tensor) and "_extra_state" not in name
    }


def save_teacher(model: torch.nn.Module, cfg: ModelConfig, directory: str | Path, *, tokenizer_id: str,
                 dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write model.safetensors + model.yaml into `directory` (TP=1, PP=1 models only)."""
    import yaml
    from safetensors.torch import save_file

    _require_single_shard(cfg)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _weights_to_save(model, dtype)
    meta = {"format": FORMAT, "tokenizer": tokenizer_id, "dtype": str(dtype).removeprefix("torch.")}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.chmod(0o644)  # safetensors creates the file owner-only; the teacher is a shipped asset
    tmp.replace(directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(
        "# The tiny teacher's Megatron-Core GPTModel (kd_teacher.engine.model.ModelConfig); weights in "
        f"{WEIGHTS_FILE}.\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False)
    )
    return directory


def _require_single_shard(cfg: ModelConfig) -> None:
    if cfg.tensor_model_parallel_size != 1 or cfg.pipeline_model_parallel_size != 1:
        raise TeacherCheckpointError(
            "the safetensors teacher form holds a TP=1, PP=1 state dict; got "
            f"TP={cfg.tensor_model_parallel_size}, PP={cfg.pipeline_model_parallel_size}"
        )


def load_weights(model: torch.nn.Module, directory: str | Path = TINY_TEACHER_DIR) -> dict:
    """Copy the safetensors weights into `model` (names and shapes must match exactly); returns the metadata."""
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights {path} are missing")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise TeacherCheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        saved = {name: f.get_tensor(name) for name in f.keys()}
    own = {n: t for n, t in model.state_dict().items() if isinstance(t, torch.Tensor) and "_extra_state" not in n}
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        raise TeacherCheckpointError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in own.items():
        if tuple(saved[name].shape) != tuple(t.shape):
            raise TeacherCheckpointError(
                f"{path}: {name} has shape {tuple(saved[name].shape)}, the model has {tuple(t.shape)}"
            )
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(saved[name].to(t.dtype))
    return meta


def build_tiny_teacher(directory: str | Path = TINY_TEACHER_DIR, cfg: ModelConfig | None = None):
    """The committed teacher as a Megatron-Core GPTModel (parallel_state initialised at TP=1, PP=1).

    Returns `(model, model_config, metadata)`."""
    cfg = cfg or load_model_config(directory)
    _require_single_shard(cfg)
    model, _ = build_gpt_model(cfg)
    meta = load_weights(model, directory)
    return model, cfg, meta
