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
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kd_teacher.dtypes import DTYPES
from kd_teacher.offline.format import DIGEST_BYTES, Manifest, ShardCorruptError, identity_diff, shard_file

META_KEY = "kd_teacher"
TABLES = ("token_offsets", "sample_ids", "token_hashes", "sample_digests")


def sample_digest(values: torch.Tensor, packed: torch.Tensor, lse: torch.Tensor) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for t in (values, packed, lse):
        if t.numel():
            h.update(t.contiguous().view(torch.uint8).numpy())
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
    """One shard, read with positioned reads into memory of our own (no memory map).

    Opening reads the safetensors header and checks every tensor's dtype, shape and place against what the
    manifest says the shard holds (a changed header byte can turn lse F32 into I32 with every checksum still
    true), then copies the four tables and checks them against the manifest's `index_blake2b`. `read(row)`
    reads a sample's bytes into fresh tensors and checks their digest against the copied table: what is checked
    is what is served, whatever happens to the file afterwards. A shard rewritten in place is then a checksum
    error and a truncated one a short read, where a memory map would serve the new file's samples under its
    new checksums, or die of SIGBUS.

    The file is held open between reads until `close()` (`OfflineTeacher` bounds how many it holds).
    """

    def __init__(self, directory: Path, entry: dict, manifest: Manifest):
        self.path = Path(directory) / entry["file"]
        self.entry = entry
        self.k = manifest.k
        self.bits = manifest.index_bits
        self._file = None
        try:
            self._read_header(manifest, entry)
            self.tables = {name: self._read(name, 0, self._shapes[name][0]) for name in TABLES}
        finally:
            self.close()
        if index_digest(self.tables) != entry["index_blake2b"]:
            raise ShardCorruptError(f"shard {self.path}: its sample tables do not match the manifest checksum")
        self.offsets = self.tables["token_offsets"]
        self._check_tables(manifest.shard_range(entry["index"]))

    def __len__(self) -> int:
        return self.tables["sample_ids"].shape[0]

    # ---- serving ---------------------------------------------------------------------------------------------
    def read(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample `row`'s (values [len, k], ids [len, k] int32, lse [len]), digest-checked."""
        from kd_teacher.offline.packing import unpack_ids

        a, b = int(self.offsets[row]), int(self.offsets[row + 1])
        pa, pb = int(self.byte_offsets[row]), int(self.byte_offsets[row + 1])
        values = self._read("values", a, b)
        packed = self._read("indices", pa, pb)
        lse = self._read("lse", a, b)
        if sample_digest(values, packed, lse) != self.tables["sample_digests"][row].numpy().tobytes():
            raise ShardCorruptError(
                f"shard {self.path}: checksum mismatch for sample {int(self.tables['sample_ids'][row])} "
                f"(row {row}): the file is corrupt, or was changed while in use; run `kd-teacher verify`"
            )
        ids = unpack_ids(packed.reshape(1, -1), (b - a) * self.k, self.bits).reshape(b - a, self.k)
        return values, ids, lse

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # ---- reading ---------------------------------------------------------------------------------------------
    def _read(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of tensor `name`, read into a new tensor."""
        dtype, shape = self._dtypes[name], self._shapes[name]
        out = torch.empty((hi - lo, *shape[1:]), dtype=dtype)
        row_bytes = _nbytes(dtype, shape[1:])
        self._pread_into(out.view(torch.uint8).numpy(), self._at[name] + lo * row_bytes)
        return out

    def _pread_into(self, buf, offset: int) -> None:
        if self._file is None:
            try:
                self._file = open(self.path, "rb", buffering=0)
            except FileNotFoundError:
                raise ShardCorruptError(f"shard {self.path} listed in the manifest does not exist") from None
        view, done = memoryview(buf).cast("B"), 0
        while done < len(view):
            got = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if got == 0:
                raise ShardCorruptError(f"shard {self.path} ends at byte {offset + done}, before the data the "
                                        "manifest lists: truncated (or replaced) while in use; run `kd-teacher verify`")
            done += got

    # ---- checks at open --------------------------------------------------------------------------------------
    def _read_header(self, manifest: Manifest, entry: dict) -> None:
        """Parse the safetensors header (8-byte length, JSON; safetensors' own reader only memory-maps) and check
        its metadata and each tensor's dtype, shape and place against the manifest; sets `_at` (absolute
        offsets), `_dtypes` and `_shapes`."""
        head = bytearray(8)
        self._pread_into(head, 0)
        size = os.fstat(self._file.fileno()).st_size
        if size != entry["bytes"]:
            raise ShardCorruptError(f"shard {self.path} is {size} bytes, the manifest says {entry['bytes']} (truncated?)")
        n = int.from_bytes(head, "little")
        if not 2 <= n <= min(_MAX_HEADER_BYTES, size - 8):
            raise ShardCorruptError(f"shard {self.path}: header length {n} does not fit the file: not a shard")
        raw = bytearray(n)
        self._pread_into(raw, 8)
        try:
            header = json.loads(raw)
            meta = json.loads(header.pop("__metadata__")[META_KEY])
            found = {name: _tensor_entry(t) for name, t in header.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ShardCorruptError(f"shard {self.path}: malformed safetensors header ({type(e).__name__}: {e})") from None
        expected_meta = manifest.shard_meta(entry["index"])
        if meta != expected_meta:
            bad = identity_diff(meta, expected_meta) if isinstance(meta, dict) else [repr(meta)[:80]]
            raise ShardCorruptError(f"shard {self.path}: its metadata disagrees with the manifest: {bad[:3]}")
        tokens, samples, k = entry["tokens"], entry["samples"], manifest.k
        expected = {  # indices: its length follows from the token offsets (checked once they are read)
            "values": (DTYPES[manifest.values_dtype], [tokens, k]), "indices": (torch.uint8, None),
            "lse": (torch.float32, [tokens]), "token_offsets": (torch.int64, [samples + 1]),
            "sample_ids": (torch.int64, [samples]), "token_hashes": (torch.uint8, [samples, DIGEST_BYTES]),
            "sample_digests": (torch.uint8, [samples, DIGEST_BYTES]),
        }
        if set(found) != set(expected):
            raise ShardCorruptError(f"shard {self.path} holds tensors {sorted(found)}, not {sorted(expected)}")
        self._at, self._dtypes, self._shapes, end = {}, {}, {}, 0
        for name, (code, shape, lo, hi) in sorted(found.items(), key=lambda item: item[1][2]):
            dtype, want = expected[name]
            if code != _CODES[dtype]:
                raise ShardCorruptError(f"shard {self.path}: tensor {name} has dtype {code}, the manifest says "
                                        f"{_CODES[dtype]} (a damaged header)")
            if shape != want and not (want is None and len(shape) == 1):
                raise ShardCorruptError(f"shard {self.path}: tensor {name} has shape {shape}, the manifest says "
                                        f"{want or '1-D'} (a damaged header)")
            if lo != end or hi - lo != _nbytes(dtype, shape):
                raise ShardCorruptError(f"shard {self.path}: tensor {name} lies at data bytes [{lo}, {hi}); its "
                                        f"{_nbytes(dtype, shape)} bytes should start at {end} (a damaged header)")
            self._at[name], self._dtypes[name], self._shapes[name], end = 8 + n + lo, dtype, shape, hi
        if 8 + n + end != size:
            raise ShardCorruptError(f"shard {self.path}: {size - 8 - n - end} bytes after its last tensor")

    def _check_tables(self, expected_ids: range) -> None:
        ids = self.tables["sample_ids"]
        if not torch.equal(ids, torch.arange(expected_ids.start, expected_ids.stop)):
            raise ShardCorruptError(f"shard {self.path} holds samples {ids[:4].tolist()}..., expected "
                                    f"{expected_ids.start}..{expected_ids.stop - 1}")
        off = self.offsets
        if int(off[0]) != 0 or bool((off[1:] <= off[:-1]).any()) or int(off[-1]) != self.entry["tokens"]:
            raise ShardCorruptError(f"shard {self.path}: token offsets are not a partition of its tokens")
        lengths = (off[1:] - off[:-1]) * self.k
        self.byte_offsets = torch.zeros_like(off)
        self.byte_offsets[1:] = torch.cumsum((lengths * self.bits + 7) // 8, 0)
        if self._shapes["indices"] != [int(self.byte_offsets[-1])]:
            raise ShardCorruptError(f"shard {self.path}: indices hold {self._shapes['indices']} bytes, the token "
                                    f"offsets need {int(self.byte_offsets[-1])}")


# safetensors' dtype codes of the dtypes a shard holds
_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint8: "U8", torch.int64: "I64"}
_MAX_HEADER_BYTES = 1 << 20  # ours are ~1 KB; safetensors itself allows 100 MB


def _tensor_entry(t: dict) -> tuple[str, list, int, int]:
    """(dtype code, shape, begin, end) of one header entry, refusing wrong JSON types."""
    code, shape, (lo, hi) = t["dtype"], t["shape"], t["data_offsets"]
    if not (isinstance(code, str) and isinstance(shape, list) and all(_is_count(d) for d in shape)
            and _is_count(lo) and _is_count(hi)):
        raise TypeError(f"header entry {t!r} is not {{dtype: str, shape: [int], data_offsets: [int, int]}}")
    return code, shape, lo, hi


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * dtype.itemsize
