"""The hook's fused CE + KD pass (kd_teacher/hooks/fused.py) through Megatron-Core's schedule on real gloo ranks:
the same reported losses and the same gradients as the separate passes (Megatron's CE + the KD loss), the
user's forward_step and loss_func unchanged; and the deferred value checks still refuse a bad payload before
an optimizer step could use its gradient (training) or at the next micro-batch (evaluation), naming it."""

import pytest
import torch

from kd_teacher.demo import forward_step
from kd_teacher.payload import PayloadError
from kd_teacher.testing.distributed import run_distributed
from tests.hooks.test_forward_step import MBS, SEQ, kd_config, micro_batches, student_config

ALPHA = 0.6


def _fused_vs_separate(num_microbatches):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from kd_teacher.engine.model import build_gpt_model
    from kd_teacher.hooks import wrap_forward_step

    tp = parallel_state.get_tensor_model_parallel_world_size()
    cfg = student_config(tp)
    torch.manual_seed(cfg.seed)
    model, _ = build_gpt_model(cfg)
    batches = micro_batches(num_microbatches, seed=7)
    out = {}
    for fused in (True, False):
        step = wrap_forward_step(forward_step, kd_config(tp, alpha=ALPHA, fused_ce=fused), model=model)
        model.zero_grad(set_to_none=True)
        reports = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(batches), model=[model], num_microbatches=num_microbatches,
            seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
        out[fused] = dict(reports=[{k: v.tolist() for k, v in r.items()} for r in reports],
                          grads={n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                          fused_micro_batches=step.fused_micro_batches)
        step.close()
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_pass_gives_the_separate_passes_losses_and_gradients(tp):
    for result in run_distributed(_fused_vs_separate, tp, 2, tp=tp):
        fused, separate = result[True], result[False]
        assert fused["fused_micro_batches"] == 2 and separate["fused_micro_batches"] == 0
        for a, b in zip(fused["reports"], separate["reports"]):
            assert a.keys() == b.keys()
            for key in a:  # [sum, count]: CE to fp32 rounding of its sums of exps, KD the same numbers
                assert a[key][1] == b[key][1], key
                assert a[key][0] == pytest.approx(b[key][0], rel=2e-6, abs=1e-6), key
        assert fused["grads"].keys() == separate["grads"].keys() and fused["grads"]
        for name, g in fused["grads"].items():
            torch.testing.assert_close(g, separate["grads"][name], rtol=1e-4, atol=1e-6, msg=name)


def _bad_payload(forward_only):
    """A teacher whose payloads repeat an id within a token: refused after the loss was built, read late."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from kd_teacher.engine.model import build_gpt_model
    from kd_teacher.hooks import wrap_forward_step

    cfg = student_config(1)
    torch.manual_seed(cfg.seed)
    model, _ = build_gpt_model(cfg)
    step = wrap_forward_step(forward_step, kd_config(1, alpha=ALPHA), model=model)
    score = step.source.score

    def repeating(tokens, **kw):
        payload = score(tokens, **kw)
        payload.indices[1, 3, 1] = payload.indices[1, 3, 0]
        return payload

    step.source.score = repeating
    model.zero_grad(set_to_none=True)
    raised = None
    try:
        get_forward_backward_func()(forward_step_func=step, data_iterator=iter(micro_batches(2, seed=8)),
                                    model=[model], num_microbatches=2, seq_length=SEQ, micro_batch_size=MBS,
                                    forward_only=forward_only)
    except PayloadError as e:
        raised = ("step", str(e))
    if raised is None:
        try:
            step.close()
        except PayloadError as e:
            raised = ("close", str(e))
    grads = sum(p.grad is not None for p in model.parameters())
    return raised, step.fused_micro_batches, grads


def test_a_bad_payload_raises_in_the_backward_of_its_micro_batch_named():
    (raised, fused, grads), = run_distributed(_bad_payload, 1, False, tp=1)
    assert raised is not None and raised[0] == "step", raised
    assert "KD micro-batch 1 " in raised[1] and "repeated ids" in raised[1], raised
    assert fused == 1, "the second micro-batch never ran"


def test_in_evaluation_a_bad_payload_raises_at_the_next_micro_batch():
    (raised, fused, grads), = run_distributed(_bad_payload, 1, True, tp=1)
    # forward_only: no backward; the first micro-batch's checks are read when the second one starts
    assert raised is not None and raised[0] == "step" and "KD micro-batch 1 " in raised[1], raised
    assert grads == 0
