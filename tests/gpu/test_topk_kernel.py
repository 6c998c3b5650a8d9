"""The fused top-k + LSE kernel against the PyTorch reference on the GPU, case by case (tests/gpu/topk_kernel_cases.py
says what must agree)."""

import pytest

from tests.gpu.topk_kernel_cases import gpu_cases, run_case, summary_line

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", gpu_cases(), ids=lambda c: c.name)
def test_fused_topk_kernel_matches_the_reference(case, device, gpu_record):
    from kd_teacher.kernels.topk_lse import TopKKernelConfig

    result = run_case(case, device, TopKKernelConfig())
    gpu_record({**result, "summary": summary_line(result)})
    assert result["ok"], {k: v for k, v in result.items() if k not in ("case", "plan")}
