"""`kd-teacher import-hf PATH --out DIR`: a Hugging Face checkpoint as a kd-teacher teacher, once.

Writes `DIR/checkpoint/` (a `megatron.core.dist_checkpointing` checkpoint, loadable at any TP/PP/EP),
`DIR/tokenizer/` (the checkpoint's tokenizer files) and `DIR/teacher.yaml` (model, engine defaults, checkpoint,
tokenizer), which `kd-teacher dump / serve / consistency` and `kd.in_process.config` take as they are.
`--link` writes only the YAML, pointing at PATH itself (`hf_checkpoint:`): nothing converted, the safetensors
are read at every start.

Run it under `torchrun --nproc-per-node N -m kd_teacher.cli import-hf ... --tp N` for a teacher too large for one
process: each rank reads only its shard of each tensor, and the checkpoint is written by all ranks together.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import yaml

from kd_teacher.config import apply_overrides
from kd_teacher.tokenizer_identity import find_tokenizer

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json")


def register(sub) -> None:
    p = sub.add_parser("import-hf", help="a Hugging Face checkpoint as a teacher: Megatron-Core checkpoint + "
                                         "teacher YAML")
    p.add_argument("path", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="directory to write checkpoint/, tokenizer/ and teacher.yaml into")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this run (and of the YAML)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE)")
    p.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (MoE; default: TP)")
    p.add_argument("--link", action="store_true",
                   help="write only teacher.yaml, loading PATH's safetensors at every start (no conversion)")
    p.add_argument("overrides", nargs="*",
                   help="ModelConfig fields as key=value right after PATH, e.g. layer_spec=transformer_engine "
                        "precision.params_dtype=bfloat16")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import torch.distributed as dist

    from kd_teacher.engine.checkpoint import save_checkpoint
    from kd_teacher.engine.engine import EngineConfig
    from kd_teacher.engine.model import init_model_parallel
    from kd_teacher.hf.config import FAMILIES, family_of, model_config_from_hf, read_hf_config
    from kd_teacher.hf.load import build_hf_model
    from kd_teacher.hf.safetensors_files import SafetensorsFiles
    from kd_teacher.hf.weights import check_checkpoint
    from kd_teacher.runtime import is_main_rank

    source, out = Path(args.path).resolve(), Path(args.out).resolve()
    hf = read_hf_config(source)
    family = family_of(hf)
    layout = dict(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    if FAMILIES[family].moe is not None:
        layout.update(expert_model_parallel_size=args.ep, expert_tensor_parallel_size=args.etp)
    elif args.ep != 1 or args.etp:
        raise ValueError(f"--ep/--etp: {source} is a dense model ({family}), it has no experts")
    cfg = model_config_from_hf(hf, {**layout, **apply_overrides({}, args.overrides)})
    checkpoint_dir = out / "checkpoint"
    if not args.link and checkpoint_dir.exists() and any(checkpoint_dir.iterdir()):
        raise ValueError(f"{checkpoint_dir} exists and is not empty: choose another --out or remove it")
    yaml_data = {"model": asdict(cfg), "engine": asdict(EngineConfig())}
    if args.link:
        check_checkpoint(SafetensorsFiles(source), cfg, family)  # names and shapes, without loading
        yaml_data.update(hf_checkpoint=str(source), tokenizer=find_tokenizer(source) and str(source))
    else:
        init_model_parallel(cfg)
        model, _ = build_hf_model(source, cfg)
        save_checkpoint(model, checkpoint_dir)
        tokenizer = _copy_tokenizer(source, out / "tokenizer") if is_main_rank() else None
        yaml_data.update(checkpoint=str(checkpoint_dir), tokenizer=tokenizer)
        if dist.is_initialized():
            dist.barrier()
    if is_main_rank():
        _write_yaml(out / "teacher.yaml", yaml_data, source)
        log.info("teacher config %s: %s, %d layers%s, tokenizer %s", out / "teacher.yaml", hf["model_type"],
                 cfg.num_layers, f", {cfg.moe.num_experts} experts" if cfg.moe else "",
                 find_tokenizer(yaml_data["tokenizer"]) if yaml_data["tokenizer"] else "none found")
    return 0


def _copy_tokenizer(source: Path, dest: Path):
    """The tokenizer files of `source` copied to `dest`; its path, or None when `source` holds no tokenizer."""
    if find_tokenizer(source) is None:
        log.warning("%s holds no tokenizer (tokenizer.json, tokenizer.model, vocab.json + merges.txt): payloads "
                    "will name none, and students cannot be checked against it", source)
        return None
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    return str(dest)


def _write_yaml(path: Path, data: dict, source: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(f"# Written by `kd-teacher import-hf {source}`: a kd-teacher teacher config "
                "(kd_teacher.engine.loading.TeacherConfig).\n")
        yaml.safe_dump(data, f, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
