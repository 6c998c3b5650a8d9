"""TeacherEngine on real Megatron-Core GPTModels: teacher mode equals the training-path forward bit for bit at
TP=1, TP=2 (with and without sequence parallelism) and PP=2, with the top-k taken at the output layer; a model
that changes its logits after the output layer is served from its returned logits; a dist_checkpointing
checkpoint scores like the in-process model; bad input is refused."""

import pytest
import torch

from kd_teacher.topk import vocab_parallel_topk
from kd_teacher.testing.distributed import run_distributed

VOCAB = 1000


def _model_config(tp=1, pp=1, dtype="float32", layers=2, sp=False):
    from kd_teacher.engine.model import ModelConfig, PrecisionConfig

    return ModelConfig(
        num_layers=layers, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        vocab_size=VOCAB, max_sequence_length=64, make_vocab_size_divisible_by=48,  # padded to 1008 / 1056
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, hidden_dropout=0.1, attention_dropout=0.1,
        sequence_parallel=sp, precision=PrecisionConfig(params_dtype=dtype),
    )


def _engine(tp=1, pp=1, dtype="float32", k=16, temperature=1.0, sp=False, repacking=None):
    from kd_teacher.engine.engine import EngineConfig, TeacherEngine
    from kd_teacher.engine.model import build_gpt_model

    cfg = _model_config(tp, pp, dtype, sp=sp)
    torch.manual_seed(cfg.seed)
    model, _ = build_gpt_model(cfg)
    return TeacherEngine(model, VOCAB, EngineConfig(k=k, temperature=temperature, repacking=repacking),
                         model_config=cfg)


def _batches(second_len=17):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (2, 24), generator=g), torch.randint(0, VOCAB, (3, second_len), generator=g)]


def _consistency(tp, pp, dtype, temperature, sp=False):
    from kd_teacher.engine.consistency import check_consistency

    engine = _engine(tp, pp, dtype, temperature=temperature, sp=sp)
    # sequence parallelism splits the sequence over TP ranks: lengths must divide by TP
    report = check_consistency(engine, _batches(18 if sp else 17))
    payload = engine.score(_batches()[0], sample_ids=[5, 6])
    return report, payload, engine.extraction_site


@pytest.mark.parametrize("tp, pp, sp", [(1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False)],
                         ids=["tp1", "tp2", "tp2_sp", "pp2"])
def test_teacher_mode_equals_training_forward_bitwise(tp, pp, sp):
    for dtype, temperature in (("float32", 1.0), ("bfloat16", 2.0)):
        results = run_distributed(_consistency, tp * pp, tp, pp, dtype, temperature, sp, tp=tp, pp=pp)
        # the top-k is taken at the output layer (no [b, s, V] copy), and still equals the training path's
        assert [site for _, _, site in results] == ["output_layer"] * (tp * pp)
        reports = [r for r, _, _ in results if r is not None]
        assert len(reports) == tp  # one per rank of the last pipeline stage
        for report in reports:
            assert report.batches == 2
            assert report.bitwise_equal and report.payload_bitwise_equal, report.to_json()
            assert report.max_abs_logit_diff == 0.0 and report.topk_index_agreement == 1.0
        payloads = [p for _, p, _ in results]
        for p in payloads:  # PP: the payload reaches every stage; TP: every rank holds the same payload
            p.validate()
            assert torch.equal(p.values, payloads[0].values) and torch.equal(p.indices, payloads[0].indices)
            p.check_tokens(_batches()[0], sample_ids=[5, 6])
            assert p.header.temperature == temperature and p.header.vocab_size == VOCAB


def _logits_changed_after_output_layer(tp):
    """A forward hook that rescales GPTModel's returned logits: a change after the output layer that no
    configuration flag announces. The engine's first-forward check must catch it and serve the returned logits."""
    from megatron.core import parallel_state as mpu

    engine = _engine(tp, 1, "float32", k=8)
    engine.model.register_forward_hook(lambda module, args, logits: logits * 0.5)
    tokens = _batches()[0]
    assert engine.extraction_site == "output_layer"  # nothing in the config says otherwise
    first, second = engine.score(tokens), engine.score(tokens)
    v, i, lse = vocab_parallel_topk(engine.teacher_logits(tokens), 8, vocab_size=VOCAB,
                                    group=mpu.get_tensor_model_parallel_group())
    return engine.extraction_site, first, second, (v, i, lse)


def test_logits_changed_after_output_layer_are_served_as_returned():
    for site, first, second, (v, i, lse) in run_distributed(_logits_changed_after_output_layer, 2, 2, tp=2):
        assert site == "returned_logits"
        for p in (first, second):
            assert torch.equal(p.values, v) and torch.equal(p.indices.long(), i) and torch.equal(p.lse, lse)


def _dense_payload_check(tp):
    """The engine's payload equals top-k/LSE of the full logits gathered across TP, in float64."""
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    engine = _engine(tp, 1, "float32", k=8, temperature=1.5)
    tokens = _batches()[0]
    shard = engine.teacher_logits(tokens)
    full = gather_from_tensor_model_parallel_region(shard) if tp > 1 else shard
    return engine.score(tokens), full[..., :VOCAB], mpu.get_tensor_model_parallel_rank()


def test_payload_matches_dense_full_vocabulary_at_tp2():
    for payload, full, _ in run_distributed(_dense_payload_check, 2, 2, tp=2):
        dense = torch.log_softmax(full.double() / 1.5, dim=-1)
        top = torch.sort(full, dim=-1, descending=True, stable=True)
        assert torch.equal(payload.indices.long(), top.indices[..., :8])
        torch.testing.assert_close(payload.log_probs().double(), top.values[..., :8].double() / 1.5
                                   - torch.logsumexp(full.double() / 1.5, -1, keepdim=True), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(payload.lse.double(), torch.logsumexp(full.double() / 1.5, -1), rtol=1e-6, atol=1e-6)
        assert torch.allclose(torch.gather(dense, -1, payload.indices.long()), payload.log_probs().double(), atol=1e-5)


def _checkpoint_round_trip(ckpt_dir):
    from kd_teacher.engine.engine import EngineConfig, TeacherEngine
    from kd_teacher.engine.checkpoint import save_checkpoint

    engine = _engine(2, 1)
    save_checkpoint(engine.model, ckpt_dir)
    torch.manual_seed(999)  # a differently initialised model, then loaded from the checkpoint
    loaded = TeacherEngine.from_checkpoint(ckpt_dir, _model_config(2, 1), EngineConfig(k=16))
    a, b = engine.score(_batches()[1]), loaded.score(_batches()[1])
    return torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices) and torch.equal(a.lse, b.lse), \
        a.header.teacher_fingerprint == b.header.teacher_fingerprint


def _load_mismatched(ckpt_dir):
    from kd_teacher.engine.engine import TeacherEngine
    from kd_teacher.engine.checkpoint import CheckpointMismatchError

    cfg = _model_config(2, 1)
    cfg.ffn_hidden_size = 96
    try:
        TeacherEngine.from_checkpoint(ckpt_dir, cfg)
    except CheckpointMismatchError as e:
        return str(e)
    return None


def test_checkpoint_scores_like_in_process_model(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    for same_payload, same_fingerprint in run_distributed(_checkpoint_round_trip, 2, ckpt, tp=2):
        assert same_payload and same_fingerprint
    for msg in run_distributed(_load_mismatched, 2, ckpt, tp=2):
        assert msg is not None and "does not match the model config" in msg


def _bad_inputs():
    from kd_teacher.engine.engine import EngineConfig, TeacherEngine
    from kd_teacher.payload import PayloadError

    engine = _engine()
    errors = {}
    for name, tokens in {
        "out_of_range": torch.tensor([[1, 2, VOCAB]]),
        "negative": torch.tensor([[-1, 2]]),
        "empty": torch.zeros(0, 5, dtype=torch.long),
        "float": torch.zeros(1, 5),
        "1d": torch.zeros(5, dtype=torch.long),
    }.items():
        try:
            engine.score(tokens)
        except PayloadError as e:
            errors[name] = str(e)
    for name, kwargs in {"k_too_big": dict(config=EngineConfig(k=VOCAB + 1)), "vocab_too_big": dict(vocab_size=2000)}.items():
        try:
            TeacherEngine(engine.model, kwargs.get("vocab_size", VOCAB), kwargs.get("config"))
        except ValueError as e:
            errors[name] = str(e)
    try:
        TeacherEngine.from_checkpoint("/nonexistent/ckpt", _model_config())
    except FileNotFoundError as e:
        errors["missing_checkpoint"] = str(e)
    # score_many(out=...): one destination per request, and the caller's requests are left as they were
    from kd_teacher.engine.scheduler import ScoreRequest

    mine = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    requests = [ScoreRequest(mine), ScoreRequest(torch.tensor([[4, 5, 6]]))]
    try:
        engine.score_many(requests, out=[None])
    except ValueError as e:
        errors["out_too_short"] = str(e)
    errors["tokens_kept"] = requests[0].tokens is mine and mine.dtype == torch.int32
    with torch.no_grad():  # a teacher gone bad: its logits are NaN, so no payload may come out
        next(engine.model.parameters()).fill_(float("nan"))
    try:
        engine.score(torch.tensor([[1, 2, 3]]))
    except FloatingPointError as e:
        errors["nan_teacher"] = str(e)
    return errors


def test_bad_input_is_named():
    (errors,) = run_distributed(_bad_inputs, 1)
    assert "out of range" in errors["out_of_range"] and "out of range" in errors["negative"]
    assert "empty batch" in errors["empty"]
    assert "integers" in errors["float"] and "[batch, seq]" in errors["1d"]
    assert "larger than the true vocabulary" in errors["k_too_big"]
    assert "larger than the model's padded vocabulary" in errors["vocab_too_big"]
    assert "/nonexistent/ckpt does not exist" in errors["missing_checkpoint"]
    assert "non-finite" in errors["nan_teacher"]
    assert "1 destinations for 2 requests" in errors["out_too_short"]
    assert errors["tokens_kept"] is True


def _score_many_vs_score():
    from kd_teacher.engine.scheduler import ScoreRequest

    engine = _engine(k=8, repacking="any")  # opted in: merged forwards are what this test is about
    engine.scheduler.max_tokens = 64
    g = torch.Generator().manual_seed(3)
    requests = [ScoreRequest(torch.randint(0, VOCAB, (b, s), generator=g), request_id=str(i))
                for i, (b, s) in enumerate([(1, 20), (2, 9), (1, 31), (3, 5)])]
    singles = [engine.score(r.tokens) for r in requests]
    batches = engine.scheduler.plan(requests)
    many = engine.score_many(requests)
    # Into a transport's reply buffers (DistServer.payload_views): the same numbers, in the given tensors.
    from kd_teacher.transport.protocol import is_packed_in, packed_views

    bufs = [torch.full((b * s * 8 * (4 + 4) + 4 * b * s,), 7, dtype=torch.uint8) for b, s in
            (r.tokens.shape for r in requests)]
    views = [packed_views(buf, *r.tokens.shape, 8, "float32") for buf, r in zip(bufs, requests)]
    into = engine.score_many(requests, out=[views[0], None, views[2], views[3]])
    in_place = [is_packed_in(p, buf) for p, buf in zip(into, bufs)]
    same = all(torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices) and torch.equal(a.lse, b.lse)
               and a.header == b.header for a, b in zip(many, into))
    return singles, many, [b.tokens for b in batches], [r.tokens for r in requests], in_place, same


def test_scheduler_packs_within_budget_and_matches_single_requests():
    (singles, many, batch_tokens, tokens, in_place, same), = run_distributed(_score_many_vs_score, 1)
    assert in_place == [True, False, True, True] and same
    assert len(batch_tokens) < 4 and max(batch_tokens) <= 64  # requests were merged, within the budget
    for s, m, t in zip(singles, many, tokens):
        m.check_tokens(t)
        assert torch.equal(s.indices, m.indices)
        # a merged (right-padded) forward may round differently from a lone one; the contract is per micro-batch
        torch.testing.assert_close(s.values, m.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.lse, m.lse, rtol=1e-5, atol=1e-5)


def test_a_load_that_fails_for_another_reason_than_the_checkpoint_is_not_called_a_mismatch():
    """Out of memory, a failed collective or an interrupt during a load says nothing about the checkpoint: it is
    raised as it is. What a checkpoint that does not fit raises (Megatron-Core's validation, torch DCP's
    per-rank failures) becomes CheckpointMismatchError."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    from kd_teacher.engine.checkpoint import CheckpointMismatchError, load_failure

    def dcp(exc):
        return CheckpointException("load failed", {1: (exc, None)})

    for cause in (torch.OutOfMemoryError("CUDA out of memory"), MemoryError(), KeyboardInterrupt(),
                  torch.distributed.DistBackendError("NCCL error"), dcp(torch.OutOfMemoryError("oom on rank 1")),
                  dcp(torch.distributed.DistNetworkError("peer gone"))):
        assert load_failure(cause, "/ckpt") is cause
    for cause in (CheckpointingException("shape mismatch"), dcp(RuntimeError("size mismatch for weight")),
                  KeyError("decoder.layers.0.mlp")):
        mismatch = load_failure(cause, "/ckpt")
        assert isinstance(mismatch, CheckpointMismatchError) and "does not match the model config" in str(mismatch)
