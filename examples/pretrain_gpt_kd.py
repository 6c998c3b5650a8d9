"""A small but complete Megatron-Core pretraining script, with knowledge distillation as one YAML block.

    python examples/pretrain_gpt_kd.py configs/kd_example.yaml                        # 1 process, CPU or GPU
    torchrun --nproc-per-node 2 examples/pretrain_gpt_kd.py configs/kd_example.yaml \
        model.tensor_model_parallel_size=2 kd.in_process.overrides='[model.tensor_model_parallel_size=2]'
    python examples/pretrain_gpt_kd.py configs/kd_example.yaml kd=null               # the CE-only baseline

Everything here is plain Megatron-Core: `GPTModel`, `DistributedDataParallel`, `get_megatron_optimizer`, the
pipeline schedule from `get_forward_backward_func()`, and a `GPTDataset` over an indexed (.bin/.idx) dataset
built by `BlendedMegatronDatasetBuilder`. The forward_step calls the model with `labels=`, as Megatron-LM's
pretrain_gpt.py does. KD is the `kd:` block of the config and the line marked `# KD` below; with `kd: null`
the script is the unchanged CE baseline.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from kd_teacher.config import load_config
from kd_teacher.engine.model import ModelConfig, build_gpt_model
from kd_teacher.hooks import KDConfig, wrap_forward_step
from kd_teacher.runtime import init_distributed

log = logging.getLogger("pretrain_gpt_kd")


@dataclass
class DataConfig:
    prefix: str  # indexed dataset path prefix (PREFIX.bin / PREFIX.idx)
    # > 0: write a synthetic corpus of this many documents at `prefix` if it does not exist yet.
    synthetic_documents: int = 0
    split: str = "90,10,0"
    seed: int = 1234
    eod_mask_loss: bool = False


@dataclass
class TrainConfig:
    steps: int = 20
    micro_batch_size: int = 4
    num_microbatches: int = 2
    seq_length: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    eval_microbatches: int = 4
    log_interval: int = 5
    seed: int = 1234


@dataclass
class ExampleConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    kd: Optional[KDConfig] = None  # the KD block; null: plain CE pretraining


# ---- data: Megatron-Core's GPTDataset over an indexed dataset ---------------------------------------------------
def write_synthetic_corpus(prefix: str, documents: int, vocab_size: int, seed: int) -> None:
    """Zipf-distributed token documents of random length, written with Megatron-Core's IndexedDatasetBuilder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    eod = vocab_size - 1
    weights = 1.0 / np.arange(1, eod + 1) ** 1.1
    weights /= weights.sum()
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin.tmp", dtype=np.int32)
    for _ in range(documents):
        doc = rng.choice(eod, size=int(rng.integers(16, 200)), p=weights)
        builder.add_document(torch.from_numpy(np.append(doc, eod).astype(np.int32)), [len(doc) + 1])
    builder.finalize(prefix + ".idx.tmp")
    os.replace(prefix + ".bin.tmp", prefix + ".bin")  # .bin first: a reader checks for the .idx
    os.replace(prefix + ".idx.tmp", prefix + ".idx")


def build_datasets(cfg: ExampleConfig, num_samples: list[int]):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    d = cfg.data
    if d.synthetic_documents:
        # Only rank 0 looks at the disk; every rank takes the barrier. Deciding per rank raced: a rank that
        # looked after rank 0 had written the corpus skipped the barrier, and from then on its collectives
        # paired with the wrong ones of rank 0 (seen as a hang at Megatron's dataset-builder barrier).
        if dist.get_rank() == 0 and not Path(d.prefix + ".idx").exists():
            write_synthetic_corpus(d.prefix, d.synthetic_documents, cfg.model.vocab_size, d.seed)
        dist.barrier()
    config = GPTDatasetConfig(
        random_seed=d.seed,
        sequence_length=cfg.train.seq_length,
        blend=([d.prefix], None),
        split=d.split,
        tokenizer=NullTokenizer(cfg.model.vocab_size - 1),  # ids 0..V-2, eod = V-1
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=d.eod_mask_loss,
        create_attention_mask=False,
        path_to_cache=str(Path(d.prefix).parent / "cache"),
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, num_samples, lambda: True, config).build()


def micro_batches(dataset, micro_batch_size: int, start: int, stride: int):
    """This data-parallel rank's micro-batches: dicts of [b, s] tensors, as a Megatron data iterator yields."""
    index = start
    while True:
        samples = [dataset[(index + i) % len(dataset)] for i in range(micro_batch_size)]
        index += stride
        yield {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
               for key in ("tokens", "labels", "loss_mask", "position_ids")}


# ---- the user's forward step (Megatron-LM style: the model computes CE from `labels`) -----------------------------
def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float()
    loss_mask = loss_mask.reshape(-1).float()
    loss = torch.sum(losses.reshape(-1) * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.clone().detach(), num_tokens.float()])}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


# ---- model and optimizer -------------------------------------------------------------------------------------------
def build_model_and_optimizer(cfg: ExampleConfig):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    torch.manual_seed(cfg.model.seed)
    model, tconfig = build_gpt_model(cfg.model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.train.use_distributed_optimizer,
    )
    model = DistributedDataParallel(tconfig, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, clip_grad=cfg.train.clip_grad,
            use_distributed_optimizer=cfg.train.use_distributed_optimizer,
            bf16=tconfig.bf16, fp16=tconfig.fp16, params_dtype=tconfig.params_dtype,
        ),
        [model],
    )
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.no_sync_func = model.no_sync
    tconfig.grad_scale_func = optimizer.scale_loss
    return model, optimizer


def _reduce_report(reports: list[dict]) -> dict:
    """Per-token means of the `[sum, count]` report entries over micro-batches and data-parallel ranks."""
    from megatron.core import parallel_state

    out = {}
    for key in reports[0] if reports else []:
        total = torch.stack([r[key].float().reshape(2) for r in reports]).sum(0)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        out[key] = (total[0] / total[1].clamp(min=1)).item()
    return out


# ---- the training loop ---------------------------------------------------------------------------------------------
def train(cfg: ExampleConfig) -> tuple[dict, torch.nn.Module]:
    """Train for `cfg.train.steps`; returns (history, model). Needs torch.distributed + parallel_state set up."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    t = cfg.train
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_step = t.micro_batch_size * t.num_microbatches * dp
    train_ds, valid_ds, _ = build_datasets(cfg, [t.steps * per_step, t.eval_microbatches * t.micro_batch_size * dp,
                                                 0])
    model, optimizer = build_model_and_optimizer(cfg)
    step_fn = wrap_forward_step(forward_step, cfg.kd, model=model)  # KD: the one line (kd: null -> unchanged)
    # An in-process teacher that spans pipeline stages computes the step's payloads before the schedule runs.
    prepare = getattr(step_fn, "prefetch", None) if parallel_state.get_pipeline_model_parallel_world_size() > 1 \
        else None
    train_iter = micro_batches(train_ds, t.micro_batch_size, dp_rank * t.micro_batch_size, t.micro_batch_size * dp)
    forward_backward = get_forward_backward_func()
    history: dict = {"train": [], "valid": None}
    torch.manual_seed(t.seed)
    for step in range(t.steps):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        data = prepare(train_iter, t.num_microbatches) if prepare else train_iter
        reports = forward_backward(
            forward_step_func=step_fn, data_iterator=data, model=[model], num_microbatches=t.num_microbatches,
            seq_length=t.seq_length, micro_batch_size=t.micro_batch_size, forward_only=False,
        )
        _, grad_norm, _ = optimizer.step()
        metrics = _reduce_report(reports) if parallel_state.is_pipeline_last_stage() else {}
        history["train"].append(metrics)
        if parallel_state.is_pipeline_last_stage() and (step % t.log_interval == 0 or step == t.steps - 1):
            log.info("step %d %s grad_norm %.4g", step, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
                     grad_norm or 0.0)
    history["valid"] = evaluate(cfg, model, step_fn, valid_ds, prepare)
    return history, model


def evaluate(cfg: ExampleConfig, model, step_fn, valid_ds, prepare=None) -> dict:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    t = cfg.train
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    it = micro_batches(valid_ds, t.micro_batch_size, dp_rank * t.micro_batch_size, t.micro_batch_size * dp)
    model.eval()
    with torch.no_grad():
        data = prepare(it, t.eval_microbatches) if prepare else it
        reports = get_forward_backward_func()(
            forward_step_func=step_fn, data_iterator=data, model=[model], num_microbatches=t.eval_microbatches,
            seq_length=t.seq_length, micro_batch_size=t.micro_batch_size, forward_only=True,
        )
    model.train()
    return _reduce_report(reports) if parallel_state.is_pipeline_last_stage() else {}


def load_example_config(path: str, overrides: Optional[list[str]] = None) -> ExampleConfig:
    cfg = load_config(ExampleConfig, path, overrides)
    if cfg.kd is not None:
        cfg.kd.check()
    return cfg


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_example_config(args.config, args.overrides)
    init_distributed(cfg.model.tensor_model_parallel_size, cfg.model.pipeline_model_parallel_size, cfg.train.seed)
    history, _ = train(cfg)
    from megatron.core import parallel_state

    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0 \
            and parallel_state.get_data_parallel_rank() == 0:
        print("validation:", " ".join(f"{k}={v:.4f}" for k, v in history["valid"].items()))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
