"""examples/onpolicy_kd.py at a small scale on a gloo rank: the embedded tiny teacher, a student pre-trained as
`make demo` does, then the same steps on-policy and off-policy; on held-out prompts the on-policy student's
reverse KL(student || teacher) on its own samples is lower."""

from pathlib import Path

from kd_teacher.testing.distributed import run_distributed
from kd_teacher.testing.scripts import import_script

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "onpolicy_kd.py"
SMALL = ["steps=12", "micro_batch_size=8", "prompt_tokens=16", "new_tokens=16", "heldout_prompts=32",
         "pretrain.seq_len=64", "pretrain.train_sequences=128", "pretrain.steps=30", "pretrain.micro_batch_size=16",
         "pretrain.heldout_sequences=32", "pretrain.eval_every=1000"]


def _run_small(out_dir: str) -> dict:
    ex = import_script(EXAMPLE)
    cfg = ex.parse_config(SMALL + [f"out_dir={out_dir}", f"pretrain.out_dir={out_dir}/pretrain"])
    report = ex.run(cfg)
    report["text"] = ex.format_report(report)
    return report


def test_on_policy_student_beats_off_policy_on_its_own_heldout_samples(tmp_path):
    report = run_distributed(_run_small, 1, str(tmp_path))[0]
    kl = report["heldout_reverse_kl"]
    assert report["on_policy_wins"] and kl["on-policy"] < kl["off-policy"], report["text"]
    assert (tmp_path / "report.json").is_file()
    assert "OK: the on-policy student beats the off-policy one" in report["text"]
