"""Build this rank's Megatron-Core GPT for a Hugging Face checkpoint and fill it from the checkpoint.

The model is built with Megatron-Core's random initialisation skipped (`perform_initialization=False`): every
parameter is then written from the checkpoint (`weights.load_hf_weights` refuses a parameter it cannot fill), so
initialising them first would only cost time (for a large teacher, minutes of CPU).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from kd_teacher.engine.model import ModelConfig, build_gpt_model, transformer_config
from kd_teacher.hf.config import FAMILIES, family_of, model_config_from_hf, read_hf_config
from kd_teacher.hf.weights import load_hf_weights

log = logging.getLogger(__name__)


def current_layout(moe: bool) -> dict:
    """ModelConfig fields of the parallel layout parallel_state is initialised with."""
    from megatron.core import parallel_state as mpu

    layout = dict(tensor_model_parallel_size=mpu.get_tensor_model_parallel_world_size(),
                  pipeline_model_parallel_size=mpu.get_pipeline_model_parallel_world_size())
    if moe:
        etp = mpu.get_expert_tensor_parallel_world_size()
        layout.update(expert_model_parallel_size=mpu.get_expert_model_parallel_world_size(),
                      expert_tensor_parallel_size=None if etp == layout["tensor_model_parallel_size"] else etp)
    return layout


def build_hf_model(path: str | Path, model_config: Optional[ModelConfig] = None,
                   overrides: Optional[dict] = None) -> tuple[torch.nn.Module, ModelConfig]:
    """(this rank's model with the checkpoint's weights, its ModelConfig). Without `model_config`, it is made
    from config.json, the parallel layout parallel_state is initialised with, and `overrides`."""
    model, model_config, family = build_unfilled_hf_model(path, model_config, overrides)
    read, total = load_hf_weights(model, path, model_config, family)
    log.info("%s: this rank read %.1f MB of the checkpoint's %.1f MB", path, read / 2**20, total / 2**20)
    return model, model_config


def build_unfilled_hf_model(path: str | Path, model_config: Optional[ModelConfig] = None,
                            overrides: Optional[dict] = None) -> tuple[torch.nn.Module, ModelConfig, str]:
    """(this rank's model, uninitialised, its ModelConfig, the checkpoint's family)."""
    hf = read_hf_config(path)
    family = family_of(hf)
    if model_config is None:
        layout = current_layout(moe=FAMILIES[family].moe is not None)
        model_config = model_config_from_hf(hf, {**layout, **(overrides or {})})
    config = transformer_config(model_config)
    config.perform_initialization = False
    model, _ = build_gpt_model(model_config, config)
    return model, model_config, family
