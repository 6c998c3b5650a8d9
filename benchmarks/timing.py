"""Timing helpers the benchmark scripts share (they run as `python benchmarks/NAME.py`, so this directory is
on their import path)."""

from __future__ import annotations

import statistics

import torch


def sync() -> None:
    """Wait for the GPU, where there is one: wall-clock timings must include the queued work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median GPU time of fn in ms, by CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
