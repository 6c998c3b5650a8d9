"""The fused cross-entropy + KD pass (kd_teacher/losses/ce_kd.py) against float64 oracles and Megatron's CE.

The oracle is the dense float64 reference of tests/test_losses.py for the KD term plus the float64 CE over every
column of the padded vocabulary (Megatron's CE includes the padding), differentiated by plain autograd: the
fused function's CE, KD loss and its ONE gradient must match it at TP = 1 and at TP = 2 (real gloo ranks).
Megatron-Core's own `vocab_parallel_cross_entropy` is reproduced to the stated tolerance (module docstring of
ce_kd.py; docs/kd_step.md): the sums of exponentials run in another order, so bitwise equality is impossible.
The Triton kernels are checked against this module's PyTorch path in tests/kd_loss_kernel_interpreted.py.
"""

import pytest
import torch

from kd_teacher.losses import kd_terms
from kd_teacher.losses.ce_kd import fused_ce_kd
from kd_teacher.losses.student import StudentLogitsError, raise_on_bad_rows, token_rows
from kd_teacher.testing.distributed import run_distributed
from tests.test_losses import BETA, make_case, reference_kd

VOCAB, PADDED = 90, 96
# Megatron's CE against ours: |difference| <= CE_ATOL + CE_RTOL * CE (fp32 sums of one row's exps in two orders)
CE_ATOL, CE_RTOL = 2e-6, 2e-6


def labels_for(seed, b, s):
    """Labels over the padded vocabulary, with one in the padding and one that no rank owns (Megatron: ignored
    by the loss mask, and its CE is log-sum-exp minus the max)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    labels[0, 1] = PADDED - 1
    labels[1, 2] = -100
    return labels


def reference_ce(full, labels):
    """Float64 CE [b, s] over every column of `full` [b, s, V_padded]; for a label no rank owns Megatron's value,
    log-sum-exp minus the max, with the max a constant (its backward is the softmax alone)."""
    z = full.double()
    lse = torch.logsumexp(z, dim=-1)
    owned = (labels >= 0) & (labels < z.shape[-1])
    at = z.gather(-1, labels.clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return lse - torch.where(owned, at, z.amax(dim=-1).detach())


def fused_step(full, payload, labels, mask, ce_w, kd_w, *, kind, tail, tp=1, rank=0, group=None, seq_major=True):
    """CE [b, s], KD loss [b, s] and the gradient of sum(ce_w * CE) + sum(kd_w * KD) on this rank's shard."""
    v_local = full.shape[-1] // tp
    shard = full[..., rank * v_local:(rank + 1) * v_local]
    leaf = (shard.transpose(0, 1).contiguous() if seq_major else shard.contiguous()).requires_grad_()
    logits = leaf.transpose(0, 1) if seq_major else leaf
    rows = token_rows(logits)
    b, s = labels.shape
    ce, student = fused_ce_kd(rows.rows, rows.to_rows(labels), rows.to_rows(payload.indices), vocab_size=VOCAB,
                              temperature=payload.header.temperature, tail=tail, group=group)
    raise_on_bad_rows(int(student.bad_rows))
    ce = rows.to_grid(ce, b, s)
    terms = kd_terms(logits, payload, kind=kind, tail=tail, beta=BETA, loss_mask=mask, group=group, student=student)
    (grad,) = torch.autograd.grad((ce * ce_w).sum() + (terms.loss * kd_w).sum(), leaf)
    return ce.detach(), terms.loss.detach(), (grad.transpose(0, 1) if seq_major else grad)


def oracle(full, payload, labels, mask, ce_w, kd_w, *, kind, tail, temperature):
    x = full.detach().double().requires_grad_()
    ce = reference_ce(x, labels)
    kd = reference_kd(x, payload, kind=kind, tail=tail, temperature=temperature, vocab=VOCAB, mask=mask)
    (grad,) = torch.autograd.grad((ce * ce_w.double()).sum() + (kd * kd_w.double()).sum(), x)
    return ce.detach(), kd.detach(), grad


def errors(got, want, v_local=None, rank=0):
    ce, kd, grad = got
    want_ce, want_kd, want_grad = want
    if v_local is not None:
        want_grad = want_grad[..., rank * v_local:(rank + 1) * v_local]
    return dict(ce=(ce.double() - want_ce).abs().max().item(), kd=(kd.double() - want_kd).abs().max().item(),
                grad=(grad.double() - want_grad).abs().max().item(), grad_scale=want_grad.abs().max().item(),
                ce_scale=want_ce.abs().max().item())


def assert_close(e, dtype):
    # fp32 arithmetic against float64; a bf16 gradient also carries bf16's relative rounding (rounded once).
    assert e["ce"] <= 1e-5 * (1 + e["ce_scale"]) and e["kd"] <= 1e-5, e
    assert e["grad"] <= 2e-6 + (2 ** -8 if dtype == torch.bfloat16 else 0.0) * e["grad_scale"], e


def weights(seed, b, s):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, s, generator=g) + 0.5, torch.rand(b, s, generator=g) + 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_float64_oracle_tp1(dtype, temperature):
    full, payload, mask, _ = make_case(21, temperature=temperature, dtype=dtype, vocab=VOCAB, padded=PADDED)
    labels = labels_for(22, *mask.shape)
    ce_w, kd_w = weights(23, *mask.shape)
    for kind in ("forward_kl", "jsd"):
        for tail in (True, False):
            for seq_major in (True, False):
                got = fused_step(full, payload, labels, mask, ce_w, kd_w, kind=kind, tail=tail, seq_major=seq_major)
                want = oracle(full, payload, labels, mask, ce_w, kd_w, kind=kind, tail=tail, temperature=temperature)
                assert_close(errors(got, want), dtype)


def test_gradient_is_one_tensor_in_the_logits_dtype_and_zero_cost_views():
    full, payload, mask, _ = make_case(24, dtype=torch.bfloat16, vocab=VOCAB, padded=PADDED)
    labels = labels_for(25, *mask.shape)
    leaf = full.transpose(0, 1).contiguous().requires_grad_()
    rows = token_rows(leaf.transpose(0, 1))
    assert rows.rows.data_ptr() == leaf.data_ptr(), "rows are a view of Megatron's [s, b, V] logits"
    ce, student = fused_ce_kd(rows.rows, rows.to_rows(labels), rows.to_rows(payload.indices), vocab_size=VOCAB,
                              temperature=1.0, tail=True)
    (grad,) = torch.autograd.grad(ce.sum() + student.logp.sum(), leaf)
    assert grad.dtype == torch.bfloat16 and grad.shape == leaf.shape and ce.dtype == torch.float32


def _megatron_ce_and_tp2():
    """At TP=2: the fused CE against Megatron-Core's vocab_parallel_cross_entropy on the same shard, and the
    fused CE, KD and gradient against the float64 oracle."""
    import inspect

    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    rank, group = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_group()
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        full, payload, mask, _ = make_case(26, dtype=dtype, vocab=VOCAB, padded=PADDED)
        labels = labels_for(27, *mask.shape)
        ce_w, kd_w = weights(28, *mask.shape)
        got = fused_step(full, payload, labels, mask, ce_w, kd_w, kind="forward_kl", tail=True, tp=2, rank=rank,
                         group=group)
        want = oracle(full, payload, labels, mask, ce_w, kd_w, kind="forward_kl", tail=True, temperature=1.0)
        out[dtype, "oracle"] = errors(got, want, PADDED // 2, rank)
        shard = full[..., rank * 48:(rank + 1) * 48].transpose(0, 1).contiguous()
        extra = {"tp_group": group} if "tp_group" in inspect.signature(vocab_parallel_cross_entropy).parameters else {}
        megatron = vocab_parallel_cross_entropy(shard.clone(), labels.transpose(0, 1).contiguous(), **extra)
        out[dtype, "megatron"] = (got[0], megatron.transpose(0, 1))
    return out


def test_tp2_matches_oracle_and_megatron_cross_entropy():
    for result in run_distributed(_megatron_ce_and_tp2, 2, tp=2):
        for dtype in (torch.float32, torch.bfloat16):
            assert_close(result[dtype, "oracle"], dtype)
            ours, megatron = result[dtype, "megatron"]
            assert_megatron_ce(ours, megatron)


def assert_megatron_ce(ours, megatron):
    assert ours.shape == megatron.shape and ours.dtype == megatron.dtype == torch.float32
    diff = (ours - megatron).abs()
    assert torch.all(diff <= CE_ATOL + CE_RTOL * megatron.abs()), diff.max()


def test_tp1_reproduces_megatron_cross_entropy():
    from kd_teacher.runtime import init_distributed

    init_distributed(1, 1, 1234)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(29)
        full = (torch.randn(3, 64, 1000, generator=g) * 4).to(dtype)
        labels = torch.randint(0, 1000, (3, 64), generator=g)
        rows = token_rows(full)
        ce, _ = fused_ce_kd(rows.rows, rows.to_rows(labels), torch.randint(0, 990, (192, 8), generator=g),
                            vocab_size=990, temperature=1.0, tail=True)
        megatron = vocab_parallel_cross_entropy(full.transpose(0, 1).contiguous().clone(), labels.t().contiguous())
        assert_megatron_ce(rows.to_grid(ce, 3, 64), megatron.t())


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(30)
    labels = torch.tensor([3, 11, 0, 7])
    ids = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(4)])
    w_ce, w_kd = torch.rand(4, generator=g, dtype=torch.float64), torch.rand(4, 5, generator=g, dtype=torch.float64)
    for temperature, tail in ((1.0, True), (1.7, True), (1.0, False)):
        x = (torch.randn(4, 12, generator=g, dtype=torch.float64) * 2).requires_grad_()

        def f(z):
            ce, student = fused_ce_kd(z, labels, ids, vocab_size=10, temperature=temperature, tail=tail, chunk_tokens=3)
            return (ce * w_ce).sum() + (student.logp * w_kd[:, :student.logp.shape[1]]).sum()

        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


def test_bad_rows_are_counted_not_hidden():
    g = torch.Generator().manual_seed(31)
    rows = torch.randn(5, 40, generator=g)
    rows[1, 3] = float("nan")
    rows[3] = float("-inf")
    _, student = fused_ce_kd(rows, torch.zeros(5, dtype=torch.long), torch.randint(0, 40, (5, 4), generator=g),
                             vocab_size=40, temperature=1.0, tail=True)
    assert int(student.bad_rows) == 2
    with pytest.raises(StudentLogitsError, match="2 token"):
        raise_on_bad_rows(int(student.bad_rows))
