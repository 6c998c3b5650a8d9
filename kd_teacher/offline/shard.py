"""A shard of an offline dump: one safetensors file (`encode_shard` writes it, `ShardFile` reads it).

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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kd_teacher.offline.format import DIGEST_BYTES, Manifest, ShardCorruptError, identity_diff, shard_file

META_KEY = "kd_teacher"
TABLES = ("token_offsets", "sample_ids", "token_hashes", "sample_digests")


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
