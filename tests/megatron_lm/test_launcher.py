"""`python -m kd_teacher.megatron_lm SCRIPT ...` against Megatron-LM's three `pretrain` signatures, and the
KD block read from Megatron-LM's parsed arguments at the first micro-batch.

Megatron-LM's training code needs CUDA and is not on PyPI, so the launcher runs here on a small Megatron-LM
layout written by the test: `megatron/training/{training,arguments}.py` with functions of the real signatures
(core_r0.17: `pretrain(..., forward_step_func, ..., extra_args_provider=None, ...)`; 0.18 and 0.19/main:
`parse_and_validate_args(extra_args_provider=...)` then `pretrain(cfg_container, ...)`) that parse the real
command line with argparse and record what they receive, and a `pretrain_gpt.py` that calls them the way
Megatron-LM's does, passing its own extra_args_provider (as ModelOpt's). The KD side is real: the wrapped
forward_step builds the hook from the parsed `--kd-config` on a real model (test below, on gloo ranks)."""

import json
import multiprocessing
import os
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from kd_teacher.testing.distributed import run_distributed
from tests.hooks.test_forward_step import K, MBS, SEQ, VOCAB, forward_step, micro_batches, student_config

ROOT = Path(__file__).resolve().parents[2]
KD_EXAMPLE = ROOT / "configs" / "kd_example.yaml"

# What each release's pretrain looks like (parameter lists as in megatron/training/training.py).
SIGNATURES = {
    "core_r0.17": "train_valid_test_dataset_provider, model_provider, model_type, forward_step_func, "
                  "process_non_loss_data_func=None, extra_args_provider=None, args_defaults={}, "
                  "get_embedding_ranks=None, get_position_embedding_ranks=None, non_loss_data_func=None, "
                  "store=None, inprocess_call_wrapper=None",
    "core_r0.18": "cfg_container, train_valid_test_dataset_provider, model_provider, model_type, forward_step_func, "
                  "process_non_loss_data_func=None, get_embedding_ranks=None, get_position_embedding_ranks=None, "
                  "non_loss_data_func=None, store=None, inprocess_call_wrapper=None",
    "core_r0.19": "cfg_container, train_valid_test_dataset_provider, model_type, forward_step_func, "
                  "model_provider=None, process_non_loss_data_func=None, get_embedding_ranks=None, "
                  "get_position_embedding_ranks=None, non_loss_data_func=None, store=None, "
                  "inprocess_call_wrapper=None, p2p_communicator=None, pg_collection=None, "
                  "skip_model_parallel_init=False",
}
# How each release's pretrain_gpt.py calls them.
CALLS = {
    "core_r0.17": "pretrain(train_valid_test_datasets_provider, model_provider, 'encoder_or_decoder', forward_step,\n"
                  "         args_defaults={'tokenizer_type': 'GPT2BPETokenizer'}, extra_args_provider=add_modelopt_args,\n"
                  "         store=None)",
    "core_r0.18": "args = parse_and_validate_args(extra_args_provider=add_modelopt_args,\n"
                  "                              args_defaults={'tokenizer_type': 'GPT2BPETokenizer'})\n"
                  "pretrain({'args': vars(args)}, train_valid_test_datasets_provider, model_provider,\n"
                  "         'encoder_or_decoder', forward_step, store=None)",
    "core_r0.19": "args = parse_and_validate_args(extra_args_provider=add_modelopt_args,\n"
                  "                              args_defaults={'tokenizer_type': 'GPT2BPETokenizer'})\n"
                  "pretrain({'args': vars(args)}, train_valid_test_datasets_provider, 'encoder_or_decoder',\n"
                  "         forward_step, store=None, get_embedding_ranks=None)",
}

ARGUMENTS_PY = '''
import argparse
_ARGS = None

def _parse(extra_args_provider):
    global _ARGS
    parser = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    parser.add_argument("--seq-length", type=int)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    _ARGS = parser.parse_args()
    _ARGS.options = sorted(parser._option_string_actions)
    return _ARGS
'''
NEW_PARSER = '''
def parse_and_validate_args(extra_args_provider=None, ignore_unknown_args=False, args_defaults={}):
    return _parse(extra_args_provider)
'''
TRAINING_PY = '''
import json, os
from megatron.training import arguments

def pretrain({signature}):
    args = {args}
    record = dict(forward_step=type(forward_step_func).__name__, name=forward_step_func.__name__,
                  wraps=getattr(forward_step_func, "forward_step", forward_step_func).__name__,
                  kd_config=args.kd_config, kd_override=args.kd_override, seq_length=args.seq_length,
                  export=args.export_x, options=args.options)
    with open(os.environ["RECORD"], "w") as f:
        json.dump(record, f)
'''
SCRIPT = '''
from megatron.training import pretrain
from megatron.training.arguments import {parse_import}


def add_modelopt_args(parser):  # the script's own provider: it must still run
    parser.add_argument("--export-x", default=None)
    return parser


def forward_step(data_iterator, model):
    raise AssertionError("not called here")


def train_valid_test_datasets_provider(sizes):
    return None, None, None


def model_provider(pre_process=True, post_process=True):
    return None


if __name__ == "__main__":
{call}
'''


def _megatron_lm(tmp: Path, release: str) -> Path:
    """A Megatron-LM layout of `release`: megatron/training/{__init__,training,arguments}.py, pretrain_gpt.py.
    (`megatron` has no __init__.py, as in Megatron-LM: megatron.core still comes from megatron-core.)"""
    tree = tmp / release
    training = tree / "megatron" / "training"
    training.mkdir(parents=True)
    old = release == "core_r0.17"
    (training / "__init__.py").write_text("from megatron.training.training import pretrain\n")
    (training / "arguments.py").write_text(ARGUMENTS_PY + ("" if old else NEW_PARSER))
    args = "arguments._parse(extra_args_provider)" if old else "arguments._ARGS"
    (training / "training.py").write_text(TRAINING_PY.format(signature=SIGNATURES[release], args=args))
    (tree / "pretrain_gpt.py").write_text(SCRIPT.format(
        parse_import="_parse" if old else "parse_and_validate_args", call=textwrap.indent(CALLS[release], "    ")))
    return tree


@pytest.fixture(scope="module", autouse=True)
def _megatron_core_imported():
    """megatron-core imported once here, so that the forked launches below do not each import it."""
    import megatron.core.package_info  # noqa: F401


def _launch_in_child(tree: Path, argv: list, record: Path) -> None:
    os.chdir(tree)
    os.environ["RECORD"] = str(record)
    from kd_teacher.megatron_lm.__main__ import main

    sys.exit(main(argv))


def _launch(tree: Path, *args: str, record: Path) -> int:
    """`python -m kd_teacher.megatron_lm TREE/pretrain_gpt.py ARGS` in a forked child (no second torch import);
    its exit code."""
    child = multiprocessing.get_context("fork").Process(
        target=_launch_in_child, args=(tree, [str(tree / "pretrain_gpt.py"), *args], record))
    child.start()
    child.join(120)
    return child.exitcode


@pytest.mark.parametrize("release", list(SIGNATURES))
def test_launcher_wraps_forward_step_and_extends_the_parser_for_each_pretrain_signature(tmp_path, release):
    tree = _megatron_lm(tmp_path, release)
    record = tmp_path / "record.json"
    assert _launch(tree, "--seq-length", "64", "--kd-config", str(KD_EXAMPLE), "--kd-override", "kd.alpha=0.5",
                   "--export-x", "yes", record=record) == 0
    got = json.loads(record.read_text())
    assert got["forward_step"] == "MegatronArgsForwardStep" and got["wraps"] == got["name"] == "forward_step"
    assert (got["kd_config"], got["kd_override"]) == (str(KD_EXAMPLE), ["kd.alpha=0.5"])
    assert got["seq_length"] == 64 and got["export"] == "yes"  # the script's own provider ran too
    assert {"--kd-config", "--kd-override", "--export-x"} <= set(got["options"])


def test_without_kd_config_the_script_trains_as_alone_and_bad_usage_is_named(tmp_path, capsys):
    tree = _megatron_lm(tmp_path, "core_r0.19")
    record = tmp_path / "record.json"
    assert _launch(tree, "--seq-length", "8", record=record) == 0
    assert json.loads(record.read_text())["kd_config"] is None
    from kd_teacher.megatron_lm.__main__ import main

    assert main([str(tmp_path / "nope.py")]) == 2
    assert "nope.py is not a file" in capsys.readouterr().err


def test_a_pretrain_that_cannot_be_wrapped_is_refused_with_the_version_and_the_manual_way(tmp_path):
    from types import ModuleType

    from kd_teacher.megatron_lm.launcher import LauncherError, install

    training, arguments = ModuleType("megatron.training.training"), ModuleType("megatron.training.arguments")
    exec("def pretrain(config, forward_step, store=None):\n    pass", training.__dict__)
    with pytest.raises(LauncherError) as e:
        install(training, arguments)
    message = str(e.value)
    assert "megatron-core" in message and "no forward_step_func" in message
    assert "pretrain(config, forward_step, store=None)" in message
    assert "add_kd_args" in message and 'wrap_forward_step(forward_step, "megatron_args")' in message
    exec("def pretrain(cfg_container, provider, model_type, forward_step_func):\n    pass", training.__dict__)
    with pytest.raises(LauncherError, match="--kd-config cannot be added"):
        install(training, arguments)  # no parse_and_validate_args, no extra_args_provider


# ---- the KD block from Megatron-LM's parsed arguments, at the first micro-batch --------------------------------
def _from_parsed_arguments(argv):
    import argparse

    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    from kd_teacher.engine.model import build_gpt_model
    from kd_teacher.hooks.forward_step import MegatronArgsForwardStep
    from kd_teacher.megatron_lm.launcher import with_kd_args

    parser = with_kd_args(None)(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args(argv)
    megatron = SimpleNamespace(get_args=lambda: args, get_tokenizer=lambda: NullTokenizer(VOCAB - 1))
    model, _ = build_gpt_model(student_config(tp=2))
    step = MegatronArgsForwardStep(forward_step, {}, megatron=megatron)
    assert step.inner is None  # nothing read before the first micro-batch
    try:
        reports = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(micro_batches(2, seed=5)), model=[model], num_microbatches=2,
            seq_length=SEQ, micro_batch_size=MBS, forward_only=True)
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return {"error": f"{type(e).__name__}: {e}"}
    inner = step.inner
    out = {"reports": [sorted(r) for r in reports], "inner": type(inner).__name__}
    if inner is not forward_step:
        out.update(tokens_from=inner.cfg.tokens_from, alpha=inner.cfg.alpha, vocab=inner.vocab_size, k=inner.cfg.k)
    step.close()
    return out


def test_kd_block_is_read_from_megatron_arguments_at_the_first_micro_batch():
    # The example's in-process teacher, in the student's TP layout.
    kd = ["--kd-config", str(KD_EXAMPLE), "--kd-override", "kd.in_process.overrides=[model.tensor_model_parallel_size=2]"]
    on = run_distributed(_from_parsed_arguments, 2, [*kd, "kd.alpha=0.5"], tp=2)[0]
    assert on["inner"] == "KDForwardStep" and on["alpha"] == 0.5 and on["k"] == K
    assert on["tokens_from"] == "tp_src_rank"  # set for TP > 1: Megatron-LM reads data on TP rank 0 only
    assert on["vocab"] == VOCAB  # the tokenizer's (megatron-core 0.16's NullTokenizer(V - 1) has V ids)
    assert all({"kd loss", "kd teacher coverage", "lm loss"} <= set(r) for r in on["reports"])
    off = run_distributed(_from_parsed_arguments, 2, [], tp=2)[0]
    assert off["inner"] == "function" and off["reports"] == [["lm loss"]] * 2  # the script's own forward_step
    bad = run_distributed(_from_parsed_arguments, 2, [*kd, "kd.vocab_size=999"], tp=2)[0]
    assert "999" in bad["error"] and "1000" in bad["error"]  # both sides named, before any weight update
    # On-policy needs its own data iterator, which Megatron-LM's pretrain() does not build: refused, not ignored.
    on_policy = run_distributed(_from_parsed_arguments, 2, [*kd, "kd.on_policy.max_new_tokens=4"], tp=2)[0]
    assert "kd.on_policy" in on_policy["error"] and "OnPolicyIterator" in on_policy["error"]
