"""A dump never serves wrong numbers: hostile or unlucky input is an error naming the problem, not a loss.

Shards, manifests and configs are damaged the ways users damage them (a changed byte, a file overwritten or
truncated while training reads it, a killed rerun, a typo in a config) on copies of the session's reference
dump (see conftest.py), and the reader, `verify` and `dump` must refuse or report, never crash or serve.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from kd_teacher.config import ConfigError
from kd_teacher.offline import format as fmt
from kd_teacher.offline.reader import OfflineTeacher
from kd_teacher.offline.writer import load_dump_config
from kd_teacher.payload import PayloadError
from offline_fixtures import build_dataset, cfg_to, copy_dump, file_bytes, fork_cli, fork_dump

REPO = Path(__file__).resolve().parents[2]


def _jsonl_dump_yaml(tmp_path: Path, rows: list[list[int]]) -> Path:
    data = tmp_path / "seqs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "dump.yaml"
    config.write_text(yaml.safe_dump({
        "teacher_config": str(REPO / "configs" / "teacher_tiny.yaml"), "teacher": {"engine": {"k": 4}},
        "data": {"kind": "jsonl", "path": str(data)}, "allow_random_weights": True,
        "output": {"dir": str(tmp_path / "dump"), "samples_per_shard": 2, "progress": False},
    }))
    return config


def test_float_token_ids_are_refused_not_truncated(reference):
    cfg, out, _ = reference
    tokens = torch.stack([build_dataset(cfg).tokens(i) for i in range(2)])
    teacher = OfflineTeacher(out)
    with pytest.raises(PayloadError, match="token ids must be integers"):
        teacher.score(tokens.float() + 0.4)  # truncated to the dumped ids, these would be found and served
    with pytest.raises(PayloadError, match="token ids must be integers"):
        teacher.lookup(tokens.double())
    assert teacher.score(tokens.to(torch.int32)).header.batch == 2


# ---- config errors: before anything is written ----------------------------------------------------------------
BAD_CONFIG = {
    "teacher.engine.k=0": "k must be >= 1",
    "teacher.engine.k=-3": "k must be >= 1",
    "teacher.engine.temperature=.nan": "temperature must be a positive finite number",
    "teacher.engine.temperature=.inf": "temperature must be a positive finite number",
    "teacher.engine.temperature=0": "temperature must be a positive finite number",
    "teacher.engine.temperature=-1.0": "temperature must be a positive finite number",
    "teacher.engine.max_tokens_per_batch=0": "max_tokens_per_batch must be >= 1",
    "output.samples_per_shard=0": "samples_per_shard must be >= 1",
}


@pytest.mark.parametrize("override", sorted(BAD_CONFIG))
def test_config_errors_are_found_when_the_config_is_loaded(tmp_path, override):
    config = _jsonl_dump_yaml(tmp_path, [list(range(1, 9))])
    key = override.split("=")[0].rsplit(".", 1)[0]
    with pytest.raises(ConfigError, match=rf"{key}: .*{BAD_CONFIG[override]}"):
        load_dump_config(config, [override])


def test_a_bad_config_writes_nothing_and_the_corrected_rerun_runs(tmp_path):
    config = _jsonl_dump_yaml(tmp_path, [list(range(i, i + 8)) for i in range(4)])
    out = tmp_path / "dump"
    for override in ("teacher.engine.k=0", "teacher.engine.temperature=.nan"):
        p = fork_cli(["dump", str(config), override])
        p.join(120)
        assert p.exitcode == 2
        assert not (out / fmt.MANIFEST).exists()
    p = fork_cli(["dump", str(config)])
    p.join(120)
    assert p.exitcode == 0 and fmt.load_manifest(out).complete


def test_a_dump_that_failed_before_its_first_shard_can_be_rerun_with_another_config(tmp_path):
    """A token outside the vocabulary is found only when its shard is scored, after the manifest is written:
    nothing of that dump exists yet, so the fixed data must not be refused as "another configuration"."""
    config = _jsonl_dump_yaml(tmp_path, [list(range(i, i + 8)) for i in range(3)] + [[5, 5000, 7]])
    out = tmp_path / "dump"
    p = fork_cli(["dump", str(config), "output.samples_per_shard=8"])
    p.join(120)
    assert p.exitcode == 2 and (out / fmt.MANIFEST).exists() and not list((out / fmt.SHARDS_DIR).iterdir())
    (tmp_path / "seqs.jsonl").write_text("".join(json.dumps(list(range(i, i + 8))) + "\n" for i in range(4)))
    p = fork_cli(["dump", str(config), "output.samples_per_shard=8"])
    p.join(120)
    assert p.exitcode == 0 and fmt.load_manifest(out).complete


def test_unwritable_output_dir_is_a_clear_error_not_a_traceback(tmp_path):
    """/sys refuses new directories even to root (issue 25 item 8): one error line naming the directory."""
    import subprocess
    import sys

    config = _jsonl_dump_yaml(tmp_path, [list(range(1, 9))])
    out = "/sys/kd-teacher-unwritable-test/dump"
    run = subprocess.run([sys.executable, "-m", "kd_teacher.cli", "dump", str(config), f"output.dir={out}"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 2, run.stderr
    assert f"cannot write the dump into {out}" in run.stderr and "choose a writable output.dir" in run.stderr
    assert "Traceback" not in run.stderr


# ---- reruns ---------------------------------------------------------------------------------------------------------
def _killed_between_prepare_and_finish():
    """Fault injection in the forked child: SIGKILL the rerun once its directory is prepared, before it finishes."""
    from kd_teacher.offline.writer import DumpWriter

    DumpWriter._dump_my_shards = lambda self: os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_rerun_of_a_finished_dump_leaves_it_finished(reference, tmp_path):
    cfg, _, ref_bytes = reference
    out = copy_dump(reference, tmp_path)
    p = fork_dump(cfg_to(cfg, out), before=_killed_between_prepare_and_finish)
    p.join(120)
    assert p.exitcode == -signal.SIGKILL
    assert fmt.load_manifest(out).complete
    assert len(OfflineTeacher(out)) == fmt.load_manifest(out).num_samples  # training still takes it
    assert file_bytes(out) == ref_bytes
    p = fork_dump(cfg_to(cfg, out))  # a rerun that completes changes nothing either
    p.join(120)
    assert p.exitcode == 0 and file_bytes(out) == ref_bytes
