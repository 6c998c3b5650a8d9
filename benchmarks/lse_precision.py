"""LSE precision on natural logits: the fused kernel and the reference path against float64, same run.

    PYTHONPATH=$PWD python benchmarks/lse_precision.py --out $OUT/lse_precision.json     # CUDA GPU

`tests/gpu/test_topk_kernel.py` compares the fused kernel with the reference row by row on adversarial cases, and
measures ulps at max(|LSE|, 1): rows whose LSE is near 0 by cancellation (max ~ -log(sum)) get the ulp of 1.0,
1.2e-7, for an error that comes from terms of magnitude ~20. This script asks the plain question on logits as
a teacher makes them (unit-variance rows, the teacher shape and two others): how far is each path's fp32 LSE
from the float64 LSE of the same logits, in ulps of the LSE itself? Paths:

- fused kernel, ex2.approx (the default) and CUDA's expf (`precise_exp`);
- the reference path (`local_topk_stats`: torch exp, fp32 sum);
- fp32 exp with a float64 sum, and float64 exp of the fp32 arguments: what the sum and the exponentials each
  cost, for scale.
Every LSE is formed as the engine forms it: max + log(sum) in float64, rounded once to fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_teacher.topk import local_topk_stats  # noqa: E402
from kd_teacher.kernels.topk_lse import TopKKernelConfig, launch  # noqa: E402

CASES = (  # name, rows, vocabulary shard, temperature, dtype, seed
    ("teacher [8192, 128256] bf16", 8192, 128256, 1.0, torch.bfloat16, 0),
    ("TP4 shard [1024, 37984] bf16 T1.5", 1024, 37984, 1.5, torch.bfloat16, 3),
    ("[2048, 128256] fp32 T0.7", 2048, 128256, 0.7, torch.float32, 1),
)
ROW_BLOCK = 512


def _ulp(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    return torch.nextafter(a, torch.full_like(a, float("inf"))) - a


def _exact_lse(x: torch.Tensor, temperature: float) -> torch.Tensor:
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for lo in range(0, x.shape[0], ROW_BLOCK):
        out[lo : lo + ROW_BLOCK] = torch.logsumexp(x[lo : lo + ROW_BLOCK].double() / temperature, -1)
    return out


def _scaled_pieces(x: torch.Tensor, temperature: float):
    """max of the fp32 logits/T (as torch forms x / T: x * fp32(1/T)), and the fp32 differences to it, per block."""
    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float32).item()
    for lo in range(0, x.shape[0], ROW_BLOCK):
        xs = x[lo : lo + ROW_BLOCK].float()
        xt = xs * inv_t if temperature != 1.0 else xs
        m = xt.amax(-1)
        yield m, xt - m[:, None]


def _errors(m: torch.Tensor, s: torch.Tensor, exact: torch.Tensor) -> dict:
    lse = (m.double() + torch.log(s.double())).float().double()
    ulps = (lse - exact) / _ulp(exact.float()).double()
    return dict(max_ulp=round(float(ulps.abs().max()), 3), p999_ulp=round(float(ulps.abs().quantile(0.999)), 3),
                mean_signed_ulp=round(float(ulps.mean()), 4), rows_over_2_ulp=int((ulps.abs() > 2).sum()))


def run_case(name, n, v, temperature, dtype, seed) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, v, generator=g, device="cuda").to(dtype)
    exact = _exact_lse(x, temperature)
    paths = {}
    for label, cfg in (("fused, ex2.approx (default)", TopKKernelConfig()),
                       ("fused, expf", TopKKernelConfig(precise_exp=True))):
        _, _, m, s, _ = launch(x, 64, temperature, 0, v, cfg)
        paths[label] = _errors(m, s, exact)
    _, _, m, s = local_topk_stats(x, 64, temperature=temperature, vocab_start=0, valid=v)
    paths["reference (torch exp, fp32 sum)"] = _errors(m, s, exact)
    pieces = list(_scaled_pieces(x, temperature))
    m = torch.cat([p[0] for p in pieces])
    paths["fp32 exp, float64 sum"] = _errors(m, torch.cat([d.exp().sum(-1, dtype=torch.float64) for _, d in pieces]),
                                             exact)
    paths["float64 exp of the fp32 arguments"] = _errors(m, torch.cat([d.double().exp().sum(-1) for _, d in pieces]),
                                                         exact)
    lse_range = [round(float(exact.min()), 2), round(float(exact.max()), 2)]
    return dict(case=name, rows=n, vocab=v, temperature=temperature, dtype=str(dtype).replace("torch.", ""),
                lse_range=lse_range, paths=paths)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/lse_precision.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("lse_precision needs a CUDA GPU (the fused kernel)", file=sys.stderr)
        return 2
    results = [run_case(*c) for c in CASES]
    summary = dict(benchmark="lse_precision", device=torch.cuda.get_device_name(), torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d"), results=results)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    for r in results:
        print(f"{r['case']} (LSE {r['lse_range'][0]}..{r['lse_range'][1]})")
        for label, e in r["paths"].items():
            print(f"  {label:36s} max {e['max_ulp']:.3f} ulp, 99.9% {e['p999_ulp']:.3f}, rows > 2 ulp {e['rows_over_2_ulp']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
