"""The batch-invariance table: `benchmarks/batch_invariance.py` measures it (here on CPU, tiny model), the serving
policy reads it (`kd_teacher.engine.invariance`) and refuses one measured for another model or machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_teacher.engine.invariance import InvarianceTableError, environment, load_proven_shapes
from kd_teacher.engine.model import ModelConfig, PrecisionConfig
from kd_teacher.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
            vocab_size=1000, max_sequence_length=512, layer_spec="local", make_vocab_size_divisible_by=8)


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bi") / "table.json"
    subprocess.run([sys.executable, "benchmarks/batch_invariance.py", "--preset", "cpu", "--models", "tiny-64",
                    "--seq-lens", "8,16", "--tokens", "16,64", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    return out


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, **changes}, precision=PrecisionConfig(params_dtype="float32"))


def test_measured_table_lists_each_case_and_the_proven_shapes(measured):
    data = json.loads(measured.read_text())
    (model,) = data["models"]
    kinds = {(c["seq_len"], c["kind"], c["rows"], c["padded_len"], c["position"]) for c in model["cases"]}
    # s=8 in 16 and 64 tokens: [2, 8] at rows 0 and 1, [8, 8] at rows 0 and 7, padded [1, 16] and [4, 16]
    assert {(8, "rows", 2, 8, 0), (8, "rows", 2, 8, 1), (8, "rows", 8, 8, 7), (8, "padded", 1, 16, 0),
            (8, "padded", 4, 16, 3), (8, "repeat", 1, 8, 0)} <= kinds
    for s, shapes in model["proven"].items():
        for rows, length in shapes:
            hits = [c for c in model["cases"] if c["seq_len"] == int(s) and (c["rows"], c["padded_len"]) == (rows, length)]
            assert hits and all(c["equal"] for c in hits)


def test_policy_reads_the_table_for_this_model_and_machine(measured):
    proven = load_proven_shapes(measured, tiny())
    data = json.loads(measured.read_text())
    for s, shapes in data["models"][0]["proven"].items():
        for rows, length in shapes:
            assert proven.allows(int(s), rows, length)
    assert proven.allows(8, 1, 8)  # alone is the reference itself
    assert not proven.allows(8, 3, 8)  # never measured: not proven
    assert not proven.allows(32, 2, 32)


def test_table_of_another_model_or_machine_is_refused(measured, tmp_path):
    with pytest.raises(InvarianceTableError, match="no measurement of this model's shape"):
        load_proven_shapes(measured, tiny(hidden_size=128))
    other = dict(environment(), device="NVIDIA H100 80GB HBM3")
    with pytest.raises(InvarianceTableError, match="device 'cpu' there vs 'NVIDIA H100 80GB HBM3' here"):
        load_proven_shapes(measured, tiny(), env=other)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvarianceTableError, match="cannot read it"):
        load_proven_shapes(bad, tiny())


def _serve_with_table(table: str):
    """An engine whose policy reads the measured table: score_many packs rows only into proven shapes, and each
    payload is bit for bit the one TeacherEngine.score gives its request alone."""
    from kd_teacher.engine.engine import EngineConfig, TeacherEngine
    from kd_teacher.engine.model import build_gpt_model
    from kd_teacher.engine.scheduler import ScoreRequest

    cfg = tiny()
    torch.manual_seed(cfg.seed)
    model, _ = build_gpt_model(cfg)
    engine = TeacherEngine(model, cfg.vocab_size, EngineConfig(k=8, max_tokens_per_batch=64,
                                                               invariance_table=table), model_config=cfg)
    g = torch.Generator().manual_seed(5)
    shapes = [(1, 8)] * 6 + [(1, 16), (2, 16), (1, 12), (2, 8)]
    requests = [ScoreRequest(torch.randint(1, 1000, shape, generator=g)) for shape in shapes]
    plan = engine.scheduler.plan(requests)
    many = engine.score_many(requests)
    alone = [engine.score(r.tokens) for r in requests]
    equal = [torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices) and torch.equal(a.lse, b.lse)
             for a, b in zip(many, alone)]
    return engine.policy.repacking, [(len(b.rows), b.seq_len) for b in plan], equal


def test_engine_with_a_table_packs_into_proven_shapes_only_bitwise_as_alone(measured):
    mode, forwards, equal = run_distributed(_serve_with_table, 1, str(measured))[0]
    proven = load_proven_shapes(measured, tiny())
    assert mode == "proven" and all(equal)
    assert len(forwards) < 10  # some rows shared a forward
    # every forward has a proven shape or is one request as given: [1, 12] (length 12 was never measured) and
    # [2, 16] (not proven equal to alone, so its rows may not leave it)
    assert all(proven.allows(8, r, n) or proven.allows(16, r, n) or (r, n) in ((1, 12), (2, 16)) for r, n in forwards)
    assert (1, 12) in forwards and (2, 16) in forwards
