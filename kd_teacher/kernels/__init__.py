"""GPU kernels. `fused_local_topk_stats` is the fused per-shard top-k + log-sum-exp pass that
`kd_teacher.topk` dispatches CUDA tensors to; `fused_tail_stats` / `fused_tail_grad` are the fused
passes of the KD loss's student side (`kd_teacher.losses.student`). Each returns None where it does not apply
(no Triton, CPU tensors, unsupported dtype or k), and the caller then runs the PyTorch reference."""

from kd_teacher.kernels.kd_loss import (
    KDLossKernelConfig,
    fused_tail_grad,
    fused_tail_stats,
    kd_loss_kernel_applies,
)
from kd_teacher.kernels.topk_lse import (
    MAX_K,
    KernelPlan,
    TopKKernelConfig,
    fused_local_topk_stats,
    kernel_available,
    plan_for,
)

__all__ = [
    "fused_local_topk_stats", "kernel_available", "plan_for", "KernelPlan", "TopKKernelConfig", "MAX_K",
    "fused_tail_stats", "fused_tail_grad", "kd_loss_kernel_applies", "KDLossKernelConfig",
]
