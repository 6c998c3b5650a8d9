"""Loading a teacher: the teacher config YAML and engine construction (checkpoints: `checkpoint.py`).

A teacher config has `model:` (a `ModelConfig`), `engine:` (an `EngineConfig`: k, temperature, batching) and
the weights: `checkpoint:` (a `megatron.core.dist_checkpointing` directory) or `hf_checkpoint:` (a Hugging Face
directory, read from its safetensors at every start; `kd-teacher import-hf` writes either kind of config);
neither means random weights from `model.seed`, which is what tests and benchmarks use. `tokenizer:` (a
directory, tokenizer.json or identity) names the tokenizer in every payload header and dump manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from kd_teacher.config import PATH, load_config
from kd_teacher.engine.engine import EngineConfig, TeacherEngine
from kd_teacher.engine.model import ModelConfig, build_gpt_model


@dataclass
class TeacherConfig:
    model: ModelConfig
    engine: EngineConfig = field(default_factory=EngineConfig)
    # A dist-checkpoint directory, or a Megatron-LM --save directory (its latest iteration, or this one).
    checkpoint: Optional[str] = None
    checkpoint_iteration: Optional[int] = None
    hf_checkpoint: Optional[str] = field(default=None, metadata=PATH)
    tokenizer: Optional[str] = field(default=None, metadata=PATH)

    def __post_init__(self):
        if self.checkpoint and self.hf_checkpoint:
            raise ValueError(f"teacher config names two sets of weights: checkpoint {self.checkpoint} and "
                             f"hf_checkpoint {self.hf_checkpoint}; keep one")

    @property
    def has_weights(self) -> bool:
        """A checkpoint of either kind is named (else the weights are random, from `model.seed`)."""
        return bool(self.checkpoint or self.hf_checkpoint)


def load_teacher_config(path: str | Path, overrides: list[str] | None = None, section: str | None = None) -> TeacherConfig:
    return load_config(TeacherConfig, path, overrides, section)


def build_engine(cfg: TeacherConfig) -> TeacherEngine:
    """Build this rank's teacher (parallel_state initialised with the config's TP/PP) and its engine."""
    if cfg.checkpoint:
        return TeacherEngine.from_checkpoint(cfg.checkpoint, cfg.model, cfg.engine, iteration=cfg.checkpoint_iteration,
                                             tokenizer=cfg.tokenizer)
    if cfg.hf_checkpoint:
        return TeacherEngine.from_hf(cfg.hf_checkpoint, cfg.engine, model_config=cfg.model, tokenizer=cfg.tokenizer)
    torch.manual_seed(cfg.model.seed)
    model, _ = build_gpt_model(cfg.model)
    return TeacherEngine(model, cfg.model.vocab_size, cfg.engine, model_config=cfg.model, tokenizer=cfg.tokenizer)
