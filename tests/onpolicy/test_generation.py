"""Student generation through Megatron-Core's inference stack on real gloo ranks (TP=1 and TP=2, with sequence
parallelism at TP=2): greedy completions equal a plain greedy decode with the training forward, seeded sampling
is reproducible, the sampling-time log-probs are the training forward's, and the model comes back exactly as it
was (train flags, RNG states, parameters) and still trains."""

import math

import pytest
import torch

from kd_teacher.testing.distributed import run_distributed

VOCAB = 200  # true vocabulary; the model pads it to 256, so padding ids exist to be refused
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17], [18, 19, 20, 21, 22]]
NEW = 7


def _student(tp: int, sequence_parallel: bool = False):
    from kd_teacher.engine.model import ModelConfig, build_gpt_model

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                      vocab_size=VOCAB, max_sequence_length=64, make_vocab_size_divisible_by=128, init_method_std=0.3,
                      seed=7, tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    torch.manual_seed(cfg.seed)
    model, _ = build_gpt_model(cfg)
    return model.train()


def _logits_shard(model, seq: list[int]) -> torch.Tensor:
    """The training forward's logits [len, 1, V/TP] of one sequence. Sequence parallelism needs a length divisible
    by TP: the sequence is right-padded, which (causal attention) leaves the logits of its own positions alone."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    padded = seq + [0] * (-len(seq) % tp)
    x = torch.tensor([padded])
    return model(x, torch.arange(len(padded)).unsqueeze(0), None).transpose(0, 1)[: len(seq)]


def _full_logits(model, seq: list[int]) -> torch.Tensor:
    """The training forward's next-token logits over the true vocabulary at every position ([len, VOCAB])."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    shard = _logits_shard(model, seq)[:, 0]
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[:, :VOCAB]


def _greedy_reference(model, prompt: list[int]) -> list[int]:
    """Plain greedy decode: argmax of the full-sequence training forward, token by token (no KV cache)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(NEW):
            seq.append(int(_full_logits(model, seq)[-1].argmax()))
    return seq[len(prompt):]


def _state(model):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    attrs = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")
    return dict(flags=[m.training for m in model.modules()], cpu=torch.get_rng_state(),
                sp=[(a, getattr(m, a)) for m in model.modules() for a in attrs if hasattr(m, a)],
                tracker={k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
                params={k: v.detach().clone() for k, v in model.state_dict().items() if "_extra_state" not in k})


def _generate_and_check(tp: int, sequence_parallel: bool):
    from megatron.core import parallel_state

    from kd_teacher.onpolicy import OnPolicyConfig, StudentGenerator
    from kd_teacher.onpolicy.consistency import training_logprobs

    model = _student(tp, sequence_parallel)
    model.decoder.layers[0].eval()  # a module in eval inside a training model: its flag must come back too
    before = _state(model)
    greedy = StudentGenerator(model, OnPolicyConfig(top_k=1, max_new_tokens=NEW), vocab_size=VOCAB,
                              max_sequence_length=32, max_batch_size=len(PROMPTS))
    rollout = greedy.generate(PROMPTS, seed=1)
    after = _state(model)
    assert after["flags"] == before["flags"] and after["sp"] == before["sp"]
    assert torch.equal(after["cpu"], before["cpu"])
    assert before["tracker"].keys() == after["tracker"].keys()
    assert all(torch.equal(before["tracker"][k], after["tracker"][k]) for k in before["tracker"])
    assert all(torch.equal(before["params"][k], after["params"][k]) for k in before["params"])
    assert greedy.context.key_value_memory_dict == {}  # the KV cache is freed for training
    assert model.config.sequence_parallel == sequence_parallel

    model.decoder.layers[0].train()
    model.eval()  # dropout is 0 anyway; eval only so that the reference decode is unambiguous
    reference = [_greedy_reference(model, p) for p in PROMPTS]
    model.train()

    # Sampling-time log-probs (Megatron-Core's, through our fp32 hook) against the training forward's, same tokens.
    gaps = []
    for p, c, lps in zip(rollout.prompts, rollout.completions, rollout.logprobs):
        seq = p + c
        with torch.no_grad():
            logits = _logits_shard(model, seq[:-1])
        select = torch.zeros(1, len(seq) - 1, dtype=torch.bool)
        select[0, len(p) - 1:] = True
        trained = training_logprobs(logits, torch.tensor([seq[1:]]), select, VOCAB,
                                    parallel_state.get_tensor_model_parallel_group())
        gaps.append(float((trained - torch.tensor(lps)).abs().max()))

    # The model still trains after generation: forward + backward through the rotary tables generation used.
    _logits_shard(model, PROMPTS[0] + rollout.completions[0]).float().square().mean().backward()

    sampler = StudentGenerator(model, OnPolicyConfig(max_new_tokens=NEW, eos_id=3), vocab_size=VOCAB,
                               max_sequence_length=32, max_batch_size=len(PROMPTS))
    a, b, c = (sampler.generate(PROMPTS, seed=s).completions for s in (11, 11, 12))
    padded_ids = [t for comp in a + c for t in comp if t >= VOCAB]
    return dict(greedy=rollout.completions, reference=reference, gap=max(gaps), same_seed=a == b, other_seed=a != c,
                padded_ids=padded_ids, engine=rollout.engine)


@pytest.mark.parametrize("tp,sequence_parallel", [(1, False), (2, True)])
def test_generation_equals_greedy_decode_and_restores_the_model(tp, sequence_parallel):
    results = run_distributed(_generate_and_check, tp, tp, sequence_parallel, tp=tp)
    for r in results:
        assert r["engine"] == "static"  # no CUDA here: Megatron-Core's static-batch controller
        assert r["greedy"] == r["reference"]
        assert r["gap"] < 1e-4, r["gap"]  # fp32: decode with a KV cache vs one forward, rounding only
        assert r["same_seed"] and r["other_seed"]
        assert r["padded_ids"] == []  # the vocabulary's padding columns are never sampled
    assert all(r["greedy"] == results[0]["greedy"] for r in results)  # every TP rank generated the same


def test_sampling_settings_are_checked():
    from kd_teacher.config import ConfigError
    from kd_teacher.onpolicy import OnPolicyConfig

    OnPolicyConfig(top_p=1.0).check()
    for bad, match in [(dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
                       (dict(max_new_tokens=-3), "max_new_tokens must be >= 1"),
                       (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
                       (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
                       (dict(top_p=math.nan), r"top_p must be in \(0, 1\]"),
                       (dict(top_k=5, top_p=0.9), "both set"),
                       (dict(temperature=0.0), "temperature"),
                       (dict(lmbda=1.5), "lmbda")]:
        with pytest.raises(ConfigError, match=match):
            OnPolicyConfig(**bad).check()
