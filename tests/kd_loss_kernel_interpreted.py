"""The fused KD-loss kernels under Triton's CPU interpreter, against the PyTorch path of the student loss.

Not collected by a plain `pytest tests/` (the name does not start with test_): tests/test_kd_loss_kernel.py
runs this file in a child process with TRITON_INTERPRET=1, because Triton reads that variable when its own
`triton.language` functions are decorated, at its first import, and the parent process may have imported
Triton already without it.

Small shards: odd widths, padding, T != 1, a shard that owns some of the ids and not others, rows with -inf,
NaN or +inf, k up to the whole vocabulary, several tiles per row (so the online max/sum rescales); and a
sampled payload's loss, which runs through the same passes. On the GPU, tests/gpu/test_kd_loss_kernel.py checks
the compiled kernels the same way at full size.
"""

import os
from dataclasses import dataclass

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run this file with TRITON_INTERPRET=1 (tests/test_kd_loss_kernel.py does)")

from kd_teacher.kernels import kd_loss as launcher  # noqa: E402
from kd_teacher.kernels.ce_kd import fused_ce_kd_grad, fused_ce_kd_stats  # noqa: E402
from kd_teacher.losses import ce_kd  # noqa: E402
from kd_teacher.kernels import KDLossKernelConfig, fused_tail_grad, fused_tail_stats, kd_loss_kernel_applies  # noqa: E402
from kd_teacher.losses import StudentLogitsError, kd_loss  # noqa: E402
from kd_teacher.losses import student  # noqa: E402
from kd_teacher.payload import TopKPayload  # noqa: E402


@pytest.fixture
def pytorch_path(monkeypatch):
    """Call the returned function to run what follows on the PyTorch path (the reference)."""
    return lambda: monkeypatch.setenv(launcher.DISABLE_ENV, "0")


# ---- shards to test -----------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    rows: int
    v_local: int
    valid: int
    start: int  # first global id of the shard
    vocab: int  # true vocabulary, all shards
    k: int
    temperature: float
    dtype: torch.dtype
    words: int = 2  # 64-column tiles: several tiles per row
    special: str = ""  # "-inf", "nan", "+inf" rows; "ramp": the max grows from tile to tile


CASES = [
    Case("odd width + padding", 6, 301, 290, 0, 290, 8, 1.0, torch.bfloat16),
    Case("T=0.7, fp32, max grows per tile", 5, 517, 517, 0, 517, 16, 0.7, torch.float32, special="ramp"),
    Case("rank 1 of 2: some ids owned", 7, 301, 280, 301, 581, 12, 1.0, torch.bfloat16),
    Case("-inf rows, fp16", 6, 203, 200, 0, 200, 5, 2.0, torch.float16, special="-inf"),
    Case("k = V", 4, 97, 97, 0, 97, 97, 1.0, torch.bfloat16),
    Case("k = 200 of 257, T=2, one tile", 4, 257, 257, 0, 257, 200, 2.0, torch.bfloat16, words=128),
    Case("NaN and +inf rows", 5, 130, 128, 0, 128, 4, 1.0, torch.float32, special="nan"),
]


def make_shard(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.rows, case.v_local, generator=g) * 3
    if case.special == "ramp":
        x = x + torch.linspace(0, 40, case.v_local)  # each tile's max beats the running one
    if case.special == "-inf":
        x[1, : case.valid // 2] = float("-inf")  # half a row -inf
        x[2, : case.valid] = float("-inf")  # every valid column -inf (padding stays finite)
    if case.special == "nan":
        x[1, 70] = float("nan")
        x[3, 5] = float("inf")
    rows = x.to(case.dtype)
    # Teacher ids over the whole vocabulary, distinct per row: this shard owns those in [start, start + valid).
    ids = torch.stack([torch.randperm(case.vocab, generator=g)[: case.k] for _ in range(case.rows)])
    shard = student.VocabShard(case.start, case.v_local, case.valid, case.vocab, 1, None)
    pos, owned = shard.local_ids(ids)
    return rows, shard, pos, owned


def ulp_tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


# ---- the kernels ------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy on the NaN row
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_forward_stats_match_pytorch_path(pytorch_path, case):
    rows, shard, pos, owned = make_shard(case)
    inv_t = 1.0 / case.temperature
    got = fused_tail_stats(rows, pos, owned, shard.valid, inv_t, KDLossKernelConfig(words=case.words))
    assert got is not None, "the kernel should serve CPU tensors under the interpreter"
    pytorch_path()
    _, want_max, want_sum = student._shard_pass(rows, pos, owned, shard, inv_t, True, None)
    got_max, got_sum = got
    # The max is a comparison of stored values: exact, NaN where the row holds one.
    assert torch.equal(torch.isnan(got_max), torch.isnan(want_max))
    finite = ~torch.isnan(want_max)
    assert torch.equal(got_max[finite], want_max[finite])
    ok = finite & torch.isfinite(want_max)  # NaN/+inf rows are refused by the loss; their sum is not used
    torch.testing.assert_close(got_sum[ok], want_sum[ok], rtol=2e-6, atol=0.0)
    if case.k >= case.vocab:
        assert torch.all(got_sum == 0), "every column is a teacher id: the tail is empty, exactly"
    if case.special == "-inf":
        assert got_max[2] == float("-inf") and got_sum[2] == 0


@pytest.mark.parametrize("case", [c for c in CASES if c.special != "nan"],
                         ids=[c.name for c in CASES if c.special != "nan"])
def test_backward_tail_grad_matches_pytorch_path(pytorch_path, case):
    rows, shard, pos, owned = make_shard(case, seed=1)
    inv_t = 1.0 / case.temperature
    g = torch.Generator().manual_seed(2)
    n = case.rows
    # Row shifts as the backward builds them (max + T log tail), one row without tail mass (shift +inf).
    shift = rows.float().amax(dim=1).clamp(min=0) + torch.rand(n, generator=g) * 3
    shift[0] = float("inf")
    scale = torch.randn(n, 1, generator=g)
    got = fused_tail_grad(rows, pos, owned, shard.valid, inv_t, shift, scale, KDLossKernelConfig(words=case.words))
    assert got is not None and got.dtype == rows.dtype and got.shape == rows.shape
    pytorch_path()
    want = student._tail_grad(rows, pos, owned, shard, inv_t, shift, scale, None, torch.float32)
    assert torch.all(got[0] == 0)
    assert torch.all(got[:, shard.valid:] == 0), "padding columns get no gradient"
    # scatter_add: the ids not owned sit at column 0 too, where scatter_ would keep an arbitrary write
    at_ids = torch.zeros_like(got, dtype=torch.int32).scatter_add_(1, pos, owned.to(torch.int32)) > 0
    assert torch.all(got[at_ids] == 0), "the ids' gradient is added by the caller"
    tol = ulp_tolerance(case.dtype)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=1e-30)


@pytest.mark.parametrize("dtype,temperature,k", [(torch.bfloat16, 1.0, 8), (torch.float32, 2.0, 50),
                                                 (torch.float16, 0.5, 300)])
def test_student_buckets_forward_backward_match_pytorch_path(monkeypatch, dtype, temperature, k):
    """The whole custom autograd function, kernel path vs PyTorch path: bucket log-probs and logits' gradient."""
    g = torch.Generator().manual_seed(3)
    b, s, v_local, vocab = 2, 5, 320, 300  # 20 padding columns
    logits = (torch.randn(b, s, v_local, generator=g) * 3).to(dtype)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(b * s)])
    upstream = torch.randn(b * s, k + 1, generator=g)
    assert kd_loss_kernel_applies(logits.view(b * s, v_local))

    def run():
        rows = logits.detach().view(b * s, v_local).requires_grad_()
        out = student.student_buckets(rows, ids, vocab_size=vocab, temperature=temperature, tail=True)
        (grad,) = torch.autograd.grad((out.logp * upstream).sum(), rows)
        return out.logp.detach(), grad

    fused_logp, fused_grad = run()
    monkeypatch.setenv(launcher.DISABLE_ENV, "0")
    ref_logp, ref_grad = run()
    torch.testing.assert_close(fused_logp, ref_logp, rtol=1e-5, atol=1e-5)
    assert fused_grad.dtype == dtype
    torch.testing.assert_close(fused_grad.float(), ref_grad.float(), rtol=ulp_tolerance(dtype), atol=1e-6)


def test_kd_loss_on_kernel_path_matches_and_refuses_nan(monkeypatch):
    g = torch.Generator().manual_seed(4)
    teacher = torch.randn(2, 6, 257, generator=g) * 3
    payload = TopKPayload.from_logits(teacher, 16, temperature=1.5)
    student_logits = (teacher + torch.randn(2, 6, 257, generator=g)).bfloat16()

    def run(x):
        x = x.detach().requires_grad_()
        loss = kd_loss(x, payload, kind="jsd", beta=0.3)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), grad

    fused = run(student_logits)
    monkeypatch.setenv(launcher.DISABLE_ENV, "0")
    ref = run(student_logits)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1].float(), ref[1].float(), rtol=1e-2, atol=1e-6)
    monkeypatch.delenv(launcher.DISABLE_ENV)
    bad = student_logits.clone()
    bad[1, 2, 9] = float("nan")
    with pytest.raises(StudentLogitsError, match="1 token"):
        kd_loss(bad, payload)


# ---- the fused cross-entropy + KD kernels (kd_teacher/kernels/ce_kd*.py) -----------------------------------------

@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_ce_kd_stats_match_pytorch_path(pytorch_path, case):
    rows, shard, pos, owned = make_shard(case, seed=5)
    inv_t = 1.0 / case.temperature
    got = fused_ce_kd_stats(rows, pos, owned, shard.valid, inv_t, KDLossKernelConfig(words=case.words))
    assert got is not None, "the kernel should serve CPU tensors under the interpreter"
    pytorch_path()
    want = ce_kd._stats_reference(rows, pos, owned, shard, inv_t, None)
    for name, g, w in zip(("max_all", "sum_all", "max_valid", "tail"), got, want):
        ok = torch.isfinite(want[0]) & torch.isfinite(want[2])  # NaN/+inf rows are refused by the loss
        if name.startswith("max"):  # comparisons of stored values: exact
            assert torch.equal(g[ok], w[ok]), name
        else:
            torch.testing.assert_close(g[ok], w[ok], rtol=2e-6, atol=0.0, msg=name)


@pytest.mark.parametrize("case", [c for c in CASES if c.special != "nan"],
                         ids=[c.name for c in CASES if c.special != "nan"])
@pytest.mark.parametrize("tail", [True, False])
def test_ce_kd_grad_matches_pytorch_path(pytorch_path, case, tail):
    rows, shard, pos, owned = make_shard(case, seed=6)
    inv_t = 1.0 / case.temperature
    g = torch.Generator().manual_seed(7)
    n = case.rows
    labels = torch.randint(0, case.v_local, (n,), generator=g)
    labels[0] = -1  # owned by another shard
    labels[1] = pos[1, 0] if owned[1, 0] else labels[1]  # a label that is a teacher id
    z = rows.float()
    ce_shift = z.amax(dim=1).clamp(min=0) + 2.0 + torch.rand(n, generator=g)
    ce_grad = torch.rand(n, generator=g)
    kd_shift = z.amax(dim=1).clamp(min=0) + torch.rand(n, generator=g) * 3
    kd_shift[0] = float("inf")
    kd_scale = torch.randn(n, 1, generator=g)
    args = (rows, pos, owned, shard.valid, inv_t, labels, ce_grad, ce_shift,
            kd_shift if tail else None, kd_scale if tail else None)
    got = fused_ce_kd_grad(*args, config=KDLossKernelConfig(words=case.words))
    assert got is not None and got.dtype == rows.dtype and got.shape == rows.shape
    pytorch_path()
    want = ce_kd._grad_reference(rows, pos, owned, shard, inv_t, labels, ce_grad, ce_shift,
                                 kd_shift if tail else None, kd_scale if tail else None, None, torch.float32)
    torch.testing.assert_close(got.float(), want.float(), rtol=ulp_tolerance(case.dtype), atol=1e-30)


@pytest.mark.parametrize("dtype,temperature,k", [(torch.bfloat16, 1.0, 8), (torch.float32, 2.0, 50),
                                                 (torch.float16, 0.5, 300)])
def test_fused_ce_kd_forward_backward_match_pytorch_path(monkeypatch, dtype, temperature, k):
    """The whole autograd function, kernel path vs PyTorch path: CE, bucket log-probs and the one gradient."""
    g = torch.Generator().manual_seed(8)
    n, v_local, vocab = 10, 320, 300  # 20 padding columns, with their own logits (Megatron's CE counts them)
    logits = (torch.randn(n, v_local, generator=g) * 3).to(dtype)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    labels = torch.randint(0, v_local, (n,), generator=g)
    labels[2] = ids[2, 0]
    up_ce, up_kd = torch.rand(n, generator=g), torch.randn(n, k + 1, generator=g)

    def run():
        rows = logits.detach().clone().requires_grad_()
        ce, out = ce_kd.fused_ce_kd(rows, labels, ids, vocab_size=vocab, temperature=temperature, tail=True)
        (grad,) = torch.autograd.grad((ce * up_ce).sum() + (out.logp * up_kd).sum(), rows)
        return ce.detach(), out.logp.detach(), grad

    fused = run()
    monkeypatch.setenv(launcher.DISABLE_ENV, "0")
    ref = run()
    torch.testing.assert_close(fused[0], ref[0], rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-5, atol=1e-5)
    assert fused[2].dtype == dtype
    torch.testing.assert_close(fused[2].float(), ref[2].float(), rtol=ulp_tolerance(dtype), atol=1e-6)


def test_sampled_payload_loss_on_kernel_path_matches(monkeypatch):
    """A sampled payload's loss runs through the same fused passes (its ids with count-0 fillers as the bitmask)."""
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(2, 6, 300, generator=g) * 3
    tokens = torch.randint(0, 290, (2, 6), generator=g)
    payload = TopKPayload.from_logits(teacher, 24, temperature=2.0, vocab_size=290, tokens=tokens,
                                      extraction="sampled")
    student_logits = (teacher + torch.randn(2, 6, 300, generator=g)).bfloat16()
    assert kd_loss_kernel_applies(student_logits.view(12, 300))

    def run():
        x = student_logits.detach().requires_grad_()
        loss = kd_loss(x, payload)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), grad

    fused = run()
    monkeypatch.setenv(launcher.DISABLE_ENV, "0")
    ref = run()
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1].float(), ref[1].float(), rtol=1e-2, atol=1e-6)
