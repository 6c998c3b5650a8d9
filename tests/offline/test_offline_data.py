"""Dump sources and stored value dtypes: JSONL parsing errors, tokens outside the vocabulary, bf16/fp16."""

from __future__ import annotations

import json
import pytest

from kd_teacher.config import ConfigError
from kd_teacher.offline.data import DataConfig, JsonlSource, check_token_range
from kd_teacher.offline.writer import DumpConfig, OutputConfig, load_dump_config
from kd_teacher.testing.distributed import run_distributed
from offline_fixtures import stored_values_follow_values_dtype, tiny_teacher


def test_jsonl_lines_must_be_token_lists(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("[1, 2, 3]\n\n[4]\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not JSON"):
        JsonlSource(DataConfig(kind="jsonl", path=str(path)))
    path.write_text('[1, 2]\n{"tokens": [1, 2.5]}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: expected a non-empty list"):
        JsonlSource(DataConfig(kind="jsonl", path=str(path)))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        JsonlSource(DataConfig(kind="jsonl", path=str(tmp_path / "missing.jsonl")))


def test_tokens_outside_the_teacher_vocabulary_name_the_sample():
    import torch

    with pytest.raises(ConfigError, match=r"sample 17 has token ids in \[0, 1000\].*vocabulary of 1000"):
        check_token_range(torch.tensor([0, 1000]), 1000, 17)


def test_dump_config_merges_a_teacher_config_file(tmp_path):
    cfg_path = tmp_path / "dump.yaml"
    cfg_path.write_text(json.dumps({
        "teacher_config": "configs/teacher_tiny.yaml", "teacher": {"engine": {"k": 4}},
        "data": {"kind": "jsonl", "path": "x.jsonl"}, "output": {"dir": str(tmp_path / "d")},
    }))
    cfg = load_dump_config(cfg_path, ["output.values_dtype=bfloat16"])
    assert cfg.teacher.engine.k == 4 and cfg.teacher.model.hidden_size == 64
    assert cfg.output.values_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="output.bogus"):
        load_dump_config(cfg_path, ["output.bogus=1"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_values_are_stored_in_the_configured_dtype(tmp_path, dtype):
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(json.dumps(list(range(i, i + 12))) for i in range(6)))
    cfg = DumpConfig(teacher=tiny_teacher(1000, k=4, max_tokens=48),
                     data=DataConfig(kind="jsonl", path=str(path)),
                     output=OutputConfig(dir=str(tmp_path / "dump"), samples_per_shard=4, values_dtype=dtype,
                                         progress=False))
    result = run_distributed(stored_values_follow_values_dtype, 1, cfg)[0]
    assert result == {"dtype": f"torch.{dtype}", "header": dtype, "equal": True}
