"""The fused top-k + LSE kernel's CPU-side contract: dispatch, planning, configuration.

The kernel itself runs on a GPU (tests/gpu/test_topk_kernel.py checks it there case by case against the
reference). Here: CPU tensors take the reference path, block-size plans respect the bounds the kernels
rely on, bad configuration is refused, and, where Triton is installed, its CPU interpreter runs the real
kernels on small cases against the reference.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_teacher import topk
from kd_teacher.kernels import MAX_K, TopKKernelConfig, fused_local_topk_stats, kernel_available, plan_for

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_tensors_take_the_reference_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 300, generator=g) * 3).bfloat16()
    assert not kernel_available(x.device)
    assert fused_local_topk_stats(x, 8, 1.0, 0, 290) is None
    got = topk._local_stats(x, 8, 1.5, 600, 290)
    want = topk.local_topk_stats(x, 8, 1.5, 600, 290)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("v_local", [1, 7, 50, 200, 1000, 1500, 16032, 37984, 128256, 262144])
@pytest.mark.parametrize("k", [1, 5, 32, 64, 100, 128, 200, 256])
def test_plans_respect_kernel_bounds(v_local, k):
    plan = plan_for(v_local, k, TopKKernelConfig())
    kk = min(k, v_local)
    assert plan.kk == kk
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    assert pow2(plan.kp) and plan.kp >= kk
    # the re-read tile of candidate groups stays at 8192 elements; scratch holds 2 kp candidates
    assert plan.gcap * plan.group_size <= 8192 and plan.cap == 2 * plan.kp
    assert pow2(plan.group_size) and pow2(plan.chunk) and plan.chunk % plan.group_size == 0
    assert plan.num_chunks * plan.chunk >= v_local > (plan.num_chunks - 1) * plan.chunk
    assert plan.num_groups * plan.group_size >= v_local
    # enough groups that the kk-th largest group maximum is a bound (or groups of one column)
    assert plan.group_size == 1 or plan.num_groups >= 4 * plan.kp


def test_k_beyond_the_kernel_is_declined():
    assert plan_for(128256, MAX_K + 1, TopKKernelConfig()) is None
    assert plan_for(100, MAX_K + 1, TopKKernelConfig()) is not None  # k' = min(k, V_local) = 100


@pytest.mark.parametrize(
    "bad", [dict(chunk=1000), dict(chunk=256), dict(num_warps=3), dict(row_num_warps=64), dict(max_registers=300)]
)
def test_bad_kernel_config_is_refused(bad):
    with pytest.raises(ValueError, match="kernel"):
        TopKKernelConfig(**bad)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (optional)")
@pytest.mark.parametrize(
    "config, cases",
    [
        # selection fused into the streaming launch (the default): ties take the exact path, NaN rows do not
        ({}, ["randn multi-chunk", "ties", "nonfinite bf16", "sliced re-read"]),
        ({"fuse_select": False}, ["padded fp32", "nonfinite", "sliced re-read"]),
    ],
    ids=["fused", "separate-selection"],
)
def test_triton_interpreter_matches_reference(config, cases):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "tests/gpu/topk_kernel_cases.py", "--config", json.dumps(config), "--only", ",".join(cases)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(cases)}/{len(cases)} cases pass" in proc.stdout


def test_nan_ranks_above_inf_whatever_its_sign():
    # The key the kernel reproduces: every NaN above +inf (as torch.topk ranks it), ties among them by id.
    vals = torch.tensor([1.0, float("inf"), -float("nan"), float("nan"), float("-inf")])
    order = torch.argsort(topk.order_preserving_key(vals, torch.arange(5)), descending=True)
    assert order.tolist() == [2, 3, 1, 0, 4]
