"""Vocabulary ids packed at ceil(log2 V) bits: 17 bits for 128256 ids, 18 for 151936 or 262144.

Ids are stored as one little-endian bit stream per row (a row = one sample's `tokens x k` ids), each row
padded to a whole byte so that a sample's bytes can be sliced out of a shard without touching its
neighbours. Bit j of id i sits at stream bit `i * bits + j`, and stream bit n is bit `n % 8` of byte
`n // 8`. No Python loop over ids: on a GPU, torch bit planes (packing runs on the teacher's device before
the copy to the host, so fewer bytes cross it); on the host, numpy's packbits/unpackbits.
"""

from __future__ import annotations

import numpy as np
import torch

MAX_BITS = 31  # ids are int32 in a payload


def bits_for_vocab(vocab_size: int) -> int:
    """Bits needed for ids in [0, vocab_size): ceil(log2 V), at least 1."""
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab size must be a positive integer, got {vocab_size!r}")
    bits = max(1, (vocab_size - 1).bit_length())
    if bits > MAX_BITS:
        raise ValueError(f"vocab size {vocab_size} needs {bits} bits, more than the {MAX_BITS} an int32 id has")
    return bits


def packed_row_bytes(ids_per_row: int, bits: int) -> int:
    """Bytes of one packed row of `ids_per_row` ids."""
    return (ids_per_row * bits + 7) // 8


def _bit_weights(n: int, device, dtype) -> torch.Tensor:
    return torch.ones((), dtype=dtype, device=device) << torch.arange(n, device=device, dtype=dtype)


def _check_ids(ids: torch.Tensor, bits: int) -> None:
    if ids.dim() != 2:
        raise ValueError(f"ids must be [rows, n], got shape {tuple(ids.shape)}")
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [1, {MAX_BITS}], got {bits}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >> bits):
        raise ValueError(f"ids out of range for {bits}-bit packing: [{int(ids.min())}, {int(ids.max())}]")


def _check_packed(packed: torch.Tensor, n: int, bits: int) -> None:
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"packed ids must be uint8 [rows, bytes], got {packed.dtype} {tuple(packed.shape)}")
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [1, {MAX_BITS}], got {bits}")
    if packed.shape[1] != packed_row_bytes(n, bits):
        raise ValueError(f"{packed.shape[1]} packed bytes per row cannot hold exactly {n} ids of {bits} bits")


def pack_ids(ids: torch.Tensor, bits: int) -> torch.Tensor:
    """ids [rows, n] (any integer dtype, values in [0, 2**bits)) -> uint8 [rows, packed_row_bytes(n, bits)],
    on the device of `ids`."""
    _check_ids(ids, bits)
    return _pack_numpy(ids, bits) if ids.device.type == "cpu" else _pack_torch(ids, bits)


def unpack_ids(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """uint8 [rows, packed_row_bytes(n, bits)] -> int32 ids [rows, n], on the device of `packed`."""
    _check_packed(packed, n, bits)
    return _unpack_numpy(packed, n, bits) if packed.device.type == "cpu" else _unpack_torch(packed, n, bits)


# On the host numpy's packbits/unpackbits (C loops) are ~15x faster than torch bit planes; on a GPU the
# torch bit planes are a few elementwise kernels. Both write the same bytes (tested).
def _pack_numpy(ids: torch.Tensor, bits: int) -> torch.Tensor:
    rows, n = ids.shape
    as_bytes = ids.to(torch.int32).numpy().astype("<i4").view(np.uint8).reshape(rows, n, 4)
    stream = np.unpackbits(as_bytes, axis=-1, bitorder="little")[..., :bits].reshape(rows, n * bits)
    return torch.from_numpy(np.packbits(stream, axis=-1, bitorder="little"))


def _unpack_numpy(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    rows = packed.shape[0]
    stream = np.unpackbits(packed.numpy(), axis=-1, bitorder="little")[:, : n * bits].reshape(rows, n, bits)
    words = np.zeros((rows, n, 32), dtype=np.uint8)
    words[..., :bits] = stream
    return torch.from_numpy(np.packbits(words, axis=-1, bitorder="little").view("<i4").reshape(rows, n).copy())


def _pack_torch(ids: torch.Tensor, bits: int) -> torch.Tensor:
    rows, n = ids.shape
    ids = ids.to(torch.int32)  # < 2**31 by the range check; half the memory of int64 bit planes
    nbytes = packed_row_bytes(n, bits)
    planes = (ids.unsqueeze(-1) >> torch.arange(bits, device=ids.device, dtype=torch.int32)) & 1  # [rows, n, bits]
    stream = planes.reshape(rows, n * bits).to(torch.uint8)
    pad = nbytes * 8 - n * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    weights = _bit_weights(8, ids.device, torch.int32)
    return (stream.reshape(rows, nbytes, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def _unpack_torch(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    rows, nbytes = packed.shape
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    stream = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    planes = stream.reshape(rows, nbytes * 8)[:, : n * bits].reshape(rows, n, bits)
    return (planes * _bit_weights(bits, packed.device, torch.int32)).sum(-1, dtype=torch.int32)
