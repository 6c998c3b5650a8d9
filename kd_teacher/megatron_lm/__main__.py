"""`python -m kd_teacher.megatron_lm SCRIPT [arguments]`: run a Megatron-LM training script, unmodified, with KD.

    torchrun --nproc-per-node 8 -m kd_teacher.megatron_lm pretrain_gpt.py <the usual arguments> \\
        --kd-config kd.yaml [--kd-override kd.alpha=0.5 ...]

The script runs as `python SCRIPT` would run it (its directory first on sys.path, `__name__ == "__main__"`,
sys.argv[0] the script), after `launcher.install()` has wrapped Megatron-LM's `pretrain` and argument parser.
Without `--kd-config` it trains exactly as the script alone. Which `megatron.core` the script gets: the
checkout's own (`megatron/core` beside `megatron/training`) when there is one, since the script's directory
comes first on sys.path; a pip-installed megatron-core only when the checkout has no `megatron/core`.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

USAGE = """usage: python -m kd_teacher.megatron_lm SCRIPT [script arguments] [--kd-config KD.yaml] [--kd-override KEY=VALUE ...]
       torchrun [torchrun options] -m kd_teacher.megatron_lm SCRIPT [...]

Runs a Megatron-LM training script (pretrain_gpt.py) unmodified, with knowledge distillation added from the
`kd:` block of KD.yaml (see docs/megatron_lm.md). Without --kd-config the script trains as it would alone."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    script = Path(argv[0])
    if not script.is_file():
        print(f"kd_teacher.megatron_lm: {script} is not a file (the first argument is the training script)\n\n{USAGE}",
              file=sys.stderr)
        return 2
    sys.argv = [str(script), *argv[1:]]
    sys.path[0] = str(script.resolve().parent)  # as `python SCRIPT` sets it, before megatron is imported
    from kd_teacher.megatron_lm.launcher import install

    installation = install()
    runpy.run_path(str(script), run_name="__main__")
    installation.check_used()
    return 0


if __name__ == "__main__":
    sys.exit(main())
