"""vocab_parallel_topk against a float64 dense reference on the gathered full logits, at TP = 1, 2, 4."""

import pytest
import torch

from kd_teacher import vocab_parallel_topk
from kd_teacher.topk import order_preserving_key
from kd_teacher.testing.distributed import run_distributed

CASES = [  # (true vocab, padded vocab, k, temperature, dtype)
    (1000, 1024, 16, 1.0, torch.float32),
    (1000, 1024, 7, 2.0, torch.bfloat16),
    (250, 256, 64, 0.5, torch.float32),
    (509, 512, 128, 1.5, torch.bfloat16),  # k > V_local at TP=4: every shard contributes all it has
]


def _logits(vocab_padded, dtype, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, vocab_padded, generator=g) * 4
    if ties:  # quantise so that many logits tie exactly
        x = torch.round(x)
    return x.to(dtype)


def dense_reference(logits, k, temperature, vocab):
    """Top-k by (value desc, id asc) and LSE in float64 over the true vocabulary."""
    x = logits[..., :vocab].double()
    ids = torch.arange(vocab).expand_as(x)
    # lexsort: stable sort by id asc is the identity, then stable sort by value desc keeps ids ascending in ties
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]
    values = torch.gather(logits[..., :vocab], -1, order)
    lse = torch.logsumexp(x / temperature, dim=-1)
    return values, torch.gather(ids, -1, order), lse


def _shard_topk_all_cases():
    """Every case, with and without ties, on this rank's vocabulary shard (one launch per TP size)."""
    from megatron.core import parallel_state as mpu

    tp = mpu.get_tensor_model_parallel_world_size()
    r = mpu.get_tensor_model_parallel_rank()
    group = mpu.get_tensor_model_parallel_group() if tp > 1 else None
    out = {}
    for case_index, (vocab, padded, k, temperature, dtype) in enumerate(CASES):
        for ties in (False, True):
            shard = _logits(padded, dtype, seed=case_index, ties=ties).chunk(tp, dim=-1)[r].contiguous()
            out[case_index, ties] = vocab_parallel_topk(shard, k, temperature=temperature, vocab_size=vocab, group=group)
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_matches_dense_reference(tp):
    per_rank = run_distributed(_shard_topk_all_cases, tp, tp=tp)
    for (case_index, ties), _ in per_rank[0].items():
        vocab, padded, k, temperature, dtype = CASES[case_index]
        ref_v, ref_i, ref_lse = dense_reference(_logits(padded, dtype, seed=case_index, ties=ties), k, temperature, vocab)
        for rank_results in per_rank:
            values, indices, lse = rank_results[case_index, ties]
            assert values.dtype == dtype
            assert torch.equal(indices, ref_i), f"case {case_index}: ids differ at TP={tp}"
            assert torch.equal(values, ref_v)
            assert (indices < vocab).all(), "a padding column was selected"
            torch.testing.assert_close(lse.double(), ref_lse, rtol=2e-6, atol=2e-6)


def test_padding_never_counted():
    x = torch.zeros(1, 1, 8)
    x[..., 6:] = 100.0  # huge padding logits must neither win nor enter the LSE
    v, i, lse = vocab_parallel_topk(x, 3, vocab_size=6)
    assert i.tolist() == [[[0, 1, 2]]]
    assert torch.allclose(lse, torch.log(torch.tensor(6.0)))


def test_order_preserving_key_orders_like_floats():
    vals = torch.tensor([float("-inf"), -3.5, -0.0, 0.0, 1e-30, 2.0, 2.0, 3e38])
    ids = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    order = torch.argsort(order_preserving_key(vals, ids), descending=True)
    assert ids[order].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # ties (2.0 and +-0) by lower id


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k must be a positive integer"),
        (dict(k=11), "larger than the true vocabulary"),
        (dict(k=2, vocab_size=20), "larger than the model's padded vocabulary"),
        (dict(k=2, temperature=0.0), "temperature"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vocab_parallel_topk(torch.randn(2, 10), **kwargs)


def test_non_finite_logits_are_refused():
    x = torch.randn(2, 10)
    x[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        vocab_parallel_topk(x, 2)
