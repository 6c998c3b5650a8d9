"""`kd-teacher serve` with a model-parallel replica: when one rank's own work fails, every rank of the replica
stops with an error naming what happened, instead of its peers waiting forever in the next collective."""

import threading
import uuid
from pathlib import Path

import pytest

from kd_teacher.config import ConfigError
from kd_teacher.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]


class _HeadWorkFails(threading.Event):
    """The stop flag, which only the head of a replica reads (between batches): reading it fails."""

    def is_set(self):
        raise RuntimeError("the head's own work failed")


def _serve_until_the_head_fails(name: str) -> str:
    from kd_teacher.serve import load_serve_config, serve

    cfg = load_serve_config(ROOT / "configs/serve_shm.yaml", [f"serve.name={name}",
                                                              "model.tensor_model_parallel_size=2"])
    try:
        serve(cfg, stop=_HeadWorkFails())
    except RuntimeError as e:
        return str(e)
    return "served on"


def test_a_failing_head_stops_its_model_parallel_peers_too():
    head, peer = run_distributed(_serve_until_the_head_fails, 2, f"fail-{uuid.uuid4().hex[:8]}", tp=2)
    assert head == "the head's own work failed"
    assert "the head of this teacher replica failed" in peer


def test_a_teacher_without_a_checkpoint_is_refused_unless_random_weights_are_meant():
    """As `kd-teacher dump` and the in-process source: no silent random teacher (issue 24 item 2)."""
    from kd_teacher.serve import load_serve_config, serve

    cfg = load_serve_config(ROOT / "configs/serve_shm.yaml", ["allow_random_weights=false"])
    with pytest.raises(ConfigError, match="random weights: set checkpoint"):
        serve(cfg)
