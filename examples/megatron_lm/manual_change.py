"""The two-line change of docs/megatron_lm.md ("By hand"), applied to a copy of a Megatron-LM pretrain_gpt.py.

    python examples/megatron_lm/manual_change.py $MEGATRON_LM/pretrain_gpt.py OUT.py

`run_kd_gpu.sh` trains its in-process KD run with the copy this writes, so that the manual way is verified on
the GPU beside the launcher. Each edit must match exactly once (Megatron-LM 0.18 and later: core_r0.19.0,
main); a script it does not fit is an error naming the edit, not a silently unchanged copy.
"""

from __future__ import annotations

import sys
from pathlib import Path

EDITS = [
    ("from model_provider import model_provider\n",
     "from model_provider import model_provider\nfrom kd_teacher.hooks import add_kd_args, wrap_forward_step\n"),
    ("        extra_args_provider=add_modelopt_args if has_nvidia_modelopt else None,\n",
     "        extra_args_provider=(lambda p: add_kd_args(add_modelopt_args(p))) if has_nvidia_modelopt else add_kd_args,\n"),
    ("        ModelType.encoder_or_decoder,\n        forward_step,\n",
     "        ModelType.encoder_or_decoder,\n        wrap_forward_step(forward_step, \"megatron_args\"),\n"),
]


def apply(text: str) -> str:
    for old, new in EDITS:
        count = text.count(old)
        if count != 1:
            raise ValueError(f"the edit of {old.strip()!r} matches {count} places in this pretrain_gpt.py, not 1")
        text = text.replace(old, new)
    return text


if __name__ == "__main__":
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    target.write_text(apply(source.read_text()))
    print(f"wrote {target}: {source} with KD added by hand ({len(EDITS)} edits)")
