"""Offline dumps end to end: real Megatron-Core indexed datasets and GPTDataset, a real GPTModel teacher on
gloo ranks, real processes killed with SIGKILL, real file-size limits for "disk full"."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import yaml

from kd_teacher.offline import format as fmt
from kd_teacher.offline.reader import OfflineTeacher
from kd_teacher.offline.verify import inspect, verify
from kd_teacher.testing.distributed import run_distributed
from offline_fixtures import (
    cfg_to,
    copy_dump,
    dump_on_ranks,
    dump_with_tensor_parallel_teacher,
    file_bytes,
    flip_byte,
    fork_dump,
    student_reads_match_engine,
    verify_with_rescore,
)

REPO = Path(__file__).resolve().parents[2]


# ---- reading with other layouts ------------------------------------------------------------------------------------
def test_any_student_layout_reads_what_the_engine_scores(reference):
    cfg, out, _ = reference
    per_rank = run_distributed(student_reads_match_engine, 3, str(out), cfg, 11)
    total = {key: sum(r.get(key, 0) for r in per_rank) for key in per_rank[0]}
    n = fmt.load_manifest(out).num_samples
    assert n >= 30
    assert total == {f"{dp}x{mbs}": n for dp in (1, 2, 3) for mbs in (2, 3)}


def test_other_dp_count_writes_identical_files_and_verify_rescores(reference, tmp_path):
    cfg, _, ref_bytes = reference
    out = tmp_path / "dp3"
    run_distributed(dump_on_ranks, 3, cfg_to(cfg, out))
    assert file_bytes(out) == ref_bytes
    report = run_distributed(verify_with_rescore, 1, str(out), cfg_to(cfg, out), 4)[0]
    assert report["ok"], report["problems"]
    assert report["rescored"] == report["rescored_equal"] == 4


def test_tensor_parallel_teacher_writes_once_per_model_parallel_group(reference, tmp_path):
    cfg, _, _ = reference
    tp_cfg = cfg_to(cfg, tmp_path / "tp2")
    model = replace(tp_cfg.teacher.model, tensor_model_parallel_size=2)
    tp_cfg = replace(tp_cfg, teacher=replace(tp_cfg.teacher, model=model))
    results = run_distributed(dump_with_tensor_parallel_teacher, 2, tp_cfg, tp=2)
    assert results == [dict(complete=True, verified=True, equal=True)] * 2


# ---- crash safety ------------------------------------------------------------------------------------------------
def _count(out: Path) -> int:
    shards = out / fmt.SHARDS_DIR
    return len(list(shards.iterdir())) if shards.is_dir() else 0


def _kill_when(proc_pid: int, out: Path, new_files: int, extra_delay: float, timeout: float = 60) -> None:
    """SIGKILL once `new_files` more files (shards, entries, temp files) appeared, plus a random delay."""
    target = _count(out) + new_files
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _count(out) < target:
        time.sleep(0.0005)
    time.sleep(extra_delay)
    os.kill(proc_pid, signal.SIGKILL)


def test_sigkill_at_random_points_then_resume_is_byte_identical(reference, tmp_path):
    cfg, _, ref_bytes = reference
    out = tmp_path / "killed"
    run_cfg = cfg_to(cfg, out)
    rng = random.Random(1234)
    kills = 0
    for _ in range(4):
        p = fork_dump(run_cfg)
        _kill_when(p.pid, out, new_files=rng.randrange(1, 4), extra_delay=rng.uniform(0, 0.01))
        p.join(30)
        kills += p.exitcode == -signal.SIGKILL
    assert kills == 4
    assert not fmt.load_manifest(out).complete
    p = fork_dump(run_cfg)
    p.join(120)
    assert p.exitcode == 0
    assert file_bytes(out) == ref_bytes
    assert not list(out.rglob("*.tmp.*"))


def test_cli_dump_killed_and_rerun_gives_the_same_dump(reference, tmp_path):
    cfg, _, ref_bytes = reference
    out = tmp_path / "cli"
    data = asdict(cfg_to(cfg, out))
    config = tmp_path / "dump.yaml"
    config.write_text(yaml.safe_dump(data))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "kd_teacher.cli", "dump", str(config), "output.progress=false"]
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_when(p.pid, out, new_files=3, extra_delay=0.0, timeout=90)
    p.wait(30)
    assert p.returncode == -signal.SIGKILL
    assert fmt.load_manifest(out).complete is False
    with pytest.raises(fmt.DumpError, match="unfinished dump"):
        OfflineTeacher(out)
    assert len(OfflineTeacher(out, allow_incomplete=True)) < fmt.load_manifest(out).num_samples
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["samples"] == fmt.load_manifest(out).num_samples
    assert file_bytes(out) == ref_bytes
    runs = inspect(out)["runs"]
    assert len(runs) == 1 and runs[0]["shards_written"] < fmt.load_manifest(out).num_shards


def test_disk_full_stops_with_an_error_and_a_later_run_resumes(reference, tmp_path):
    cfg, _, ref_bytes = reference
    out = tmp_path / "full"
    run_cfg = cfg_to(cfg, out)
    shard_size = len(ref_bytes["shards/shard-00000.safetensors"])
    manifest_size = len(ref_bytes["manifest.json"])
    assert manifest_size < shard_size
    p = fork_dump(run_cfg, fsize_limit=shard_size - 1)  # the manifest fits, no shard does
    p.join(120)
    assert p.exitcode == 3
    assert not list(out.rglob("*.tmp.*")) and not list((out / fmt.SHARDS_DIR).iterdir())
    p = fork_dump(run_cfg)
    p.join(120)
    assert p.exitcode == 0
    assert file_bytes(out) == ref_bytes


def test_second_dump_in_a_locked_directory_is_refused(reference, tmp_path):
    import fcntl

    cfg, _, _ = reference
    out = tmp_path / "locked"
    (out / fmt.SHARDS_DIR).mkdir(parents=True)
    with open(out / fmt.LOCK_FILE, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        p = fork_dump(cfg_to(cfg, out))
        p.join(60)
    assert p.exitcode == 4
    assert not (out / fmt.MANIFEST).exists()


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_flipped_byte_in_payload_data_is_named_by_verify_and_reader(reference, tmp_path):
    out = copy_dump(reference, tmp_path)
    shard = out / fmt.shard_file(2)
    flip_byte(shard, shard.stat().st_size // 3)  # inside the values block
    report = verify(out)
    assert not report.ok and any("shard-00002" in p for p in report.problems)
    teacher = OfflineTeacher(out)
    cfg = reference[0]
    from offline_fixtures import build_dataset  # noqa: PLC0415 - needs only megatron.core.datasets

    source = build_dataset(cfg)
    m = teacher.manifest
    rows = list(m.shard_range(2))
    with pytest.raises(fmt.ShardCorruptError, match="shard-00002"):
        for i in rows:
            teacher.score(source.tokens(i)[None])
    # the other shards still serve
    teacher.score(source.tokens(0)[None])


def test_flipped_byte_in_tables_or_truncation_fails_at_open(reference, tmp_path):
    out = copy_dump(reference, tmp_path)
    shard = out / fmt.shard_file(1)
    flip_byte(shard, shard.stat().st_size - 5)  # the last tensor is a sample table
    with pytest.raises(fmt.ShardCorruptError, match="shard-00001"):
        OfflineTeacher(out)
    shard = out / fmt.shard_file(3)
    shard.write_bytes(shard.read_bytes()[:100])
    report = verify(out)
    assert any("shard-00001" in p for p in report.problems) and any("shard-00003" in p for p in report.problems)


def test_mismatch_with_the_training_config_is_a_clear_error(reference):
    out = reference[1]
    with pytest.raises(fmt.DumpMismatchError, match=r"k: this training run expects 16, the dump has 8"):
        OfflineTeacher(out, expect={"k": 16})
    with pytest.raises(fmt.DumpMismatchError, match="temperature.*teacher_fingerprint"):
        OfflineTeacher(out, expect={"temperature": 2.0, "teacher_fingerprint": "other"})
    with pytest.raises(fmt.DumpMismatchError, match="recipe_fingerprint"):
        OfflineTeacher(out, expect={"recipe_fingerprint": "bfloat16:abc"})
    assert OfflineTeacher(out, expect={"k": 16}, allow_mismatch=True).k == 8


def test_resuming_with_another_config_is_refused(reference, tmp_path):
    cfg, _, _ = reference
    out = copy_dump(reference, tmp_path)
    before = file_bytes(out)
    other = cfg_to(cfg, out)
    other = replace(other, teacher=replace(other.teacher, engine=replace(other.teacher.engine, k=4)))
    p = fork_dump(other)
    p.join(60)
    assert p.exitcode == 4
    assert file_bytes(out) == before


def test_not_a_dump_directory(tmp_path):
    with pytest.raises(fmt.NotADumpError, match="no manifest.json"):
        OfflineTeacher(tmp_path)
    with pytest.raises(fmt.NotADumpError, match="not a directory"):
        OfflineTeacher(tmp_path / "nope")
    (tmp_path / fmt.MANIFEST).write_text('{"format": "something-else"}')
    with pytest.raises(fmt.NotADumpError, match="format"):
        OfflineTeacher(tmp_path)
    report = verify(tmp_path)  # verify reports what it cannot check
    assert not report.ok and "format field" in report.problems[0]


def test_missing_sequences_error_or_skip_with_a_mask(reference):
    cfg, out, _ = reference
    from offline_fixtures import build_dataset

    source = build_dataset(cfg)
    known = torch.stack([source.tokens(0), source.tokens(5)])
    unknown = torch.randint(0, 999, (2, known.shape[1]), generator=torch.Generator().manual_seed(0))
    batch = torch.cat([known[:1], unknown[:1], known[1:], unknown[1:]])
    with pytest.raises(fmt.MissingSamplesError, match="2 of 4 sequences"):
        OfflineTeacher(out).score(batch)
    teacher = OfflineTeacher(out, missing="ce_only")
    payload = teacher.score(batch)
    assert payload.present.tolist() == [True, False, True, False]
    assert torch.equal(payload.rows([0, 2]).values, OfflineTeacher(out).score(known).values)
    found = teacher.lookup(batch)
    assert found.missing == 2 and teacher.missing_sequences == 4 and teacher.served_sequences == 4


def test_inspect_reports_size_and_coverage(reference):
    info = inspect(reference[1])
    m = fmt.load_manifest(reference[1])
    assert info["complete"] and info["coverage"] == 1.0 and info["k"] == 8 and info["index_bits"] == 10
    assert info["bytes"] == sum(len(b) for n, b in reference[2].items() if n.endswith(".safetensors"))
    assert info["tokens"] == m.num_samples * 32
