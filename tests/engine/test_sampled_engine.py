"""TeacherEngine with `extraction: sampled` on real Megatron-Core GPTModels: the same ids at TP=1 and TP=2 (gloo),
the ids of the sampler applied to the gathered full logits, the same ids when requests are packed together,
and bad sampling configs refused at construction."""

import pytest
import torch

from kd_teacher.payload import TopKPayload
from kd_teacher.testing.distributed import run_distributed

from tests.engine.test_engine import VOCAB, _batches, _model_config

K = 12


def _sampled_engine(tp, sample_seed=0):
    from kd_teacher.engine.engine import EngineConfig, TeacherEngine
    from kd_teacher.engine.model import build_gpt_model

    cfg = _model_config(tp)
    # Padded to 1024 at TP=1 and TP=2 alike, so both layouts build the same teacher (the same weights); the
    # logits then differ only by the TP reduction's rounding, which the draws must not see.
    cfg.make_vocab_size_divisible_by = 512 // tp
    torch.manual_seed(cfg.seed)
    model, _ = build_gpt_model(cfg)
    # repacking opted in: the packed forward below must draw the same ids as the lone one
    config = EngineConfig(k=K, temperature=1.5, extraction="sampled", sample_seed=sample_seed, repacking="any")
    return TeacherEngine(model, VOCAB, config, model_config=cfg)


def _score_sampled(tp):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from kd_teacher.engine.scheduler import ScoreRequest

    engine = _sampled_engine(tp)
    first, second = _batches()
    payload = engine.score(first, sample_ids=[3, 4])
    shard = engine.teacher_logits(first)
    full = gather_from_tensor_model_parallel_region(shard) if tp > 1 else shard
    packed = engine.score_many([ScoreRequest(second), ScoreRequest(first)])  # right-padded into one forward
    reseeded = _sampled_engine(tp, sample_seed=1).score(first)
    return payload, full.detach(), packed, engine.extraction_site, reseeded


def test_sampled_payloads_are_the_same_at_tp1_and_tp2_and_match_the_sampler():
    (tp1, full, packed, site, reseeded), = run_distributed(_score_sampled, 1, 1)
    assert site == "output_layer"
    tp1.validate()
    tp1.check_tokens(_batches()[0], sample_ids=[3, 4])
    h = tp1.header
    assert (h.extraction, h.k, h.values_dtype, h.temperature) == ("sampled", K, "float32", 1.5)
    reference = TopKPayload.from_logits(full, K, temperature=1.5, vocab_size=VOCAB, tokens=_batches()[0],
                                        extraction="sampled")
    assert torch.equal(tp1.indices, reference.indices) and torch.equal(tp1.values, reference.values)
    assert torch.equal(packed[1].indices, tp1.indices) and torch.equal(packed[1].values, tp1.values)
    packed[0].check_tokens(_batches()[1])
    assert not torch.equal(reseeded.indices, tp1.indices), "sample_seed changes the draws"
    for payload, _, _, _, _ in run_distributed(_score_sampled, 2, 2, tp=2):
        assert torch.equal(payload.indices, tp1.indices) and torch.equal(payload.values, tp1.values)
        torch.testing.assert_close(payload.lse, tp1.lse, rtol=1e-5, atol=1e-5)
        assert payload.header.teacher_fingerprint != ""


def test_bad_sampling_configs_are_refused():
    from kd_teacher.config import ConfigError, from_dict
    from kd_teacher.engine.engine import EngineConfig

    for data, match in [(dict(k=0, extraction="sampled"), "k must be >= 1"),
                        (dict(k=1025, extraction="sampled"), "maximum of 1024"),
                        (dict(k=4, extraction="sampled", sample_seed=-2), "sample seed"),
                        (dict(k=4, extraction="nucleus"), "'nucleus' is not one of")]:
        with pytest.raises(ConfigError, match=match):
            from_dict(EngineConfig, data, "teacher.engine")
