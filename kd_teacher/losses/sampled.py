"""The KD loss against a sampled payload (`extraction="sampled"`): an unbiased estimate of forward KL's gradient.

A sampled payload holds, per token, the distinct ids of k draws from the teacher's p = softmax(z_t / T) and
their counts c (summing to k). With q = softmax(z_s / T) the student's distribution, the loss per token is

    loss = -T^2 * sum_i (c_i / k) * log q(id_i)          (a cross-entropy against the draws)

E[c_i / k] = p(id_i) for every id (each draw is p-distributed), and the loss is linear in the counts, so
E[loss] = T^2 * CE(p, q) = T^2 * (KL(p || q) + H(p)): the full-vocabulary forward KL up to the teacher's entropy,
which does not depend on the student. Its gradient with respect to the student's logits is, per token,

    T * (q * sum_i c_i / k - c / k) = T * (q - c / k)      (sum_i c_i = k)

whose expectation is T * (q - p), the gradient of the dense T^2 * KL(p || q). So the loss's gradient is an
unbiased estimate of the dense forward-KL gradient (Anshumann et al., ACL 2025; docs/sampled_kd.md derives it
and tests/test_sampled.py checks it against a float64 dense reference).

log q at the ids is the student's bucket log-prob with the tail bucket (`student_buckets`, tail=True): there
each id's log-prob is normalised over the whole true vocabulary, vocab-parallel and, on a GPU, through the same
fused Triton passes as the top-k loss. The tail bucket itself gets weight 0.

Other divergences have no such estimate: reverse KL, sum_x q log(q / p), and the JSD, whose mixture m = b p +
(1 - b) q sits inside a log, are not linear in p, so no weighting of teacher draws makes their expectation (or
that of their gradient) the dense one. They are refused (`why_not_sampled`).
"""

from __future__ import annotations

from typing import Optional

import torch

from kd_teacher.payload import TopKPayload, bad_counts

SAMPLED_KINDS = ("forward_kl",)


def why_not_sampled(kind: str, tail: bool) -> Optional[str]:
    """None when the loss options have an unbiased sampled form; otherwise why not."""
    if kind not in SAMPLED_KINDS:
        return (f"KD loss kind {kind!r} has no unbiased estimate from a sampled payload: reverse KL and JSD are "
                "not linear in the teacher's probabilities (they weigh log p or log of a teacher-student mixture "
                "by the student's own probabilities), so averaging teacher draws does not give their value or "
                "gradient. Use kind='forward_kl' with sampled payloads, or a top-k payload (extraction 'topk') "
                "for reverse KL / JSD")
    if not tail:
        return ("tail=False renormalises the student over the payload's ids, which biases a sampled payload's "
                "estimate; sampled payloads are always scored against the student's full-vocabulary probabilities "
                "(leave tail=True)")
    return None


def sampled_cross_entropy(student_logp_at_ids: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    """Per row [N]: -sum_i (c_i / k) log q(id_i), from the student's log-probs at the ids [N, k] and the counts."""
    weights = counts.to(student_logp_at_ids.dtype) / k
    # A count-0 slot contributes exactly 0 (and no gradient), also where the student gives its id -inf.
    return -torch.where(weights > 0, weights * student_logp_at_ids, 0.0).sum(dim=1)


def missing_mass(payload: TopKPayload) -> torch.Tensor:
    """[b, s] Good-Turing estimate of the teacher's mass outside the drawn ids: ids drawn exactly once / k.
    (What the report calls the teacher tail mass for a sampled payload.)"""
    return (payload.values == 1).sum(dim=-1).to(torch.float32) / payload.k


def sampled_value_flags(payload: TopKPayload) -> torch.Tensor:
    """0-d bool on the payload's device: ids out of range, non-finite values or LSE, or values that are not k
    non-negative integer counts per token (validate() names which)."""
    h = payload.header
    ids = payload.indices
    invalid = ((ids < 0) | (ids >= h.vocab_size)).any()
    invalid |= ~(torch.isfinite(payload.values).all() & torch.isfinite(payload.lse).all())
    return invalid | bad_counts(payload.values, h.k)
