"""The fused KD-loss kernels against float64 and the PyTorch path on the GPU (tests/gpu/kd_loss_kernel_cases.py
says what each case must meet)."""

import pytest

from tests.gpu.kd_loss_kernel_cases import check_autograd, check_case, fixed_cases, random_cases

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", fixed_cases(small=False) + random_cases(24, seed=100), ids=lambda c: c.name)
def test_fused_kd_loss_kernels_match_float64(case, device, gpu_record):
    result = check_case(case, device)
    gpu_record({**result, "ok": result["passed"],
                "summary": f"sum err {result['sum_rel_err_fused']:.2e} (pytorch {result['sum_rel_err_pytorch']:.2e}) "
                           f"grad {result['grad_ulps_fused']:.2f} ulp (pytorch {result['grad_ulps_pytorch']:.2f})"})
    assert result["passed"], result


def test_fused_and_pytorch_autograd_agree(device, gpu_record):
    """The whole custom autograd function on both paths: bucket log-probs to fp32 rounding, the logits' gradient
    within one unit of the last place of a bf16 number at the row's largest gradient."""
    rows = check_autograd(device)
    ok = all(r["logp_max_abs_diff"] <= 1e-4 and r["grad_max_diff_rel_to_row_max"] <= 2 ** -7 for r in rows)
    gpu_record({"ok": ok, "autograd": rows,
                "summary": " ".join(f"{r['dtype'][6:]}: logp {r['logp_max_abs_diff']:.1e} grad "
                                    f"{r['grad_max_diff_rel_to_row_max']:.1e}" for r in rows)})
    assert ok, rows
