"""Mixture-of-experts teachers in teacher mode: dropless unless told otherwise, and never repacked.

| MoE configuration | a sequence's output depends on its micro-batch? | engine policy |
| --- | --- | --- |
| dropless (no capacity factor) | measured: yes, in the last bits. Routing is per token, but how many tokens each expert's GEMM gets changes with the batch, and GEMM kernels reduce in a shape-dependent order (CPU, Mixtral-shaped tiny teacher, fp32: row 0 alone vs in a batch of 4 differed by 9.5e-7 in 1 of 5 batches; `benchmarks/teacher_mode.py --moe` measures it on a GPU) | each student micro-batch exactly as given |
| token dropping (`moe.expert_capacity_factor`) | yes, by design: which tokens an expert drops depends on the rest of the batch | refused unless `engine.accept_moe_token_dropping: true`; then each micro-batch exactly as given, and the choice is part of the teacher fingerprint |

"Exactly as given" is what the consistency contract needs anyway: the training forward of a student
micro-batch sees that micro-batch and nothing else.

Expert parallelism runs beside TP/PP: Megatron-Core folds the EP ranks out of TP x DP. Where an expert group
reaches beyond one model-parallel (TP x PP) group, i.e. over teacher data-parallel ranks, every forward is a
collective of those ranks: they must score together (the same number of forwards). The training hook's
in-process teacher and `score` called on every rank do; a dump or a server, whose data-parallel replicas work
on their own requests, would hang, so they refuse such a layout (`require_independent_replicas`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class MoETokenDroppingError(ValueError):
    """A MoE teacher would drop tokens (capacity factor) and that was not accepted for serving."""


@dataclass(frozen=True)
class MoEServing:
    """What a MoE teacher's routing means for serving; `record()` goes into the teacher fingerprint."""

    num_experts: int
    router_topk: int
    # None: dropless; else the capacity settings, in words.
    token_dropping: Optional[str]
    # Every expert group lies within one model-parallel group, so data-parallel replicas run independently.
    replicas_independent: bool = True

    @property
    def batch_dependence(self) -> str:
        if self.token_dropping:
            return f"MoE token dropping ({self.token_dropping}) makes a token's output depend on its batch"
        return ("MoE (dropless): the tokens each expert's GEMM sees change with the micro-batch, and so do the "
                "last bits of a sequence's outputs")

    def record(self) -> dict:
        return {"moe_token_dropping": self.token_dropping}


def moe_serving(tconfig, accept_token_dropping: bool = False) -> Optional[MoEServing]:
    """None for a dense model; refuses a dropping MoE unless `accept_token_dropping` (EngineConfig's
    `accept_moe_token_dropping`)."""
    experts = getattr(tconfig, "num_moe_experts", None)
    if not experts:
        return None
    capacity = getattr(tconfig, "moe_expert_capacity_factor", None)
    dropping = None
    if capacity is not None:
        dropping = (f"capacity factor {capacity}, drop policy {tconfig.moe_token_drop_policy}"
                    + (", padded to capacity" if tconfig.moe_pad_expert_input_to_capacity else ""))
        if not accept_token_dropping:
            raise MoETokenDroppingError(
                f"the MoE teacher drops tokens ({dropping}): a token's top-k would then depend on which other "
                "sequences share its micro-batch. Serve it dropless (moe.expert_capacity_factor: null), or set "
                "engine.accept_moe_token_dropping: true to accept it (recorded in the teacher fingerprint)"
            )
    return MoEServing(num_experts=int(experts), router_topk=int(tconfig.moe_router_topk), token_dropping=dropping,
                      replicas_independent=_experts_within_model_parallel())


def _experts_within_model_parallel() -> bool:
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    if not (dist.is_initialized() and mpu.model_parallel_is_initialized()):
        return True
    experts = dist.get_process_group_ranks(mpu.get_expert_tensor_model_pipeline_parallel_group())
    return set(experts) <= set(dist.get_process_group_ranks(mpu.get_model_parallel_group()))


def require_independent_replicas(moe: Optional[MoEServing], what: str) -> None:
    """Refuse to run `what` (whose data-parallel replicas score their own requests) with a MoE teacher whose
    expert groups span data-parallel ranks (see the module docstring)."""
    if moe is not None and not moe.replicas_independent:
        raise ValueError(
            f"{what}: the MoE teacher's expert-parallel groups span teacher data-parallel ranks, which would have "
            "to run every forward together while each serves its own requests. Use expert_model_parallel_size x "
            "expert_tensor_parallel_size <= tensor_model_parallel_size, or one data-parallel replica"
        )
