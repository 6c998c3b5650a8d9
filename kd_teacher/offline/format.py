"""On-disk format of an offline dump: a directory of safetensors shards and one JSON manifest.

```
DIR/manifest.json                    what the dump is (teacher, recipe, k, T, vocab, data) + the shard list
DIR/shards/shard-00000.safetensors   samples [0, S), S = samples_per_shard
DIR/shards/shard-00000.json          the shard's manifest entry, written by the rank that wrote the shard
DIR/runs.jsonl                       one line per run (timestamps, world size): outside all hashed content
DIR/.dump.lock                       flock of the running `dump`
```

A shard holds, for its samples in dataset order (T = its tokens, n = its samples, k = top-k):

| tensor | shape, dtype | |
| --- | --- | --- |
| `values` | [T, k], values dtype | raw teacher logits, exactly as the teacher computed them (or cast, if asked) |
| `indices` | [bytes] uint8 | ids packed at `index_bits` bits, each sample's run byte-aligned (see packing.py) |
| `lse` | [T] fp32 | log-sum-exp of logits / T over the true vocabulary |
| `token_offsets` | [n + 1] int64 | sample i has tokens [off[i], off[i+1]) |
| `sample_ids` | [n] int64 | dataset sample index |
| `token_hashes` | [n, 16] uint8 | BLAKE2b-128 of the sample's token ids (`kd_teacher.payload.token_hash`): the lookup key |
| `sample_digests` | [n, 16] uint8 | BLAKE2b-128 of the sample's values, packed ids and lse bytes |

Its safetensors metadata has one key, `kd_teacher`, a JSON object (sorted keys) repeating the dump-wide
fields; one key because the order of several metadata keys in the file is not specified.

Integrity, at three grains: the manifest records each shard's size and BLAKE2b of the whole file (checked
by `verify`); `index_blake2b` covers the four small tables (checked by the reader when it opens a shard);
the per-sample digests are checked by the reader on every sample it serves. So a flipped byte is found
wherever it is, and the reader never serves numbers it has not checked.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from kd_teacher.contract import TeacherContract

FORMAT = "kd-teacher-offline-dump"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
LOCK_FILE = ".dump.lock"
RUN_LOG = "runs.jsonl"
META_KEY = "kd_teacher"
DIGEST_BYTES = 16
TABLES = ("token_offsets", "sample_ids", "token_hashes", "sample_digests")


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


def sample_digest(values: torch.Tensor, packed: torch.Tensor, lse: torch.Tensor) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for t in (values, packed, lse):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def index_digest(tables: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for name in TABLES:
        h.update(name.encode())
        h.update(tables[name].contiguous().view(torch.uint8).numpy().tobytes())
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


# ---- shards -----------------------------------------------------------------------------------------------------
@dataclass
class SampleRecord:
    """One sample's payload as stored: values [len, k], packed ids (uint8, byte-aligned), lse [len]."""

    sample_id: int
    token_hash: bytes
    values: torch.Tensor
    packed_ids: torch.Tensor
    lse: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.values.shape[0]


def encode_shard(meta: dict, samples: list[SampleRecord]) -> tuple[bytes, dict]:
    """The shard file's bytes and its manifest entry (minus file digest/size, which the caller adds)."""
    from safetensors.torch import save

    lengths = torch.tensor([s.tokens for s in samples], dtype=torch.int64)
    offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    tables = {
        "token_offsets": offsets,
        "sample_ids": torch.tensor([s.sample_id for s in samples], dtype=torch.int64),
        "token_hashes": _bytes_table([s.token_hash for s in samples]),
        "sample_digests": _bytes_table([sample_digest(s.values, s.packed_ids, s.lse) for s in samples]),
    }
    tensors = {
        "values": torch.cat([s.values for s in samples]).contiguous(),
        "indices": torch.cat([s.packed_ids for s in samples]).contiguous(),
        "lse": torch.cat([s.lse for s in samples]).contiguous(),
        **tables,
    }
    data = save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    entry = dict(index=meta["shard"], file=shard_file(meta["shard"]), first_sample=meta["first_sample"],
                 samples=len(samples), tokens=int(offsets[-1]), index_blake2b=index_digest(tables))
    return data, entry


def _bytes_table(rows: list[bytes]) -> torch.Tensor:
    buf = bytearray(b"".join(rows))
    return torch.frombuffer(buf, dtype=torch.uint8).reshape(len(rows), DIGEST_BYTES).clone()


class ShardFile:
    """A memory-mapped shard: its small tables in memory, payload slices read on demand and checked."""

    def __init__(self, directory: Path, entry: dict, manifest: Manifest):
        from safetensors import safe_open

        self.path = Path(directory) / entry["file"]
        self.entry = entry
        self.k = manifest.k
        self.bits = manifest.index_bits
        try:
            self._file = safe_open(str(self.path), framework="pt")
            self.meta = json.loads(self._file.metadata()[META_KEY])
            self.tables = {name: self._file.get_tensor(name) for name in TABLES}
        except FileNotFoundError:
            raise ShardCorruptError(f"shard {self.path} listed in the manifest does not exist") from None
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise ShardCorruptError(f"shard {self.path} is corrupt or truncated: {type(e).__name__}: {e}") from None
        expected_meta = manifest.shard_meta(entry["index"])
        if self.meta != expected_meta:
            bad = identity_diff(self.meta, expected_meta)
            raise ShardCorruptError(f"shard {self.path}: its metadata disagrees with the manifest: {bad[:3]}")
        if index_digest(self.tables) != entry.get("index_blake2b"):
            raise ShardCorruptError(f"shard {self.path}: its sample tables do not match the manifest checksum")
        self.offsets = self.tables["token_offsets"]
        lengths = (self.offsets[1:] - self.offsets[:-1]) * self.k
        self.byte_offsets = torch.zeros_like(self.offsets)
        self.byte_offsets[1:] = torch.cumsum((lengths * self.bits + 7) // 8, 0)

    def __len__(self) -> int:
        return self.tables["sample_ids"].shape[0]

    def read(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample `row`'s (values [len, k], ids [len, k] int32, lse [len]), digest-checked."""
        from kd_teacher.offline.packing import unpack_ids

        a, b = int(self.offsets[row]), int(self.offsets[row + 1])
        pa, pb = int(self.byte_offsets[row]), int(self.byte_offsets[row + 1])
        try:
            values = self._file.get_slice("values")[a:b]
            packed = self._file.get_slice("indices")[pa:pb]
            lse = self._file.get_slice("lse")[a:b]
        except Exception as e:  # noqa: BLE001 - a slice past a truncated file
            raise ShardCorruptError(f"shard {self.path}: cannot read sample row {row}: {e}") from None
        if sample_digest(values, packed, lse) != bytes(self.tables["sample_digests"][row].tolist()):
            raise ShardCorruptError(
                f"shard {self.path}: checksum mismatch for sample {int(self.tables['sample_ids'][row])} "
                f"(row {row}): the file is corrupt; run `kd-teacher verify` and re-dump this shard"
            )
        ids = unpack_ids(packed.reshape(1, -1), (b - a) * self.k, self.bits).reshape(b - a, self.k)
        return values, ids, lse
