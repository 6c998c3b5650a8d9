"""Offline dumps of sampled payloads (extraction: sampled) and of the version before them.

A sampled dump written by 2 DP ranks is rewritten byte for byte by a one-rank run killed with SIGKILL and
resumed (the draws depend on content only); `verify` passes, also re-scoring; `OfflineTeacher` serves what
the engine scores; the training hook refuses a dump of the other kind; a version-1 top-k dump, written by the
code before the sampled kind (tests/offline/data/make_v1_dump.py), still reads.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kd_teacher.config import ConfigError
from kd_teacher.offline import format as fmt
from kd_teacher.offline.reader import OfflineTeacher
from kd_teacher.offline.verify import inspect, verify
from kd_teacher.testing.distributed import run_distributed
from offline_fixtures import (cfg_to, dump_on_ranks, file_bytes, fork_dump, gpt_dump_config,
                              student_reads_match_engine, verify_with_rescore)
from test_offline_dump import _kill_when

V1_DUMP = Path(__file__).resolve().parent / "data" / "v1_topk_dump"
V1_TOKENS = Path(__file__).resolve().parent / "data" / "v1_topk_tokens.jsonl"


def _sampled(cfg, **engine):
    return replace(cfg, teacher=replace(cfg.teacher, engine=replace(cfg.teacher.engine, extraction="sampled",
                                                                        **engine)))


@pytest.fixture(scope="module")
def sampled_reference(tmp_path_factory, data_prefix):
    out = tmp_path_factory.mktemp("sampled") / "dump"
    cfg = _sampled(gpt_dump_config(out, data_prefix), sample_seed=3)
    results = run_distributed(dump_on_ranks, 2, cfg)
    assert results[0]["complete"]
    return cfg, out, file_bytes(out)


def test_sampled_dump_resumes_byte_identical_verifies_and_serves(sampled_reference, tmp_path):
    cfg, out, ref_bytes = sampled_reference
    m = fmt.load_manifest(out)
    assert (m.extraction, m.schema_version, m.values_dtype, m.k) == ("sampled", 3, "float32", 8)
    assert inspect(out)["extraction"] == "sampled"
    killed = tmp_path / "killed"
    rng = random.Random(5)
    for _ in range(2):
        p = fork_dump(cfg_to(cfg, killed))
        _kill_when(p.pid, killed, new_files=rng.randrange(1, 4), extra_delay=rng.uniform(0, 0.01))
        p.join(30)
    assert not fmt.load_manifest(killed).complete
    p = fork_dump(cfg_to(cfg, killed))
    p.join(120)
    assert p.exitcode == 0 and file_bytes(killed) == ref_bytes
    report = run_distributed(verify_with_rescore, 1, str(killed), cfg_to(cfg, killed), 4)[0]
    assert report["ok"] and report["rescored_equal"] == 4, report["problems"]
    per_rank = run_distributed(student_reads_match_engine, 1, str(out), cfg, 2)
    assert per_rank[0]["1x2"] == m.num_samples
    payload = OfflineTeacher(out, expect={"extraction": "sampled"}).score(
        torch.stack([_tokens(cfg, i) for i in range(3)]))
    assert payload.header.extraction == "sampled" and torch.all(payload.values.sum(-1) == 8)


def _tokens(cfg, i):
    from offline_fixtures import build_dataset

    return build_dataset(cfg).tokens(i)


def test_hook_refuses_a_dump_whose_kind_does_not_fit_the_loss(sampled_reference, reference):
    from kd_teacher.hooks.config import KDConfig, OfflineTeacherConfig
    from kd_teacher.hooks.sources import make_teacher_source

    _, sampled_dir, _ = sampled_reference
    _, topk_dir, _ = reference

    def source(**kd):
        return make_teacher_source(KDConfig(**{"source": "offline", "k": 8, **kd}))

    with pytest.raises(fmt.DumpMismatchError, match="extraction: this training run expects 'topk', the dump has "
                                                    "'sampled' .a sampled payload holds draw counts"):
        source(offline=OfflineTeacherConfig(dir=str(sampled_dir)))
    with pytest.raises(fmt.DumpMismatchError, match="expects 'sampled', the dump has 'topk'"):
        source(extraction="sampled", offline=OfflineTeacherConfig(dir=str(topk_dir)))
    with pytest.raises(ConfigError, match="'reverse_kl' has no unbiased estimate from a sampled payload"):
        source(extraction="sampled", kind="reverse_kl", offline=OfflineTeacherConfig(dir=str(sampled_dir)))
    with pytest.raises(ConfigError, match="maximum of 1024"):
        source(k=2000, extraction="sampled", offline=OfflineTeacherConfig(dir=str(sampled_dir)))
    assert source(extraction="sampled", offline=OfflineTeacherConfig(dir=str(sampled_dir))).info.extraction == "sampled"


def _writer_error(cfg) -> str:
    from kd_teacher.engine.loading import build_engine
    from kd_teacher.offline.data import build_source
    from kd_teacher.offline.writer import DumpWriter

    try:
        DumpWriter(cfg, build_engine(cfg.teacher), build_source(cfg.data))
    except ConfigError as e:
        return str(e)
    return ""


def test_counts_a_values_dtype_cannot_hold_are_refused(sampled_reference, tmp_path):
    cfg, _, _ = sampled_reference
    bf16 = cfg_to(cfg, tmp_path / "bf16")
    bf16 = replace(bf16, output=replace(bf16.output, values_dtype="bfloat16"))
    assert run_distributed(_writer_error, 1, bf16) == [""]  # counts 0..8: exact in bfloat16
    wide = replace(bf16, teacher=replace(bf16.teacher, engine=replace(bf16.teacher.engine, k=300)))
    (error,) = run_distributed(_writer_error, 1, wide)
    assert "output.values_dtype bfloat16 cannot hold a sampled dump's draw counts 0..300" in error


def test_version_1_dump_reads_unchanged():
    from kd_teacher.losses import kd_loss

    m = fmt.load_manifest(V1_DUMP)
    assert (m.schema_version, m.extraction, m.k, m.temperature) == (1, "topk", 4, 2.0)
    report = verify(V1_DUMP)
    assert report.ok and report.samples_checked == m.num_samples == 6, report.problems
    teacher = OfflineTeacher(V1_DUMP, expect={"k": 4, "temperature": 2.0, "extraction": "topk"})
    tokens = torch.tensor([json.loads(line) for line in V1_TOKENS.read_text().splitlines()])
    payload = teacher.score(tokens).validate()
    assert payload.header.extraction == "topk" and payload.values.shape == (6, 16, 4)
    loss = kd_loss(torch.randn(6, 16, 256), payload)
    assert torch.isfinite(loss).all() and (loss > 0).all()
