"""The vocab-parallel sampler (kd_teacher/sampling.py) and the sampled payload kind.

The sampler's empirical distribution matches the teacher's by a chi-square test at a fixed seed, at TP=1 and
TP=2 (gloo, real process group), with the very same ids at both; payload round trips, validation and version-1
headers; bad input.
"""

import json

import pytest
import torch

from kd_teacher.payload import PayloadError, TopKPayload, token_hashes
from kd_teacher.sampling import MAX_DRAWS, count_draws, token_seeds, vocab_parallel_sample
from kd_teacher.testing.distributed import run_distributed

VOCAB, PADDED = 300, 320  # 20 padding columns, 160 a shard at TP=2
TEMPERATURE = 1.5
DRAWS = 16
TOKENS = 2000  # one teacher distribution, many tokens: 32000 draws in all


def _teacher_row():
    g = torch.Generator().manual_seed(11)
    row = torch.randn(PADDED, generator=g) * 2.5
    row[VOCAB:] = 40.0  # padding columns with huge logits: they must never be drawn nor counted in the LSE
    return row


def _sample_on_this_rank():
    from megatron.core import parallel_state as mpu

    tp = mpu.get_tensor_model_parallel_world_size()
    rank = mpu.get_tensor_model_parallel_rank()
    shard = _teacher_row().chunk(tp)[rank].expand(1, TOKENS, PADDED // tp).contiguous()
    seeds = token_seeds(["0123456789abcdef" * 2], TOKENS, seed=5)
    group = mpu.get_tensor_model_parallel_group() if tp > 1 else None
    return vocab_parallel_sample(shard, DRAWS, seeds, temperature=TEMPERATURE, vocab_size=VOCAB, group=group)


def _chi_square(counts, ids, p):
    """(statistic, degrees of freedom, p-value) of the pooled draws against n * p, bins with expectation < 5
    merged into one."""
    observed = torch.zeros(VOCAB, dtype=torch.float64).scatter_add_(0, ids.reshape(-1).long(),
                                                                     counts.reshape(-1).double())
    expected = p * observed.sum()
    big = expected >= 5
    o = torch.cat([observed[big], observed[~big].sum().reshape(1)])
    e = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    stat = float(((o - e) ** 2 / e).sum())
    df = o.numel() - 1
    return stat, df, float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                                   torch.tensor(stat / 2, dtype=torch.float64)))


def test_draws_follow_the_teacher_distribution_and_are_the_same_at_tp1_and_tp2():
    tp1 = run_distributed(_sample_on_this_rank, 1)[0]
    tp2 = run_distributed(_sample_on_this_rank, 2, tp=2)
    for counts, ids, lse in tp2:  # every rank holds the same payload, bit for bit that of TP=1
        assert torch.equal(counts, tp1[0]) and torch.equal(ids, tp1[1])
        assert torch.allclose(lse, tp1[2], rtol=0, atol=1e-5)
    counts, ids, lse = tp1
    p = torch.softmax(_teacher_row()[:VOCAB].double() / TEMPERATURE, dim=0)
    assert torch.allclose(lse.double(), torch.logsumexp(_teacher_row()[:VOCAB].double() / TEMPERATURE, 0), atol=1e-5)
    assert int(ids.max()) < VOCAB, "a padding column was drawn"
    stat, df, p_value = _chi_square(counts, ids, p)
    assert p_value > 0.01, f"chi-square {stat:.1f} on {df} degrees of freedom: p = {p_value:.2g}"
    # ... and the test has power: the same draws do not pass for a slightly different distribution
    tilted = torch.softmax(_teacher_row()[:VOCAB].double() / (TEMPERATURE * 1.1), dim=0)
    assert _chi_square(counts, ids, tilted)[2] < 1e-6


def test_slots_hold_distinct_ids_by_count_then_fillers():
    draws = torch.tensor([[7, 3, 7, 1, 3, 7], [2, 2, 2, 2, 2, 2], [5, 4, 3, 2, 1, 0]])
    counts, ids = count_draws(draws)
    assert counts.tolist() == [[3, 2, 1, 0, 0, 0], [6, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    # drawn ids by count desc then id asc; then the smallest ids not drawn
    assert ids.tolist() == [[7, 3, 1, 0, 2, 4], [2, 0, 1, 3, 4, 5], [0, 1, 2, 3, 4, 5]]


def test_draws_depend_on_content_position_and_seed_only():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 9, 50, generator=g)
    tokens = torch.randint(0, 50, (3, 9), generator=g)
    whole = TopKPayload.from_logits(logits, 6, tokens=tokens, extraction="sampled")
    alone = TopKPayload.from_logits(logits[1:2], 6, tokens=tokens[1:2], extraction="sampled")
    assert torch.equal(whole.indices[1:2], alone.indices) and torch.equal(whole.values[1:2], alone.values)
    other = TopKPayload.from_logits(logits, 6, tokens=tokens, extraction="sampled", sample_seed=1)
    assert not torch.equal(other.indices, whole.indices)
    # the stream of a token depends on its sequence's hash: another token anywhere changes every draw
    changed = tokens.clone()
    changed[0, -1] += 1
    moved = TopKPayload.from_logits(logits, 6, tokens=changed, extraction="sampled")
    assert not torch.equal(moved.indices[0], whole.indices[0]) and torch.equal(moved.indices[1:], whole.indices[1:])


def _sampled(k=8, dtype=torch.float32, temperature=2.0):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 300, generator=g) * 3).to(dtype)
    tokens = torch.randint(0, 290, (2, 7), generator=g)
    return TopKPayload.from_logits(logits, k, temperature=temperature, vocab_size=290, tokens=tokens,
                                   extraction="sampled", sample_seed=9), tokens, logits


@pytest.mark.parametrize("dtype, k, stored", [(torch.float32, 8, torch.float32), (torch.bfloat16, 8, torch.bfloat16),
                                              (torch.bfloat16, 290, torch.float32)])
def test_sampled_payload_round_trips_and_validates(dtype, k, stored):
    p, tokens, logits = _sampled(k, dtype)
    assert p.values.dtype == stored, "counts in the logits' dtype (as top-k values) where it holds 0..k exactly"
    q = TopKPayload.from_bytes(p.to_bytes())
    assert q.header == p.header and q.header.extraction == "sampled" and q.header.schema_version == 2
    assert torch.equal(q.values, p.values) and torch.equal(q.indices, p.indices)
    assert (p.values.sum(-1) == k).all() and torch.equal(p.estimated_probs(), p.values.float() / k)
    assert all(len(set(row)) == k for row in p.indices.reshape(-1, k).tolist()), "slot ids are distinct"
    assert torch.allclose(p.lse, torch.logsumexp(logits[..., :290].double() / 2.0, -1).float(), atol=1e-5)
    q.check_tokens(tokens)
    with pytest.raises(PayloadError, match="draw counts, not the teacher's logits"):
        p.log_probs()


@pytest.mark.parametrize("tamper, match", [
    (lambda v: v.__setitem__((0, 0, 0), v[0, 0, 0] + 1), "summing to k"),
    (lambda v: v.__setitem__((0, 0, 0), v[0, 0, 0] - 0.5), "summing to k"),
    (lambda v: v.__setitem__((1, 2, 0), float("nan")), "non-finite"),
])
def test_sampled_payload_with_other_values_is_refused(tamper, match):
    p, _, _ = _sampled()
    tamper(p.values)
    with pytest.raises(PayloadError, match=match):
        p.validate()


def test_version_1_header_reads_and_cannot_claim_sampled():
    p, _, _ = _sampled()
    top = TopKPayload.from_logits(torch.randn(2, 7, 300), 5, vocab_size=290)
    old = json.loads(top.header.to_json())
    old["schema_version"] = 1
    del old["extraction"]  # a version-1 writer's header may predate the field
    assert type(top.header).from_dict(dict(old)).extraction == "topk"
    old.update(extraction="sampled", values_dtype="float32", k=8)
    with pytest.raises(PayloadError, match="version-1 payload is top-k"):
        type(p.header).from_dict(old)


def test_bad_sampling_input_is_refused():
    logits, tokens = torch.randn(1, 4, 50), torch.randint(0, 50, (1, 4))
    seeds = token_seeds(token_hashes(tokens), 4)
    for n, match in [(0, "positive integer"), (-3, "positive integer"), (MAX_DRAWS + 1, "maximum of 1024"),
                     (51, "exceed the vocabulary")]:
        with pytest.raises(ValueError, match=match):
            vocab_parallel_sample(logits, n, seeds)
    with pytest.raises(ValueError, match="seeds must be int64"):
        vocab_parallel_sample(logits, 4, seeds[:, :2])
    with pytest.raises(ValueError, match="sample seed"):
        token_seeds(token_hashes(tokens), 4, seed=-1)
    with pytest.raises(PayloadError, match="pass tokens="):
        TopKPayload.from_logits(logits, 4, extraction="sampled")
    with pytest.raises(PayloadError, match="extraction 'gumbel'"):
        TopKPayload.from_logits(logits, 4, tokens=tokens, extraction="gumbel")
    bad = logits.clone()
    bad[0, 2, 7] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        TopKPayload.from_logits(bad, 4, tokens=tokens, extraction="sampled")
