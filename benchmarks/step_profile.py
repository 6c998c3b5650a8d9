"""Where a training step's time goes, from a torch.profiler (Kineto) chrome trace: used by kd_step.py --profile.

For each profiled step (a `kd_step.step` range on the host) it accounts:
- device time by category: `kd_loss` (the KD term's forward and backward), `ce` (the student's cross-entropy),
  `fused_ce_kd` (the fused CE + KD pass), `logits_grad_add` (autograd adding two gradients over the logits),
  `copy_h2d` / `copy_d2h` / `copy_d2d` / `memset`, and `other` (the model);
- host synchronisations (cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize / blocking
  cudaMemcpy), each named by the innermost host range around it;
- host time in the KD hook's own ranges (`kd_teacher.*`, see kd_teacher/hooks/forward_step.py), and the host
  time of the outermost ops by the same categories (on a CPU run, where the ops are the compute, this is the
  accounting; on a GPU it is the launch cost);
- device idle time inside the step (span of its device work minus the union of busy intervals) and the
  largest gaps, each named by the host range that launched the work after it.

Attribution. A kernel belongs to the host op that launched it (runtime call -> kernel by correlation id).
Backward kernels run on autograd's thread: they belong to the forward op that made their autograd node
(matched by the profiler's sequence number and forward thread id), so the KD term's backward is found
through the forward ops that ran inside the hook's `kd_teacher.kd_loss` range, and the CE's through
Megatron's cross-entropy autograd function. No kernel-name guessing beyond the copy kinds.
"""

from __future__ import annotations

import bisect
import collections
import gzip
import json
import re
from pathlib import Path
from typing import Optional

STEP_RANGE = "kd_step.step"
DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaMemcpy2D", "cudaMemcpyFromSymbol", "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize",
              "cuMemcpyDtoH", "cuMemcpyDtoH_v2"}
# Host ranges that define a category for everything launched under them, innermost match wins.
RANGE_CATEGORIES = [
    (re.compile(r"FusedCrossEntropyKD|fused_ce_kd", re.I), "fused_ce_kd"),
    (re.compile(r"^kd_teacher\.kd_loss|VocabParallelBuckets"), "kd_loss"),
    (re.compile(r"CrossEntropy", re.I), "ce"),
]
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "


def load_trace(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


class _Intervals:
    """Host ranges of one thread, for 'which ranges enclose time t' queries (ranges nest on a thread)."""

    def __init__(self, events: list[dict]):
        self.events = sorted(events, key=lambda e: (e["ts"], -e.get("dur", 0)))
        self.starts = [e["ts"] for e in self.events]
        self.parent = [-1] * len(self.events)
        stack: list[int] = []
        for i, e in enumerate(self.events):
            while stack and _end(self.events[stack[-1]]) < e["ts"]:
                stack.pop()
            self.parent[i] = stack[-1] if stack else -1
            stack.append(i)

    def enclosing(self, t: float) -> list[dict]:
        """The ranges open at time t, outermost first."""
        i = bisect.bisect_right(self.starts, t) - 1
        while i >= 0 and _end(self.events[i]) < t:  # a closed sibling: its parent may still be open
            i = self.parent[i]
        chain = []
        while i >= 0:
            chain.append(self.events[i])
            i = self.parent[i]
        return chain[::-1]


def _end(e: dict) -> float:
    return e["ts"] + e.get("dur", 0)


def _category_of_names(names: list[str]) -> Optional[str]:
    for name in reversed(names):  # innermost first
        for pattern, cat in RANGE_CATEGORIES:
            if pattern.search(name):
                return cat
    return None


def _copy_category(name: str) -> str:
    n = name.lower()
    if "memset" in n:
        return "memset"
    if "htod" in n or "host -> device" in n or "pinned -> device" in n or "pageable -> device" in n:
        return "copy_h2d"
    if "dtoh" in n or "device -> pinned" in n or "device -> pageable" in n:
        return "copy_d2h"
    return "copy_d2d"


def analyse(events: list[dict], vocab_local: Optional[int] = None, top_gaps: int = 5) -> dict:
    """Per-step accounting of one profiled mode (see the module docstring); times in ms per step."""
    steps = sorted((e for e in events if e.get("name") == STEP_RANGE and e.get("ph") == "X"), key=lambda e: e["ts"])
    if not steps:
        raise ValueError(f"no '{STEP_RANGE}' ranges in the trace: profile the steps inside record_function")
    host = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")]
    by_tid = collections.defaultdict(list)
    for e in host:
        by_tid[(e["pid"], e["tid"])].append(e)
    intervals = {key: _Intervals(evs) for key, evs in by_tid.items()}

    # Forward ops -> category by autograd sequence number, for the backward's attribution. An op that makes no
    # autograd node reports the number the next node will get, so the last op (in time) with a number is the
    # one that made that node: later ops overwrite earlier ones. (One forward thread: the training loop's.)
    seq_category: dict[int, Optional[str]] = {}
    forward_ops = sorted((e for e in host if "Sequence number" in (e.get("args") or {})
                          and not e["name"].startswith(BACKWARD_PREFIX) and "Backward" not in e["name"]),
                         key=lambda e: e["ts"])
    for e in forward_ops:
        names = [x["name"] for x in intervals[(e["pid"], e["tid"])].enclosing(e["ts"] + 1e-3)]
        seq_category[e["args"]["Sequence number"]] = _category_of_names(names)

    def host_category(key, t: float) -> tuple[Optional[str], list[str]]:
        chain = intervals[key].enclosing(t) if key in intervals else []
        names = [x["name"] for x in chain]
        if vocab_local and chain and any(n.startswith(BACKWARD_PREFIX) for n in names):
            inner = chain[-1]
            dims = (inner.get("args") or {}).get("Input Dims") or []
            if inner["name"] in ("aten::add", "aten::add_") and any(d and d[-1] == vocab_local for d in dims):
                return "logits_grad_add", names  # autograd summing two gradients of the logits
        cat = _category_of_names(names)
        if cat is None:
            for x in reversed(chain):  # a backward op: the category of the forward op that made its node
                if x["name"].startswith(BACKWARD_PREFIX):
                    cat = seq_category.get((x.get("args") or {}).get("Sequence number"))
                    break
        return cat, names

    runtime = {}
    syncs = []
    for e in events:
        # Launches go through the runtime (cudaLaunchKernel) or the driver API (cuLaunchKernel(Ex): cuBLAS,
        # Transformer Engine and Triton kernels): both carry the correlation id of the kernel they launch.
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and e.get("ph") == "X":
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                runtime[corr] = e
            if e["name"] in SYNC_CALLS:
                syncs.append(e)
    device = sorted((e for e in events if e.get("cat") in DEVICE_CATS and e.get("ph") == "X"), key=lambda e: e["ts"])

    out_steps = []
    for step in steps:
        t0, t1 = step["ts"], step["ts"] + step["dur"]
        per_cat = collections.Counter()
        kernels = 0
        busy: list[tuple[float, float, str]] = []
        for e in device:
            launch = runtime.get((e.get("args") or {}).get("correlation"))
            if launch is None or not (t0 <= launch["ts"] <= t1):
                continue
            kernels += 1
            if e["cat"] == "kernel":
                cat, names = host_category((launch["pid"], launch["tid"]), launch["ts"])
                cat = cat or "other"
            else:
                cat, names = _copy_category(e["name"]), []
            per_cat[cat] += e["dur"]
            busy.append((e["ts"], e["ts"] + e["dur"], names[-1] if names else e["name"]))
        idle, gaps = _idle(busy, top_gaps)
        step_syncs = collections.Counter()
        for s in syncs:
            if t0 <= s["ts"] <= t1:
                chain = intervals.get((s["pid"], s["tid"]))
                names = [x["name"] for x in chain.enclosing(s["ts"])] if chain else []
                step_syncs[_sync_site(names)] += 1
        hook = collections.Counter()
        host_ops = collections.Counter()
        for e in host:
            if not (t0 <= e["ts"] <= t1):
                continue
            if e["name"].startswith("kd_teacher."):
                hook[e["name"]] += e["dur"]
            if e.get("cat") == "cpu_op":
                key = (e["pid"], e["tid"])
                chain = intervals[key].enclosing(e["ts"])
                if all(x is e or x.get("cat") != "cpu_op" for x in chain):  # outermost op: no double count
                    host_ops[host_category(key, e["ts"])[0] or "other"] += e["dur"]
                elif host_category(key, e["ts"])[0] == "logits_grad_add" and e["name"] in ("aten::add", "aten::add_"):
                    # moved out of the backward function it ran in, into its own category
                    outermost = next(x for x in chain if x.get("cat") == "cpu_op")
                    outer = host_category(key, outermost["ts"])[0]
                    host_ops["logits_grad_add"] += e["dur"]
                    host_ops[outer or "other"] -= e["dur"]
        out_steps.append(dict(
            wall_ms=step["dur"] / 1e3,
            device_ms={k: v / 1e3 for k, v in sorted(per_cat.items())},
            device_busy_ms=sum(per_cat.values()) / 1e3,
            device_launches=kernels,
            device_idle_ms=idle / 1e3,
            largest_gaps=gaps,
            host_syncs=sum(step_syncs.values()),
            host_sync_sites=dict(step_syncs),
            hook_host_ms={k: v / 1e3 for k, v in sorted(hook.items())},
            host_op_ms={k: v / 1e3 for k, v in sorted(host_ops.items())},
        ))
    return _mean_over_steps(out_steps)


def _sync_site(names: list[str]) -> str:
    """The innermost KD range and the innermost op around a host synchronisation."""
    kd = next((n for n in reversed(names) if n.startswith("kd_teacher.")), None)
    op = next((n for n in reversed(names) if not n.startswith(("kd_step.", "kd_teacher."))), None)
    return " / ".join(p for p in (kd, op) if p) or "(step)"


def _idle(busy: list[tuple[float, float, str]], top: int) -> tuple[float, list]:
    if not busy:
        return 0.0, []
    busy.sort()
    idle, gaps = 0.0, []
    end = busy[0][1]
    for start, stop, name in busy[1:]:
        if start > end:
            idle += start - end
            gaps.append((start - end, name))
        end = max(end, stop)
    gaps.sort(reverse=True)
    return idle, [{"ms": g / 1e3, "before": name} for g, name in gaps[:top]]


def _mean_over_steps(steps: list[dict]) -> dict:
    n = len(steps)

    def mean_dict(key):
        total = collections.Counter()
        for s in steps:
            total.update(s[key])
        return {k: v / n for k, v in sorted(total.items())}

    return dict(
        steps=n,
        wall_ms=sum(s["wall_ms"] for s in steps) / n,
        device_ms=mean_dict("device_ms"),
        device_busy_ms=sum(s["device_busy_ms"] for s in steps) / n,
        device_launches=sum(s["device_launches"] for s in steps) / n,
        device_idle_ms=sum(s["device_idle_ms"] for s in steps) / n,
        host_syncs=sum(s["host_syncs"] for s in steps) / n,
        host_sync_sites=mean_dict("host_sync_sites"),
        hook_host_ms=mean_dict("hook_host_ms"),
        host_op_ms=mean_dict("host_op_ms"),
        largest_gaps_last_step=steps[-1]["largest_gaps"],
    )


def extra_over(base: dict, mode: dict) -> dict:
    """Milliseconds a mode adds to the base mode per step, by where they go; `unaccounted` is the wall-clock
    difference that neither device categories nor device idle time explain (host time the device overlapped)."""
    cats = sorted(set(base["device_ms"]) | set(mode["device_ms"]))
    device = {c: mode["device_ms"].get(c, 0.0) - base["device_ms"].get(c, 0.0) for c in cats}
    wall = mode["wall_ms"] - base["wall_ms"]
    idle = mode["device_idle_ms"] - base["device_idle_ms"]
    host_cats = sorted(set(base["host_op_ms"]) | set(mode["host_op_ms"]))
    return dict(
        wall_ms=wall,
        device_ms=device,
        host_op_ms={c: mode["host_op_ms"].get(c, 0.0) - base["host_op_ms"].get(c, 0.0) for c in host_cats},
        device_idle_ms=idle,
        unaccounted_ms=wall - sum(device.values()) - idle,
        host_syncs=mode["host_syncs"] - base["host_syncs"],
    )
