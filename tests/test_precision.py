"""The precision recipe: derivation from Megatron-Core's TransformerConfig for every recipe, fingerprints,
mismatch errors in words, the serving policy per recipe, FP8 availability errors, refusal of delayed-scaling
checkpoints without FP8 scales, and in-place weight reloads. What only a GPU with Transformer Engine can show
(bitwise consistency under each recipe, frozen scales) is benchmarks/fp8_consistency.py."""

import logging
from pathlib import Path
import pickle

import pytest
import torch

from kd_teacher.engine.scheduler import ScoreRequest, TokenBudgetScheduler
from kd_teacher.precision import (
    FP8_RECIPES,
    FP8UnavailableError,
    PrecisionRecipe,
    RecipeMismatchError,
    check_recipe,
    fp8_support_problems,
    require_fp8_support,
    serving_policy,
)
from kd_teacher.testing.distributed import run_distributed

VOCAB = 1000


def _model_config(recipe=None, dtype="bfloat16", **precision):
    from kd_teacher.engine.model import ModelConfig, PrecisionConfig

    if recipe is not None:
        precision = dict(fp8="hybrid", fp8_recipe=recipe, **precision)
    return ModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        vocab_size=VOCAB, max_sequence_length=64, make_vocab_size_divisible_by=8,
        precision=PrecisionConfig(params_dtype=dtype, **precision),
    )


def _recipe(recipe=None, dtype="bfloat16", **precision) -> PrecisionRecipe:
    """The recipe of a real TransformerConfig (constructs on a CPU, no Transformer Engine needed)."""
    from kd_teacher.engine.model import transformer_config

    return PrecisionRecipe.from_transformer_config(transformer_config(_model_config(recipe, dtype, **precision)))


def _all_fingerprints():
    return [_recipe(r, fp8_margin=1, fp8_amax_history_len=16, fp8_amax_compute_algo="max").fingerprint()
            for r in (None,) + FP8_RECIPES]


# ---- derivation and fingerprint -------------------------------------------------------------------------------
def test_recipe_is_read_off_the_transformer_config_for_every_recipe():
    bf16 = _recipe(None)
    assert (bf16.name, bf16.fp8, bf16.batch_invariant, bf16.te_version) == ("bfloat16", None, True, None)
    assert bf16.mcore_version and "+" not in bf16.mcore_version  # recorded, without a VCS suffix
    history = dict(fp8_margin=2, fp8_amax_history_len=16, fp8_amax_compute_algo="max")
    for name in FP8_RECIPES:
        r = _recipe(name, fp8_param=True, **history)
        assert (r.name, r.fp8, r.fp8_recipe, r.fp8_param, r.params_dtype) == (
            f"fp8-{name}", "hybrid", name, True, "bfloat16")
        if name == "delayed":  # margin and amax history shape only delayed scaling
            assert (r.fp8_margin, r.fp8_amax_history_len, r.fp8_amax_compute_algo) == (2, 16, "max")
        else:
            assert (r.fp8_margin, r.fp8_amax_history_len, r.fp8_amax_compute_algo) == (0, 1, "most_recent")
            assert r.fingerprint() == _recipe(name, fp8_param=True).fingerprint()
    ends = _recipe("tensorwise", first_last_layers_bf16=True, num_layers_at_start_in_bf16=1,
                   num_layers_at_end_in_bf16=1)
    assert (ends.first_last_layers_bf16, ends.num_layers_at_start_in_bf16, ends.num_layers_at_end_in_bf16) == (True, 1, 1)
    with pytest.raises(ValueError, match="Delayed scaling does not support first / last layer"):
        _recipe("delayed", first_last_layers_bf16=True)  # Megatron-Core's own validation


def test_fingerprints_are_distinct_stable_across_processes_and_readable():
    here = _all_fingerprints()
    assert len(set(here)) == len(here)
    (there,) = run_distributed(_all_fingerprints, 1)
    assert there == here  # a fresh process derives the very same strings
    for fp in here:
        back = PrecisionRecipe.from_fingerprint(fp)
        assert back is not None and back.fingerprint() == fp
    delayed = _recipe("delayed")
    assert _recipe("delayed", fp8_margin=1).fingerprint() != delayed.fingerprint()
    # A fingerprint whose fields were edited no longer hashes to itself: not trusted, not described.
    tampered = delayed.fingerprint().replace("fp8_margin=0", "fp8_margin=3")
    assert tampered != delayed.fingerprint() and PrecisionRecipe.from_fingerprint(tampered) is None
    assert PrecisionRecipe.from_fingerprint("fp8-delayed:0123abcd") is None


def test_library_versions_are_recorded_but_not_part_of_the_recipe(caplog):
    """A dump made before a commit to a megatron-core source checkout (version 0.19.1+<hash>) or an upgrade
    still fits: versions are not in the fingerprint; a difference is named in a warning."""
    import dataclasses

    from kd_teacher.precision import _mcore_version, public_version, version_differences

    here = _recipe("blockwise")
    elsewhere = dataclasses.replace(here, mcore_version="0.19.1", te_version="2.19.0")
    assert elsewhere == here and elsewhere.fingerprint() == here.fingerprint()
    assert "version" not in here.fingerprint()
    check_recipe(elsewhere.fingerprint(), here)
    assert public_version("0.19.1+1f415a5") == public_version("0.19.1+f4fe165") == "0.19.1"
    assert version_differences({"mcore_version": f"{_mcore_version()}+abc123", "te_version": None}) == []
    (line,) = version_differences({"mcore_version": "0.19.1", "te_version": "2.20.2"})
    assert line == f"megatron-core 0.19.1 (here {_mcore_version()})"  # no TE here: nothing to compare


def test_recipe_mismatch_names_the_teacher_setting_and_its_value():
    fp32_teacher, bf16_student = _recipe(None, dtype="float32"), _recipe(None, dtype="bfloat16")
    with pytest.raises(RecipeMismatchError) as e:
        check_recipe(fp32_teacher.fingerprint(), bf16_student)
    msg = str(e.value)
    assert "params_dtype (float32 vs bfloat16)" in msg
    assert "set model.precision.params_dtype: bfloat16 in the teacher config" in msg
    with pytest.raises(RecipeMismatchError, match="set model.precision.fp8: hybrid, model.precision.fp8_recipe: "
                                                  "tensorwise in the teacher config"):
        check_recipe(bf16_student.fingerprint(), _recipe("tensorwise"))


# ---- the student's check --------------------------------------------------------------------------------------
def test_recipe_mismatch_is_refused_with_both_recipes_in_words(caplog):
    teacher, student = _recipe("delayed", fp8_amax_history_len=16), _recipe("blockwise")
    check_recipe(student.fingerprint(), student)
    check_recipe(student.fingerprint(), student.fingerprint())
    with pytest.raises(RecipeMismatchError) as e:
        check_recipe(teacher.fingerprint(), student)
    msg = str(e.value)
    assert "computed under FP8 delayed scaling (format hybrid, margin 0, amax history 16 (most_recent))" in msg
    assert "this run trains under FP8 blockwise scaling (format hybrid), parameters bfloat16" in msg
    assert "fp8_recipe (delayed vs blockwise)" in msg and "fp8_amax_history_len (16 vs 1)" in msg
    assert "kd.allow_recipe_mismatch: true" in msg
    with pytest.raises(RecipeMismatchError, match=r"computed under bfloat16 \(no FP8\).*trains under FP8 blockwise"):
        check_recipe(_recipe(None).fingerprint(), student.fingerprint())
    with pytest.raises(RecipeMismatchError, match="unreadable precision recipe"):
        check_recipe("fp8-delayed:0123abcd", student)
    with pytest.raises(RecipeMismatchError, match="unrecorded precision recipe"):
        check_recipe("", student)
    with caplog.at_level(logging.WARNING, logger="kd_teacher.precision"):
        check_recipe(teacher.fingerprint(), student, allow_mismatch=True)
    assert "accepting a precision recipe mismatch" in caplog.text


# ---- the engine's policy ----------------------------------------------------------------------------------------
def test_serving_policy_per_recipe_drives_the_scheduler(caplog, tmp_path):
    """Repacking is off unless asked for: kernels are chosen by shape, so no recipe is batch-invariant by
    construction. `any` is an opt-in with a warning; a batch-wide scale or a MoE model refuses it, naming why."""
    g = torch.Generator().manual_seed(0)
    requests = [ScoreRequest(torch.randint(0, VOCAB, (b, s), generator=g)) for b, s in ((2, 9), (1, 30), (3, 17))]
    exact = [[(i, r, req.tokens.shape[1]) for r in range(req.tokens.shape[0])] for i, req in enumerate(requests)]
    no_batch_wide_term = {None: True, "blockwise": True, "mxfp8": True, "tensorwise": False, "delayed": False}
    for name, may in no_batch_wide_term.items():
        recipe = _recipe(name)
        policy = serving_policy(recipe)
        assert policy.repacking == "off" and not policy.allow_repacking and recipe.batch_invariant is may
        assert policy.frozen_scales is (name == "delayed")
        plan = TokenBudgetScheduler(4096, repacking=policy.repacking).plan(requests)
        assert [b.rows for b in plan] == exact  # every student micro-batch exactly as given
        if may:
            caplog.clear()
            opted = serving_policy(recipe, "any")
            assert opted.repacking == "any" and "engine.repacking=any" in caplog.text
            plan = TokenBudgetScheduler(4096, repacking=opted.repacking).plan(requests)
            assert len(plan) == 1 and len(plan[0].rows) == 6  # one shared forward
            assert serving_policy(recipe, invariance_table="t.json").repacking == "proven"
            assert serving_policy(recipe, "off", invariance_table="t.json").repacking == "off"
            with pytest.raises(ValueError, match="engine.repacking=proven needs engine.invariance_table"):
                serving_policy(recipe, "proven")
    for name, why in (("tensorwise", "a batch-wide scale"), ("delayed", "measured to depend on the micro-batch")):
        for asked in ("any", "proven"):
            with pytest.raises(ValueError, match=f"engine.repacking={asked} with fp8-{name}.*{why}"):
                serving_policy(_recipe(name), asked, invariance_table="t.json")
        with pytest.raises(ValueError, match=f"engine.invariance_table=t.json with fp8-{name}"):
            serving_policy(_recipe(name), invariance_table="t.json")
    with pytest.raises(ValueError, match="engine.repacking=any with bfloat16, MoE"):
        serving_policy(_recipe(None), "any", model_batch_dependence="MoE (dropless)")
    with pytest.raises(ValueError, match="is not one of off, proven, any"):
        serving_policy(_recipe(None), "yes")


class _Table:
    """Proven shapes as engine.invariance.ProvenShapes answers them: rows of length 8 in [2, 8] and [4, 8]."""

    def allows(self, seq_len, rows, padded_len):
        return (rows, padded_len) in {(1, seq_len)} | ({(2, 8), (4, 8)} if seq_len == 8 else set())


def test_proven_repacking_packs_into_proven_shapes_only_and_keeps_sequence_parallel_padding():
    g = torch.Generator().manual_seed(0)
    shapes = ((1, 8), (2, 8), (1, 8), (1, 8), (1, 8), (1, 5), (3, 8))
    requests = [ScoreRequest(torch.randint(0, VOCAB, shape, generator=g)) for shape in shapes]
    plan = TokenBudgetScheduler(64, repacking="proven", proven=_Table()).plan(requests)
    as_given = [b for b in plan if b.rows and b.rows[0][0] in (5, 6)]
    for batch in plan:
        if batch not in as_given:
            assert all(_Table().allows(length, len(batch.rows), batch.seq_len) for _, _, length in batch.rows)
    # length 5 is in no proven shape, [3, 8] is not proven as given: both run exactly as the student gave them
    assert sorted(b.rows[0][0] for b in as_given) == [5, 6] and all(len({i for i, _, _ in b.rows}) == 1
                                                                   for b in as_given)
    packed = [b for b in plan if b not in as_given]
    assert sorted(len(b.rows) for b in packed) == [2, 4]  # the six rows of length 8: [4, 8] + [2, 8]
    assert sorted(r for b in plan for r in ((i, j) for i, j, _ in b.rows)) == sorted(
        (i, j) for i, (b, _) in enumerate(shapes) for j in range(b))
    # Sequence parallelism: every forward a multiple of TP=4 long, in every mode
    for mode, proven in (("off", None), ("any", None), ("proven", _Table())):
        plan = TokenBudgetScheduler(64, repacking=mode, seq_multiple=4, proven=proven).plan(requests)
        assert all(b.seq_len % 4 == 0 for b in plan)


def test_fp8_support_problems_name_what_is_missing():
    h100 = dict(te_version="2.20.2", capability=(9, 0), cuda_version="13.0")
    for name in ("delayed", "tensorwise", "blockwise"):
        assert fp8_support_problems(_recipe(name), **h100) == []
    (mx,) = fp8_support_problems(_recipe("mxfp8"), **h100)
    assert "compute capability >= 10.0; this one is 9.0" in mx
    assert fp8_support_problems(_recipe("mxfp8"), te_version="2.20.2", capability=(10, 0), cuda_version="13.0") == []
    (a100,) = fp8_support_problems(_recipe("delayed"), te_version="2.20.2", capability=(8, 0), cuda_version="12.4")
    assert "compute capability >= 8.9; this one is 8.0" in a100
    (old_cuda,) = fp8_support_problems(_recipe("blockwise"), te_version="2.20.2", capability=(9, 0), cuda_version="12.4")
    assert "CUDA >= 12.9" in old_cuda
    (old_te,) = fp8_support_problems(_recipe("tensorwise"), te_version="2.1.0", capability=(9, 0), cuda_version="13.0")
    assert "Transformer Engine 2.1.0 is too old" in old_te
    no_te = fp8_support_problems(_recipe("delayed"), te_version=None, capability=None, cuda_version=None)
    assert any("Transformer Engine is not installed" in p for p in no_te)
    assert any("no CUDA GPU" in p for p in no_te)
    assert fp8_support_problems(_recipe(None), te_version=None, capability=None, cuda_version=None) == []


def test_fp8_without_transformer_engine_is_refused_here():
    require_fp8_support(_recipe(None))  # bf16 needs nothing
    with pytest.raises(FP8UnavailableError, match="Transformer Engine is not installed"):
        require_fp8_support(_recipe("blockwise"))
    (msg, local_problem), = run_distributed(_engine_with_fp8_local_model, 1)
    assert "cannot run the teacher under FP8 tensorwise (per-tensor current) scaling" in msg
    assert "Transformer Engine is not installed" in msg
    assert "no Transformer Engine layers (layer_spec: local)" in local_problem


def _engine_with_fp8_local_model():
    from kd_teacher.engine.engine import TeacherEngine
    from kd_teacher.engine.model import build_gpt_model
    from kd_teacher.precision import model_fp8_problems

    cfg = _model_config("tensorwise")
    model, tconfig = build_gpt_model(cfg)
    try:
        TeacherEngine(model, VOCAB, model_config=cfg)
    except FP8UnavailableError as e:
        msg = str(e)
    else:
        msg = "no error"
    (local_problem,) = model_fp8_problems(PrecisionRecipe.from_transformer_config(tconfig), model)
    return msg, local_problem


# ---- delayed scaling: scales must come with the checkpoint --------------------------------------------------
def test_extra_state_scan_recognises_transformer_engines_delayed_scaling_state():
    from kd_teacher.engine.fp8_state import extra_state_has_delayed_scales

    # The bytes TE 2.x stores in a delayed-scaling module's `_extra_state` (a pickled dict, built in memory
    # here because TE needs CUDA); the scan reads opcodes and never unpickles.
    te_state = pickle.dumps({"recipe": "DelayedScaling()", "scale_fwd": torch.ones(3), "amax_history_fwd":
                             torch.zeros(16, 3), "scale_bwd": torch.ones(2), "amax_history_bwd": torch.zeros(16, 2),
                             "extra_fp8_variables": {"num_gemms": 1}})
    assert extra_state_has_delayed_scales(torch.frombuffer(bytearray(te_state), dtype=torch.uint8))
    stateless = pickle.dumps({"recipe": "Float8BlockScaling()", "extra_fp8_variables": {}})
    assert not extra_state_has_delayed_scales(torch.frombuffer(bytearray(stateless), dtype=torch.uint8))
    assert not extra_state_has_delayed_scales(torch.empty(0, dtype=torch.uint8))  # TE module never ran in FP8
    assert not extra_state_has_delayed_scales(None)  # Megatron's local layers
    assert not extra_state_has_delayed_scales(torch.tensor([1, 2, 3], dtype=torch.uint8))  # not a pickle


def test_delayed_scaling_checkpoint_without_scales_is_refused(tmp_path):
    (result,) = run_distributed(_checkpoint_without_scales, 1, str(tmp_path / "ckpt"))
    refused, untouched, accepted_equal, tensorwise_loaded = result
    assert "has no FP8 delayed-scaling state (scales, amax history)" in refused
    assert "engine.accept_initial_fp8_scales: true" in refused
    assert untouched and accepted_equal and tensorwise_loaded


def _checkpoint_without_scales(ckpt):
    from kd_teacher.engine.fp8_state import MissingFP8StateError
    from kd_teacher.engine.checkpoint import load_checkpoint, save_checkpoint
    from kd_teacher.engine.model import build_gpt_model

    torch.manual_seed(1)
    source, _ = build_gpt_model(_model_config("delayed"))
    save_checkpoint(source, ckpt)  # Megatron's local layers write empty `_extra_state`: no scales
    torch.manual_seed(2)
    target, tconfig = build_gpt_model(_model_config("delayed"))
    before = {k: v.clone() for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)}
    recipe = PrecisionRecipe.from_transformer_config(tconfig)
    try:
        load_checkpoint(target, ckpt, recipe=recipe)
        refused = "loaded"
    except MissingFP8StateError as e:
        refused = str(e)
    untouched = all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    load_checkpoint(target, ckpt, recipe=recipe, accept_initial_fp8_scales=True)
    accepted_equal = all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items()
                         if isinstance(v, torch.Tensor))
    torch.manual_seed(3)
    other, other_config = build_gpt_model(_model_config("tensorwise"))
    load_checkpoint(other, ckpt, recipe=PrecisionRecipe.from_transformer_config(other_config))  # stateless recipe
    tensorwise_loaded = torch.equal(other.state_dict()["embedding.word_embeddings.weight"],
                                    source.state_dict()["embedding.word_embeddings.weight"])
    return refused, untouched, accepted_equal, tensorwise_loaded


# ---- weights changing in place --------------------------------------------------------------------------------
def test_reload_weights_serves_the_new_teacher():
    (result,) = run_distributed(_reload, 1)
    changed, same_as_fresh, new_fingerprint, bad_msg, untouched = result
    assert changed and same_as_fresh and new_fingerprint
    assert "wrong shape" in bad_msg and untouched


def _reload():
    from kd_teacher.engine.engine import EngineConfig, TeacherEngine
    from kd_teacher.engine.checkpoint import CheckpointMismatchError
    from kd_teacher.engine.model import build_gpt_model

    cfg = _model_config(None, dtype="float32")
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    model, _ = build_gpt_model(cfg)
    engine = TeacherEngine(model, VOCAB, EngineConfig(k=8), model_config=cfg)
    before, fp_before = engine.score(tokens), engine.fingerprint
    torch.manual_seed(2)
    new_model, _ = build_gpt_model(cfg)
    new_state = new_model.state_dict()
    engine.reload_weights(new_state)
    after = engine.score(tokens)
    fresh = TeacherEngine(new_model, VOCAB, EngineConfig(k=8), model_config=cfg).score(tokens)
    changed = not torch.equal(before.values, after.values)
    same_as_fresh = torch.equal(after.values, fresh.values) and torch.equal(after.indices, fresh.indices)
    new_fingerprint = engine.fingerprint != fp_before and after.header.teacher_fingerprint == engine.fingerprint
    bad = dict(new_state)
    bad["embedding.word_embeddings.weight"] = torch.zeros(3, 3)
    try:
        engine.reload_weights(bad)
        msg = "accepted"
    except CheckpointMismatchError as e:
        msg = str(e)
    untouched = torch.equal(engine.score(tokens).values, after.values)
    return changed, same_as_fresh, new_fingerprint, msg, untouched


# ---- the FP8 distillation config ----------------------------------------------------------------------------
def test_fp8_distill_config_loads_with_one_fp8_recipe():
    from kd_teacher.engine.loading import load_teacher_config
    from kd_teacher.engine.model import transformer_config

    cfg = load_teacher_config(Path(__file__).resolve().parents[1] / "configs" / "fp8_distill.yaml")
    assert cfg.model.layer_spec == "transformer_engine" and cfg.model.precision.fp8 is not None
    recipe = PrecisionRecipe.from_transformer_config(transformer_config(cfg.model))
    assert recipe.fp8_recipe in FP8_RECIPES
    assert serving_policy(recipe, cfg.engine.repacking, invariance_table=cfg.engine.invariance_table).repacking == "off"


def test_recipe_command_prints_the_recipe_and_refuses_another(capsys, caplog):
    from kd_teacher.cli import main

    config = str(Path(__file__).resolve().parents[1] / "configs" / "fp8_distill.yaml")
    assert main(["recipe", config]) == 0
    printed = capsys.readouterr().out
    assert "recipe:      FP8 blockwise scaling" in printed and "engine.repacking=off" in printed
    fingerprint = next(line.split(": ", 1)[1] for line in printed.splitlines() if line.startswith("fingerprint:"))
    assert main(["recipe", config, "--against", fingerprint]) == 0
    assert main(["recipe", config, "model.precision.fp8_recipe=tensorwise", "--against", fingerprint]) == 2
    assert "fp8_recipe (blockwise vs tensorwise)" in caplog.text
