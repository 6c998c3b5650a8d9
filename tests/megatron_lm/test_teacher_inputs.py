"""What a Megatron-LM user points kd-teacher at: a `--save` directory (its latest iteration through
`latest_checkpointed_iteration.txt`, or a chosen one), and a dump teacher without weights, which is refused
unless random weights are meant."""

from pathlib import Path

import pytest

from kd_teacher.config import ConfigError
from kd_teacher.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
TEACHER_YAML = ROOT / "configs" / "kd_teacher_tiny.yaml"


def _weights(model) -> str:
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for name, p in sorted(model.state_dict().items()):
        if "_extra_state" not in name:
            digest.update(p.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def _save_like_megatron_lm(save_dir: str) -> dict:
    """Two iterations saved as Megatron-LM lays them out: SAVE/iter_NNNNNNN/ and the tracker file."""
    from kd_teacher.engine.checkpoint import save_checkpoint
    from kd_teacher.engine.loading import build_engine, load_teacher_config

    weights = {}
    for iteration, seed in ((10, 1), (20, 2)):
        tcfg = load_teacher_config(TEACHER_YAML, [f"model.seed={seed}"])
        engine = build_engine(tcfg)  # random weights of this seed
        save_checkpoint(engine.model, Path(save_dir) / f"iter_{iteration:07d}")
        weights[iteration] = _weights(engine.model)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        (Path(save_dir) / "latest_checkpointed_iteration.txt").write_text("20")
    dist.barrier()

    def loaded(**kw):
        cfg = load_teacher_config(TEACHER_YAML)
        cfg.checkpoint, cfg.checkpoint_iteration = save_dir, kw.get("iteration")
        return _weights(build_engine(cfg).model)

    out = {"saved": weights, "latest": loaded(), "iteration 10": loaded(iteration=10)}
    for name, kw in (("iteration 30", dict(iteration=30)),):
        try:
            loaded(**kw)
        except FileNotFoundError as e:
            out[name] = str(e)
    return out


def test_a_megatron_lm_save_directory_loads_its_latest_or_a_chosen_iteration(tmp_path):
    out = run_distributed(_save_like_megatron_lm, 1, str(tmp_path / "save"))[0]
    assert out["latest"] == out["saved"][20] != out["saved"][10]
    assert out["iteration 10"] == out["saved"][10]
    assert "no checkpoint of iteration 30 (iter_0000030)" in out["iteration 30"]
    assert "iter_0000010" in out["iteration 30"] and "iter_0000020" in out["iteration 30"]


def test_checkpoint_paths_that_are_neither_are_named():
    from kd_teacher.engine.checkpoint import resolve_checkpoint_dir

    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint_dir("/nonexistent/teacher")
    with pytest.raises(FileNotFoundError, match="nor a Megatron-LM --save directory"):
        resolve_checkpoint_dir(ROOT / "configs")


def test_dump_refuses_a_teacher_without_weights_unless_meant(tmp_path):
    from kd_teacher.config import from_dict, load_yaml
    from kd_teacher.offline.writer import DumpConfig, run_dump

    rows = tmp_path / "rows.jsonl"
    rows.write_text("[1, 2, 3, 4]\n")
    data = {"teacher": load_yaml(TEACHER_YAML), "data": {"kind": "jsonl", "path": str(rows)},
            "output": {"dir": str(tmp_path / "dump"), "progress": False}}
    with pytest.raises(ConfigError, match="random weights.*allow_random_weights: true"):
        run_dump(from_dict(DumpConfig, data))  # refused before any process group or file is needed
    assert not (tmp_path / "dump").exists()
    assert from_dict(DumpConfig, {**data, "allow_random_weights": True}).allow_random_weights


def test_shipped_megatron_lm_configs_load_and_agree_on_the_vocabulary():
    from kd_teacher.engine.loading import load_teacher_config
    from kd_teacher.offline.writer import load_dump_config

    teacher = load_teacher_config(ROOT / "configs" / "teacher_megatron_lm_bf16.yaml")
    assert teacher.model.precision.params_dtype == "bfloat16" and teacher.model.layer_spec == "transformer_engine"
    dump = load_dump_config(ROOT / "configs" / "dump_gpt.yaml")
    assert dump.data.tokenizer.vocab_size == dump.teacher.model.vocab_size == teacher.model.vocab_size


def test_the_megatron_lm_dump_config_loads():
    from kd_teacher.offline.writer import load_dump_config

    cfg = load_dump_config(ROOT / "configs" / "dump_megatron_lm.yaml")
    assert cfg.data.kind == "megatron_lm" and cfg.data.splits == ["train", "valid"]
