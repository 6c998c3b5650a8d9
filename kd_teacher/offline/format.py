"""On-disk format of an offline dump: a directory of safetensors shards and one JSON manifest.

```
DIR/manifest.json                    what the dump is (teacher, recipe, k, T, vocab, data) + the shard list
DIR/shards/shard-00000.safetensors   samples [0, S), S = samples_per_shard
DIR/shards/shard-00000.json          the shard's manifest entry, written by the rank that wrote the shard
DIR/runs.jsonl                       one line per run (timestamps, world size): outside all hashed content
DIR/.dump.lock                       flock of the running `dump`
```

A shard's layout is in shard.py.

The manifest and each shard entry carry a checksum of their own (`manifest_blake2b`, `entry_blake2b`:
BLAKE2b-128 of their canonical JSON without it), checked wherever they are read, and the manifest's fields
are checked for type and consistency, so a damaged manifest is an error or a `verify` report, not a crash
or a dump that silently describes something else.

Integrity of the data, at three grains: the manifest records each shard's size and BLAKE2b of the whole file
(checked by `verify`); when the reader opens a shard it checks the header (every tensor's dtype, shape and place)
against the manifest and its copy of the four small tables against `index_blake2b`; the per-sample digests
are checked by the reader on every sample it serves, on the bytes it serves. So a flipped byte is found
wherever it is, and the reader never serves numbers it has not checked (docs/offline_format.md).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kd_teacher.config import ConfigError, from_dict
from kd_teacher.contract import TeacherContract
from kd_teacher.dtypes import DTYPES
from kd_teacher.payload import EXACT_COUNTS, EXTRACTIONS

log = logging.getLogger(__name__)

FORMAT = "kd-teacher-offline-dump"
# 2: the manifest and shard entries carry their own checksums. 3: `extraction` may be "sampled" (values are draw
# counts), and shards repeat it in their metadata.
SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)  # a version-1 manifest has no checksum: read, with a warning; 1, 2: top-k
SEALED_SINCE = 2
SAMPLED_SINCE = 3
MANIFEST_CHECKSUM = "manifest_blake2b"
ENTRY_CHECKSUM = "entry_blake2b"
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


class ManifestCorruptError(DumpError):
    """A manifest or shard entry that fails its checksum, or whose fields are of the wrong type or disagree."""


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


# ---- JSON files with their own checksum -----------------------------------------------------------------------
def _json_digest(obj: dict) -> str:
    return hashlib.blake2b(canonical_json(obj).encode(), digest_size=DIGEST_BYTES).hexdigest()


def sealed_json(obj: dict, key: str) -> str:
    """`canonical_json(obj)` with one more field, `key`: the digest of the rest. The digest is of the parsed
    form (a JSON round trip first), so that a reader recomputes it from what it parsed."""
    obj = json.loads(canonical_json(obj))
    return canonical_json({**obj, key: _json_digest(obj)})


def read_sealed(raw: bytes | str, key: str, where: str, required: bool = True) -> tuple[dict, bool]:
    """(the JSON object without its checksum field `key`, whether it had one); ManifestCorruptError when it is
    not a JSON object or its checksum does not match (or is missing and `required`)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ManifestCorruptError(f"{where} is not valid JSON ({e}): damaged, or not written by kd-teacher") from None
    if not isinstance(data, dict):
        raise ManifestCorruptError(f"{where} is not a JSON object: damaged, or not written by kd-teacher")
    stored = data.pop(key, None)
    if stored is None:
        if required:
            raise ManifestCorruptError(f"{where} has no checksum ({key}): damaged, or not written by kd-teacher")
        return data, False
    if stored != _json_digest(data):
        raise ManifestCorruptError(f"{where}: checksum mismatch, the file was damaged or edited after kd-teacher "
                                   "wrote it")
    return data, True


@dataclass
class ShardEntry:
    """One shard's line in the manifest (the writer keeps it as a dict; this is its type, for checking)."""

    index: int
    file: str
    first_sample: int
    samples: int
    tokens: int
    index_blake2b: str
    bytes: int
    blake2b: str


def read_entry(path: Path) -> dict:
    """A shard entry file, its checksum and field types checked; ManifestCorruptError otherwise."""
    data, _ = read_sealed(path.read_bytes(), ENTRY_CHECKSUM, str(path))
    try:
        from_dict(ShardEntry, data, str(path))
    except ConfigError as e:
        raise ManifestCorruptError(str(e)) from None
    return data


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
    recipe: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    extraction: str = "topk"
    shards: list[dict[str, Any]] = field(default_factory=list)  # ShardEntry fields
    complete: bool = False
    format: str = FORMAT
    schema_version: int = SCHEMA_VERSION

    def identity(self) -> dict:
        d = asdict(self)
        d.pop("shards")
        d.pop("complete")
        return d

    def to_json(self) -> str:
        return sealed_json(asdict(self), MANIFEST_CHECKSUM)

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
        meta = dict(format=FORMAT, schema_version=self.schema_version, shard=i, first_sample=r.start,
                    samples=len(r), k=self.k, temperature=self.temperature, vocab_size=self.vocab_size,
                    index_bits=self.index_bits, values_dtype=self.values_dtype,
                    teacher_fingerprint=self.teacher_fingerprint, recipe_fingerprint=self.recipe_fingerprint)
        if self.schema_version >= SAMPLED_SINCE:  # a lone shard of a sampled dump must say that its values are counts
            meta["extraction"] = self.extraction
        return meta

    @classmethod
    def from_json(cls, raw: bytes | str, where: str) -> "Manifest":
        """Parse a manifest, checking its checksum, the type of every field and their consistency."""
        data, sealed = read_sealed(raw, MANIFEST_CHECKSUM, where, required=False)
        if data.get("format") != FORMAT:
            raise NotADumpError(f"{where} is not a kd-teacher dump manifest (format field is not {FORMAT!r})")
        version = data.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise NotADumpError(f"{where} has dump schema version {version!r}; this reader knows "
                                f"{READABLE_SCHEMA_VERSIONS}")
        if not sealed and version >= SEALED_SINCE:
            raise ManifestCorruptError(f"{where} has no checksum ({MANIFEST_CHECKSUM}): damaged or edited")
        if not sealed:
            log.warning("%s: a version-%d manifest has no checksum of its own; damage to it is found only where "
                        "it makes the shards disagree", where, version)
        if version < SAMPLED_SINCE and data.get("extraction", "topk") != "topk":
            raise ManifestCorruptError(f"{where}: a version-{version} dump is top-k, but it says extraction "
                                       f"{data['extraction']!r}")
        try:
            manifest = from_dict(cls, data, where)
            for i, entry in enumerate(manifest.shards):
                from_dict(ShardEntry, entry, f"{where}: shards[{i}]")
        except ConfigError as e:
            raise ManifestCorruptError(str(e)) from None
        manifest.check_consistent(where)
        return manifest

    def check_consistent(self, where: str) -> None:
        """ManifestCorruptError unless the fields agree with each other (what a re-sealed or hand-made manifest
        could get wrong: every reader relies on these)."""
        from kd_teacher.offline.packing import bits_for_vocab

        problems = []
        if not (self.k >= 1 and self.vocab_size >= self.k and 0 < self.temperature < math.inf):
            problems.append(f"k {self.k}, vocab_size {self.vocab_size}, temperature {self.temperature} are not "
                            "1 <= k <= vocab_size and a positive finite temperature")
        elif self.vocab_size >= 2**31 or self.index_bits != bits_for_vocab(self.vocab_size):
            problems.append(f"index_bits {self.index_bits} is not the {self.vocab_size}-id vocabulary's")
        if self.values_dtype not in DTYPES or self.logits_dtype not in DTYPES:
            problems.append(f"dtypes {self.values_dtype!r}/{self.logits_dtype!r} are not of {sorted(DTYPES)}")
        elif self.extraction not in EXTRACTIONS:
            problems.append(f"extraction {self.extraction!r} is not one of {list(EXTRACTIONS)}")
        elif self.extraction == "sampled" and self.k > EXACT_COUNTS[self.values_dtype]:
            problems.append(f"{self.values_dtype} values cannot hold draw counts up to k={self.k}")
        if not (self.num_samples >= 0 and self.samples_per_shard >= 1
                and self.num_shards == -(-self.num_samples // self.samples_per_shard)):
            problems.append(f"{self.num_shards} shards of {self.samples_per_shard} do not hold {self.num_samples} "
                            "samples")
        previous = -1
        for e in self.shards if not problems else []:
            i = e["index"]
            r = self.shard_range(i)
            if not (previous < i < self.num_shards and e["file"] == shard_file(i) and e["first_sample"] == r.start
                    and e["samples"] == len(r) and e["tokens"] >= e["samples"] and e["bytes"] > 8
                    and _HEX_DIGEST.fullmatch(e["blake2b"]) and _HEX_DIGEST.fullmatch(e["index_blake2b"])):
                problems.append(f"shard entry {e} does not fit shard {i} of this dump (or comes out of order)")
                break
            previous = i
        if self.complete and not problems and len(self.shards) != self.num_shards:
            problems.append(f"complete, with {len(self.shards)} of {self.num_shards} shards listed")
        if problems:
            raise ManifestCorruptError(f"{where}: {'; '.join(problems)}")


_HEX_DIGEST = re.compile(f"[0-9a-f]{{{2 * DIGEST_BYTES}}}")


def load_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADumpError(f"{directory} is not a directory, so not a kd-teacher dump")
    path = directory / MANIFEST
    if not path.is_file():
        raise NotADumpError(f"{directory} is not a kd-teacher dump: it has no {MANIFEST}")
    return Manifest.from_json(path.read_bytes(), str(path))


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
