"""Cut a payload to this rank's context-parallel shard of the sequence, the way Megatron-Core cuts the batch.

Megatron-Core's `get_batch_on_this_cp_rank` (megatron/core/utils.py, 0.16 and 0.19.2) splits the sequence into
2 x cp chunks and gives CP rank r the chunks r and 2 x cp - 1 - r, in that order, so that causal attention work
is balanced. Tokens, labels and loss_mask are cut that way before the forward; the student's logits on a CP rank
are therefore [b, 2 * s / (2 * cp), V/TP], and the teacher payload (computed for whole sequences) must be cut
the same way to line up with them.

This is the per-sequence split (batches of whole sequences, `cu_seqlens` absent). Packed sequences with
per-document balancing (megatron-core 0.19's `cu_seqlens` path) are not handled here.

The token hashes in the header stay those of the whole sequences: check the payload against the micro-batch's
tokens (`TopKPayload.check_tokens`) *before* cutting, while both are whole.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from kd_teacher.payload import PayloadError, TopKPayload


def _cp_layout(cp_size: Optional[int], cp_rank: Optional[int], cp_group) -> tuple[int, int]:
    if cp_group is not None:
        return cp_group.size(), cp_group.rank()
    if cp_size is not None:
        return int(cp_size), int(cp_rank or 0)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1, 0
    return parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()


def cp_positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Sequence positions [2 * seq_len / (2 * cp_size)] that CP rank `cp_rank` holds, in its order."""
    if cp_size < 1 or not (0 <= cp_rank < cp_size):
        raise ValueError(f"context-parallel rank {cp_rank} of size {cp_size} is not a valid layout")
    if seq_len % (2 * cp_size):
        raise PayloadError(
            f"sequence length {seq_len} is not divisible by 2 x context-parallel size = {2 * cp_size}, "
            "as Megatron-Core's context parallelism requires"
        )
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second_start = (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, torch.arange(second_start, second_start + chunk, device=device)])


def payload_for_cp_rank(payload: TopKPayload, cp_size: Optional[int] = None, cp_rank: Optional[int] = None,
                        *, cp_group=None) -> TopKPayload:
    """The part of `payload` that lines up with this CP rank's student logits.

    The layout comes from `cp_group`, else from `cp_size`/`cp_rank`, else from Megatron's parallel_state
    (CP size 1 if it is not initialised). With CP size 1 the payload is returned unchanged.
    """
    size, rank = _cp_layout(cp_size, cp_rank, cp_group)
    if size == 1:
        return payload
    pos = cp_positions(payload.header.seq_len, size, rank, device=payload.values.device)
    return TopKPayload(
        payload.values.index_select(1, pos),
        payload.indices.index_select(1, pos),
        payload.lse.index_select(1, pos),
        replace(payload.header, seq_len=int(pos.numel())),
    )
