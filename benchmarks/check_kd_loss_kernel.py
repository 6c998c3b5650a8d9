"""GPU check of the fused KD-loss kernels (kd_teacher/kernels/kd_loss*.py): correctness and kernel timings.

Correctness, case by case (fixed cases, then random shapes: bf16/fp16/fp32, T, padding, k 1..256, shards that
own some ids and not others, rows of -inf, NaN or +inf, students so sure of the teacher's ids that the tail is
~1e-17 of the row): the kernels' max and tail sum, and their tail gradient, against float64 computed from the
same stored logits, and the PyTorch path (KD_TEACHER_FUSED_KD_LOSS=0) measured against float64 the same way.
A case passes when the max is exact (NaN where the row holds one), the tail sum is within 1e-5 relative (or
twice the PyTorch path's error) and every gradient element is within one unit in the last place of its dtype
(or twice the PyTorch path's error, for fp32 gradients, where fp32 `z - shift` rounds by more than that).
Then the whole custom autograd function on both paths, and the number of host syncs per loss call
(torch.cuda.set_sync_debug_mode).

Timings ([8192, 128256] bf16, k=64): each pass against the read floor from a device copy of the logits, the
PyTorch path's passes, and a small sweep of the kernel configuration.

    python benchmarks/check_kd_loss_kernel.py --out $OUT/kd_loss_kernel_check.json
    TRITON_INTERPRET=1 python benchmarks/check_kd_loss_kernel.py --device cpu --small   # the interpreter, minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import time_ms  # noqa: E402

from kd_teacher.kernels import kd_loss as launcher  # noqa: E402
from kd_teacher.kernels.kd_loss import KDLossKernelConfig, fused_tail_grad, fused_tail_stats  # noqa: E402
from kd_teacher.losses import kd_loss_and_report, kd_terms, student  # noqa: E402
from kd_teacher.payload import TopKPayload  # noqa: E402

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


def count_syncs(device) -> dict:
    """Host syncs per call, counted by torch.cuda.set_sync_debug_mode (warns at every synchronising op)."""
    from kd_teacher.runtime import init_distributed

    init_distributed(1, 1)
    g = torch.Generator(device=device).manual_seed(8)
    teacher = torch.randn(2, 512, 32000, generator=g, device=device) * 3
    payload = TopKPayload.from_logits(teacher, 64)
    logits = (teacher + torch.randn_like(teacher)).bfloat16().requires_grad_()
    labels = torch.randint(0, 32000, (2, 512), generator=g, device=device)
    out = {}
    for name, call in {
        "kd_terms": lambda: kd_terms(logits, payload),
        "kd_loss_and_report(labels, alpha=0.5)": lambda: kd_loss_and_report(logits, payload, labels=labels,
                                                                             alpha=0.5),
    }.items():
        call()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                call()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        messages = [str(w.message).splitlines()[0][:160] for w in seen if "synchroniz" in str(w.message)]
        out[name] = dict(count=len(messages), messages=messages)
    return out


def profile_loss(device) -> list[dict]:
    """Where a forward_kl fwd+bwd's GPU time goes on the fused path ([8192, 128256] bf16, k=64): top ops."""
    g = torch.Generator(device=device).manual_seed(9)
    teacher = (torch.randn(2, 4096, 128256, generator=g, device=device) * 3).bfloat16()
    payload = TopKPayload.from_logits(teacher, 64)
    logits = (teacher + torch.randn_like(teacher)).transpose(0, 1).contiguous().requires_grad_()
    del teacher

    def step():
        loss = kd_terms(logits.transpose(0, 1), payload).loss.sum()
        torch.autograd.grad(loss, logits)

    fused_path()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        rows.append(dict(op=e.key[:100], device_us=float(us), calls=e.count))
    rows.sort(key=lambda r: -r["device_us"])
    return rows[:25]


# ---- timings -----------------------------------------------------------------------------------------------

def timings(device, sweep: bool) -> dict:
    case = Case("timing", 8192, 128256, 128256, 0, 128256, 64, 1.0, "bf16")
    rows, shard, pos, owned = make_inputs(case, device)
    nbytes = rows.numel() * rows.element_size()
    copy_ms = time_ms(lambda: torch.empty_like(rows).copy_(rows))
    bandwidth = 2 * nbytes / (copy_ms * 1e-3)  # read + write
    floor_fwd, floor_bwd = nbytes / bandwidth * 1e3, 2 * nbytes / bandwidth * 1e3
    shift = rows.float().amax(dim=1) + 2.0
    scale = torch.full((case.rows, 1), 0.5, device=device)

    def passes(config):
        return (time_ms(lambda: fused_tail_stats(rows, pos, owned, shard.valid, 1.0, config)),
                time_ms(lambda: fused_tail_grad(rows, pos, owned, shard.valid, 1.0, shift, scale, config)))

    fused_path()
    fwd, bwd = passes(None)
    mask_ms = time_ms(lambda: launcher.id_bitmask(pos, owned, case.v_local))
    pytorch_path()
    t_fwd = time_ms(lambda: student._shard_pass(rows, pos, owned, shard, 1.0, True, None), iters=5)
    t_bwd = time_ms(lambda: student._tail_grad(rows, pos, owned, shard, 1.0, shift, scale, None, torch.float32),
                    iters=5)
    fused_path()
    out = dict(shape=[case.rows, case.v_local], dtype="bf16", k=case.k, copy_ms=copy_ms,
               copy_bandwidth_gb_s=bandwidth / 1e9, floor_fwd_ms=floor_fwd, floor_bwd_ms=floor_bwd,
               fused_fwd_ms=fwd, fused_bwd_ms=bwd, fused_fwd_vs_floor=fwd / floor_fwd, fused_bwd_vs_floor=bwd / floor_bwd,
               id_bitmask_ms=mask_ms, pytorch_fwd_ms=t_fwd, pytorch_bwd_ms=t_bwd,
               default_config=dataclasses.asdict(KDLossKernelConfig()))
    if sweep:
        variants = [dict(words=64), dict(words=256), dict(stats_num_warps=8), dict(stats_num_warps=16),
                    dict(words=256, stats_num_warps=4),
                    dict(grad_num_warps=4), dict(grad_num_warps=16), dict(precise_exp=True), dict(precise_exp=False)]
        out["sweep"] = []
        for v in variants:
            f, b = passes(KDLossKernelConfig(**v))
            out["sweep"].append(dict(config=v, fwd_ms=f, bwd_ms=b))
    return out


# ---- main --------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--random", type=int, default=24, help="number of random cases")
    ap.add_argument("--small", action="store_true", help="small fixed cases only (the CPU interpreter)")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cases = fixed_cases(args.small) + ([] if args.small else random_cases(args.random, seed=100))
    results = []
    for case in cases:
        r = check_case(case, device)
        results.append(r)
        print(f"{'ok  ' if r['passed'] else 'FAIL'} {case.name:38} max exact {r['max_exact']!s:5} "
              f"sum err {r['sum_rel_err_fused']:.2e} (pytorch {r['sum_rel_err_pytorch']:.2e}) "
              f"grad {r['grad_ulps_fused']:.2f} ulp (pytorch {r['grad_ulps_pytorch']:.2f})", flush=True)
    n_pass = sum(r["passed"] for r in results)
    print(f"{n_pass}/{len(results)} cases pass")
    report = dict(benchmark="check_kd_loss_kernel", date=datetime.date.today().isoformat(), torch=torch.__version__,
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
                  passed=n_pass, total=len(results), cases=results)
    if device.type == "cuda":
        import triton

        report["triton"] = triton.__version__
        report["autograd"] = check_autograd(device)
        print("autograd, fused vs pytorch path:", report["autograd"])
        report["host_syncs_per_call"] = count_syncs(device)
        print("host syncs per call:", report["host_syncs_per_call"])
        report["profile_forward_kl_fused"] = profile_loss(device)
        total = sum(r["device_us"] for r in report["profile_forward_kl_fused"])
        print(f"profile, forward_kl fwd+bwd on the fused path (top ops, {total / 1e3:.2f} ms among them):")
        for r in report["profile_forward_kl_fused"][:15]:
            print(f"  {r['device_us'] / 1e3:7.3f} ms  x{r['calls']:<3} {r['op']}")
        report["timings"] = timings(device, sweep=not args.no_sweep)
        t = report["timings"]
        print(f"fused fwd {t['fused_fwd_ms']:.3f} ms (x{t['fused_fwd_vs_floor']:.2f} of read floor "
              f"{t['floor_fwd_ms']:.3f}), bwd {t['fused_bwd_ms']:.3f} ms (x{t['fused_bwd_vs_floor']:.2f} of "
              f"{t['floor_bwd_ms']:.3f}); pytorch path fwd {t['pytorch_fwd_ms']:.2f} bwd {t['pytorch_bwd_ms']:.2f} ms")
        for s in t.get("sweep", []):
            print(f"  {s['config']}: fwd {s['fwd_ms']:.3f} bwd {s['bwd_ms']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if n_pass == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
