"""Timings of the fused KD-loss kernels on one GPU ([8192, 128256] bf16, k=64): each pass against the read floor
from a device copy of the logits, the PyTorch path's passes, a small sweep of the kernel configuration, where a
forward_kl fwd+bwd's GPU time goes (profile), and the host syncs per loss call. Correctness:
`pytest -m gpu tests/gpu` (tests/gpu/test_kd_loss_kernel.py).

    python benchmarks/kd_loss_kernel_timing.py --out $OUT/kd_loss_kernel_timing.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
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
from tests.gpu.kd_loss_kernel_cases import Case, fused_path, make_inputs, pytorch_path  # noqa: E402


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    import triton

    report = dict(benchmark="kd_loss_kernel_timing", date=datetime.date.today().isoformat(), torch=torch.__version__,
                  triton=triton.__version__, device=torch.cuda.get_device_name())
    report["host_syncs_per_call"] = count_syncs(device)
    report["profile_forward_kl_fused"] = profile_loss(device)
    report["timings"] = timings(device, sweep=not args.no_sweep)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    total = sum(r["device_us"] for r in report["profile_forward_kl_fused"])
    print(f"profile, forward_kl fwd+bwd on the fused path (top ops, {total / 1e3:.2f} ms among them):")
    for r in report["profile_forward_kl_fused"][:15]:
        print(f"  {r['device_us'] / 1e3:7.3f} ms  x{r['calls']:<3} {r['op']}")
    print("host syncs per call:", {k: v["count"] for k, v in report["host_syncs_per_call"].items()})
    t = report["timings"]
    for s in t.get("sweep", []):
        print(f"  {s['config']}: fwd {s['fwd_ms']:.3f} bwd {s['bwd_ms']:.3f}")
    print(f"fused fwd {t['fused_fwd_ms']:.3f} ms (x{t['fused_fwd_vs_floor']:.2f} of read floor "
          f"{t['floor_fwd_ms']:.3f}), bwd {t['fused_bwd_ms']:.3f} ms (x{t['fused_bwd_vs_floor']:.2f} of "
          f"{t['floor_bwd_ms']:.3f}); pytorch path fwd {t['pytorch_fwd_ms']:.2f} bwd {t['pytorch_bwd_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
