"""Loading a teacher: the teacher config YAML and engine construction (checkpoints: `checkpoint.py`).

A teacher config has three parts: `model:` (a `ModelConfig`), `engine:` (an `EngineConfig`: k, temperature,
batching) and `checkpoint:` (a `megatron.core.dist_checkpointing` directory; absent means random weights
from `model.seed`, which is what tests and benchmarks use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from kd_teacher.config import load_config
from kd_teacher.engine.engine import EngineConfig, TeacherEngine
from kd_teacher.engine.model import ModelConfig, build_gpt_model


@dataclass
class TeacherConfig:
    model: ModelConfig
    engine: EngineConfig = field(default_factory=EngineConfig)
    # A dist-checkpoint directory, or a Megatron-LM --save directory (its latest iteration, or this one).
    checkpoint: Optional[str] = None
    checkpoint_iteration: Optional[int] = None


def load_teacher_config(path: str | Path, overrides: list[str] | None = None, section: str | None = None) -> TeacherConfig:
    return load_config(TeacherConfig, path, overrides, section)


def build_engine(cfg: TeacherConfig) -> TeacherEngine:
    """Build this rank's teacher (parallel_state initialised with the config's TP/PP) and its engine."""
    if cfg.checkpoint:
        return TeacherEngine.from_checkpoint(cfg.checkpoint, cfg.model, cfg.engine, iteration=cfg.checkpoint_iteration)
    torch.manual_seed(cfg.model.seed)
    model, _ = build_gpt_model(cfg.model)
    return TeacherEngine(model, cfg.model.vocab_size, cfg.engine, model_config=cfg.model)
