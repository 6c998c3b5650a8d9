"""GPU check of the fused cross-entropy + KD pass (kd_teacher/losses/ce_kd.py, kernels/ce_kd*.py).

At a training shape (default [8192, 128256] bf16, k=64, T=1, one shard; also T=2 and padding), against
  - Megatron-Core's CE: `vocab_parallel_cross_entropy` and the native fused CE
    (`fusions.fused_cross_entropy.fused_vocab_parallel_cross_entropy`, what `cross_entropy_loss_fusion`
    runs): max |CE difference| against the stated tolerance (|d| <= 2e-6 + 2e-6 |CE|; docs/kd_step.md);
  - float64 on a subset of rows (the same stored logits): CE, KD bucket log-probs and the ONE gradient of
    w_ce * CE + w_kd . logp, in units of the logits dtype's ulp;
  - the PyTorch path of the same function (KD_TEACHER_FUSED_KD_LOSS=0): CE, log-probs, gradient;
and times fwd+bwd of: the fused pass; Megatron's native fused CE alone; Megatron's CE + the separate KD loss
(`student_buckets`), as the hook ran them before; and the read/write floor of the logits at the measured copy
bandwidth.

    python benchmarks/check_ce_kd.py --out $OUT/check_ce_kd.json
    TRITON_INTERPRET=1 python benchmarks/check_ce_kd.py --device cpu --rows 64 --vocab 2048   # the interpreter
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import time_ms  # noqa: E402

from kd_teacher.kernels import kd_loss as launcher  # noqa: E402
from kd_teacher.losses.ce_kd import fused_ce_kd  # noqa: E402
from kd_teacher.losses.student import student_buckets  # noqa: E402

CE_ATOL, CE_RTOL = 2e-6, 2e-6
ULP = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 2 ** -24}
# Allowed gradient error, in ulps of the row set's largest gradient: bf16/fp16 are dominated by the one final
# rounding; fp32 logits are computed in fp32 itself, so the fp32 rounding of the shift (max + log sum, |z| ~ 10)
# reaches the gradient as a few ulps (measured: 5 on the CPU at [64, 2048]).
GRAD_ULPS = {torch.bfloat16: 1, torch.float16: 1, torch.float32: 16}


def make(rows, v_local, vocab, k, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(rows, v_local, generator=g) * 3).to(dtype).to(device)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(rows)]).to(device)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[: rows // 4] = ids[: rows // 4, 0].cpu()  # a quarter of the labels are the teacher's top id
    labels = labels.to(device)
    w_ce = (torch.rand(rows, generator=g) + 0.5).to(device)
    w_kd = torch.randn(rows, k + 1, generator=g).to(device)
    return logits, ids, labels, w_ce, w_kd


def run_fused(logits, ids, labels, w_ce, w_kd, vocab, temperature):
    x = logits.detach().requires_grad_()
    ce, st = fused_ce_kd(x, labels, ids, vocab_size=vocab, temperature=temperature, tail=True)
    (grad,) = torch.autograd.grad((ce * w_ce).sum() + (st.logp * w_kd).sum(), x)
    return ce.detach(), st.logp.detach(), grad, int(st.bad_rows)


def float64_oracle(logits, ids, labels, w_ce, w_kd, vocab, temperature):
    z = logits.detach().double().requires_grad_()
    ce = torch.logsumexp(z, -1) - z.gather(1, labels.unsqueeze(1)).squeeze(1)
    ls = torch.log_softmax(z[:, :vocab] / temperature, -1)
    at = ls.gather(1, ids)
    rest = ls.scatter(1, ids, float("-inf"))
    logp = torch.cat([at, torch.logsumexp(rest, -1, keepdim=True)], 1)
    (grad,) = torch.autograd.grad((ce * w_ce.double()).sum() + (logp * w_kd.double()).sum(), z)
    return ce.detach(), logp.detach(), grad


def megatron_ces(logits, labels):
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.parallel_state import get_tensor_model_parallel_group
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    sb = logits.unsqueeze(1)  # [s, b=1, V]
    # megatron-core >= 0.19 takes the TP group as an argument; 0.16 reads it from parallel_state.
    extra = {"tp_group": get_tensor_model_parallel_group()} if "tp_group" in inspect.signature(
        vocab_parallel_cross_entropy).parameters else {}
    plain = vocab_parallel_cross_entropy(sb.clone(), labels.unsqueeze(1), **extra).squeeze(1)
    out = {"vocab_parallel_cross_entropy": plain}
    if logits.dtype == torch.bfloat16 and logits.is_cuda:  # the native fused CE is bf16-only (its gradient)
        out["fused_vocab_parallel_cross_entropy"] = fused_vocab_parallel_cross_entropy(
            sb.clone(), labels.unsqueeze(1), get_tensor_model_parallel_group()).squeeze(1)
    return out


def check(rows, v_local, vocab, k, dtype, temperature, device, oracle_rows):
    logits, ids, labels, w_ce, w_kd = make(rows, v_local, vocab, k, dtype, device)
    ce, logp, grad, bad = run_fused(logits, ids, labels, w_ce, w_kd, vocab, temperature)
    r = dict(rows=rows, v_local=v_local, vocab=vocab, k=k, dtype=str(dtype), temperature=temperature, bad_rows=bad)
    for name, theirs in megatron_ces(logits, labels).items():
        d = (ce - theirs).abs()
        r[f"ce_vs_{name}_max_abs"] = d.max().item()
        r[f"ce_vs_{name}_within_tolerance"] = bool(torch.all(d <= CE_ATOL + CE_RTOL * theirs.abs()))
    n = oracle_rows
    o_ce, o_logp, o_grad = float64_oracle(logits[:n], ids[:n], labels[:n], w_ce[:n], w_kd[:n], vocab, temperature)
    ulp = ULP[dtype] * o_grad.abs().clamp(min=torch.finfo(dtype).tiny)
    r["oracle_rows"] = n
    r["oracle_ce_max_abs"] = (ce[:n].double() - o_ce).abs().max().item()
    r["oracle_logp_max_abs"] = (logp[:n].double() - o_logp).abs().max().item()
    # One rounding of the fp32 sum to the logits' dtype: within one ulp, plus fp32 noise on tiny elements.
    r["oracle_grad_max_ulps"] = ((grad[:n].double() - o_grad).abs() / ulp).max().item()
    r["oracle_grad_max_abs"] = (grad[:n].double() - o_grad).abs().max().item()
    os.environ[launcher.DISABLE_ENV] = "0"
    try:
        p_ce, p_logp, p_grad, _ = run_fused(logits, ids, labels, w_ce, w_kd, vocab, temperature)
    finally:
        os.environ.pop(launcher.DISABLE_ENV)
    r["pytorch_path_ce_max_abs"] = (ce - p_ce).abs().max().item()
    r["pytorch_path_logp_max_abs"] = (logp - p_logp).abs().max().item()
    r["pytorch_path_grad_max_abs"] = (grad.float() - p_grad.float()).abs().max().item()
    r["passed"] = bool(
        bad == 0 and all(v for key, v in r.items() if key.endswith("within_tolerance"))
        and r["oracle_ce_max_abs"] <= 1e-5 and r["oracle_logp_max_abs"] <= 1e-5
        and r["oracle_grad_max_abs"] <= 1e-6 + GRAD_ULPS[dtype] * ULP[dtype] * o_grad.abs().max().item())
    return r


def timings(rows, v_local, vocab, k, device) -> dict:
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.parallel_state import get_tensor_model_parallel_group

    logits, ids, labels, w_ce, w_kd = make(rows, v_local, vocab, k, torch.bfloat16, device, seed=1)
    group = get_tensor_model_parallel_group()

    def fused():
        run_fused(logits, ids, labels, w_ce, w_kd, vocab, 1.0)

    def megatron_ce():
        x = logits.detach().unsqueeze(1).requires_grad_()
        ce = fused_vocab_parallel_cross_entropy(x, labels.unsqueeze(1), group)
        torch.autograd.grad((ce.squeeze(1) * w_ce).sum(), x)

    def separate():  # Megatron's CE, then the KD loss on the same logits; autograd adds the two gradients
        x = logits.detach().requires_grad_()
        ce = fused_vocab_parallel_cross_entropy(x.unsqueeze(1), labels.unsqueeze(1), group).squeeze(1)
        st = student_buckets(x, ids, vocab_size=vocab, temperature=1.0, tail=True, check=False)
        torch.autograd.grad((ce * w_ce).sum() + (st.logp * w_kd).sum(), x)

    copy = torch.empty_like(logits)
    out = dict(shape=[rows, v_local], fused_ms=time_ms(fused), megatron_fused_ce_ms=time_ms(megatron_ce),
               megatron_ce_plus_separate_kd_ms=time_ms(separate),
               copy_logits_ms=time_ms(lambda: copy.copy_(logits)))
    # Floor of the fused pass: read the logits twice (forward, backward) and write the gradient once.
    out["floor_ms"] = 1.5 * out["copy_logits_ms"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--oracle-rows", type=int, default=64)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    from kd_teacher.runtime import init_distributed

    init_distributed(1, 1, 1234)
    padded = -(-args.vocab // 128) * 128
    cases = [(args.vocab, padded, torch.bfloat16, 1.0), (args.vocab - 100, padded, torch.bfloat16, 2.0),
             (args.vocab, padded, torch.float32, 1.0)]
    results = []
    for vocab, v_local, dtype, t in cases:
        r = check(args.rows, v_local, vocab, args.k, dtype, t, device, args.oracle_rows)
        results.append(r)
        print(f"{'ok  ' if r['passed'] else 'FAIL'} {dtype} T={t} vocab {vocab}/{v_local}: CE vs Megatron "
              f"{r['ce_vs_vocab_parallel_cross_entropy_max_abs']:.2e}, vs float64 {r['oracle_ce_max_abs']:.2e}; "
              f"logp {r['oracle_logp_max_abs']:.2e}; grad {r['oracle_grad_max_ulps']:.2f} ulp", flush=True)
    report = dict(benchmark="check_ce_kd", date=datetime.date.today().isoformat(), torch=torch.__version__,
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  ce_tolerance=f"|ce - megatron| <= {CE_ATOL} + {CE_RTOL} |megatron|",
                  passed=sum(r["passed"] for r in results), total=len(results), cases=results)
    if device.type == "cuda":
        t = report["timings"] = timings(args.rows, padded, args.vocab, args.k, device)
        print("| pass (fwd+bwd) | ms |")
        print("| --- | --- |")
        for key in ("fused_ms", "megatron_fused_ce_ms", "megatron_ce_plus_separate_kd_ms", "floor_ms"):
            print(f"| {key[:-3]} | {t[key]:.3f} |")
    print(f"{report['passed']}/{report['total']} cases pass")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] == report["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
