"""Cases for the fused top-k + LSE kernel against the PyTorch reference (tests/gpu/test_topk_kernel.py runs them
on the GPU; `main` runs the small ones under Triton's CPU interpreter for tests/test_kernels.py).

For every case: the fused kernel (`kd_teacher.kernels.topk_lse.launch`) and the reference
(`kd_teacher.topk.local_topk_stats`) run on the same logits, on the same device, and must agree:
values bitwise, ids identical (ties by lower id, -1 for padding), max bitwise (NaN where the reference has
NaN; +0.0 and -0.0 count as equal), and LSE = max + log(sum) with the same non-finite pattern and, row by
row, within 2 ulp of fp32 (at max(|LSE|, 1)) of the reference or at least as close to the float64 LSE as
the reference is (the reference's fp32 sum over the vocabulary has its own rounding error). Cases cover random
shapes, k, T, dtypes, padded vocabularies, ties, columns sorted by value, -inf / +inf / NaN / +-0 / huge values,
strided rows, and the teacher shape [8192, 128256] bf16.

CPU (Triton's interpreter, small shapes):
      TRITON_INTERPRET=1 python tests/gpu/topk_kernel_cases.py --only "ties,padded fp32"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kd_teacher.kernels.topk_lse import TopKKernelConfig, launch, plan_for  # noqa: E402
from kd_teacher.topk import local_topk_stats  # noqa: E402

log = logging.getLogger("topk_kernel_cases")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass
class Case:
    name: str
    n: int
    v: int
    k: int
    dtype: str = "bf16"
    temperature: float = 1.0
    vocab_start: int = 0
    valid: int | None = None  # None: no padding
    kind: str = "randn"  # randn | ties | sorted | specials | nonfinite | strided
    seed: int = 0


def make_logits(case: Case, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(case.seed)
    n, v = case.n, case.v
    if case.kind == "ties":
        x = torch.randint(-3, 4, (n, v), generator=g).float()
    elif case.kind == "sorted":
        # Columns sorted by value (ascending, and descending on odd rows): logits that follow the column.
        x = torch.sort(torch.randn(n, v, generator=g) * 3, dim=1).values
        x[1::2] = x[1::2].flip(1)
    elif case.kind == "specials":
        x = torch.randn(n, v, generator=g) * 3
        r = torch.rand(n, v, generator=g)
        x[r < 0.2] = float("-inf")
        x[(r >= 0.2) & (r < 0.3)] = 0.0
        x[(r >= 0.3) & (r < 0.4)] = -0.0
        x[0::4, 5::97] = 1e30  # huge but finite (also in bf16), many ties at the top
        x[1::4, 7::89] = -1e30
        x[2::4, 3] = float("inf")
    elif case.kind == "nonfinite":
        x = torch.randn(n, v, generator=g)
        x[0] = float("-inf")  # all -inf: max -inf, sum NaN (as the reference)
        x[1, v // 2] = float("nan")
        x[2, v // 3] = -float("nan")  # a NaN with the sign bit: ranks below -inf
        x[3, :: max(1, v // 5)] = float("inf")
        if n > 5:
            x[4, v // 2] = float("nan")  # NaN beside +inf: max NaN (as torch.amax), NaN first
            x[4, v // 3] = float("inf")
            x[5, [v // 7, v // 5, v // 3]] = torch.tensor([float("nan"), -float("nan"), float("nan")])  # ties by id
    else:
        x = torch.randn(n, v, generator=g) * 4 + torch.randn(n, 1, generator=g) * 10
    x = x.to(DTYPES[case.dtype])
    if case.kind == "strided":
        wide = torch.randn(n, v + 40, generator=g).to(DTYPES[case.dtype])
        wide[:, :v] = x
        return wide.to(device)[:, :v]
    return x.to(device)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _ulp(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    return torch.nextafter(a, torch.full_like(a, float("inf"))) - a


def exact_lse(x: torch.Tensor, temperature: float, valid: int) -> torch.Tensor:
    """float64 LSE of logits / T over the valid columns (rows of only padding: -inf), in row blocks."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for lo in range(0, x.shape[0], 512):
        xd = x[lo : lo + 512, :valid].double() / temperature
        out[lo : lo + 512] = torch.logsumexp(xd, dim=-1) if valid > 0 else float("-inf")
    return out


def compare(case: Case, fused, ref, lse64: torch.Tensor) -> dict:
    v, i, m, s, flags = fused
    rv, ri, rm, rs = ref
    out = {
        "values_bitwise": bool(v.shape == rv.shape and torch.equal(_bits(v), _bits(rv))),
        "ids_equal": bool(i.shape == ri.shape and torch.equal(i, ri)),
    }
    same_max = (_bits(m) == _bits(rm)) | (torch.isnan(m) & torch.isnan(rm)) | ((m == 0) & (rm == 0))
    out["max_bitwise"] = bool(same_max.all())
    # As vocab_parallel_topk combines them: max + log(sum) in float64, rounded once to fp32.
    lse, rlse = (m.double() + torch.log(s.double())).float(), (rm.double() + torch.log(rs.double())).float()
    fin, rfin = torch.isfinite(lse), torch.isfinite(rlse)
    same_nonfinite = torch.equal(fin, rfin) and torch.equal(torch.isnan(lse), torch.isnan(rlse))
    both = fin & rfin
    if both.any():
        # ulp of fp32 at max(|LSE|, 1): below 1 the LSE is a difference of larger terms (max and log sum).
        unit = _ulp(rlse[both].abs().clamp_min(1.0)).double()
        diff = (lse[both] - rlse[both]).abs().double() / unit
        exact = lse64[both]
        err_fused = (lse[both].double() - exact).abs() / unit
        err_ref = (rlse[both].double() - exact).abs() / unit
        # A row passes when the fused LSE is within 2 ulp of the reference, or at least as close to the
        # float64 value as the reference is (the reference's own fp32 summation is not exact either).
        row_ok = (diff <= 2.0) | (err_fused <= torch.maximum(err_ref, torch.full_like(err_ref, 2.0)))
        out["lse_max_ulp"] = float(diff.max())
        out["lse_fused_vs_fp64_max_ulp"] = float(err_fused.max())
        out["lse_reference_vs_fp64_max_ulp"] = float(err_ref.max())
        out["lse_rows_over_2ulp_vs_reference"] = int((diff > 2.0).sum())
        out["lse_rows_failing"] = int((~row_ok).sum())
    else:
        out["lse_max_ulp"] = out["lse_fused_vs_fp64_max_ulp"] = out["lse_reference_vs_fp64_max_ulp"] = 0.0
        out["lse_rows_over_2ulp_vs_reference"] = out["lse_rows_failing"] = 0
    out["lse_nonfinite_match"] = bool(same_nonfinite)
    if not same_nonfinite:
        row = int((fin != rfin).nonzero()[0]) if not torch.equal(fin, rfin) else int((torch.isnan(lse) != torch.isnan(rlse)).nonzero()[0])
        out["first_nonfinite_mismatch"] = {"row": row, "fused_max": float(m[row]), "fused_sum": float(s[row]),
                                           "ref_max": float(rm[row]), "ref_sum": float(rs[row])}
    out["lse_ok"] = bool(same_nonfinite and out["lse_rows_failing"] == 0)
    out["exact_path_rows"] = int(flags.sum())
    out["rows"] = int(flags.numel())
    if not out["ids_equal"] and i.shape == ri.shape:
        bad = (i != ri).any(dim=-1).nonzero().flatten()[:4].tolist()
        out["first_bad_row"] = bad[0]
        out["bad_rows"] = [{"row": r, "fused_ids": i[r, :6].tolist(), "ref_ids": ri[r, :6].tolist(),
                            "fused_value_bits": _bits(v[r, :6]).tolist(), "ref_value_bits": _bits(rv[r, :6]).tolist(),
                            "exact_path": int(flags[r])} for r in bad]
    out["ok"] = out["values_bitwise"] and out["ids_equal"] and out["max_bitwise"] and out["lse_ok"]
    return out


def gpu_cases() -> list[Case]:
    cases = [
        Case("teacher bf16 k64", 8192, 128256, 64),
        Case("fp32 k64 T0.7", 2048, 128256, 64, "fp32", 0.7, seed=1),
        Case("TP8 shard, padded, k128 T2", 4096, 16032, 128, "bf16", 2.0, 16032 * 7, 16032 - 100, seed=2),
        Case("Qwen TP4 shard k256 T1.5", 1024, 37984, 256, "bf16", 1.5, 37984, seed=3),
        Case("k1", 3000, 50000, 1, "bf16", seed=4),
        Case("k100 fp32 T0.5", 1500, 32000, 100, "fp32", 0.5, seed=5),
        Case("k > V", 300, 50, 64, "bf16", seed=6),
        Case("valid < k", 200, 1000, 64, "fp32", 1.0, 3000, 10, seed=7),
        Case("padding only", 64, 2048, 16, "bf16", 1.0, 0, 0, seed=8),
        Case("ties", 512, 20000, 64, "bf16", seed=9, kind="ties"),
        Case("ties fp32 T3", 256, 9000, 200, "fp32", 3.0, seed=10, kind="ties"),
        Case("sorted columns", 256, 40000, 64, "bf16", seed=11, kind="sorted"),
        Case("specials bf16", 512, 30000, 64, "bf16", seed=12, kind="specials"),
        Case("specials fp32 T0.9", 512, 30000, 32, "fp32", 0.9, seed=13, kind="specials"),
        Case("nonfinite", 8, 9000, 64, "bf16", 1.0, 0, 8900, seed=14, kind="nonfinite"),
        Case("nonfinite fp32 T0.8", 8, 140000, 128, "fp32", 0.8, 0, 139000, seed=17, kind="nonfinite"),
        Case("strided rows", 700, 25000, 64, "bf16", seed=15, kind="strided"),
        Case("fp16", 500, 32000, 64, "fp16", 1.0, seed=16),
    ]
    rnd = random.Random(1234)
    for j in range(8):
        v = rnd.choice([rnd.randint(1, 300), rnd.randint(300, 20000), rnd.randint(20000, 140000)])
        valid = v if rnd.random() < 0.6 else rnd.randint(0, v)
        cases.append(Case(
            f"random {j}", rnd.randint(1, 2500), v, rnd.choice([1, 7, 32, 64, 64, 128, 255]),
            rnd.choice(["bf16", "bf16", "fp32"]), rnd.choice([1.0, 1.0, 2.0, 0.8, 1.3]),
            rnd.randint(0, 4) * v, valid, seed=100 + j,
        ))
    return cases


def small_cases() -> list[Case]:
    """Shapes for Triton's CPU interpreter (numpy, slow): several chunks of 512 columns each."""
    return [
        Case("randn multi-chunk", 3, 1500, 64, "bf16", 2.0, 1500, seed=1),
        Case("padded fp32", 3, 1100, 32, "fp32", 1.0, 0, 1030, seed=2),
        Case("ties", 3, 1200, 64, "bf16", seed=3, kind="ties"),
        Case("sorted", 2, 1100, 40, "fp32", seed=4, kind="sorted"),
        Case("specials", 4, 1000, 64, "bf16", seed=5, kind="specials"),
        Case("nonfinite", 6, 700, 16, "fp32", 1.0, 0, 690, seed=6, kind="nonfinite"),
        Case("nonfinite bf16", 6, 1100, 16, "bf16", 1.0, 0, 1090, seed=6, kind="nonfinite"),
        Case("k > V, k 256", 2, 200, 256, "bf16", seed=7),
        Case("padding only", 2, 600, 8, "bf16", 1.0, 0, 0, seed=8),
        # 32-column groups: the ~100 candidate groups are re-read in two slices of 64
        Case("sliced re-read", 2, 20000, 100, "bf16", 1.3, 20000, 19990, seed=9),
    ]


def run_case(case: Case, device: torch.device, config: TopKKernelConfig) -> dict:
    x = make_logits(case, device)
    valid = case.v if case.valid is None else case.valid
    t0 = time.perf_counter()
    fused = launch(x, case.k, case.temperature, case.vocab_start, valid, config)
    if fused is None:
        raise RuntimeError(f"{case.name}: the fused kernel declined the case")
    ref = local_topk_stats(x, case.k, case.temperature, case.vocab_start, valid)
    if device.type == "cuda":
        torch.cuda.synchronize()
    result = {"case": dataclasses.asdict(case), "plan": dataclasses.asdict(plan_for(case.v, case.k, config))}
    result.update(compare(case, fused, ref, exact_lse(x, case.temperature, valid)))
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def main(argv=None) -> int:
    """The small cases under Triton's CPU interpreter (set TRITON_INTERPRET=1 before Python starts)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="{}", help='TopKKernelConfig fields as JSON, e.g. \'{"fuse_select": false}\'')
    p.add_argument("--only", default=None, help="run only the cases of these names (comma-separated)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = TopKKernelConfig(**{"chunk": 512, **json.loads(args.config)})
    cases = small_cases()
    if args.only:
        wanted = args.only.split(",")
        cases = [c for c in cases if c.name in wanted]
    results = [run_case(case, torch.device("cpu"), config) for case in cases]
    for case, r in zip(cases, results):
        log.info("%-32s %s  %s", case.name, "PASS" if r["ok"] else "FAIL", summary_line(r))
    n_fail = sum(not r["ok"] for r in results)
    print(f"{len(results) - n_fail}/{len(results)} cases pass")
    return 1 if n_fail else 0


def summary_line(r: dict) -> str:
    return (f"vals={r['values_bitwise']} ids={r['ids_equal']} max={r['max_bitwise']} lse ulp: vs ref "
            f"{r['lse_max_ulp']:.2f}, fused vs fp64 {r['lse_fused_vs_fp64_max_ulp']:.2f}, ref vs fp64 "
            f"{r['lse_reference_vs_fp64_max_ulp']:.2f}; exact_rows={r['exact_path_rows']}/{r['rows']}")


if __name__ == "__main__":
    sys.exit(main())
