"""Divergences between the teacher's and the student's bucket distributions, and the teacher's buckets.

Buckets: the teacher's k ids plus one tail bucket with the rest of the mass (tail=True), or the k ids alone,
both sides renormalised over them (tail=False, the truncated variant other tools use; it ignores how much mass
each side puts outside the k ids, so it is a divergence between conditionals, not a bound on the full KL).

All functions take log-probs [N, B] and return one value per row [N]. Buckets with zero mass (log-prob -inf,
e.g. the tail when k covers the whole vocabulary) contribute exactly 0, with gradients free of NaN.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

KINDS = ("forward_kl", "reverse_kl", "jsd")
NEG_INF = float("-inf")
# Relative resolution of the teacher's fp32 LSE as a mass: 2^-20 covers the rounding of a float32 sum of
# exponentials over ~1e5..1e6 terms (log2(V) x 2^-24) with margin.
TAIL_RESOLUTION = 2.0 ** -20


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0, accurate at both ends (Maechler 2012: expm1 near 0, log1p far from it)."""
    a = a.clamp(max=0.0)
    near_zero = a > -math.log(2.0)
    return torch.where(near_zero, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(torch.where(near_zero, -1.0, a))))


def teacher_bucket_logp(values: torch.Tensor, lse: torch.Tensor, temperature: float, tail: bool,
                        dtype: torch.dtype, covers_vocab: bool = False,
                        student_log_tail: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Teacher log-probs [N, k+1] (k ids, tail) or renormalised [N, k] from raw values [N, k] and lse [N].

    The tail is log(1 - exp(logsumexp(top-k log-probs))): a log-sum-exp difference against the full-vocabulary
    LSE the teacher recorded, never `1 - sum(p)` in the values' dtype. When the k ids are the whole vocabulary
    (`covers_vocab`) the tail is exactly empty, whatever rounding left in the difference.

    The payload knows the tail only to the resolution of its fp32 LSE, r = TAIL_RESOLUTION x max(1, |lse|).
    A tail below r is noise, and taken at face value it would dominate reverse KL (q log(q / noise)) or, floored
    at r, forward KL. So an unresolved tail is read as "somewhere in [0, r]" and set to the point of that
    interval nearest the student's own tail (`student_log_tail`, detached): no loss when the student is
    consistent with the teacher, a push towards r when it is not. The buckets are then renormalised.

    Computed in float64 (it is only [N, k]): fp32 arithmetic on values / T - lse would add rounding of its own.
    """
    logp = values.double() / temperature - lse.double().unsqueeze(1)
    top = torch.logsumexp(logp, dim=1, keepdim=True)
    if not tail:
        return (logp - top).to(dtype)
    if covers_vocab:
        return torch.cat([logp, torch.full_like(top, NEG_INF)], dim=1).to(dtype)
    face = log1mexp(top)
    resolution = torch.log(TAIL_RESOLUTION * lse.double().abs().clamp(min=1.0)).unsqueeze(1)
    nearest = resolution if student_log_tail is None else \
        torch.minimum(student_log_tail.detach().double().unsqueeze(1), resolution)
    rest = torch.where(face < resolution, nearest, face)
    buckets = torch.cat([logp, rest], dim=1)
    return (buckets - torch.logsumexp(buckets, dim=1, keepdim=True)).to(dtype)


def renormalised(scaled_logits: torch.Tensor) -> torch.Tensor:
    """Student log-probs over the k ids alone, from logits / T at those ids."""
    return scaled_logits - torch.logsumexp(scaled_logits, dim=1, keepdim=True)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row; buckets where p = 0 contribute 0 (their gradient too, hence the double `where`)."""
    has_mass = logp > NEG_INF
    lp = torch.where(has_mass, logp, 0.0)
    lq = torch.where(has_mass, logq, 0.0)
    return torch.where(has_mass, lp.exp() * (lp - lq), 0.0).sum(dim=1)


def generalized_jsd(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * KL(p || m) + (1 - beta) * KL(q || m) with m = beta * p + (1 - beta) * q (GKD, Agarwal et al. 2024).

    As in GKD's reference implementation, beta = 0 and beta = 1 are taken as forward and reverse KL (the
    formula itself tends to 0 at both ends).
    """
    if beta == 0.0:
        return kl(logp, logq)
    if beta == 1.0:
        return kl(logq, logp)
    empty = (logp == NEG_INF) & (logq == NEG_INF)
    # logaddexp(-inf, -inf) has a NaN gradient: feed it zeros where both sides are empty, mask the result.
    mix = torch.logaddexp(torch.where(empty, 0.0, logp) + math.log(beta),
                          torch.where(empty, 0.0, logq) + math.log1p(-beta))
    logm = torch.where(empty, NEG_INF, mix)
    return beta * kl(logp, logm) + (1.0 - beta) * kl(logq, logm)


def divergence(kind: str, teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row divergence of `kind` between teacher and student bucket log-probs."""
    if kind == "forward_kl":
        return kl(teacher_logp, student_logp)
    if kind == "reverse_kl":
        return kl(student_logp, teacher_logp)
    if kind == "jsd":
        return generalized_jsd(teacher_logp, student_logp, beta)
    raise ValueError(f"unknown KD loss kind {kind!r}; expected one of {KINDS}")
