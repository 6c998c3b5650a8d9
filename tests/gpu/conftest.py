"""GPU correctness checks: tests marked `gpu`, deselected unless asked for (`-m gpu`), run on a CUDA machine.

    pytest -m gpu tests/gpu --gpu-out $OUT/gpu_checks.json            # all checks, one process
    pytest -m gpu tests/gpu --gpu-shard 3/8 --gpu-out part3.json      # every 8th check from the 4th

Every check records its numbers (`gpu_record`); `--gpu-out` writes them as JSON with the device and versions,
and the terminal summary ends with a short table. Asked for on a machine without a GPU, the checks fail (they
are not skipped: a GPU check that did not run must not look like one that passed).
"""

import json
import time

import pytest
import torch

_RECORDS: list = []


def pytest_addoption(parser):
    group = parser.getgroup("kd-teacher GPU checks")
    group.addoption("--gpu-out", default=None, help="write the GPU checks' results here (JSON)")
    group.addoption("--gpu-shard", default=None, help="I/N: run every N-th GPU check from the I-th (0-based)")


def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--gpu-shard")
    if not shard:
        return
    i, n = (int(x) for x in shard.split("/"))
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    keep = set(gpu[i::n])
    dropped = [item for item in gpu if item not in keep]
    items[:] = [item for item in items if item not in dropped]
    config.hook.pytest_deselected(items=dropped)


@pytest.fixture
def device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("GPU checks need a CUDA GPU; on a CPU machine run the default selection (not -m gpu)")
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture
def gpu_record(request):
    """gpu_record(result_dict): keep this check's numbers for --gpu-out and the summary table."""

    def record(result: dict) -> None:
        _RECORDS.append({"test": request.node.nodeid, **result})

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RECORDS:
        return
    terminalreporter.section("GPU checks")
    for r in _RECORDS:
        terminalreporter.write_line(f"{'ok  ' if r.get('ok') else 'FAIL'} {r['test'].split('::')[-1][:70]:70} "
                                    f"{r.get('summary', '')}")
    failed = sum(not r.get("ok") for r in _RECORDS)
    terminalreporter.write_line(f"{len(_RECORDS) - failed}/{len(_RECORDS)} GPU checks pass")
    out = config.getoption("--gpu-out")
    if out:
        with open(out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
                           torch=torch.__version__, triton=_triton_version(), date=time.strftime("%Y-%m-%d"),
                           passed=len(_RECORDS) - failed, total=len(_RECORDS), checks=_RECORDS), f, indent=1)


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"
