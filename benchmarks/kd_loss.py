"""KD loss forward+backward: time and peak memory against Megatron-Core's vocab_parallel_cross_entropy.

Both losses run on the same bf16 logits [s, b, V] in the same process (TP=1); the KD loss gets them the way
the student hook does, as a transposed view [b, s, V]. Ratios are KD / CE, measured side by side.

On CUDA every KD variant that has a tail runs twice: "[fused]" with the Triton kernels of
kd_teacher/kernels/kd_loss.py (the default there) and "[pytorch]" with the PyTorch path forced
(KD_TEACHER_FUSED_KD_LOSS=0), interleaved in the same run. On the CPU only the PyTorch path exists.

Memory is the peak of memory allocated during one forward+backward above what was allocated before it
(the logits and the payload are not counted; the logits' gradient is). It is also given in units of one fp32
copy of the logits, the issue's target being <= 1 such copy beyond the logits. On CUDA it is
torch.cuda.max_memory_allocated. On the CPU, where PyTorch keeps no allocator statistics, a
TorchDispatchMode adds the bytes of every storage an op creates and subtracts them when the storage is
freed (PyTorch keeps one Python object per storage, so a weakref finaliser sees its real end of life).
Kernel-internal scratch is not seen that way; it is small for these ops. Timing runs never use that mode.

    python benchmarks/kd_loss.py --preset cpu --out benchmarks/results/kd_loss_cpu.json
    python benchmarks/kd_loss.py --preset gpu --out $OUT/kd_loss_gpu.json      # [8192, 128256] bf16, k=64
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import statistics
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_teacher.kernels.kd_loss import DISABLE_ENV, kd_loss_kernel_applies  # noqa: E402
from kd_teacher.losses import kd_loss, kd_loss_and_report  # noqa: E402
from kd_teacher.payload import TopKPayload  # noqa: E402

log = logging.getLogger("kd_loss_bench")


@dataclass
class Preset:
    tokens: int
    vocab: int
    k: int
    batch: int = 2
    warmup: int = 2
    reps: int = 5


PRESETS = {
    "cpu": Preset(tokens=2048, vocab=32000, k=64, warmup=1, reps=5),
    "gpu": Preset(tokens=8192, vocab=128256, k=64, warmup=3, reps=10),
}

# name -> (temperature, kd_loss keyword arguments); "megatron_ce" is the baseline.
VARIANTS = {
    "kd forward_kl": (1.0, dict(kind="forward_kl")),
    "kd forward_kl chunk=1024": (1.0, dict(kind="forward_kl", chunk_tokens=1024)),
    "kd forward_kl T=2": (2.0, dict(kind="forward_kl")),
    "kd reverse_kl": (1.0, dict(kind="reverse_kl")),
    "kd jsd beta=0.5": (1.0, dict(kind="jsd", beta=0.5)),
    "kd forward_kl no tail": (1.0, dict(kind="forward_kl", tail=False)),
    "kd+ce alpha=0.5 (labels)": (1.0, dict(kind="forward_kl", alpha=0.5)),
}


# ---- memory ------------------------------------------------------------------------------------------------

class LiveStorageBytes(TorchDispatchMode):
    """Bytes of storages created under this mode and still alive; `peak` is the maximum seen."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        # In-place and out= ops return storages that already exist (possibly from before this mode).
        inputs = {t.untyped_storage().data_ptr() for t in _tensors(args, kwargs)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().data_ptr() not in inputs:
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._seen and storage.nbytes():
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def _tensors(args, kwargs):
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, torch.Tensor))


def measure_peak(step, device) -> int:
    """Extra peak bytes of `step()` (which returns what it wants kept alive until the end, e.g. the grad)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        kept = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del kept
        return peak
    mode = LiveStorageBytes()
    with mode:
        kept = step()
    del kept
    return mode.peak


def measure_times(steps: dict, device, warmup: int, reps: int) -> dict[str, list[float]]:
    """Milliseconds per step, round-robin over the variants so that load changes on a shared machine hit
    every variant alike (the CPU machines run other jobs beside this one)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + reps):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            kept = step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            del kept
            if i >= warmup:
                times[name].append(dt * 1e3)
    return times


# ---- the steps ---------------------------------------------------------------------------------------------

def make_inputs(p: Preset, device):
    s = p.tokens // p.batch
    g = torch.Generator(device=device).manual_seed(0)  # on the device: 1e9 normals on a CPU take minutes
    # Realistic scale: teacher and student logits with std ~3 (LM logits), student a perturbed teacher.
    teacher = (torch.randn(p.batch, s, p.vocab, generator=g, device=device) * 3).to(torch.bfloat16)
    payloads = {t: TopKPayload.from_logits(teacher, p.k, temperature=t) for t in {v[0] for v in VARIANTS.values()}}
    noise = torch.randn(p.batch, s, p.vocab, generator=g, device=device).to(torch.bfloat16)
    student_sbv = (teacher + noise).transpose(0, 1).contiguous().requires_grad_()  # the output layer's layout
    labels_sb = torch.randint(0, p.vocab, (s, p.batch), generator=g, device=device)
    del teacher, noise
    return student_sbv, payloads, labels_sb


def ce_step(logits_sbv, labels_sb):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def step():
        loss = vocab_parallel_cross_entropy(logits_sbv, labels_sb)
        (grad,) = torch.autograd.grad(loss.sum(), logits_sbv)
        return grad

    return step


def kd_step(logits_sbv, payload, labels_sb, kwargs, path: str):
    kwargs = dict(kwargs)
    alpha = kwargs.pop("alpha", None)

    def step():
        # The dispatch reads the switch at every call, so both paths interleave in one process.
        if path == "pytorch":
            os.environ[DISABLE_ENV] = "0"
        else:
            os.environ.pop(DISABLE_ENV, None)
        logits = logits_sbv.transpose(0, 1)
        if alpha is None:
            loss = kd_loss(logits, payload, **kwargs).sum()
        else:
            loss, _, _ = kd_loss_and_report(logits, payload, labels=labels_sb.transpose(0, 1), alpha=alpha, **kwargs)
        (grad,) = torch.autograd.grad(loss, logits_sbv)
        return grad

    return step


# ---- run ---------------------------------------------------------------------------------------------------

def run(preset_name: str) -> dict:
    from kd_teacher.runtime import init_distributed

    init_distributed(1, 1)  # Megatron's CE reads its TP group from parallel_state
    p = PRESETS[preset_name]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    logits, payloads, labels = make_inputs(p, device)
    fp32_copy = p.tokens * p.vocab * 4
    grad_bytes = logits.numel() * logits.element_size()
    steps = {"megatron_ce": ce_step(logits, labels)}
    fused = kd_loss_kernel_applies(logits.view(-1, p.vocab)[:1])
    for name, (t, kw) in VARIANTS.items():
        # The fused kernels replace the tail's passes; without a tail (and on the CPU) there is one path.
        paths = ["fused", "pytorch"] if fused and kw.get("tail", True) else ["pytorch"]
        if "chunk_tokens" in kw:
            paths = ["pytorch"]  # the fused path has no fp32 working buffer to chunk
        for path in paths:
            label = f"{name} [{path}]" if fused else name
            steps[label] = kd_step(logits, payloads[t], labels, kw, path)
    all_times = measure_times(steps, device, p.warmup, p.reps)
    results = {}
    for name, step in steps.items():
        times = all_times[name]
        peak = measure_peak(step, device)
        results[name] = dict(
            time_ms_min=min(times), time_ms_median=statistics.median(times), time_ms=times, extra_peak_bytes=peak,
            extra_peak_fp32_copies=peak / fp32_copy, extra_peak_without_grad_fp32_copies=(peak - grad_bytes) / fp32_copy,
        )
        log.info("%s: %.1f ms, peak +%.2f fp32 copies", name, results[name]["time_ms_min"],
                 results[name]["extra_peak_fp32_copies"])
    base = results["megatron_ce"]
    for r in results.values():
        # min over repetitions: the least disturbed run of each, robust on a shared machine
        r["time_ratio_vs_ce"] = r["time_ms_min"] / base["time_ms_min"]
        r["time_ratio_vs_ce_median"] = r["time_ms_median"] / base["time_ms_median"]
        r["peak_ratio_vs_ce"] = r["extra_peak_bytes"] / base["extra_peak_bytes"]
    for name, r in results.items():
        if name.endswith(" [fused]") and name.replace("[fused]", "[pytorch]") in results:
            r["time_ratio_vs_pytorch_path"] = r["time_ms_min"] / results[name.replace("[fused]", "[pytorch]")]["time_ms_min"]
    os.environ.pop(DISABLE_ENV, None)
    return dict(
        benchmark="kd_loss", preset=preset_name, config=asdict(p), logits_dtype="bfloat16",
        device=torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads)",
        torch=torch.__version__, megatron_core=_megatron_version(), date=datetime.date.today().isoformat(),
        fused_kernels=fused,
        memory_method="torch.cuda.max_memory_allocated" if device.type == "cuda" else "live storage bytes "
        "(TorchDispatchMode + storage finalisers)",
        targets=dict(time_ratio_vs_ce="<= 1.5 on GPU", extra_peak_fp32_copies="<= 1 beyond the logits' gradient"),
        results=results,
    )


def _megatron_version() -> str:
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:  # noqa: BLE001 - installed from a wheel path without metadata
        return "unknown"


def print_table(report: dict) -> None:
    print(f"kd_loss vs megatron vocab_parallel_cross_entropy: {report['config']['tokens']} x "
          f"{report['config']['vocab']} bf16, k={report['config']['k']}, {report['device']}")
    print(f"{'variant':38} {'min ms':>9} {'x CE':>6} {'peak (fp32 copies)':>19} {'w/o grad':>9} {'x CE':>6}")
    for name, r in report["results"].items():
        vs = f"  x{r['time_ratio_vs_pytorch_path']:.3f} of pytorch path" if "time_ratio_vs_pytorch_path" in r else ""
        print(f"{name:38} {r['time_ms_min']:9.2f} {r['time_ratio_vs_ce']:6.3f} {r['extra_peak_fp32_copies']:19.2f} "
              f"{r['extra_peak_without_grad_fp32_copies']:9.2f} {r['peak_ratio_vs_ce']:6.2f}{vs}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report = run(args.preset)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
