"""The KD loss against sampled payloads (kd_teacher/losses/sampled.py): unbiased, vocab-parallel, refused where
it has no unbiased form.

Unbiasedness: with float64 student logits, the loss's gradient averaged over 16 seeds x 256 positions (4096
independent payloads of k=8 draws each) is the dense full-vocabulary forward-KL gradient T (q - p) up to Monte
Carlo error. The tolerance is stated from the estimator's own variance: each draw count c is binomial, so the
mean gradient's standard error at id j is T sqrt(p_j (1 - p_j) / (k M)) with M payloads; every component must
lie within 5 standard errors, and the test shows it has the power to tell a biased estimate (top-k without its
tail, at the same k) from it.
"""

import math

import pytest
import torch

from kd_teacher.losses import KDLossError, kd_loss, kd_loss_and_report
from kd_teacher.payload import TopKPayload
from kd_teacher.testing.distributed import run_distributed

VOCAB, PADDED = 60, 64
T = 1.5
K = 8
POSITIONS, SEEDS = 256, 16


def _teacher_and_student():
    g = torch.Generator().manual_seed(21)
    teacher = torch.randn(PADDED, generator=g, dtype=torch.float64) * 2
    student = torch.randn(PADDED, generator=g, dtype=torch.float64) * 1.5
    return teacher, student


def _dense_gradient(teacher, student):
    p = torch.softmax(teacher[:VOCAB] / T, 0)
    q = torch.softmax(student[:VOCAB] / T, 0)
    grad = torch.zeros(PADDED, dtype=torch.float64)
    grad[:VOCAB] = T * (q - p)  # d/dz of T^2 KL(p || softmax(z / T)); padding columns get none
    return grad, p, q


def _mean_sampled_gradient(teacher, student, extraction="sampled", tail=True):
    """Gradient of the per-token loss w.r.t. one position's logits, averaged over SEEDS x POSITIONS payloads (the
    same teacher and student distribution at every position; each position has its own random stream)."""
    tokens = torch.arange(POSITIONS).remainder(VOCAB).reshape(1, POSITIONS)
    t_logits = teacher.float().expand(1, POSITIONS, PADDED).contiguous()
    total, losses = torch.zeros(PADDED, dtype=torch.float64), []
    for seed in range(SEEDS):
        payload = TopKPayload.from_logits(t_logits, K, temperature=T, vocab_size=VOCAB, tokens=tokens,
                                          extraction=extraction, sample_seed=seed)
        z = student.expand(1, POSITIONS, PADDED).clone().requires_grad_()
        loss = kd_loss(z, payload, tail=tail)
        (grad,) = torch.autograd.grad(loss.sum(), z)
        total += grad.sum(dim=(0, 1))
        losses.append(loss.detach())
    return total / (SEEDS * POSITIONS), torch.cat(losses).double()


def test_gradient_averaged_over_seeds_is_the_dense_forward_kl_gradient():
    teacher, student = _teacher_and_student()
    dense, p, q = _dense_gradient(teacher, student)
    mean, losses = _mean_sampled_gradient(teacher, student)
    m = SEEDS * POSITIONS
    standard_error = T * torch.sqrt(p * (1 - p) / (K * m))
    err = (mean[:VOCAB] - dense[:VOCAB]).abs()
    assert torch.all(mean[VOCAB:] == 0), "padding columns get no gradient"
    assert torch.all(err <= 5 * standard_error), f"worst: {float((err / standard_error).max()):.2f} standard errors"
    # The loss itself estimates T^2 (KL(p || q) + H(p)) = T^2 CE(p, q), without bias.
    ce = -(p * torch.log(q)).sum() * T * T
    assert abs(losses.mean() - ce) <= 5 * losses.std() / math.sqrt(losses.numel())
    # Power: a biased estimate of the same size (top-8 renormalised, no tail) is many standard errors away.
    biased, _ = _mean_sampled_gradient(teacher, student, extraction="topk", tail=False)
    assert float(((biased[:VOCAB] - dense[:VOCAB]).abs() / standard_error).max()) > 20


def _payload_and_student(seed=3, b=2, s=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, s, PADDED, generator=g) * 3
    tokens = torch.randint(0, VOCAB, (b, s), generator=g)
    student = (torch.randn(b, s, PADDED, generator=g) * 2).to(dtype)
    payload = TopKPayload.from_logits(teacher, K, temperature=T, vocab_size=VOCAB, tokens=tokens,
                                      extraction="sampled")
    return payload, student


def _reference_loss(student, payload):
    """float64: -T^2 sum_i (c_i / k) log softmax(z / T)[id_i] over the true vocabulary."""
    logq = torch.log_softmax(student[..., :VOCAB].double() / T, -1).gather(-1, payload.indices.long())
    return -(payload.values.double() / K * logq).sum(-1) * T * T


def _tp2_loss_and_grad():
    from megatron.core import parallel_state as mpu

    rank, group = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_group()
    payload, student = _payload_and_student()
    shard = student[..., rank * 32:(rank + 1) * 32].contiguous().requires_grad_()
    loss = kd_loss(shard, payload, group=group)
    (grad,) = torch.autograd.grad(loss.sum(), shard)
    return loss.detach(), grad


def test_matches_float64_reference_at_tp1_and_tp2():
    payload, student = _payload_and_student()
    full = student.double().requires_grad_()
    ref = _reference_loss(full, payload)
    (ref_grad,) = torch.autograd.grad(ref.sum(), full)
    x = student.clone().requires_grad_()
    loss = kd_loss(x, payload)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=2e-6)
    for rank, (loss2, grad2) in enumerate(run_distributed(_tp2_loss_and_grad, 2, tp=2)):
        torch.testing.assert_close(loss2.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad2.double(), ref_grad[..., rank * 32:(rank + 1) * 32], rtol=0, atol=2e-6)


def test_report_and_mask():
    payload, student = _payload_and_student()
    mask = torch.ones(2, 5)
    mask[0, 1] = 0
    labels = torch.randint(0, VOCAB, (2, 5))
    ce = torch.rand(2, 5)
    loss_sum, n, report = kd_loss_and_report(student, payload, loss_mask=mask, ce_loss=ce, alpha=0.5)
    kd = _reference_loss(student, payload).float()
    assert int(n) == 9 and torch.isclose(loss_sum, (0.5 * kd * mask + 0.5 * ce * mask).sum(), atol=1e-5)
    once = ((payload.values == 1).sum(-1).float() / K)[mask.bool()].mean()
    assert torch.isclose(report["teacher tail mass"], once), "Good-Turing: ids drawn once / k"
    assert labels is not None and 0 <= float(report["kd top1 agreement"]) <= 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="reverse_kl"), "'reverse_kl' has no unbiased estimate from a sampled payload"),
    (dict(kind="jsd", beta=0.5), "not linear in the teacher's probabilities"),
    (dict(tail=False), "tail=False renormalises"),
    (dict(temperature=1.0), "temperature: the loss expects 1.0, the teacher payload has 1.5"),
])
def test_losses_without_an_unbiased_sampled_form_are_refused(kwargs, match):
    payload, student = _payload_and_student()
    with pytest.raises(KDLossError, match=match):
        kd_loss(student, payload, **kwargs)
