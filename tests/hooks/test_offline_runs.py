"""An offline teacher through a long run's events, on real gloo ranks: Megatron-Core's `RerunDataIterator`
replaying a step while payloads are read ahead, evaluation over sequences the dump does not cover, steps
without any covered sequence (never a NaN metric), and read-ahead streams evicted by others."""

import math

import pytest

from kd_teacher.testing.distributed import run_distributed
from tests.hooks.test_forward_step import K, MBS, SEQ, VOCAB, forward_step, kd_config, micro_batches, student_config
from tests.hooks.test_sources import _dump


def _offline_kd(directory, missing="error", prefetch=2):
    from kd_teacher.hooks.config import KDConfig, OfflineTeacherConfig

    return KDConfig(source="offline", k=K, alpha=0.6, vocab_size=VOCAB, prefetch=prefetch,
                    offline=OfflineTeacherConfig(dir=directory, missing=missing)).check()


def _run(step, model, data_iterator, n):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    reports = get_forward_backward_func()(
        forward_step_func=step, data_iterator=data_iterator, model=[model], num_microbatches=n,
        seq_length=SEQ, micro_batch_size=MBS, forward_only=True,
    )
    return [{k: v.tolist() for k, v in r.items()} for r in reports]


def _student_and_dump(tmp, batches):
    import torch

    from kd_teacher.engine.model import build_gpt_model
    from kd_teacher.hooks import make_teacher_source

    torch.manual_seed(5)
    model, _ = build_gpt_model(student_config(tp=2))
    teacher = make_teacher_source(kd_config(tp=2))
    return model, _dump(teacher.engine, batches, tmp)


# ---- Megatron-LM's rerun machinery replays a step's micro-batches ------------------------------------------
def _replay(tmp):
    from megatron.core.rerun_state_machine import (
        RerunDataIterator, RerunMode, destroy_rerun_state_machine, initialize_rerun_state_machine,
    )

    from kd_teacher.hooks import wrap_forward_step

    batches = micro_batches(6, seed=21)
    model, directory = _student_and_dump(tmp, batches)
    reference = wrap_forward_step(forward_step, _offline_kd(directory), model=model, read_ahead=False)
    expected = [_run(reference, model, iter(batches[:3]), 3), _run(reference, model, iter(batches[3:]), 3)]

    # What the rerun state machine does to a data iterator (in mode validate_results, Megatron-LM's default):
    # advance() when a step starts, rewind() to run the step again on the same micro-batches.
    initialize_rerun_state_machine(mode=RerunMode.VALIDATE_RESULTS)
    try:
        step = wrap_forward_step(forward_step, _offline_kd(directory, prefetch=2), model=model)
        assert step.read_ahead
        data = RerunDataIterator(iter(batches))
        seen = {}
        data.advance()
        seen["step 1"] = _run(step, model, data, 3)
        data.rewind()
        seen["step 1 replayed"] = _run(step, model, data, 3)
        data.rewind()
        seen["step 1 replayed again"] = _run(step, model, data, 3)
        data.advance()
        seen["step 2"] = _run(step, model, data, 3)
        step.close()
    finally:
        destroy_rerun_state_machine()
    return expected, seen


def test_read_ahead_survives_megatron_rerun_replay(tmp_path):
    for expected, seen in run_distributed(_replay, 2, str(tmp_path), tp=2):
        assert seen["step 1"] == expected[0]
        assert seen["step 1 replayed"] == expected[0]  # the same micro-batches, with their own payloads
        assert seen["step 1 replayed again"] == expected[0]
        assert seen["step 2"] == expected[1]  # nothing read ahead for step 2 was lost or reordered


# ---- evaluation, and steps without a covered sequence ------------------------------------------------------
def _evaluation(tmp):
    from kd_teacher.hooks import wrap_forward_step
    from kd_teacher.offline.format import MissingSamplesError

    covered = micro_batches(2, seed=31)
    model, directory = _student_and_dump(tmp, covered)
    uncovered = micro_batches(2, seed=32)
    half = micro_batches(1, seed=33)
    half[0]["tokens"][0] = covered[0]["tokens"][0]  # row 0 in the dump, row 1 not
    out = {}
    strict = wrap_forward_step(forward_step, _offline_kd(directory), model=model)
    model.train()
    try:
        _run(strict, model, iter(uncovered), 2)
    except MissingSamplesError as e:
        out["training error"] = str(e)
    model.eval()  # as Megatron-LM's evaluate() does, with the same wrapped forward_step
    out["eval uncovered"] = _run(strict, model, iter(uncovered), 2)
    out["eval half"] = _run(strict, model, iter(half), 1)
    out["eval covered"] = _run(strict, model, iter(covered), 2)
    model.train()
    lenient = wrap_forward_step(forward_step, _offline_kd(directory, missing="ce_only"), model=model)
    out["train uncovered, ce_only"] = _run(lenient, model, iter(uncovered), 2)
    strict.close()
    lenient.close()
    return out


def test_evaluation_without_dump_coverage_is_cross_entropy_only_and_never_nan(tmp_path):
    out = run_distributed(_evaluation, 2, str(tmp_path), tp=2)[0]
    assert "2 of 2 sequences of this training micro-batch are not in the offline dump" in out["training error"]
    assert "kd.offline.missing: ce_only" in out["training error"]
    for name in ("eval uncovered", "eval half", "eval covered", "train uncovered, ce_only"):
        for report in out[name]:
            assert all(math.isfinite(x) for pair in report.values() for x in pair), (name, report)
            # KD metrics are per loss token, the count the training loop divides by is never 0
            assert report["kd loss"][1] == report["lm loss"][1] > 0
    for name in ("eval uncovered", "train uncovered, ce_only"):
        for report in out[name]:
            assert report["kd teacher coverage"][0] == 0 and report["kd loss"][0] == 0
            assert report["kd total loss"][0] == pytest.approx(0.4 * report["lm loss"][0], rel=1e-6)
    covered, tokens = out["eval half"][0]["kd teacher coverage"]
    assert 0 < covered < tokens
    assert all(r["kd teacher coverage"][0] == r["kd teacher coverage"][1] for r in out["eval covered"])


# ---- read-ahead streams: the few most recent data iterators, the others stopped and cancelled -------------
def _streams(tmp):
    from megatron.core.rerun_state_machine import RerunDataIterator

    from kd_teacher.hooks import wrap_forward_step
    from kd_teacher.hooks import forward_step as fs

    batches = micro_batches(4, seed=41)
    model, directory = _student_and_dump(tmp, batches)
    step = wrap_forward_step(forward_step, _offline_kd(directory, prefetch=2), model=model)
    cancelled = []
    real_cancel = step.source.cancel
    step.source.cancel = lambda handle: cancelled.append(handle) or real_cancel(handle)
    reference = wrap_forward_step(forward_step, _offline_kd(directory), model=model, read_ahead=False)
    expected = _run(reference, model, iter(batches), 4)

    kept = RerunDataIterator(iter(batches))
    first = _run(step, model, kept, 1)  # reads ahead 2 more from `kept`
    others = [iter(batches) for _ in range(fs._MAX_READ_AHEAD_STREAMS)]
    for it in others:  # each newer iterator pushes the least recently used one out
        _run(step, model, it, 1)
    out = {"kept, after eviction": first + _run(step, model, kept, 3)}  # evicts the oldest plain iterator
    out["cancelled"], out["streams"] = len(cancelled), len(step._streams)
    out["expected"] = expected
    step.close()
    out["cancelled at close"] = len(cancelled)
    return out


def test_evicted_read_ahead_cancels_its_requests_and_keeps_a_rerun_iterators_batches(tmp_path):
    from kd_teacher.hooks.forward_step import _MAX_READ_AHEAD_STREAMS

    out = run_distributed(_streams, 2, str(tmp_path), tp=2)[0]
    # The rerun iterator's 2 requests in flight, then one plain iterator's (its 2 read-ahead items dropped).
    assert out["cancelled"] == 4 and out["streams"] == _MAX_READ_AHEAD_STREAMS
    assert out["kept, after eviction"] == out["expected"]  # its read-ahead items still come, in order
    assert out["cancelled at close"] == 4 + 2 * (_MAX_READ_AHEAD_STREAMS - 1)  # the other iterators' requests
