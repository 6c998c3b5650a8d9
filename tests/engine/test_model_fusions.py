"""ModelConfig.fusions: Megatron-LM's default fusions where CUDA + Transformer Engine run them, none elsewhere."""

import pytest
import torch

from kd_teacher.config import ConfigError, from_dict
from kd_teacher.engine.model import ModelConfig, transformer_config

SHAPE = dict(num_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=256, max_sequence_length=32)
FUSIONS = ("bias_dropout_fusion", "bias_activation_fusion", "apply_rope_fusion", "masked_softmax_fusion",
           "persist_layer_norm", "gradient_accumulation_fusion", "cross_entropy_loss_fusion")


def test_auto_is_off_with_the_local_spec_and_every_fusion_is_off_in_the_transformer_config():
    cfg = from_dict(ModelConfig, SHAPE)
    assert cfg.fusions.enabled is None and not cfg.fusions_active()
    tconfig = transformer_config(cfg)
    assert not any(getattr(tconfig, name) for name in FUSIONS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer; on a GPU the TE spec turns them on")
def test_asking_for_fusions_where_they_cannot_run_names_the_problem():
    with pytest.raises(ValueError, match="layer_spec: transformer_engine"):
        from_dict(ModelConfig, {**SHAPE, "fusions": {"enabled": True}}).fusions_active()
    with pytest.raises(ValueError, match="needs CUDA"):
        from_dict(ModelConfig, {**SHAPE, "layer_spec": "transformer_engine",
                                "fusions": {"enabled": True}}).fusions_active()


def test_unknown_fusion_keys_and_impls_are_refused():
    with pytest.raises(ConfigError, match="fusions"):
        from_dict(ModelConfig, {**SHAPE, "fusions": {"rope": True}})
    with pytest.raises(ConfigError, match="cross_entropy_fusion_impl"):
        from_dict(ModelConfig, {**SHAPE, "fusions": {"cross_entropy_fusion_impl": "apex"}})
