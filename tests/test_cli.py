"""The `kd-teacher` command line: known harmless third-party warnings are hidden unless --verbose (real ones are
not filtered), and an error is one line of its message, with the traceback behind --verbose."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "kd_teacher.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_a_dump_prints_no_third_party_warnings_and_verbose_shows_them(tmp_path):
    rows = tmp_path / "seqs.jsonl"
    rows.write_text("".join(json.dumps(list(range(i, i + 16))) + "\n" for i in range(4)))
    done = _cli("dump", "configs/dump_jsonl_tiny.yaml", f"data.path={rows}", f"output.dir={tmp_path / 'dump'}",
                "allow_random_weights=true", "output.progress=false")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Warning" not in done.stderr and "Megatron-FSDP" not in done.stderr, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["samples"] == 4
    verbose = _cli("recipe", "configs/teacher_tiny.yaml", "--verbose")
    assert verbose.returncode == 0 and "Transformer Engine and Apex are not installed" in verbose.stderr


def test_an_error_is_its_message_and_the_traceback_comes_with_verbose():
    quiet = _cli("recipe", "no_such_teacher.yaml")
    assert quiet.returncode == 2
    assert "config file no_such_teacher.yaml does not exist" in quiet.stderr and "Traceback" not in quiet.stderr
    loud = _cli("-v", "recipe", "no_such_teacher.yaml")
    assert loud.returncode == 2 and "Traceback" in loud.stderr and "load_yaml" in loud.stderr


def test_only_the_known_warnings_are_filtered():
    from kd_teacher.cli import quiet_third_party

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party(verbose=False)
        warnings.warn_explicit("Apex is not installed. Falling back to Torch Norm", UserWarning, "backends.py", 21,
                               module="megatron.core.models.backends")
        warnings.warn_explicit("Apex is not installed", UserWarning, "mine.py", 1, module="my_package")
        warnings.warn_explicit("something real", UserWarning, "backends.py", 22, module="megatron.core.models")
    assert [str(w.message) for w in seen] == ["Apex is not installed", "something real"]


@pytest.fixture(autouse=True)
def _restore_warning_filters():
    saved = warnings.filters[:]
    yield
    warnings.filters[:] = saved
