"""`verify` and `inspect` of a dump directory.

verify: the manifest is sound (its checksum, field types and consistency: a damaged one is reported, not a
crash) and a complete dump; every shard has the listed size and BLAKE2b, a header, metadata and tables that
agree with the manifest, and every sample's checksum; no unlisted files. With
`rescore=N`, N random samples are recomputed by the teacher, in the very micro-batch the dump scored them
in (the shard's chunk plan is a pure function of its sample lengths), after checking that the data source
still yields the tokens the dump hashed; payloads must be bitwise equal.

inspect: sizes, bytes per token, k, vocabulary, fingerprints and coverage (also of a dump in progress).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from kd_teacher.offline import format as fmt
from kd_teacher.offline.shard import ShardFile


@dataclass
class VerifyReport:
    directory: str
    ok: bool = True
    shards_checked: int = 0
    samples_checked: int = 0
    rescored: int = 0
    rescored_equal: int = 0
    problems: list = field(default_factory=list)

    def fail(self, text: str) -> None:
        self.ok = False
        self.problems.append(text)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def verify(directory: str | Path, *, rescore: int = 0, config=None, seed: int = 0) -> VerifyReport:
    directory = Path(directory)
    report = VerifyReport(str(directory))
    try:
        manifest = fmt.load_manifest(directory)  # checksum, field types, consistency
    except fmt.DumpError as e:
        report.fail(f"manifest: {e}")  # nothing else can be checked without it
        return report
    if not manifest.complete:
        report.fail(f"the dump is unfinished: {len(manifest.shards)} of {manifest.num_shards} shards in the manifest")
    shards = {}
    for entry in manifest.shards:
        shard = _check_shard(directory, manifest, entry, report)
        if shard is not None:
            shards[entry["index"]] = shard
    _check_orphans(directory, manifest, report)
    if rescore:
        try:
            _rescore(manifest, shards, rescore, config, seed, report)
        finally:
            for shard in shards.values():
                shard.close()
    return report


def _check_shard(directory: Path, m: fmt.Manifest, entry: dict, report: VerifyReport):
    path = directory / entry["file"]
    if not path.is_file():
        report.fail(f"shard {path} is missing")
        return None
    size = path.stat().st_size
    if size != entry["bytes"]:
        report.fail(f"shard {path} is {size} bytes, the manifest says {entry['bytes']} (truncated?)")
        return None
    if fmt.blake2b_file(path) != entry["blake2b"]:
        report.fail(f"shard {path}: checksum mismatch (the file is corrupt)")
        return None
    try:
        shard = ShardFile(directory, entry, m)
        try:
            for row in range(len(shard)):
                shard.read(row)
        finally:
            shard.close()
    except fmt.DumpError as e:
        report.fail(str(e))
        return None
    report.shards_checked += 1
    report.samples_checked += len(shard)
    return shard


def _check_orphans(directory: Path, m: fmt.Manifest, report: VerifyReport) -> None:
    listed = {e["file"] for e in m.shards} | {fmt.entry_file(e["index"]) for e in m.shards}
    for p in sorted((directory / fmt.SHARDS_DIR).iterdir()) if (directory / fmt.SHARDS_DIR).is_dir() else []:
        rel = f"{fmt.SHARDS_DIR}/{p.name}"
        if rel not in listed:
            report.fail(f"{p} is not listed in the manifest (a leftover of an interrupted run?)")


# ---- re-scoring ---------------------------------------------------------------------------------------------------
def _rescore(m: fmt.Manifest, shards: dict, n: int, config, seed: int, report: VerifyReport) -> None:
    """Recompute `n` random samples in their original micro-batches; needs torch.distributed initialised."""
    from kd_teacher.engine.loading import build_engine
    from kd_teacher.engine.scheduler import ScoreRequest
    from kd_teacher.offline.data import build_source
    from kd_teacher.offline.writer import plan_chunks
    from kd_teacher.dtypes import DTYPES
    from kd_teacher.payload import token_hashes

    engine = build_engine(config.teacher)
    if engine.fingerprint != m.teacher_fingerprint:
        report.fail(f"re-scoring teacher has fingerprint {engine.fingerprint}, the dump {m.teacher_fingerprint}")
        return
    source = build_source(config.data)
    rng = random.Random(seed)
    usable = [i for i in range(m.num_samples) if i // m.samples_per_shard in shards]
    for sample in sorted(rng.sample(usable, min(n, len(usable)))):
        shard = shards[sample // m.samples_per_shard]
        row = sample - shard.entry["first_sample"]
        lengths = (shard.offsets[1:] - shard.offsets[:-1]).tolist()
        chunk = next(c for c in plan_chunks(lengths, engine.config.max_tokens_per_batch) if row in c)
        first = shard.entry["first_sample"]
        tokens = torch.stack([source.tokens(first + c) for c in chunk])
        stored_hashes = [bytes(shard.tables["token_hashes"][c].tolist()).hex() for c in chunk]
        report.rescored += 1
        if token_hashes(tokens) != stored_hashes:
            report.fail(f"sample {sample}: the data source no longer yields the tokens the dump was made from")
            continue
        payload = engine.score_many([ScoreRequest(tokens, [first + c for c in chunk])])[0]
        j = row - chunk.start
        values, ids, lse = shard.read(row)
        same = (torch.equal(payload.values[j].to(DTYPES[m.values_dtype]).cpu(), values)
                and torch.equal(payload.indices[j].cpu(), ids) and torch.equal(payload.lse[j].cpu(), lse))
        if same:
            report.rescored_equal += 1
        else:
            report.fail(f"sample {sample} (shard {shard.path}): re-scored payload differs from the stored one")


# ---- inspect --------------------------------------------------------------------------------------------------------
def inspect(directory: str | Path) -> dict:
    directory = Path(directory)
    m = fmt.load_manifest(directory)
    entries = {e["index"]: e for e in m.shards}
    for i in range(m.num_shards):  # a running dump's entries that the manifest has not picked up yet
        p = directory / fmt.entry_file(i)
        if i not in entries and p.is_file() and (directory / fmt.shard_file(i)).is_file():
            try:
                entries[i] = fmt.read_entry(p)
            except fmt.DumpError:  # counted once its writer scores the shard again
                continue
    tokens = sum(e["tokens"] for e in entries.values())
    size = sum(e["bytes"] for e in entries.values())
    samples = sum(e["samples"] for e in entries.values())
    runs_path = directory / fmt.RUN_LOG
    runs = [json.loads(line) for line in runs_path.read_text().splitlines()] if runs_path.is_file() else []
    return dict(
        directory=str(directory), complete=m.complete, shards=f"{len(entries)}/{m.num_shards}",
        samples=f"{samples}/{m.num_samples}", coverage=samples / max(1, m.num_samples), tokens=tokens, bytes=size,
        bytes_per_token=size / max(1, tokens), bytes_per_entry=size / max(1, tokens * m.k), k=m.k,
        extraction=m.extraction, temperature=m.temperature, vocab_size=m.vocab_size, index_bits=m.index_bits,
        values_dtype=m.values_dtype,
        logits_dtype=m.logits_dtype, teacher_fingerprint=m.teacher_fingerprint,
        recipe_fingerprint=m.recipe_fingerprint, tokenizer=m.tokenizer, dataset=m.dataset, runs=runs,
    )


def rescore_config(m: fmt.Manifest, config_path: Optional[str], overrides: Optional[list] = None):
    """The dump config for re-scoring: the given file, else the one recorded in the manifest."""
    from kd_teacher.config import from_dict
    from kd_teacher.offline.writer import DumpConfig, load_dump_config

    if config_path:
        return load_dump_config(config_path, overrides)
    stored = json.loads(json.dumps(m.config))
    stored["output"]["dir"] = ""
    return from_dict(DumpConfig, stored)
