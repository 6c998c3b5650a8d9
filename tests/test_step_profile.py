"""benchmarks/step_profile.py: the GPU profile's accounting, on a small trace written as Kineto writes one.

A CPU run has no device events, so the attribution of kernels (host op -> runtime call -> kernel; backward
kernels -> the forward op that made their autograd node) is checked here on a hand-built trace with the
fields and nesting of a real CUDA trace (names and args as torch 2.11's Kineto writes them).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_profile  # noqa: E402

MAIN, BWD, V = 100, 200, 1024


def op(name, ts, dur, tid=MAIN, seq=None, dims=None, cat="cpu_op"):
    args = {}
    if seq is not None:
        args["Sequence number"] = seq
        args["Fwd thread id"] = 1 if name.startswith(step_profile.BACKWARD_PREFIX) else 0
    if dims is not None:
        args["Input Dims"] = dims
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": args}


def launch(ts, corr, name="cudaLaunchKernel", tid=MAIN, dur=2):
    return {"ph": "X", "cat": "cuda_runtime", "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur,
            "args": {"correlation": corr}}


def kernel(ts, dur, corr, name="some_kernel", cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": 7, "ts": ts, "dur": dur,
            "args": {"correlation": corr}}


def one_step(t0):
    """A KD micro-batch: model op, CE forward, KD forward (with its host read), backward of both, the add."""
    return [
        op(step_profile.STEP_RANGE, t0, 1000, cat="user_annotation"),
        op("aten::mm", t0 + 10, 20, seq=1), launch(t0 + 12, t0 + 1), kernel(t0 + 40, 100, t0 + 1),
        op("_VocabParallelCrossEntropy", t0 + 40, 30, seq=2), launch(t0 + 45, t0 + 2), kernel(t0 + 140, 50, t0 + 2),
        op("kd_teacher.kd_loss", t0 + 80, 100, cat="user_annotation"),
        op("_VocabParallelBuckets", t0 + 85, 20, seq=3), launch(t0 + 90, t0 + 3), kernel(t0 + 190, 30, t0 + 3),
        op("aten::sum", t0 + 110, 5, seq=4), launch(t0 + 111, t0 + 4), kernel(t0 + 220, 5, t0 + 4),
        op("kd_teacher.kd_loss.read_checks", t0 + 120, 50, cat="user_annotation"),
        op("aten::_local_scalar_dense", t0 + 121, 48),
        launch(t0 + 122, t0 + 5, name="cudaMemcpyAsync"), kernel(t0 + 225, 2, t0 + 5, "Memcpy DtoH (Device -> Pageable)",
                                                                  cat="gpu_memcpy"),
        launch(t0 + 124, t0 + 6, name="cudaStreamSynchronize", dur=40),
        # a gap on the device: nothing until the backward is launched
        op(step_profile.BACKWARD_PREFIX + "SumBackward0", t0 + 300, 10, tid=BWD, seq=4),
        launch(t0 + 301, t0 + 7, tid=BWD), kernel(t0 + 400, 5, t0 + 7),
        op(step_profile.BACKWARD_PREFIX + "_VocabParallelBucketsBackward", t0 + 320, 30, tid=BWD, seq=3),
        launch(t0 + 321, t0 + 8, tid=BWD), kernel(t0 + 405, 40, t0 + 8),
        op(step_profile.BACKWARD_PREFIX + "_VocabParallelCrossEntropyBackward", t0 + 360, 30, tid=BWD, seq=2),
        launch(t0 + 361, t0 + 9, tid=BWD), kernel(t0 + 445, 60, t0 + 9),
        op("aten::add", t0 + 380, 8, tid=BWD, dims=[[512, V], [512, V], []]),
        launch(t0 + 381, t0 + 10, tid=BWD), kernel(t0 + 505, 20, t0 + 10),
        op(step_profile.BACKWARD_PREFIX + "MmBackward0", t0 + 400, 20, tid=BWD, seq=1),
        launch(t0 + 401, t0 + 11, tid=BWD), kernel(t0 + 525, 200, t0 + 11),
    ]


def test_kernels_are_attributed_to_the_forward_ops_that_made_them():
    events = one_step(0) + one_step(10_000)
    r = step_profile.analyse(events, vocab_local=V)
    assert r["steps"] == 2
    ms = {k: round(v * 1e3) for k, v in r["device_ms"].items()}  # back to microseconds
    # KD: forward stats 30 + sum 5, backward of both 5 + 40; CE: 50 forward + 60 backward; the add 20.
    assert ms == {"kd_loss": 80, "ce": 110, "logits_grad_add": 20, "copy_d2h": 2, "other": 300}
    assert r["host_syncs"] == 1
    assert r["host_sync_sites"] == {"kd_teacher.kd_loss.read_checks / aten::_local_scalar_dense": 1}
    assert r["hook_host_ms"]["kd_teacher.kd_loss"] == pytest.approx(0.1)
    # device busy from 40 to 725 but idle from 227 to 400 (the host read and the backward's launch)
    assert r["device_idle_ms"] == pytest.approx((400 - 227) / 1e3)
    assert r["largest_gaps_last_step"][0]["before"] == step_profile.BACKWARD_PREFIX + "SumBackward0"


def test_extra_over_base_accounts_the_wall_clock_difference():
    base = step_profile.analyse(one_step(0), vocab_local=V)
    slower = one_step(0)
    slower[0]["dur"] = 1500
    mode = step_profile.analyse(slower, vocab_local=V)
    extra = step_profile.extra_over(base, mode)
    assert extra["wall_ms"] == pytest.approx(0.5)
    assert extra["unaccounted_ms"] == pytest.approx(0.5)  # same device work, so the rest is host time


def test_a_trace_without_steps_is_refused():
    with pytest.raises(ValueError, match="kd_step.step"):
        step_profile.analyse([op("aten::mm", 0, 1)])
