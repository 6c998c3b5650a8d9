"""Student-side KD losses over the teacher's `TopKPayload`, on Megatron's vocab-parallel logits.

`kd_loss` gives the per-token loss, `kd_loss_and_report` Megatron-Core's `(loss, num_tokens, report)` form,
`payload_for_cp_rank` cuts a payload to this rank's context-parallel shard of the sequence, and `fused_ce_kd`
computes the student's cross-entropy and the KD term's student side in one pass over the logits.
"""

from kd_teacher.losses.ce_kd import fused_ce_kd
from kd_teacher.losses.context_parallel import cp_positions, payload_for_cp_rank
from kd_teacher.losses.divergences import KINDS
from kd_teacher.losses.kd import KDLossError, kd_loss, kd_loss_and_report, kd_terms, megatron_cross_entropy
from kd_teacher.losses.student import StudentLogitsError

__all__ = [
    "KINDS", "KDLossError", "StudentLogitsError", "kd_loss", "kd_loss_and_report", "kd_terms",
    "megatron_cross_entropy", "cp_positions", "payload_for_cp_rank", "fused_ce_kd",
]
