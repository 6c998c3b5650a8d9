"""`kd-teacher dump CONFIG [key=value ...] [--megatron-args ARGS...]`, `kd-teacher verify DIR`, `kd-teacher inspect DIR`.

`dump` runs as one process or under torchrun (`torchrun --nproc-per-node 8 -m kd_teacher.cli dump ...`):
the world is split into the teacher's TP x PP and data-parallel ranks, each DP rank writing its own shards.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("dump", help="run the teacher over a dataset and write an offline safetensors dump")
    p.add_argument("config", help="dump YAML (teacher: or teacher_config:, data:, output:)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. output.dir=/dumps/x")
    p.add_argument("--megatron-args", nargs=argparse.REMAINDER, default=None, metavar="ARGS",
                   help="last: the student's Megatron-LM arguments (data ones are read): dump its datasets "
                        "(data.kind: megatron_lm)")
    p.set_defaults(func=_dump)

    p = sub.add_parser("verify", help="check a dump's checksums and manifest; optionally re-score samples")
    p.add_argument("dir")
    p.add_argument("--rescore", type=int, default=0, metavar="N", help="re-score N random samples bitwise")
    p.add_argument("--config", help="dump YAML for re-scoring (default: the config recorded in the manifest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="overrides for --config")
    p.set_defaults(func=_verify)

    p = sub.add_parser("inspect", help="sizes, bytes/token, k, vocab, fingerprints and coverage of a dump")
    p.add_argument("dir")
    p.set_defaults(func=_inspect)


def _dump(args) -> int:
    from kd_teacher.offline.writer import load_dump_config, run_dump
    from kd_teacher.engine.model import init_model_parallel
    from kd_teacher.runtime import is_main_rank

    cfg = load_dump_config(args.config, args.overrides)
    if args.megatron_args is not None:
        cfg.data.kind, cfg.data.megatron_args = "megatron_lm", list(args.megatron_args)
    m = cfg.teacher.model
    init_model_parallel(m)
    manifest = run_dump(cfg)
    if is_main_rank():
        print(json.dumps(dict(dir=cfg.output.dir, shards=manifest.num_shards, samples=manifest.num_samples,
                              tokens=manifest.total_tokens, bytes=manifest.total_bytes,
                              bytes_per_token=round(manifest.total_bytes / max(1, manifest.total_tokens), 2))))
    return 0


def _verify(args) -> int:
    from kd_teacher.offline import format as fmt
    from kd_teacher.offline.verify import rescore_config, verify

    config = None
    if args.rescore:
        from kd_teacher.engine.model import init_model_parallel

        config = rescore_config(fmt.load_manifest(args.dir), args.config, args.overrides)
        m = config.teacher.model
        init_model_parallel(m)
    report = verify(args.dir, rescore=args.rescore, config=config, seed=args.seed)
    print(report.to_json())
    for problem in report.problems:
        log.error("%s", problem)
    return 0 if report.ok else 1


def _inspect(args) -> int:
    from kd_teacher.offline.verify import inspect

    json.dump(inspect(args.dir), sys.stdout, indent=2)
    print()
    return 0
