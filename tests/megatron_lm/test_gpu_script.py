"""The CPU-checkable parts of examples/megatron_lm/run_kd_gpu.sh: report.py reads Megatron-LM's own log lines
(written here with the format strings of megatron/training/training.py) into step times, ratios and KD lines;
manual_change.py makes the documented two-line change or names the edit that does not fit; prepare.py's KD
blocks and dump config load with the project's own loaders."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "examples" / "megatron_lm"


def _script(name):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _training_log(iteration, of, ms, tflops, losses):
    """One line as training_log (core_r0.19.0) prints it."""
    line = " [2026-12-04 10:00:00.000000]"
    line += " iteration {:8d}/{:8d} |".format(iteration, of)
    line += " consumed samples: {:12d} |".format(iteration * 128)
    line += " elapsed time per iteration (ms): {:.1f} |".format(ms)
    line += f" throughput per GPU (TFLOP/s/GPU): {tflops:.1f} |"
    line += f" learning rate: {3e-4:.6E} |"
    line += f" global batch size: {128:5d} |"
    for key, value in losses.items():
        line += " {}: {:.6E} |".format(key, value)
    line += f" loss scale: {1.0:.1f} |"
    line += f" grad norm: {1.234:.3f} |"
    line += " number of skipped iterations: {:3d} |".format(0)
    line += " number of nan iterations: {:3d} |".format(0)
    return line


def _validation(at, losses):
    string = f" validation loss at {at} | "
    for key, value in losses.items():
        string += "{} value: {:.6E} | ".format(key, value)
        string += "{} PPL: {:.6E} | ".format(key, 2.0)
    return "-" * 20 + "\n" + string + "\n" + "-" * 20


def _log(times, kd=True):
    lines = ["> PyTorch version ................ 2.11.0+cu130", "> Megatron-Core version .......... 0.19.1",
             "> Transformer Engine version ... 2.20.2",
             " > number of parameters on (tensor, pipeline) model parallel rank (0, 0): 372244480"]
    for i, ms in enumerate(times, 1):
        losses = {"lm loss": 5.0 - i / 10}
        if kd:
            losses.update({"kd loss": 2.0 - i / 10, "kd total loss": 3.0, "kd top1 agreement": 0.4,
                           "kd teacher coverage": 1.0})
        lines.append(_training_log(10 * i, 40, ms, 300.0, losses))
        if i == 2:
            lines.append(_validation("iteration 20", losses))
    return "\n".join(lines) + "\n"


def test_report_reads_megatron_lm_logs_into_step_times_ratios_and_kd_lines(tmp_path):
    report = _script("report")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "ce.log").write_text(_log([900.0, 200.0, 202.0, 198.0], kd=False))
    (tmp_path / "logs" / "kd_offline.log").write_text(_log([950.0, 206.0, 208.0, 204.0]))
    (tmp_path / "logs" / "kd_in_process.log").write_text(_log([990.0, 220.0, 222.0, 218.0]))
    (tmp_path / "replay.json").write_text(json.dumps({"exit_code": 17, "missing_samples_error": False}))
    result = report.summarize(tmp_path)
    ce = result["runs"]["ce"]
    assert ce["step_ms"] == 200.0 and ce["tflops"] == 300.0  # the first interval (start-up) left out
    assert ce["versions"] == {"torch": "2.11.0+cu130", "megatron_core": "0.19.1", "transformer_engine": "2.20.2"}
    assert ce["parameters"] == 372244480
    assert result["ratio_kd_offline_vs_ce"] == pytest.approx(1.03)
    assert result["ratio_kd_in_process_vs_ce"] == pytest.approx(1.10)
    offline = result["runs"]["kd_offline"]
    assert offline["iterations"][-1]["kd loss"] == pytest.approx(1.6)
    assert offline["iterations"][-1]["number of nan iterations"] == 0
    assert offline["validations"] == [{"at": "iteration 20", "lm loss": 4.8, "kd loss": 1.8, "kd total loss": 3.0,
                                       "kd top1 agreement": 0.4, "kd teacher coverage": 1.0}]
    assert result["kd_loss_offline_vs_in_process_max_rel_diff"] == 0.0
    assert all(result["passed"].values())
    text = report.table(result)
    assert "ratio_kd_offline_vs_ce: 1.030 (target <= 1.05)" in text and "kd_offline" in text
    row = report.markdown_row(result)
    assert "| 1.030 |" in row and "exit 17" in row and "0.37B" in row


def test_report_marks_a_run_that_missed_samples_or_crashed(tmp_path):
    report = _script("report")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "ce.log").write_text(_log([900.0, 200.0], kd=False))
    (tmp_path / "logs" / "kd_offline.log").write_text(
        _log([950.0]) + "Traceback (most recent call last):\nkd_teacher.offline.format.MissingSamplesError: 1 of 32\n")
    result = report.summarize(tmp_path)
    assert result["passed"] == {"all_runs_finished": False, "offline_covered_every_sample": False,
                                "ratio_within_target": False, "replay_ends_as_megatron_lm_intends": False}


PRETRAIN_GPT_MAIN = '''from model_provider import model_provider

if __name__ == "__main__":
    args = parse_and_validate_args(
        extra_args_provider=add_modelopt_args if has_nvidia_modelopt else None,
        args_defaults={'tokenizer_type': 'GPT2BPETokenizer'},
    )
    pretrain(
        full_config,
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        store=store,
    )
'''


def test_manual_change_is_the_documented_two_lines_or_names_the_edit_that_does_not_fit():
    manual = _script("manual_change")
    changed = manual.apply(PRETRAIN_GPT_MAIN)
    compile(changed, "pretrain_gpt.py", "exec")
    assert "from kd_teacher.hooks import add_kd_args, wrap_forward_step" in changed
    assert 'wrap_forward_step(forward_step, "megatron_args"),' in changed
    assert "add_kd_args(add_modelopt_args(p))) if has_nvidia_modelopt else add_kd_args," in changed
    guide = (ROOT / "docs" / "megatron_lm.md").read_text()
    for _, new in manual.EDITS:  # the guide shows exactly these lines
        assert new.strip().splitlines()[-1].strip() in guide
    with pytest.raises(ValueError, match="forward_step.*matches 0 places"):
        manual.apply(PRETRAIN_GPT_MAIN.replace("        forward_step,\n", "        forward_step_func=forward_step,\n"))


def test_prepared_kd_blocks_and_dump_config_load(tmp_path):
    from kd_teacher.hooks.config import load_kd_config
    from kd_teacher.offline.writer import load_dump_config

    prepare = _script("prepare")
    teacher = tmp_path / "teacher" / "teacher.yaml"
    teacher.parent.mkdir()
    teacher.write_text((ROOT / "configs" / "kd_teacher_tiny.yaml").read_text())
    prepare.write_configs(tmp_path, teacher, k=64, alpha=0.5)
    offline = load_kd_config(tmp_path / "kd_offline.yaml")
    assert (offline.source, offline.k, offline.offline.missing) == ("offline", 64, "error")
    assert load_kd_config(tmp_path / "kd_in_process.yaml").in_process.config == str(teacher)
    dump = load_dump_config(tmp_path / "dump.yaml")
    assert dump.data.kind == "megatron_lm" and dump.data.splits == ["train", "valid"]
