"""The fused KD-loss kernels (kd_teacher/kernels/kd_loss*.py): dispatch, configuration, and the loss's host reads.

The kernels themselves run under Triton's CPU interpreter in a child process (tests/kd_loss_kernel_interpreted.py,
against the PyTorch path), where Triton is installed; CI has none, and there only the dispatch and the folded
host checks are tested (the loss itself is tested in tests/test_losses.py on the PyTorch path). On the GPU,
tests/gpu/test_kd_loss_kernel.py checks the compiled kernels (pytest -m gpu tests/gpu).
"""

import importlib.util
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kd_teacher.kernels import kd_loss as launcher
from kd_teacher.kernels import KDLossKernelConfig, fused_tail_grad, fused_tail_stats, kd_loss_kernel_applies
from kd_teacher.losses import StudentLogitsError, kd_terms
from kd_teacher.losses import student
from kd_teacher.payload import PayloadError, TopKPayload

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (optional; CI has none)")
def test_fused_kernels_match_pytorch_path_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop(launcher.DISABLE_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kd_loss_kernel_interpreted.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "skipped" not in proc.stdout, proc.stdout


# ---- dispatch and configuration (no Triton needed) -----------------------------------------------------------

def test_pytorch_path_where_the_kernels_do_not_apply(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(4, 64)
    assert not kd_loss_kernel_applies(x), "CPU tensors outside the interpreter take the PyTorch path"
    shard = student.VocabShard(0, 64, 64, 64, 1, None)
    pos, owned = shard.local_ids(torch.randint(0, 64, (4, 3)))
    assert fused_tail_stats(x, pos, owned, 64, 1.0) is None
    assert fused_tail_grad(x, pos, owned, 64, 1.0, torch.zeros(4), torch.ones(4)) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not kd_loss_kernel_applies(x.double()), "float64 (gradcheck) stays on the PyTorch path"
    assert not kd_loss_kernel_applies(x.t()), "columns must be contiguous"
    assert not kd_loss_kernel_applies(x[:0]), "no rows, nothing to launch"
    monkeypatch.setenv(launcher.DISABLE_ENV, "0")
    assert not kd_loss_kernel_applies(x), "switched off by the environment"


@pytest.mark.parametrize("bad", [dict(words=3), dict(words=0), dict(stats_num_warps=3), dict(grad_num_warps=64)])
def test_bad_kernel_config_is_refused(bad):
    with pytest.raises(ValueError, match="kd-loss kernel"):
        KDLossKernelConfig(**bad)


# ---- the loss's host reads: folded into one per call -----------------------------------------------------------

class ScalarReads(TorchDispatchMode):
    """Counts reads of single tensor elements by the host (`.item()`, `int(t)`, `bool(t)`: each a GPU sync)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_kd_terms_reads_no_scalars_and_still_refuses_bad_input(monkeypatch):
    """The payload's value checks, the repeated-id check and the bad-row count are one stacked read (.tolist(),
    not seen by the mode), not one sync each; bad input still raises its named error."""
    monkeypatch.setenv(launcher.DISABLE_ENV, "0")
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(2, 4, 100, generator=g)
    payload = TopKPayload.from_logits(teacher, 8)
    logits = teacher + 0.5 * torch.randn(2, 4, 100, generator=g)
    with ScalarReads() as reads:
        kd_terms(logits, payload, tail=True)
    assert reads.count == 0

    nan = logits.clone()
    nan[0, 1, 3] = float("nan")
    with pytest.raises(StudentLogitsError, match="NaN, \\+inf or all -inf in 1 token"):
        kd_terms(nan, payload)
    repeated = replace(payload, indices=payload.indices.clone())
    repeated.indices[1, 2, 3] = repeated.indices[1, 2, 0]
    with pytest.raises(PayloadError, match="repeated ids"):
        kd_terms(logits, repeated)
    out_of_range = replace(payload, indices=payload.indices.clone())
    out_of_range.indices[0, 0, 0] = 100
    with pytest.raises(PayloadError, match="outside the vocabulary"):
        kd_terms(logits, out_of_range)


def test_student_buckets_can_leave_the_bad_row_count_to_the_caller():
    rows = torch.randn(3, 40)
    rows[2] = float("-inf")
    ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    out = student.student_buckets(rows, ids, vocab_size=40, temperature=1.0, tail=True, check=False)
    assert out.bad_rows.dtype == torch.int64 and int(out.bad_rows) == 1
    with pytest.raises(StudentLogitsError, match="in 1 token"):
        student.student_buckets(rows, ids, vocab_size=40, temperature=1.0, tail=True)
