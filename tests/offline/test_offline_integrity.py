"""A dump never serves wrong numbers: hostile or unlucky input is an error naming the problem, not a loss.

Shards, manifests and configs are damaged the ways users damage them (a changed byte, a file overwritten or
truncated while training reads it, a killed rerun, a typo in a config) on copies of the session's reference
dump (see conftest.py), and the reader, `verify` and `dump` must refuse or report, never crash or serve.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import signal
import struct
from pathlib import Path

import pytest
import torch
import yaml

from kd_teacher.config import ConfigError
from kd_teacher.offline import format as fmt
from kd_teacher.offline.reader import OfflineTeacher
from kd_teacher.offline.writer import load_dump_config
from kd_teacher.payload import PayloadError
from kd_teacher.offline.verify import verify
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



def test_a_damaged_shard_entry_is_scored_again_not_trusted(reference, tmp_path):
    """Entries are what a rerun builds the manifest from: one with a changed digit would be sealed into it."""
    cfg, _, ref_bytes = reference
    out = copy_dump(reference, tmp_path)
    entry = out / fmt.entry_file(1)
    text = entry.read_text()
    entry.write_text(text.replace('"tokens": 160', '"tokens": 161'))
    assert entry.read_text() != text
    p = fork_dump(cfg_to(cfg, out))
    p.join(120)
    assert p.exitcode == 0 and file_bytes(out) == ref_bytes


# ---- shard headers: every tensor's dtype and shape is the manifest's ---------------------------------------------
def _edit_header(path: Path, tensor: str, field: str, new: str) -> None:
    """Replace `field` ("dtype" or "shape") of `tensor` in a safetensors header by `new`, same length, in place."""
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8 : 8 + n].decode()
    m = re.search(rf'"{tensor}":\{{[^}}]*"{field}":(\[[0-9,]*\]|"[A-Z0-9]+")', header)
    assert m is not None and len(new) == len(m.group(1)), (tensor, field, new)
    start = 8 + m.start(1)
    data[start : start + len(new)] = new.encode()
    path.write_bytes(bytes(data))


SAME_WIDTH = {"F32": '"I32"', "I64": '"U64"', "U8": '"I8"'}


@pytest.mark.parametrize("tensor", ["values", "indices", "lse", "token_offsets", "sample_ids", "token_hashes",
                                    "sample_digests"])
def test_a_tensor_of_another_dtype_is_refused_when_the_shard_is_opened(reference, tmp_path, tensor):
    """One changed byte of a header turns lse F32 into I32: same bytes, so every checksum still holds, and
    lse ~ 1e9 would be served. The dtype is checked against the manifest instead."""
    out = copy_dump(reference, tmp_path)
    shard = out / fmt.shard_file(1)
    header = shard.read_bytes()[8:2048].decode(errors="replace")
    dtype = re.search(rf'"{tensor}":{{"dtype":"([A-Z0-9]+)"', header).group(1)
    _edit_header(shard, tensor, "dtype", SAME_WIDTH[dtype])
    with pytest.raises(fmt.ShardCorruptError, match=rf"shard-00001.*{tensor}.*dtype"):
        OfflineTeacher(out)
    assert any("shard-00001" in p for p in verify(out).problems)


def test_a_tensor_of_another_shape_is_refused_when_the_shard_is_opened(reference, tmp_path):
    out = copy_dump(reference, tmp_path)
    shard = out / fmt.shard_file(1)
    tokens = fmt.load_manifest(out).shards[1]["tokens"]
    _edit_header(shard, "values", "shape", f"[8,{tokens}]")  # was [tokens, 8]: same size, same length
    with pytest.raises(fmt.ShardCorruptError, match=r"shard-00001.*values.*shape"):
        OfflineTeacher(out)


# ---- shards changed underneath an open reader ------------------------------------------------------------------
def _rows_of_shard(cfg, manifest, i: int) -> torch.Tensor:
    source = build_dataset(cfg)
    return torch.stack([source.tokens(j) for j in manifest.shard_range(i)])


def test_a_shard_overwritten_in_place_is_an_error_never_another_samples_numbers(reference, tmp_path):
    """`cp`/`rsync --inplace` of another shard over an open one: data and checksums change together in the
    file, but the reader checks what it read against the tables it copied (and checked) at open."""
    cfg, _, ref_bytes = reference
    out = copy_dump(reference, tmp_path)
    teacher = OfflineTeacher(out)
    rows = _rows_of_shard(cfg, teacher.manifest, 2)
    want = teacher.score(rows)
    assert len(ref_bytes["shards/shard-00003.safetensors"]) == len(ref_bytes["shards/shard-00002.safetensors"])
    with open(out / fmt.shard_file(2), "r+b") as f:  # in place: same inode
        f.write(ref_bytes["shards/shard-00003.safetensors"])
    for r in range(rows.shape[0]):
        with pytest.raises(fmt.ShardCorruptError, match="shard-00002"):
            teacher.score(rows[r : r + 1])
    with open(out / fmt.shard_file(2), "r+b") as f:  # put back: served again, and right
        f.write(ref_bytes["shards/shard-00002.safetensors"])
    got = teacher.score(rows)
    assert torch.equal(got.values, want.values) and torch.equal(got.lse, want.lse)


def _score_after_truncation(out: Path, rows: torch.Tensor, shard: Path) -> None:
    teacher = OfflineTeacher(out)
    os.truncate(shard, shard.stat().st_size // 2)
    try:
        teacher.score(rows)
    except fmt.ShardCorruptError as e:
        os._exit(0 if "shard-00002" in str(e) else 5)
    os._exit(6)


def test_a_shard_truncated_in_place_is_an_error_not_sigbus(reference, tmp_path):
    cfg = reference[0]
    out = copy_dump(reference, tmp_path)
    rows = _rows_of_shard(cfg, fmt.load_manifest(out), 2)
    p = multiprocessing.get_context("fork").Process(target=_score_after_truncation,
                                                     args=(out, rows, out / fmt.shard_file(2)))
    p.start()
    p.join(120)
    assert p.exitcode == 0, f"exit code {p.exitcode} (-7: SIGBUS)"


def _open_shard_handles() -> list[str]:
    """Shard files this process holds open or mapped."""
    fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
           if os.path.exists(f"/proc/self/fd/{fd}")]
    maps = Path("/proc/self/maps").read_text().splitlines()
    return [x for x in fds + maps if ".safetensors" in x]


def test_shard_handles_are_closed_and_bounded(reference):
    cfg, out, _ = reference
    m = fmt.load_manifest(out)
    assert m.num_shards > 3
    before = _open_shard_handles()
    with OfflineTeacher(out, max_open_shards=3) as teacher:
        for i in range(m.num_shards):
            teacher.score(_rows_of_shard(cfg, m, i))
            assert len(_open_shard_handles()) - len(before) <= 3
    assert _open_shard_handles() == before
    assert verify(out).ok and _open_shard_handles() == before


# ---- the manifest: its own checksum; verify reports, never crashes ---------------------------------------------
def _manifest_outcome(out: Path, original) -> str:
    """'detected' (verify reports the manifest, the reader refuses it) or 'harmless' (it reads as the original);
    anything else fails the test, an exception out of verify first of all."""
    report = verify(out)
    if not report.ok:
        assert any("manifest" in p for p in report.problems), report.problems
        with pytest.raises(fmt.DumpError):
            OfflineTeacher(out)
        return "detected"
    assert fmt.load_manifest(out) == original, "a changed manifest passed verify"
    return "harmless"


def test_every_bit_flip_of_the_manifest_is_detected_or_harmless(reference, tmp_path):
    out = copy_dump(reference, tmp_path)
    path = out / fmt.MANIFEST
    good = path.read_bytes()
    original = fmt.load_manifest(out)
    # Every bit through the parser (what verify and the reader start with), in memory: fast.
    for bit in range(8 * len(good)):
        data = bytearray(good)
        data[bit // 8] ^= 1 << (bit % 8)
        try:
            assert fmt.Manifest.from_json(bytes(data), "m") == original, f"bit {bit} changed the manifest unseen"
        except fmt.DumpError:
            pass
    # A seeded sample on disk, through verify and the reader.
    outcomes = []
    for bit in random.Random(25).sample(range(8 * len(good)), 300):
        data = bytearray(good)
        data[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(data))
        outcomes.append(_manifest_outcome(out, original))
    assert outcomes.count("detected") >= 290, outcomes


def test_a_manifest_with_wrong_types_under_a_valid_checksum_is_reported_not_a_crash(reference, tmp_path):
    """What a buggy tool or a hand edit that re-seals the manifest would write: verify and the reader must
    still report it (and never raise KeyError/TypeError out of verify)."""
    out = copy_dump(reference, tmp_path)
    good = json.loads((out / fmt.MANIFEST).read_text())
    good.pop(fmt.MANIFEST_CHECKSUM)
    edits = {
        "k is a string": lambda m: m.update(k="8"),
        "no shards list": lambda m: m.update(shards=None),
        "an entry lacks its size": lambda m: m["shards"][0].pop("bytes"),
        "an entry's index is out of range": lambda m: m["shards"][1].update(index=999),
        "an entry names another file": lambda m: m["shards"][1].update(file="../../etc/passwd"),
        "num_shards disagrees": lambda m: m.update(num_shards=m["num_shards"] + 1),
        "index bits too few for the vocabulary": lambda m: m.update(index_bits=3),
        "temperature is NaN": lambda m: m.update(temperature=float("nan")),
        "an unknown field": lambda m: m.update(surprise=1),
        "a nested list where a dict is": lambda m: m.update(dataset=[[[]]]),
    }
    for what, edit in edits.items():
        m = json.loads(json.dumps(good))
        edit(m)
        (out / fmt.MANIFEST).write_text(fmt.sealed_json(m, fmt.MANIFEST_CHECKSUM))
        report = verify(out)
        assert not report.ok and report.problems, what
        with pytest.raises(fmt.DumpError):
            OfflineTeacher(out)


def test_verify_reports_an_unreadable_manifest(tmp_path):
    (tmp_path / fmt.MANIFEST).write_bytes(b"\xff\xfe{ not json")
    report = verify(tmp_path)
    assert not report.ok and "manifest" in report.problems[0]
    (tmp_path / fmt.MANIFEST).write_text("[1, 2]")
    assert not verify(tmp_path).ok
