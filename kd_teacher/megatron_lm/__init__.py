"""Megatron-LM as users run it: its own training scripts, unmodified, with KD added.

- `python -m kd_teacher.megatron_lm pretrain_gpt.py <arguments> --kd-config kd.yaml` (or under torchrun):
  `launcher.py` wraps what the Megatron-LM release exposes and runs the script (`__main__.py`);
- `kd-teacher dump ... --megatron-args <arguments>`: the student's own datasets (`datasets.py`).

docs/megatron_lm.md is the guide, with the two-line manual change for those who prefer to edit the script.
"""
