"""`kd_loss`: the KD loss of vocab-parallel student logits against a teacher's `TopKPayload`, per token.

`kd_loss_and_report` reduces it (mixed with the student's cross-entropy by `alpha`) to Megatron-Core's
loss-function contract `(loss_sum, num_tokens, report)`: the pipeline schedules divide `loss_sum` by
`num_tokens` themselves (see `forward_step_calc_loss` in megatron/core/pipeline_parallel/schedules.py).

Layouts. Student logits are `[b, s, V/TP]`: this rank's shard of the padded vocabulary, either contiguous
or Megatron's output-layer tensor `[s, b, V/TP]` transposed (`.transpose(0, 1)`, a view: no copy is made).
With sequence parallelism the output layer all-gathers the sequence before its matmul (ColumnParallelLinear
with `sequence_parallel=True`), so the logits hold the *whole* sequence on every TP rank and the payload is
used as it is. With context parallelism each rank holds its own 2 x cp chunks of the sequence: cut the payload
with `payload_for_cp_rank` the same way Megatron cuts the batch.

Padding. Megatron pads the vocabulary to a multiple of `make_vocab_size_divisible_by x TP`; the student's
distribution here is over the true vocabulary (the payload's), as the teacher's is, so padding columns get
no probability and no gradient. (Megatron's own cross-entropy does include them.)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from kd_teacher.contract import TeacherContract
from kd_teacher.losses.divergences import KINDS, divergence, log1mexp, renormalised, teacher_bucket_logp
from kd_teacher.losses.sampled import missing_mass, sampled_cross_entropy, sampled_value_flags, why_not_sampled
from kd_teacher.losses.student import StudentBuckets, raise_on_bad_rows, student_buckets, token_rows
from kd_teacher.payload import PayloadError, TopKPayload


class KDLossError(ValueError):
    """The KD loss was called with inputs that do not fit together; the message names the mismatch."""


@dataclass
class KDTerms:
    """Per-token pieces of the KD loss, [b, s] each; used by `kd_loss_and_report`."""

    loss: torch.Tensor  # T^2-scaled divergence, 0 where masked
    mask: torch.Tensor  # bool, True where the token counts
    top1_agrees: torch.Tensor  # bool: the student's argmax is the teacher's top-1 id
    teacher_tail: torch.Tensor  # teacher mass outside its k ids
    student_tail: Optional[torch.Tensor]  # student mass outside the teacher's k ids (tail=True only)
    # defer_checks=True: [invalid payload, repeated ids, bad student rows] int64 on the device, for raise_on_checks
    checks: Optional[torch.Tensor] = None


# ---- input checks (before any collective, so that every TP rank fails the same way) ------------------------

def _group_size(group) -> int:
    if group is None:
        return 1
    if not dist.is_initialized():
        raise KDLossError("a TP group was given but torch.distributed is not initialised")
    return dist.get_world_size(group)


def _check_contract(payload: TopKPayload, temperature: Optional[float], vocab_size: Optional[int]) -> None:
    """The payload serves what this loss computes: its temperature, the student's true vocabulary (top-k and
    sampled ids both: `kd_terms` scores each its own way)."""
    expected = TeacherContract(temperature=temperature, vocab_size=vocab_size)
    payload.header.check(expected, served="the teacher payload", expecting="the loss", error=KDLossError)


def _check_student_vocab(payload: TopKPayload, v_local: int, tp: int) -> int:
    teacher_vocab = payload.header.vocab_size
    if v_local * tp < teacher_vocab:
        raise KDLossError(
            f"student logits cover {v_local} x TP {tp} = {v_local * tp} ids, fewer than the payload's "
            f"vocabulary of {teacher_vocab}: wrong TP group, or logits not from this tokenizer"
        )
    return teacher_vocab


def _check_payload(payload, b: int, s: int) -> None:
    if not isinstance(payload, TopKPayload):
        raise KDLossError(f"payload must be a TopKPayload, got {type(payload).__name__}")
    h = payload.header
    if (h.batch, h.seq_len) != (b, s):
        raise KDLossError(
            f"payload is for [batch, seq] = [{h.batch}, {h.seq_len}] but the student logits are [{b}, {s}, V/TP] "
            "(pass Megatron's [s, b, V/TP] output as .transpose(0, 1); with context parallelism cut the payload "
            "with payload_for_cp_rank)"
        )
    payload.validate(values=False)  # header, shapes, dtypes; the values are checked by _payload_value_flags


# Each host read of a GPU tensor stalls the CPU's run-ahead of the GPU. So the value checks are computed on the
# device as flags and read once per call, together with the student's bad-row count, after the loss is built
# (the loss never indexes out of range on bad ids: ids outside the shard count as not owned). Any flag set:
# the full checks run again on the host, for the message.
def _payload_value_flags(payload: TopKPayload) -> torch.Tensor:
    """[2] int64: validate()'s value checks failed; ids repeat within a token."""
    h = payload.header
    if payload.values.numel() == 0:
        return torch.zeros(2, dtype=torch.int64, device=payload.values.device)
    ids = payload.indices
    if payload.sampled:
        invalid = sampled_value_flags(payload)
    else:
        invalid = ((ids < 0) | (ids >= h.vocab_size)).any()
        invalid |= ~(torch.isfinite(payload.values).all() & torch.isfinite(payload.lse).all())
        invalid |= (payload.values.float() / h.temperature - payload.lse.unsqueeze(-1)).amax() > 1e-3
    repeated = torch.zeros_like(invalid)
    if h.k > 1:
        ids = ids.sort(dim=-1).values
        repeated = (ids[..., 1:] == ids[..., :-1]).any()
    return torch.stack([invalid, repeated]).to(torch.int64)


def raise_on_checks(payload: TopKPayload, checks) -> None:
    """Raise on the values of `KDTerms.checks` ([invalid, repeated, bad rows], read on the host) naming the
    problem; nothing when all are 0."""
    invalid, repeated, n_bad = (int(x) for x in checks)
    if invalid:
        payload.validate()
        raise PayloadError("payload values, ids or lse failed validation")  # not reached: validate() names it
    if repeated:
        raise PayloadError("payload has repeated ids within a token: top-k ids must be distinct")
    raise_on_bad_rows(n_bad)


def _check_mask(loss_mask, b: int, s: int, device) -> torch.Tensor:
    if loss_mask is None:
        return torch.ones(b, s, dtype=torch.bool, device=device)
    if not isinstance(loss_mask, torch.Tensor) or tuple(loss_mask.shape) != (b, s):
        shape = tuple(loss_mask.shape) if isinstance(loss_mask, torch.Tensor) else type(loss_mask).__name__
        raise KDLossError(f"loss_mask must be [batch, seq] = [{b}, {s}], got {shape}")
    return loss_mask.to(device)


def _check_options(kind: str, beta: float, chunk_tokens) -> None:
    if kind not in KINDS:
        raise KDLossError(f"unknown KD loss kind {kind!r}; expected one of {list(KINDS)}")
    if not (0.0 <= float(beta) <= 1.0):
        raise KDLossError(f"beta must be in [0, 1], got {beta}")
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise KDLossError(f"chunk_tokens must be a positive integer or None, got {chunk_tokens!r}")


# ---- the loss ----------------------------------------------------------------------------------------------

def kd_terms(student_logits, payload, *, kind="forward_kl", temperature=None, tail=True, beta=0.5,
             loss_mask=None, group=None, vocab_size=None, chunk_tokens=None, student: Optional[StudentBuckets] = None,
             defer_checks: bool = False) -> KDTerms:
    """The per-token KD loss and the statistics the report needs (see `kd_loss` for the arguments).

    student: the student's side, already computed from these logits' rows (`fused_ce_kd`, which computes it with
        the cross-entropy in one pass); None: computed here (`student_buckets`).
    defer_checks: leave the value checks of the payload and the student's bad-row count on the device, in
        `KDTerms.checks`, for the caller to read later and pass to `raise_on_checks` before the loss is used;
        False: read them here (the one host read of the call) and raise.
    """
    _check_options(kind, beta, chunk_tokens)
    rows = token_rows(student_logits)
    b, s, v_local = student_logits.shape
    _check_payload(payload, b, s)
    if payload.sampled and why_not_sampled(kind, tail) is not None:
        raise KDLossError(why_not_sampled(kind, tail))
    _check_contract(payload, temperature, vocab_size)
    t = float(payload.header.temperature)
    vocab = _check_student_vocab(payload, v_local, _group_size(group))
    weights = _check_mask(loss_mask, b, s, student_logits.device)
    if payload.values.device != student_logits.device:
        payload = payload.to(student_logits.device)
    payload_flags = _payload_value_flags(payload)

    if student is None:
        student = student_buckets(rows.rows, rows.to_rows(payload.indices), vocab_size=vocab, temperature=t,
                                  tail=tail, group=group, chunk_tokens=chunk_tokens, check=False)
    dtype = student.logp.dtype
    if payload.sampled:  # kd_teacher.losses.sampled: an unbiased estimate, not a divergence (may be < KL)
        per_row = sampled_cross_entropy(student.logp[:, :-1], rows.to_rows(payload.values), payload.k) * (t * t)
    else:
        teacher = teacher_bucket_logp(rows.to_rows(payload.values), rows.to_rows(payload.lse), t, tail, dtype,
                                      covers_vocab=payload.k >= vocab,
                                      student_log_tail=student.logp[:, -1] if tail else None)
        student_logp = student.logp if tail else renormalised(student.logp)
        # Each divergence is >= 0; rounding can leave a token at -1e-8, which would let the sum go below 0.
        per_row = divergence(kind, teacher, student_logp, float(beta)).clamp(min=0.0) * (t * t)

    keep = weights != 0
    loss = torch.where(keep, rows.to_grid(per_row, b, s) * weights.to(dtype), 0.0)
    with torch.no_grad():
        top1 = payload.values.argmax(dim=-1, keepdim=True)
        at_top1 = torch.gather(rows.to_grid(student.logits_at_ids, b, s), -1, top1).squeeze(-1)
        top1_agrees = at_top1 >= rows.to_grid(student.max_logit, b, s)
        teacher_tail = _teacher_tail(payload, t, vocab)
        student_tail = rows.to_grid(student.logp[:, -1].exp(), b, s) if tail else None
    checks = torch.cat([payload_flags, student.bad_rows.reshape(1)])
    if not defer_checks:
        with torch.profiler.record_function("kd_teacher.kd_loss.read_checks"):
            values = checks.tolist()  # the one host read
        raise_on_checks(payload, values)
        checks = None
    return KDTerms(loss, keep, top1_agrees, teacher_tail, student_tail, checks)


def _teacher_tail(payload: TopKPayload, t: float, vocab: int) -> torch.Tensor:
    """The teacher's mass outside its k ids, as the payload states it (for the report); for a sampled payload
    the Good-Turing estimate of the mass outside the drawn ids."""
    if payload.sampled:
        return missing_mass(payload)
    if payload.k >= vocab:
        return torch.zeros_like(payload.lse)
    return log1mexp(torch.logsumexp(payload.log_probs().double(), dim=-1)).exp().float()


def kd_loss(student_logits: torch.Tensor, payload: TopKPayload, *, kind: str = "forward_kl",
            temperature: Optional[float] = None, tail: bool = True, beta: float = 0.5,
            loss_mask: Optional[torch.Tensor] = None, group: Optional[dist.ProcessGroup] = None,
            vocab_size: Optional[int] = None, chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Per-token KD loss [b, s] (fp32; exactly 0 at masked positions) of student logits against a payload.

    student_logits: [b, s, V/TP], this rank's vocabulary shard (bf16/fp16/fp32), contiguous or Megatron's
        [s, b, V/TP] output transposed as a view. `group`: the TP group (None: the whole vocabulary is here).
    payload: the teacher's top-k for the same [b, s] tokens (after `payload_for_cp_rank` with CP). A sampled
        payload (extraction "sampled") gives the cross-entropy against its draws, whose gradient is an unbiased
        estimate of the dense forward KL's (`kd_teacher.losses.sampled`); only kind "forward_kl" with tail=True.
    kind: "forward_kl" KL(teacher || student), "reverse_kl" KL(student || teacher), or "jsd" (generalized JSD
        with `beta`; 0 = forward KL, 1 = reverse KL).
    temperature: None = the payload's; another value is an error (the payload's LSE is only valid at its T).
        The loss is scaled by T^2 so that gradient magnitudes do not shrink with T (Hinton et al. 2015).
    tail: True = k teacher ids + 1 tail bucket with the rest of the mass on both sides (a true divergence of
        the coarse-grained distributions, >= 0); False = both sides renormalised over the k ids.
    loss_mask: [b, s] (bool or float weights, Megatron's loss_mask); 0 entries give exactly 0 and no gradient.
    vocab_size: the student's true vocabulary, checked against the payload's (None: take the payload's).
    chunk_tokens: process this many tokens at a time, bounding the fp32 working buffer to chunk x V/TP.
    """
    return kd_terms(student_logits, payload, kind=kind, temperature=temperature, tail=tail, beta=beta,
                    loss_mask=loss_mask, group=group, vocab_size=vocab_size, chunk_tokens=chunk_tokens).loss


# ---- the reduced form: Megatron's loss-function contract ---------------------------------------------------

def megatron_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, group=None,
                           vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token [b, s] cross-entropy from Megatron-Core's `vocab_parallel_cross_entropy` (its TP group)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    b, s, v_local = student_logits.shape
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (b, s):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise KDLossError(f"labels must be [batch, seq] = [{b}, {s}], got {shape}")
    if not parallel_state.model_parallel_is_initialized():
        raise KDLossError("labels= needs Megatron's parallel_state (the CE is vocab_parallel_cross_entropy); "
                          "initialise it, or pass the per-token ce_loss you already have")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp != _group_size(group):
        raise KDLossError(f"Megatron's TP size is {tp} but the KD loss was given a group of {_group_size(group)}")
    limit = vocab_size if vocab_size is not None else v_local * tp
    if labels.numel():
        lo, hi = torch.stack(torch.aminmax(labels)).tolist()  # one host read, not two
        if lo < 0 or hi >= limit:
            raise KDLossError(f"labels range [{lo}, {hi}] is outside [0, {limit})")
    rows = token_rows(student_logits)
    logits, target = (student_logits.transpose(0, 1), labels.transpose(0, 1)) if rows.seq_major else \
        (student_logits, labels)
    if logits.dtype == torch.float32:
        # Megatron's CE subtracts the max and exponentiates *in place* when its input is already fp32 (it
        # owns the logits in Megatron-LM); here the KD term still needs them, so it gets its own copy.
        logits = logits.clone()
    # megatron-core >= 0.19 takes the TP group as an argument; 0.16 reads it from parallel_state (checked above).
    takes_group = "tp_group" in inspect.signature(vocab_parallel_cross_entropy).parameters
    extra = {"tp_group": group} if takes_group and group is not None else {}
    ce = vocab_parallel_cross_entropy(logits, target.long(), **extra)
    return ce.transpose(0, 1) if rows.seq_major else ce


def kd_loss_and_report(student_logits: torch.Tensor, payload: TopKPayload, *, labels=None, loss_mask=None,
                       alpha: float = 1.0, ce_loss: Optional[torch.Tensor] = None, **kd_kwargs):
    """(loss_sum, num_tokens, report) for Megatron-Core's pipeline schedules.

    loss per token = alpha * KD + (1 - alpha) * CE, summed over the unmasked tokens (weighted by a float
    loss_mask); num_tokens = count of unmasked tokens (int); the schedules divide by it. CE is `ce_loss` [b, s]
    if given (what Megatron-LM's `model(..., labels=...)` returns), else Megatron's vocab_parallel_cross_entropy
    on `labels`. With alpha = 1 a CE from `labels`/`ce_loss` is only reported. The report holds detached 0-d
    means over this rank's unmasked tokens: "kd loss", "ce loss" (if any CE), "kd top1 agreement",
    "teacher tail mass" and, with the tail bucket, "student tail mass".
    """
    if not (0.0 <= float(alpha) <= 1.0):
        raise KDLossError(f"alpha must be in [0, 1], got {alpha}")
    if alpha < 1.0 and labels is None and ce_loss is None:
        raise KDLossError(f"alpha={alpha} mixes in cross-entropy: pass labels= or ce_loss=")
    terms = kd_terms(student_logits, payload, loss_mask=loss_mask, **kd_kwargs)
    b, s = terms.loss.shape
    ce = _cross_entropy(student_logits, labels, ce_loss, alpha, b, s, kd_kwargs)

    weights = terms.loss.new_ones(()) if loss_mask is None else loss_mask.to(terms.loss)
    total = alpha * terms.loss
    if ce is not None and alpha < 1.0:
        total = total + torch.where(terms.mask, (1.0 - alpha) * ce.float() * weights, 0.0)
    loss_sum = total.sum()
    num_tokens = terms.mask.sum().to(torch.int)
    return loss_sum, num_tokens, _report(terms, ce, num_tokens)


def _cross_entropy(student_logits, labels, ce_loss, alpha, b, s, kd_kwargs):
    if ce_loss is not None:
        if not isinstance(ce_loss, torch.Tensor) or tuple(ce_loss.shape) != (b, s):
            shape = tuple(ce_loss.shape) if isinstance(ce_loss, torch.Tensor) else type(ce_loss).__name__
            raise KDLossError(f"ce_loss must be per-token [batch, seq] = [{b}, {s}], got {shape}")
        return ce_loss
    if labels is None:
        return None
    group, vocab = kd_kwargs.get("group"), kd_kwargs.get("vocab_size")
    if alpha < 1.0:
        return megatron_cross_entropy(student_logits, labels, group, vocab)
    with torch.no_grad():  # reported only: keep Megatron's saved softmax out of the graph
        return megatron_cross_entropy(student_logits, labels, group, vocab)


def _report(terms: KDTerms, ce, num_tokens) -> dict:
    count = num_tokens.clamp(min=1).float()
    mask = terms.mask

    def mean(x):
        return (torch.where(mask, x.detach().float(), 0.0).sum() / count).detach()

    report = {"kd loss": (terms.loss.detach().sum() / count)}
    if ce is not None:
        report["ce loss"] = mean(ce)
    report["kd top1 agreement"] = mean(terms.top1_agrees.float())
    report["teacher tail mass"] = mean(terms.teacher_tail)
    if terms.student_tail is not None:
        report["student tail mass"] = mean(terms.student_tail)
    return report
