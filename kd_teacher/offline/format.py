"""On-disk format of an offline dump: a directory of safetensors shards and one JSON manifest.

```
DIR/manifest.json                    what the dump is (teacher, recipe, k, T, vocab, data) + the shard list
DIR/shards/shard-00000.safetensors   samples [0, S), S = samples_per_shard
DIR/shards/shard-00000.json          the shard's manifest entry, written by the rank that wrote the shard
DIR/runs.jsonl                       one line per run (timestamps, world size): outside all hashed content
DIR/.dump.lock                       flock of the running `dump`
```

A shard's layout is in shard.py.

Integrity, at three grains: the manifest records each shard's size and BLAKE2b of the whole file (checked
by `verify`); when the reader opens a shard it checks the header (every tensor's dtype, shape and place)
against the manifest and its copy of the four small tables against `index_blake2b`; the per-sample digests
are checked by the reader on every sample it serves, on the bytes it serves. So a flipped byte is found
wherever it is, and the reader never serves numbers it has not checked (docs/offline_format.md).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from kd_teacher.contract import TeacherContract

FORMAT = "kd-teacher-offline-dump"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
LOCK_FILE = ".dump.lock"
RUN_LOG = "runs.jsonl"
DIGEST_BYTES = 16


class DumpError(ValueError):
    """Base of every offline-dump error; messages name the directory or shard concerned."""


class NotADumpError(DumpError):
    pass


class DumpMismatchError(DumpError):
    """The dump was made with another teacher/recipe/k/temperature/vocab/config than asked for."""


class ShardCorruptError(DumpError):
    pass


class MissingSamplesError(DumpError):
    pass


class DumpLockedError(DumpError):
    pass


class DiskFullError(DumpError, OSError):
    pass


# ---- names --------------------------------------------------------------------------------------------------
def shard_file(i: int) -> str:
    return f"{SHARDS_DIR}/shard-{i:05d}.safetensors"


def entry_file(i: int) -> str:
    return f"{SHARDS_DIR}/shard-{i:05d}.json"


# ---- hashing --------------------------------------------------------------------------------------------------
def blake2b_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---- atomic files -----------------------------------------------------------------------------------------------
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` so that `path` either keeps its old content or has all of the new: temp file in the same
    directory, fsync, rename over, fsync the directory (so the rename itself survives a power cut)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    raw = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        if e.errno in _NO_SPACE:
            raise DiskFullError(
                e.errno, f"no space left writing {path} ({len(raw)} bytes): {os.strerror(e.errno)}; free space "
                "and run the same command again to resume"
            ) from e
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_temp_files(directory: Path) -> int:
    """Leftovers of killed runs (`*.tmp.<pid>`); only called while holding the dump lock."""
    n = 0
    for p in list(directory.glob("*.tmp.*")) + list(directory.glob(f"{SHARDS_DIR}/*.tmp.*")):
        _remove_quietly(p)
        n += 1
    return n


def canonical_json(obj) -> str:
    """The one JSON spelling of `obj` used for hashed content: sorted keys, fixed separators, newline."""
    return json.dumps(obj, sort_keys=True, indent=1, separators=(",", ": ")) + "\n"


# ---- the manifest ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Manifest(TeacherContract):
    """Everything about a dump except its timestamps. `identity()` is what a resumed run must agree on. What the
    dump serves is its `TeacherContract` part (a reader checks it against the training run's expectation)."""

    teacher_fingerprint: str
    recipe_fingerprint: str
    k: int
    temperature: float
    vocab_size: int
    index_bits: int
    values_dtype: str
    logits_dtype: str
    num_samples: int
    samples_per_shard: int
    num_shards: int
    recipe: dict = field(default_factory=dict)
    tokenizer: dict = field(default_factory=dict)
    dataset: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    extraction: str = "topk"
    shards: list = field(default_factory=list)
    complete: bool = False
    format: str = FORMAT
    schema_version: int = SCHEMA_VERSION

    def identity(self) -> dict:
        d = asdict(self)
        d.pop("shards")
        d.pop("complete")
        return d

    def to_json(self) -> str:
        return canonical_json(asdict(self))

    def shard_range(self, i: int) -> range:
        lo = i * self.samples_per_shard
        return range(lo, min(lo + self.samples_per_shard, self.num_samples))

    @property
    def total_tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s["bytes"] for s in self.shards)

    def shard_meta(self, i: int) -> dict:
        """The dump-wide fields a shard repeats in its own metadata (so a lone shard explains itself)."""
        r = self.shard_range(i)
        return dict(format=FORMAT, schema_version=SCHEMA_VERSION, shard=i, first_sample=r.start, samples=len(r),
                    k=self.k, temperature=self.temperature, vocab_size=self.vocab_size, index_bits=self.index_bits,
                    values_dtype=self.values_dtype, teacher_fingerprint=self.teacher_fingerprint,
                    recipe_fingerprint=self.recipe_fingerprint)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise NotADumpError(f"{where} is not valid JSON ({e}): not a kd-teacher dump manifest") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise NotADumpError(f"{where} is not a kd-teacher dump manifest (format field is not {FORMAT!r})")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise NotADumpError(
                f"{where} has dump schema version {data.get('schema_version')!r}; this reader knows {SCHEMA_VERSION}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise NotADumpError(f"{where} has unknown fields {unknown}")
        try:
            return cls(**data)
        except TypeError as e:
            raise NotADumpError(f"{where} lacks fields: {e}") from None


def load_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADumpError(f"{directory} is not a directory, so not a kd-teacher dump")
    path = directory / MANIFEST
    if not path.is_file():
        raise NotADumpError(f"{directory} is not a kd-teacher dump: it has no {MANIFEST}")
    return Manifest.from_json(path.read_text(), str(path))


def identity_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two identity dicts (for error messages)."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += identity_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} vs {vb!r}")
    return out
