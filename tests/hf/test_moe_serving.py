"""MoE teachers are served dropless: a capacity factor (token dropping) is refused unless accepted, and then it
is part of the teacher fingerprint; no MoE teacher repacks requests (the serving policy)."""

import pytest

from kd_teacher.testing.distributed import run_distributed


def _moe_model(capacity=None, **layout):
    import torch

    from kd_teacher.engine.model import ModelConfig, MoEConfig, build_gpt_model

    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64,
                      max_sequence_length=32, make_vocab_size_divisible_by=8, **layout,
                      moe=MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=32, expert_capacity_factor=capacity))
    torch.manual_seed(0)
    return build_gpt_model(cfg)[0]


def _engines() -> dict:
    import torch

    from kd_teacher.engine.engine import EngineConfig, TeacherEngine
    from kd_teacher.engine.moe_policy import MoETokenDroppingError

    model = _moe_model

    out = {}
    dropping = model(1.0)
    try:
        TeacherEngine(dropping, 64, EngineConfig(k=4))
    except MoETokenDroppingError as e:
        out["refused"] = str(e)
    accepted = TeacherEngine(dropping, 64, EngineConfig(k=4, accept_moe_token_dropping=True))
    accepted.score(torch.randint(0, 64, (2, 8)))
    dropless = TeacherEngine(model(None), 64, EngineConfig(k=4))
    try:
        TeacherEngine(model(None), 64, EngineConfig(k=4, repacking="any"))
    except ValueError as e:
        out["repacking_refused"] = str(e)
    out.update(fingerprints=(accepted.fingerprint, dropless.fingerprint),
               repacking=(accepted.policy.allow_repacking, dropless.policy.allow_repacking),
               reasons=(accepted.policy.reason, dropless.policy.reason))
    return out


def test_token_dropping_refused_unless_accepted_and_recorded():
    out = run_distributed(_engines, 1)[0]
    assert "drops tokens (capacity factor 1.0, drop policy probs)" in out["refused"]
    assert "engine.accept_moe_token_dropping: true" in out["refused"]
    accepted, dropless = out["fingerprints"]
    assert accepted != dropless  # same weights: the fingerprints differ by the dropping choice alone
    assert out["repacking"] == (False, False)
    assert "token dropping" in out["reasons"][0] and "MoE (dropless)" in out["reasons"][1]
    assert "engine.repacking=any with float32, MoE (dropless)" in out["repacking_refused"]


def test_moe_model_config_is_checked():
    from kd_teacher.engine.model import ModelConfig, MoEConfig

    base = dict(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=64, max_sequence_length=32)
    moe = MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=32)
    with pytest.raises(ValueError, match="needs sequence_parallel: true"):
        ModelConfig(**base, moe=moe, tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="num_experts 4 is not divisible by expert_model_parallel_size 3"):
        ModelConfig(**base, moe=moe, expert_model_parallel_size=3)
    with pytest.raises(ValueError, match="need a `moe:` section"):
        ModelConfig(**base, expert_model_parallel_size=2)
    with pytest.raises(ValueError, match="router_topk 5 must be in"):
        MoEConfig(num_experts=4, router_topk=5, ffn_hidden_size=32)


def _replicas_independent(**layout):
    from kd_teacher.engine.engine import EngineConfig, TeacherEngine
    from kd_teacher.engine.moe_policy import require_independent_replicas

    engine = TeacherEngine(_moe_model(**layout), 64, EngineConfig(k=4))
    try:
        require_independent_replicas(engine.moe, "kd-teacher dump")
        return None
    except ValueError as e:
        return str(e)


def test_dump_and_serve_refuse_expert_groups_across_data_parallel_replicas():
    """TP=1, EP=2 on two ranks: the experts span the two data-parallel replicas (they must forward together);
    TP=2, EP=2, expert TP=1: one replica, both ranks in its model-parallel group."""
    across = run_distributed(_replicas_independent, 2, ep=2, expert_model_parallel_size=2)
    assert all("expert-parallel groups span teacher data-parallel ranks" in e for e in across)
    within = run_distributed(_replicas_independent, 2, tp=2, ep=2, etp=1, tensor_model_parallel_size=2,
                             sequence_parallel=True, expert_model_parallel_size=2, expert_tensor_parallel_size=1)
    assert within == [None, None]
