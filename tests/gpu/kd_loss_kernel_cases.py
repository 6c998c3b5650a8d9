"""Cases for the fused KD-loss kernels (kd_teacher/kernels/kd_loss*.py) against float64: tests/gpu/test_kd_loss_kernel.py
runs them on the GPU (timings: benchmarks/kd_loss_kernel_timing.py).

Correctness, case by case (fixed cases, then random shapes: bf16/fp16/fp32, T, padding, k 1..256, shards that
own some ids and not others, rows of -inf, NaN or +inf, students so sure of the teacher's ids that the tail is
~1e-17 of the row): the kernels' max and tail sum, and their tail gradient, against float64 computed from the
same stored logits, and the PyTorch path (KD_TEACHER_FUSED_KD_LOSS=0) measured against float64 the same way.
A case passes when the max is exact (NaN where the row holds one), the tail sum is within 1e-5 relative (or
twice the PyTorch path's error) and every gradient element is within one unit in the last place of its dtype
(or twice the PyTorch path's error, for fp32 gradients, where fp32 `z - shift` rounds by more than that).
Then the whole custom autograd function on both paths.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from kd_teacher.kernels import kd_loss as launcher
from kd_teacher.kernels.kd_loss import fused_tail_grad, fused_tail_stats
from kd_teacher.losses import student

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass
class Case:
    name: str
    rows: int
    v_local: int
    valid: int
    start: int
    vocab: int
    k: int
    temperature: float
    dtype: str
    special: str = ""  # "-inf", "nan", "+inf", "sure" (ids 40 nats above the rest: tiny tail)
    seed: int = 0


def fixed_cases(small: bool) -> list[Case]:
    big = [
        Case("full vocab bf16 k=64", 8192, 128256, 128256, 0, 128256, 64, 1.0, "bf16"),
        Case("TP rank 3 of 8, some ids owned", 4096, 16032, 16032, 3 * 16032, 128256, 256, 1.0, "bf16"),
        Case("last TP rank, padding", 2048, 16032, 16032 - 95, 7 * 16032, 8 * 16032 - 95, 64, 2.0, "bf16"),
    ] if not small else []
    cases = big + [
        Case("padding 50304/50257, fp32, T=0.7", 512, 50304, 50257, 0, 50257, 64, 0.7, "fp32"),
        Case("fp16 T=2 k=1", 300, 32000, 32000, 0, 32000, 1, 2.0, "fp16"),
        Case("odd width 1001", 64, 1001, 1001, 0, 1001, 100, 1.0, "bf16"),
        Case("k = V", 16, 200, 200, 0, 200, 200, 1.0, "bf16"),
        Case("-inf rows", 64, 4099, 4000, 0, 4000, 32, 1.0, "bf16", special="-inf"),
        Case("NaN row", 16, 3000, 3000, 0, 3000, 8, 1.0, "fp32", special="nan"),
        Case("+inf row", 16, 3000, 3000, 0, 3000, 8, 1.0, "bf16", special="+inf"),
        Case("sure student, tail ~1e-17", 256, 32000, 32000, 0, 32000, 16, 1.0, "fp32", special="sure"),
        Case("sure student bf16 T=3", 256, 32000, 32000, 0, 32000, 16, 3.0, "bf16", special="sure"),
    ]
    # The interpreter runs each program in Python: a few rows per case.
    return [dataclasses.replace(c, rows=min(c.rows, 6)) for c in cases] if small else cases


def random_cases(n: int, seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    out = []
    for i in range(n):
        v_local = int(torch.randint(1, 40000, (1,), generator=g))
        valid = max(1, v_local - pick([0, 0, 1, 17, v_local // 3]))
        tp = pick([1, 1, 2, 4])
        rank = int(torch.randint(tp, (1,), generator=g))
        vocab = (tp - 1) * v_local + valid
        k = min(pick([1, 2, 5, 16, 64, 100, 128, 255, 256]), vocab)
        out.append(Case(f"random {i}", int(torch.randint(1, 2000, (1,), generator=g)), v_local, valid,
                        rank * v_local, vocab, k, pick([0.5, 1.0, 1.0, 2.0, 3.7]), pick(list(DTYPES)),
                        special=pick(["", "", "-inf", "sure"]), seed=seed + i))
    return out


def make_inputs(case: Case, device):
    """Logits [N, V_local] (the shard's), teacher ids [N, k] (global) as a teacher's top-k of a nearby row."""
    g = torch.Generator(device=device).manual_seed(case.seed)
    x = torch.randn(case.rows, case.v_local, generator=g, device=device) * 3
    # The teacher's ids: top-k of a perturbed copy of the full row; this shard is one slice of it.
    full = torch.randn(case.rows, case.vocab, generator=g, device=device) * 3
    lo, hi = case.start, min(case.start + case.valid, case.vocab)
    full[:, lo:hi] = x[:, : hi - lo] + 0.3 * torch.randn(case.rows, hi - lo, generator=g, device=device)
    ids = full.topk(case.k, dim=1).indices
    del full
    shard = student.VocabShard(case.start, case.v_local, case.valid, case.vocab, 1, None)
    pos, owned = shard.local_ids(ids)
    if case.special == "sure":
        x.scatter_add_(1, pos, torch.where(owned, 40.0 * case.temperature, 0.0))
    if case.special == "-inf":
        x[::3, : case.valid // 2] = float("-inf")
        x[1, : case.valid] = float("-inf")
    if case.special == "nan":
        x[3, case.valid // 2] = float("nan")
    if case.special == "+inf":
        x[2, case.valid - 1] = float("inf")
    return x.to(DTYPES[case.dtype]), shard, pos, owned


# ---- float64 references ------------------------------------------------------------------------------------

def id_columns(pos, owned, v_local):
    # scatter_add, not scatter_: ids this shard does not own sit at column 0 too, and scatter_ of True and
    # False to one column keeps whichever write lands last.
    hits = torch.zeros(pos.shape[0], v_local, dtype=torch.int32, device=pos.device)
    return hits.scatter_add_(1, pos, owned.to(torch.int32)) > 0


def reference_stats(rows, pos, owned, valid, inv_t, chunk=1024):
    n = rows.shape[0]
    out_max = torch.empty(n, dtype=torch.float64, device=rows.device)
    out_sum = torch.empty(n, dtype=torch.float64, device=rows.device)
    for lo in range(0, n, chunk):
        x = rows[lo:lo + chunk, :valid].double()
        m = x.amax(dim=1)
        shift = torch.where(torch.isneginf(m), 0.0, m)
        is_id = id_columns(pos[lo:lo + chunk], owned[lo:lo + chunk], rows.shape[1])[:, :valid]
        out_max[lo:lo + chunk] = m
        out_sum[lo:lo + chunk] = torch.where(is_id, 0.0, ((x - shift[:, None]) * inv_t).exp()).sum(dim=1)
    return out_max, out_sum


def grad_units(got, rows, pos, owned, valid, inv_t, shift, scale, chunk=1024) -> float:
    """Largest |got - exact| over the gradient, in units of the last place of got's dtype at the exact value."""
    fi = torch.finfo(got.dtype)
    shift, scale = shift.reshape(-1), scale.reshape(-1)
    worst = 0.0
    for lo in range(0, rows.shape[0], chunk):
        x = rows[lo:lo + chunk].double()
        is_id = id_columns(pos[lo:lo + chunk], owned[lo:lo + chunk], rows.shape[1])
        col = torch.arange(rows.shape[1], device=rows.device)
        exact = ((x - shift[lo:lo + chunk, None].double()) * inv_t).exp() * scale[lo:lo + chunk, None].double()
        # (an exact shift: the kernels' and the PyTorch path's fp32 `z - shift` rounds, worth a few fp32 ulps)
        exact = torch.where(is_id | (col >= valid), 0.0, exact)
        ulp = torch.clamp(exact.abs() * fi.eps, min=fi.smallest_normal * fi.eps)
        err = ((got[lo:lo + chunk].double() - exact).abs() / ulp).amax()
        worst = max(worst, float(err))
    return worst


def rel_err(got, want) -> float:
    got, want = got.double(), want.double()
    zero = want == 0
    if bool((got[zero] != 0).any()):
        return math.inf  # an empty tail must come out exactly 0
    r = ((got - want).abs() / want.abs().clamp(min=1e-300))[~zero]
    return float(r.max()) if r.numel() else 0.0


# ---- one case ----------------------------------------------------------------------------------------------

def pytorch_path():
    os.environ[launcher.DISABLE_ENV] = "0"


def fused_path():
    os.environ.pop(launcher.DISABLE_ENV, None)


def check_case(case: Case, device) -> dict:
    rows, shard, pos, owned = make_inputs(case, device)
    inv_t = 1.0 / case.temperature
    fused_path()
    f_max, f_sum = fused_tail_stats(rows, pos, owned, shard.valid, inv_t)
    pytorch_path()
    _, t_max, t_sum = student._shard_pass(rows, pos, owned, shard, inv_t, True, None)
    fused_path()
    r_max, r_sum = reference_stats(rows, pos, owned, shard.valid, inv_t)
    nan_rows = torch.isnan(r_max)
    good = ~nan_rows & ~torch.isposinf(r_max)  # NaN / +inf rows are refused by the loss; only their max matters
    max_exact = bool(torch.equal(torch.isnan(f_max), nan_rows)) and bool(
        torch.equal(f_max[~nan_rows].double(), r_max[~nan_rows]))
    fused_sum_err, torch_sum_err = rel_err(f_sum[good], r_sum[good]), rel_err(t_sum[good], r_sum[good])

    # Backward with the shift the loss would use: max + T log(tail), a row without tail mass at +inf.
    shift = torch.where(r_sum > 0, r_max + case.temperature * r_sum.log(), math.inf).float()
    shift = torch.where(good, shift, torch.zeros_like(shift))
    g = torch.Generator(device=device).manual_seed(case.seed + 1)
    scale = torch.randn(case.rows, 1, generator=g, device=device)
    f_grad = fused_tail_grad(rows, pos, owned, shard.valid, inv_t, shift, scale)
    pytorch_path()
    t_grad = student._tail_grad(rows, pos, owned, shard, inv_t, shift, scale, None, torch.float32)
    fused_path()
    sel = good.nonzero().squeeze(1)
    fused_units = grad_units(f_grad[sel], rows[sel], pos[sel], owned[sel], shard.valid, inv_t, shift[sel], scale[sel])
    torch_units = grad_units(t_grad[sel], rows[sel], pos[sel], owned[sel], shard.valid, inv_t, shift[sel], scale[sel])
    # One ulp of a bf16/fp16 gradient is far above the fp32 arithmetic's error; an fp32 gradient inherits the
    # rounding of fp32 `z - shift` (both paths compute it so), hence the PyTorch path's error as the bound.
    ok = (max_exact and fused_sum_err <= max(1e-5, 2 * torch_sum_err)
          and fused_units <= max(1.0, 2 * torch_units) and f_grad.dtype == rows.dtype)
    return dict(case=dataclasses.asdict(case), passed=ok, max_exact=max_exact, sum_rel_err_fused=fused_sum_err,
                sum_rel_err_pytorch=torch_sum_err, grad_ulps_fused=fused_units, grad_ulps_pytorch=torch_units)


def check_autograd(device) -> list[dict]:
    """The whole custom autograd function on both paths: bucket log-probs and the logits' gradient."""
    out = []
    for dtype, t, k in [(torch.bfloat16, 1.0, 64), (torch.float32, 2.0, 256), (torch.float16, 0.7, 7)]:
        g = torch.Generator(device=device).manual_seed(7)
        n, v_local, vocab = 1024, 32064, 32000
        logits = (torch.randn(n, v_local, generator=g, device=device) * 3).to(dtype)
        ids = torch.stack([torch.randperm(vocab, device=device)[:k] for _ in range(n)])
        upstream = torch.randn(n, k + 1, generator=g, device=device)

        def run():
            rows = logits.detach().requires_grad_()
            res = student.student_buckets(rows, ids, vocab_size=vocab, temperature=t, tail=True)
            (grad,) = torch.autograd.grad((res.logp * upstream).sum(), rows)
            return res.logp.detach(), grad

        fused_path()
        f_logp, f_grad = run()
        pytorch_path()
        t_logp, t_grad = run()
        fused_path()
        scale = t_grad.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
        out.append(dict(dtype=str(dtype), temperature=t, k=k,
                        logp_max_abs_diff=float((f_logp - t_logp).abs().max()),
                        grad_max_diff_rel_to_row_max=float(((f_grad.float() - t_grad.float()).abs() / scale).max())))
    return out
