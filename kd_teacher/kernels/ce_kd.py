"""Launchers of the fused cross-entropy + KD kernels (`ce_kd_triton`), or None where they do not apply.

`kd_teacher.losses.ce_kd` calls `fused_ce_kd_stats` in its forward and `fused_ce_kd_grad` in its backward; a
None answer sends it down its PyTorch path, the reference. Where the kernels apply is where the KD-loss kernels
apply (`kd_loss_kernel_applies`: CUDA, or CPU under Triton's interpreter; `KD_TEACHER_FUSED_KD_LOSS=0` turns
both off), and the tuning is theirs (`KDLossKernelConfig`).
"""

from __future__ import annotations

from typing import Optional

import torch

from kd_teacher.kernels.kd_loss import (
    DEFAULT_CONFIG,
    KDLossKernelConfig,
    device_scope,
    use_precise_exp,
    id_bitmask,
    kd_loss_kernel_applies,
)
from kd_teacher.kernels.triton_support import kernels_module


def _kernels():
    return kernels_module("ce_kd_triton")


def fused_ce_kd_stats(rows, pos, owned, valid: int, inv_t: float, config: Optional[KDLossKernelConfig] = None):
    """(max over all columns, sum of exp(z - that max), max over the `valid` columns, tail sum of
    exp((z - valid max) / T) over valid columns that are not owned ids), each [N] fp32; or None to fall back."""
    if not kd_loss_kernel_applies(rows) or _kernels() is None:
        return None
    config = config or DEFAULT_CONFIG
    n, v_local = rows.shape
    mask = id_bitmask(pos, owned, v_local)
    out = [torch.empty(n, dtype=torch.float32, device=rows.device) for _ in range(4)]
    tile = config.words * 32
    with device_scope(rows):
        _kernels().ce_kd_stats_kernel[(n,)](
            rows, rows.stride(0), mask, mask.shape[1], v_local, valid, float(inv_t), *out, -(-v_local // tile),
            WORDS=config.words, SAME_SHIFT=valid == v_local and inv_t == 1.0,
            PRECISE_EXP=use_precise_exp(config, rows.dtype), num_warps=config.stats_num_warps,
        )
    return tuple(out)


def fused_ce_kd_grad(rows, pos, owned, valid: int, inv_t: float, label_col: torch.Tensor, ce_grad: torch.Tensor,
                     ce_shift: torch.Tensor, kd_shift: Optional[torch.Tensor], kd_scale: Optional[torch.Tensor],
                     config: Optional[KDLossKernelConfig] = None):
    """The logits' gradient [N, V_local] in their dtype, 0 at the owned ids (see `ce_kd_grad_kernel`), or None.

    label_col: [N] int, the label's column in this shard or -1; ce_grad, ce_shift: [N] fp32; kd_shift, kd_scale:
    [N] fp32, or None for no KD tail (KD without the tail bucket has gradient at the ids only).
    """
    if not kd_loss_kernel_applies(rows) or _kernels() is None:
        return None
    config = config or DEFAULT_CONFIG
    n, v_local = rows.shape
    mask = id_bitmask(pos, owned, v_local)
    grad = torch.empty(n, v_local, dtype=rows.dtype, device=rows.device)
    tail = kd_shift is not None

    def vec(t):
        return t.reshape(n).to(torch.float32).contiguous()

    ce_grad, ce_shift = vec(ce_grad), vec(ce_shift)
    kd_shift, kd_scale = (vec(kd_shift), vec(kd_scale)) if tail else (ce_shift, ce_grad)  # unread without TAIL
    tile = config.words * 32
    num_blocks = -(-v_local // tile)
    with device_scope(rows):
        _kernels().ce_kd_grad_kernel[(n * num_blocks,)](
            rows, rows.stride(0), grad, grad.stride(0), mask, mask.shape[1], v_local, valid, float(inv_t),
            label_col.to(torch.int32).contiguous(), ce_grad, ce_shift, kd_shift, kd_scale, num_blocks,
            WORDS=config.words, TAIL=tail, PRECISE_EXP=use_precise_exp(config, rows.dtype),
            num_warps=config.grad_num_warps,
        )
    return grad
