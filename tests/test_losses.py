"""KD losses against a float64 dense reference at TP = 1, 2, 4; gradcheck; bad input; a short training run.

The reference builds the student's full-vocabulary softmax in float64 from the same logits and the teacher's
buckets in float64 from the same payload (values, lse), then takes the divergence with plain autograd.
"""

import inspect
import math

import pytest
import torch

from kd_teacher.losses import (
    KDLossError, StudentLogitsError, cp_positions, kd_loss, kd_loss_and_report, kd_terms, payload_for_cp_rank,
)
from kd_teacher.losses.divergences import TAIL_RESOLUTION
from kd_teacher.losses.student import token_rows
from kd_teacher.payload import PayloadError, TopKPayload
from kd_teacher.testing.distributed import run_distributed

KINDS = ("forward_kl", "reverse_kl", "jsd")
BETA = 0.3


# ---- the float64 dense reference ---------------------------------------------------------------------------

def reference_kd(student, payload, *, kind, tail, temperature, vocab, beta=BETA, mask=None):
    """Per-token loss [b, s] in float64 from full student logits [b, s, V_padded] (differentiable)."""
    t = temperature
    ls_full = torch.log_softmax(student[..., :vocab].double() / t, dim=-1)
    ids = payload.indices.long()
    ls = ls_full.gather(-1, ids)
    lt = payload.values.double() / t - payload.lse.double().unsqueeze(-1)
    if tail:
        ls = torch.cat([ls, torch.log1p(-ls.exp().sum(-1, keepdim=True))], -1)
        # The teacher's tail is known to the fp32 LSE's resolution r only: below r it is read as the point of
        # [0, r] nearest the student's tail (see teacher_bucket_logp), then the buckets are renormalised.
        r = TAIL_RESOLUTION * payload.lse.double().abs().clamp(min=1).unsqueeze(-1)
        face = 1 - lt.exp().sum(-1, keepdim=True)
        p_tail = torch.where(face < r, torch.minimum(ls[..., -1:].detach().exp(), r), face)
        lt = torch.cat([lt, torch.log(p_tail)], -1)
        lt = lt - lt.logsumexp(-1, keepdim=True)
    else:
        ls = ls - ls.logsumexp(-1, keepdim=True)
        lt = lt - lt.logsumexp(-1, keepdim=True)

    def kl(a, b):
        return (a.exp() * (a - b)).sum(-1)

    if kind == "forward_kl":
        loss = kl(lt, ls)
    elif kind == "reverse_kl":
        loss = kl(ls, lt)
    else:
        m = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        loss = beta * kl(lt, m) + (1 - beta) * kl(ls, m)
    loss = loss * t * t
    if mask is not None:
        loss = torch.where(mask != 0, loss * mask.double(), torch.zeros_like(loss))
    return loss


def make_case(seed, *, b=2, s=6, vocab=90, padded=96, k=8, temperature=1.0, dtype=torch.float32,
              teacher_scale=3.0, student_scale=2.0):
    """Full teacher/student logits and the teacher's payload, the same on every rank (seeded)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, s, padded, generator=g) * teacher_scale
    student = (torch.randn(b, s, padded, generator=g) * student_scale).to(dtype)
    mask = (torch.rand(b, s, generator=g) > 0.3).float()
    upstream = torch.rand(b, s, generator=g) + 0.5  # a non-uniform grad_output, to check the backward fully
    payload = TopKPayload.from_logits(teacher, k, temperature=temperature, vocab_size=vocab)
    return student, payload, mask, upstream


def compare(student_full, payload, mask, upstream, *, kind, tail, temperature, vocab, tp=1, rank=0, group=None,
            seq_major=False, chunk_tokens=None):
    """(loss error, grad error, scale) of kd_loss on this rank's shard against the reference."""
    v_local = student_full.shape[-1] // tp
    shard = student_full[..., rank * v_local:(rank + 1) * v_local]
    if seq_major:  # Megatron's output layer layout [s, b, V/TP], handed over as a transposed view
        leaf = shard.transpose(0, 1).contiguous().requires_grad_()
        logits = leaf.transpose(0, 1)
    else:
        leaf = shard.contiguous().requires_grad_()
        logits = leaf
    loss = kd_loss(logits, payload, kind=kind, tail=tail, beta=BETA, loss_mask=mask, group=group,
                   chunk_tokens=chunk_tokens)
    (grad,) = torch.autograd.grad((loss * upstream).sum(), leaf)
    if seq_major:
        grad = grad.transpose(0, 1)
    full = student_full.detach().double().requires_grad_()
    ref = reference_kd(full, payload, kind=kind, tail=tail, temperature=temperature, vocab=vocab, mask=mask)
    (ref_grad,) = torch.autograd.grad((ref * upstream.double()).sum(), full)
    ref_grad = ref_grad[..., rank * v_local:(rank + 1) * v_local]
    assert loss.dtype == torch.float32 and loss.shape == mask.shape
    assert torch.all(loss[mask == 0] == 0), "masked positions must be exactly 0"
    return ((loss.double() - ref).abs().max().item(), (grad.double() - ref_grad).abs().max().item(),
            ref.abs().max().item(), ref_grad.abs().max().item())


def _assert_close(errors, dtype):
    loss_err, grad_err, loss_scale, grad_scale = errors
    # fp32 arithmetic against float64: gradients are differences of probabilities (p - q, O(1) terms), so their
    # rounding is absolute at fp32 epsilon x a few; a bf16 gradient also carries bf16's relative rounding.
    grad_rtol = 2 ** -8 if dtype == torch.bfloat16 else 0.0
    assert loss_err <= 1e-5 * (1 + loss_scale), errors
    assert grad_err <= 2e-6 + grad_rtol * grad_scale, errors


# ---- TP = 1, in process: every kind, T, tail, dtype and layout -----------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_matches_dense_reference_tp1(dtype, temperature):
    student, payload, mask, upstream = make_case(1, temperature=temperature, dtype=dtype)
    for kind in KINDS:
        for tail in (True, False):
            for seq_major in (False, True):
                errors = compare(student, payload, mask, upstream, kind=kind, tail=tail, temperature=temperature,
                                 vocab=90, seq_major=seq_major)
                _assert_close(errors, dtype)


# ---- TP = 2 and 4, real gloo groups ----------------------------------------------------------------------

TP_CASES = [  # (seed, temperature, dtype, seq_major, chunk_tokens)
    (2, 1.0, torch.float32, False, None),
    (3, 2.0, torch.float32, True, 5),
    (4, 0.5, torch.bfloat16, True, None),
]


def _tp_reference_check():
    from megatron.core import parallel_state as mpu

    tp, rank, group = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank(), \
        mpu.get_tensor_model_parallel_group()
    out = {}
    for seed, temperature, dtype, seq_major, chunk in TP_CASES:
        # padded 96 at TP=4: the last shard holds ids 72..95 of which 90..95 are padding
        student, payload, mask, upstream = make_case(seed, temperature=temperature, dtype=dtype)
        for kind in KINDS:
            for tail in (True, False):
                out[seed, kind, tail] = compare(student, payload, mask, upstream, kind=kind, tail=tail,
                                                temperature=temperature, vocab=90, tp=tp, rank=rank, group=group,
                                                seq_major=seq_major, chunk_tokens=chunk)
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_matches_dense_reference_tp(tp):
    per_rank = run_distributed(_tp_reference_check, tp, tp=tp)
    for results in per_rank:
        for (seed, _, _), errors in results.items():
            dtype = next(c[2] for c in TP_CASES if c[0] == seed)
            _assert_close(errors, dtype)


def _tp_checks_and_report():
    """At TP=2: NaN on one rank only, the reduced form with Megatron's CE, and the schedule's loss contract."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
    from megatron.core.transformer import TransformerConfig

    rank, group = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_group()
    student, payload, mask, _ = make_case(5, temperature=1.0)
    shard = student[..., rank * 48:(rank + 1) * 48].contiguous()
    result = {}

    poisoned = shard.clone()
    if rank == 1:
        poisoned[1, 2, 7] = float("nan")
    try:
        kd_loss(poisoned, payload, group=group)
        result["nan"] = None
    except StudentLogitsError as e:
        result["nan"] = str(e)

    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 90, mask.shape, generator=g)
    leaf = shard.clone().requires_grad_()
    loss_sum, num_tokens, report = kd_loss_and_report(leaf, payload, labels=labels, loss_mask=mask, alpha=0.7,
                                                      group=group)
    (grad,) = torch.autograd.grad(loss_sum, leaf)
    result["reduced"] = (loss_sum.detach(), num_tokens, {k: v.detach() for k, v in report.items()},
                         grad[..., :48].detach())  # Megatron's CE hands back its own buffer, flagged

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, calculate_per_token_loss=False)
    out, n = forward_step_calc_loss(
        None, shard.clone(), lambda logits: kd_loss_and_report(logits, payload, loss_mask=mask, group=group),
        config, None, False, 2, [], cp_group_size=1, is_last_stage=True)
    result["schedule"] = (out.detach(), n)
    return result


def test_tp2_nan_on_one_rank_reduced_form_and_schedule_contract():
    per_rank = run_distributed(_tp_checks_and_report, 2, tp=2)
    student, payload, mask, _ = make_case(5, temperature=1.0)
    for result in per_rank:  # both ranks raise, neither hangs in a collective
        assert result["nan"] is not None and "NaN" in result["nan"] and "1 token" in result["nan"]

    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 90, mask.shape, generator=g)
    full = student.double().requires_grad_()
    kd = reference_kd(full, payload, kind="forward_kl", tail=True, temperature=1.0, vocab=90, mask=mask)
    ce = -torch.log_softmax(full, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # Megatron's: padded
    ref_sum = (0.7 * kd + 0.3 * ce * mask).sum()
    (ref_grad,) = torch.autograd.grad(ref_sum, full)
    loss_sum, num_tokens, report, grad = per_rank[0]["reduced"]
    assert abs(loss_sum.item() - ref_sum.item()) < 1e-5 * abs(ref_sum.item())
    assert num_tokens.dtype == torch.int32 and num_tokens.item() == int(mask.sum())
    assert (grad.double() - ref_grad[..., :48]).abs().max() < 1e-5
    n = mask.sum().item()
    assert abs(report["kd loss"].item() - kd.sum().item() / n) < 1e-5
    assert abs(report["ce loss"].item() - (ce * mask).sum().item() / n) < 1e-5
    assert set(report) == {"kd loss", "ce loss", "kd top1 agreement", "teacher tail mass", "student tail mass"}
    agrees = (student.argmax(-1) == payload.indices[..., 0].long()).double()
    assert abs(report["kd top1 agreement"].item() - (agrees * mask).sum().item() / n) < 1e-6
    p_tail = 1 - payload.log_probs().double().exp().sum(-1)
    assert abs(report["teacher tail mass"].item() - (p_tail * mask).sum().item() / n) < 1e-5

    # forward_step_calc_loss divides our loss sum by our token count and by the 2 micro-batches.
    out, n_tokens = per_rank[0]["schedule"]
    assert n_tokens.item() == int(mask.sum())
    assert abs(out.item() - kd.sum().item() / mask.sum().item() / 2) < 1e-5


# ---- context parallelism: the same cut as Megatron's get_batch_on_this_cp_rank ----------------------------

def _cp_cut_matches_megatron():
    import torch.distributed as dist
    from megatron.core.utils import get_batch_on_this_cp_rank

    cp_group = dist.new_group([0, 1])  # a real 2-rank group standing as the CP group
    student, payload, _, _ = make_case(7, s=8)
    # megatron-core 0.19 added a required `is_hybrid_cp` (False: the plain per-sequence split)
    hybrid = {"is_hybrid_cp": False} if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters \
        else {}
    batch = get_batch_on_this_cp_rank(
        {"values": payload.values.clone(), "indices": payload.indices.clone(), "lse": payload.lse.clone()},
        cp_group=cp_group, **hybrid)
    mine = payload_for_cp_rank(payload, cp_group=cp_group)
    return batch, mine


def test_cp_cut_matches_megatron():
    per_rank = run_distributed(_cp_cut_matches_megatron, 2, tp=1)
    for batch, mine in per_rank:
        assert mine.header.seq_len == 4
        for name in ("values", "indices", "lse"):
            assert torch.equal(getattr(mine, name), batch[name])
        mine.validate()
    seen = torch.cat([cp_positions(16, 4, r) for r in range(4)])
    assert torch.equal(seen.sort().values, torch.arange(16))
    with pytest.raises(PayloadError, match="not divisible by 2 x context-parallel size"):
        cp_positions(12, 4, 0)


# ---- properties ------------------------------------------------------------------------------------------

def test_nonnegative_and_zero_when_student_is_teacher():
    g = torch.Generator().manual_seed(8)
    for temperature in (0.5, 1.0, 2.0):
        teacher = torch.randn(3, 7, 128, generator=g) * 4
        payload = TopKPayload.from_logits(teacher, 16, temperature=temperature, vocab_size=120)
        other = teacher + torch.randn(teacher.shape, generator=g)
        for kind in KINDS:
            same = kd_loss(teacher, payload, kind=kind)
            # 0 up to fp32 rounding of two LSEs computed in different orders (teacher's and student's pass)
            assert torch.all(same >= 0) and same.max() < 1e-6, (kind, temperature, same.max())
            for tail in (True, False):
                differ = kd_loss(other, payload, kind=kind, tail=tail)
                assert torch.all(differ > 0) and differ.mean() > 100 * same.max(), (kind, tail, temperature)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(9)
    teacher = torch.randn(1, 3, 12, generator=g) * 2
    payload = TopKPayload.from_logits(teacher, 4, temperature=1.5, vocab_size=10)
    mask = torch.tensor([[1.0, 0.0, 2.0]])
    for kind in KINDS:
        for tail in (True, False):
            x = (torch.randn(1, 3, 12, generator=g, dtype=torch.float64) * 2).requires_grad_()
            assert torch.autograd.gradcheck(
                lambda z: kd_loss(z, payload, kind=kind, tail=tail, loss_mask=mask, chunk_tokens=2), (x,),
                eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [1, 64, 4096])
def test_tail_stable_for_large_and_small_k(k):
    """Peaked teacher and student: tails down to ~1e-9 must still match the float64 reference."""
    student, payload, mask, upstream = make_case(10, b=1, s=4, vocab=5000, padded=5120, k=k, teacher_scale=6.0,
                                                 student_scale=5.0)
    for kind in KINDS:
        errors = compare(student, payload, mask, upstream, kind=kind, tail=True, temperature=1.0, vocab=5000)
        _assert_close(errors, torch.float32)


def test_chunked_equals_unchunked_and_views_are_not_copies():
    student, payload, mask, _ = make_case(11, dtype=torch.bfloat16)
    whole = kd_loss(student, payload, loss_mask=mask)
    assert torch.equal(whole, kd_loss(student, payload, loss_mask=mask, chunk_tokens=5))
    sbv = student.transpose(0, 1).contiguous()
    assert token_rows(sbv.transpose(0, 1)).rows.data_ptr() == sbv.data_ptr()
    assert token_rows(student).rows.data_ptr() == student.data_ptr()
    with pytest.raises(StudentLogitsError, match="neither contiguous"):
        token_rows(student[:, ::2])


# ---- bad input -------------------------------------------------------------------------------------------

def test_bad_input_gives_clear_errors():
    student, payload, mask, _ = make_case(12, temperature=2.0)
    with pytest.raises(KDLossError, match=r"payload is for \[batch, seq\] = \[2, 6\]"):
        kd_loss(student[:, :5].contiguous(), payload)
    with pytest.raises(KDLossError, match="vocab_size: the loss expects 91, the teacher payload has 90"):
        kd_loss(student, payload, vocab_size=91)
    with pytest.raises(KDLossError, match="fewer than the payload's vocabulary of 90"):
        kd_loss(student[..., :80].contiguous(), payload)
    with pytest.raises(KDLossError, match="temperature: the loss expects 1.0, the teacher payload has 2.0"):
        kd_loss(student, payload, temperature=1.0)
    bad_ids = TopKPayload(payload.values, payload.indices.clone(), payload.lse, payload.header)
    bad_ids.indices[0, 0, 0] = 90
    with pytest.raises(PayloadError, match="outside the vocabulary"):
        kd_loss(student, bad_ids)
    dup = TopKPayload(payload.values, payload.indices.clone(), payload.lse, payload.header)
    dup.indices[0, 0, 1] = dup.indices[0, 0, 0]
    with pytest.raises(PayloadError, match="repeated ids"):
        kd_loss(student, dup)
    nan = student.clone()
    nan[1, 3, 50] = float("nan")
    with pytest.raises(StudentLogitsError, match="NaN"):
        kd_loss(nan, payload)
    with pytest.raises(KDLossError, match=r"loss_mask must be \[batch, seq\] = \[2, 6\]"):
        kd_loss(student, payload, loss_mask=mask.reshape(-1))
    with pytest.raises(KDLossError, match="unknown KD loss kind"):
        kd_loss(student, payload, kind="kl")
    with pytest.raises(KDLossError, match="beta must be in"):
        kd_loss(student, payload, kind="jsd", beta=1.5)
    with pytest.raises(KDLossError, match="pass labels= or ce_loss="):
        kd_loss_and_report(student, payload, alpha=0.5)
    with pytest.raises(KDLossError, match="ce_loss must be per-token"):
        kd_loss_and_report(student, payload, alpha=0.5, ce_loss=torch.zeros(12))


def test_reduced_form_with_callers_ce_loss():
    student, payload, mask, _ = make_case(13)
    ce = torch.rand(mask.shape)
    loss_sum, num_tokens, report = kd_loss_and_report(student, payload, loss_mask=mask, alpha=0.25, ce_loss=ce)
    kd = kd_loss(student, payload, loss_mask=mask)
    assert torch.allclose(loss_sum, (0.25 * kd + 0.75 * ce * mask).sum())
    assert num_tokens.item() == int(mask.sum())
    terms = kd_terms(student, payload, loss_mask=mask)
    assert torch.allclose(report["kd loss"], terms.loss.sum() / mask.sum())



# ---- a short training run: KD moves a student towards the teacher faster than CE on the teacher's samples --

def _gather_vocab(logits, group, tp, vocab):
    parts = [torch.empty_like(logits) for _ in range(tp)]
    torch.distributed.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, -1)[..., :vocab]


def _train_kd_vs_ce(steps=30, lr=3e-3, k=16, vocab=500, b=8, s=32):
    """Two identical TP=2 GPTModel students, one on forward_kl, one on Megatron's CE with labels sampled from
    the teacher; returns the full-vocabulary KL(teacher || student) on held-out tokens before and after."""
    from megatron.core import parallel_state as mpu

    from kd_teacher.engine.model import ModelConfig, build_gpt_model
    from kd_teacher.losses import megatron_cross_entropy

    tp, group = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_group()
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=vocab,
                      max_sequence_length=s, make_vocab_size_divisible_by=8, tensor_model_parallel_size=tp)
    torch.manual_seed(1)
    teacher, _ = build_gpt_model(cfg)
    with torch.no_grad():  # a random model's outputs are near uniform: sharpen it into a distinctive teacher
        teacher.output_layer.weight.mul_(10.0)
    teacher.eval()
    students = {}
    for name in ("kd", "ce"):
        torch.manual_seed(2)  # CPU initialisation draws from the default generator: identical students
        students[name] = build_gpt_model(cfg)[0]
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=lr) for name, m in students.items()}
    positions = torch.arange(s).expand(b, s)

    def tokens(seed):
        return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))

    def kl_to_teacher(model, batch):
        with torch.no_grad():
            lt = _gather_vocab(teacher(batch, positions, None), group, tp, vocab).log_softmax(-1)
            ls = _gather_vocab(model(batch, positions, None), group, tp, vocab).log_softmax(-1)
            return (lt.exp() * (lt - ls)).sum(-1).mean().item()

    held_out = tokens(10**6)
    before = {name: kl_to_teacher(m, held_out) for name, m in students.items()}
    for step in range(steps):
        batch = tokens(step)
        with torch.no_grad():
            teacher_logits = teacher(batch, positions, None)
            payload = TopKPayload.from_logits(teacher_logits, k, vocab_size=vocab, group=group, tokens=batch)
            probs = _gather_vocab(teacher_logits, group, tp, vocab).softmax(-1).reshape(-1, vocab)
            labels = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(step)).reshape(b, s)
        for name, model in students.items():
            logits = model(batch, positions, None)
            if name == "kd":
                loss = kd_loss(logits, payload, group=group).mean()
            else:
                loss = megatron_cross_entropy(logits, labels, group).mean()
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
    after = {name: kl_to_teacher(m, held_out) for name, m in students.items()}
    return before, after


def test_training_forward_kl_approaches_teacher_faster_than_ce():
    before, after = run_distributed(_train_kd_vs_ce, 2, tp=2)[0]
    assert before["kd"] == before["ce"]  # the same student to start with
    # Measured (CPU, TP=2, 30 steps): KL 1.25 -> 0.85 with forward_kl, 1.25 -> 1.24 with CE on teacher samples.
    assert after["kd"] < 0.85 * before["kd"], (before, after)
    assert after["kd"] < 0.85 * after["ce"], (before, after)
