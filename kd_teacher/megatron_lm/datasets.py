"""The GPTDatasets a Megatron-LM student trains on, built from its own command-line arguments (`kd-teacher dump`).

Megatron-LM's training code is not installable, but what decides a run's samples is a handful of its
arguments. This module reads them with Megatron-LM's names and defaults (core_r0.19.0 and main: megatron-core
0.19 / 0.20), turns them into the `GPTDatasetConfig` and the per-split sample counts that `pretrain_gpt.py`
(`core_gpt_dataset_config_from_args`) and `megatron.training.training.get_train_valid_test_num_samples` give,
and builds the datasets with megatron-core's own `BlendedMegatronDatasetBuilder`. Every other argument of the
student's command line is ignored, so the whole command line can be passed as it is.

Sample i of a split is what the student's data loader reads as that split's sample i, so with the same
megatron-core the dump holds exactly the rows of the student's micro-batches (found by content, in any order
or layout). Runs whose samples are not a fixed list are refused: `--mock-data`, `--sft`, `--fim-data`,
`--phase-transition-iterations`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from kd_teacher.config import ConfigError

SPLITS = ("train", "valid", "test")
_UNSUPPORTED = {
    "mock_data": "--mock-data draws random tokens: there is nothing to dump",
    "sft": "--sft builds packed SFT samples (megatron.training.datasets.sft_dataset), not GPTDataset samples",
    "fim_data": "--fim-data rearranges samples at random when they are read (GPTFIMDataset)",
    "phase_transition_iterations": "--phase-transition-iterations sizes the train split per phase",
}


def data_arg_parser() -> argparse.ArgumentParser:
    """Megatron-LM's data, batch and tokenizer arguments (names, types and defaults of core_r0.19.0)."""
    p = argparse.ArgumentParser(prog="Megatron-LM data arguments", allow_abbrev=False, add_help=False)
    for name in ("--data-path", "--train-data-path", "--valid-data-path", "--test-data-path"):
        p.add_argument(name, nargs="*", default=None)
    for name in ("--split", "--data-args-path", "--per-split-data-args-path", "--data-cache-path",
                 "--object-storage-cache-path", "--per-dataset-sequences-path", "--phase-transition-iterations",
                 "--tokenizer-type", "--tokenizer-model", "--rampup-batch-size"):
        p.add_argument(name, default=None)
    p.add_argument("--no-mmap-bin-files", action="store_false", dest="mmap_bin_files")
    p.add_argument("--no-create-attention-mask-in-dataloader", action="store_false",
                   dest="create_attention_mask_in_dataloader")
    for name in ("--mock-data", "--sft", "--fim-data", "--reset-position-ids", "--reset-attention-mask",
                 "--eod-mask-loss", "--full-validation", "--multiple-validation-sets", "--skip-train",
                 "--allow-ambiguous-pad-tokens", "--dataloader-fast-cache-load", "--dataloader-defer-npy-index-mmap",
                 "--sequence-parallel", "--hybrid-context-parallel", "--dataloader-inter-document-masking"):
        p.add_argument(name, action="store_true")
    for name, default in (("--seq-length", None), ("--seed", 1234), ("--train-samples", None), ("--train-iters", None),
                          ("--global-batch-size", None), ("--micro-batch-size", None), ("--eval-iters", 100),
                          ("--eval-interval", None), ("--start-eval-at-iter", None),
                          ("--eval-global-batch-size", None), ("--vocab-size", None),
                          ("--null-tokenizer-eod-id", None), ("--null-tokenizer-pad-id", -1),
                          ("--num-dataset-builder-threads", 1), ("--context-parallel-size", 1),
                          ("--tensor-model-parallel-size", 1)):
        p.add_argument(name, type=int, default=default)
    p.add_argument("--mid-level-dataset-surplus", type=float, default=0.005)
    return p


def parse_data_args(argv: Sequence[str]) -> argparse.Namespace:
    """The data-relevant part of a Megatron-LM command line (the rest is ignored), checked for what a dump
    needs; errors name the Megatron-LM argument."""
    args, _ = data_arg_parser().parse_known_args(list(argv))
    for name, why in _UNSUPPORTED.items():
        if getattr(args, name):
            raise ConfigError(f"Megatron-LM arguments: {why}; kd-teacher dump needs a GPTDataset run")
    if args.seq_length is None:
        raise ConfigError("Megatron-LM arguments: --seq-length is missing")
    uses_paths = any(getattr(args, n) is not None for n in ("data_path", "data_args_path", "train_data_path",
                                                            "valid_data_path", "test_data_path",
                                                            "per_split_data_args_path"))
    if not uses_paths:
        raise ConfigError("Megatron-LM arguments: no --data-path (or --train-data-path, --data-args-path, ...)")
    if args.data_path is not None and args.split is None:
        args.split = "969, 30, 1"  # Megatron-LM's legacy default, with the same warning there
    if args.train_samples is None and args.train_iters is None and not args.skip_train:
        raise ConfigError("Megatron-LM arguments: --train-iters or --train-samples is needed (it sizes the train split)")
    if args.train_iters is not None and args.global_batch_size is None:
        raise ConfigError(
            "Megatron-LM arguments: --global-batch-size is needed with --train-iters (Megatron-LM defaults it to "
            "micro-batch size x data-parallel size, which depends on the world size: pass the number)")
    if args.eval_global_batch_size is None:
        args.eval_global_batch_size = args.global_batch_size
    return args


def num_samples(args: argparse.Namespace) -> list[Optional[int]]:
    """Samples per split, as `get_train_valid_test_num_samples` computes them (None: the whole split)."""
    train = args.train_samples if args.train_samples else (args.train_iters or 0) * (args.global_batch_size or 0)
    if args.full_validation:
        valid = None
    else:
        if args.skip_train:
            eval_iters = args.eval_iters
        else:
            if args.eval_interval is None:
                raise ConfigError("Megatron-LM arguments: --eval-interval is needed to size the validation split "
                                  "(Megatron-LM computes (train_iters // eval_interval + 1) * eval_iters batches)")
            if args.train_iters is None:
                raise ConfigError("Megatron-LM arguments: sizing the validation split needs --train-iters")
            points = args.train_iters // args.eval_interval + 1
            if args.start_eval_at_iter is not None:
                points = max(0, points - args.start_eval_at_iter // args.eval_interval)
            eval_iters = points * args.eval_iters
        valid = eval_iters * args.eval_global_batch_size
    test = args.eval_iters * (args.eval_global_batch_size or 0)
    return [train, valid, test]


def blends(args: argparse.Namespace):
    """(blend, blend_per_split) as Megatron-LM's `get_blend_and_blend_per_split` reads them."""
    from megatron.core.datasets.utils import get_blend_from_list

    if args.data_path is not None or args.data_args_path is not None:
        if args.data_args_path is not None:
            if args.data_path is not None:
                raise ConfigError("Megatron-LM arguments: --data-path and --data-args-path exclude each other")
            return get_blend_from_list(Path(args.data_args_path).read_text().split()), None
        return get_blend_from_list(args.data_path), None
    if args.per_split_data_args_path is not None:
        per_split = json.loads(Path(args.per_split_data_args_path).read_text())
        lists = [per_split[s].split() if isinstance(per_split[s], str) else per_split[s] for s in SPLITS]
    else:
        lists = [args.train_data_path, args.valid_data_path, args.test_data_path]
    return None, [get_blend_from_list(x) for x in lists]


class DatasetTokenizer:
    """What `GPTDataset` reads off the run's tokenizer: `vocab_size`, `eod`, `pad`, `unique_identifiers`.

    NullTokenizer is megatron-core's own class, so its ids follow the installed release: from 0.18 on it has
    `vocab_size` ids with EOD = `vocab_size - 1` (`--null-tokenizer-eod-id`) and pad `--null-tokenizer-pad-id`;
    before, `vocab_size + 1` ids with EOD = `vocab_size`. Other tokenizers are not loaded here: their
    vocabulary size, EOD and pad ids are given (`data.tokenizer` in the dump YAML).
    """

    def __init__(self, vocab_size: int, eod: int, pad: Optional[int], name: str):
        self.vocab_size, self.eod, self.name = vocab_size, eod, name
        if pad is not None:
            self.pad = pad
        self.unique_identifiers = {"class": f"{__name__}.DatasetTokenizer", "name": name, "vocab_size": vocab_size,
                                   "eod": eod, "pad": pad}

    @classmethod
    def for_args(cls, args: argparse.Namespace, given: Optional[dict] = None) -> "DatasetTokenizer":
        if given is not None:
            return cls(given["vocab_size"], given["eod"], given.get("pad"), given.get("name") or "given")
        if args.tokenizer_type != "NullTokenizer":
            raise ConfigError(
                f"Megatron-LM arguments: --tokenizer-type {args.tokenizer_type}: give the dataset's tokenizer as "
                "data.tokenizer: {vocab_size, eod, pad, name} (GPTDataset needs its EOD and pad ids); "
                "NullTokenizer is read from the arguments")
        if args.vocab_size is None:
            raise ConfigError("Megatron-LM arguments: --vocab-size is needed with --tokenizer-type NullTokenizer")
        from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

        if "eod_id" in inspect.signature(NullTokenizer).parameters:
            null = NullTokenizer(args.vocab_size, eod_id=args.null_tokenizer_eod_id, pad_id=args.null_tokenizer_pad_id)
        else:
            null = NullTokenizer(args.vocab_size)
        return cls(null.vocab_size, null.eod, getattr(null, "pad", None), f"NullTokenizer({args.vocab_size})")


def dataset_config(args: argparse.Namespace, tokenizer: DatasetTokenizer):
    """The `GPTDatasetConfig` of pretrain_gpt.py's `core_gpt_dataset_config_from_args` for these arguments.

    Fields the installed megatron-core does not have are left out when Megatron-LM's value is their default
    (that release behaves as with the default); a non-default value it cannot honour is an error.
    """
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    blend, blend_per_split = blends(args)
    sequences_per_dataset = None
    if args.per_dataset_sequences_path is not None:
        sequences_per_dataset = json.loads(Path(args.per_dataset_sequences_path).read_text())
    wanted = dict(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, multiple_validation_sets=args.multiple_validation_sets,
        full_validation=args.full_validation, num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files, tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, create_attention_mask=args.create_attention_mask_in_dataloader,
        object_storage_cache_path=args.object_storage_cache_path,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens, fast_cache_load=args.dataloader_fast_cache_load,
        sequences_per_dataset=sequences_per_dataset, defer_npy_index_mmap=args.dataloader_defer_npy_index_mmap,
        context_parallel_size=args.context_parallel_size,
        # Data parallelism only pads packed sequences (SFT, refused above): the sample list does not depend on it.
        sequence_parallel_size=args.tensor_model_parallel_size * args.sequence_parallel,
        hybrid_context_parallel=args.hybrid_context_parallel,
        inter_document_masking=args.dataloader_inter_document_masking,
    )
    fields = {f.name: f for f in dataclasses.fields(GPTDatasetConfig) if f.init}
    kwargs = {}
    for name, value in wanted.items():
        if name in fields:
            kwargs[name] = value
        elif value not in (None, False, 0, 1, 0.005):
            raise ConfigError(f"Megatron-LM arguments set {name}={value!r}, which the installed megatron-core's "
                              "GPTDatasetConfig has no field for: dump with the student's megatron-core")
    return GPTDatasetConfig(**kwargs)


class MegatronLMSource:
    """The dump's sequences: the requested splits of the student's datasets, in order, one after the other."""

    def __init__(self, megatron_args: Sequence[str], splits: Sequence[str] = ("train",),
                 tokenizer: Optional[dict] = None):
        unknown = [s for s in splits if s not in SPLITS]
        if unknown or not splits:
            raise ConfigError(f"data.splits: {list(splits)} must list some of {list(SPLITS)}")
        self.megatron_args = list(megatron_args)
        self.args = parse_data_args(self.megatron_args)
        self.tokenizer = DatasetTokenizer.for_args(self.args, tokenizer)
        self.splits = list(splits)
        self.sizes = num_samples(self.args)
        self.parts = self._build()  # [(split, dataset, samples used)]
        self.offsets = []
        total = 0
        for _, _, n in self.parts:
            self.offsets.append(total)
            total += n
        self.length = total

    def _build(self):
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset

        config = dataset_config(self.args, self.tokenizer)
        sizes = [size if split in self.splits else 0 for split, size in zip(SPLITS, self.sizes)]
        built = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
        parts = []
        for split in self.splits:
            found = built[SPLITS.index(split)]
            datasets = found if isinstance(found, list) else [found]  # --multiple-validation-sets
            if not datasets or any(d is None or len(d) == 0 for d in datasets):
                raise ConfigError(f"the student's {split} split is empty with these Megatron-LM arguments "
                                  f"(--split {self.args.split!r})")
            want = self.sizes[SPLITS.index(split)]
            for d in datasets:
                # The student reads samples [0, want) of each split (more exist when an epoch overshoots).
                parts.append((split, d, len(d) if want is None else min(len(d), want)))
        return parts

    def __len__(self) -> int:
        return self.length

    def tokens(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.length:
            raise IndexError(f"sample {i} of {self.length}")
        for (_, dataset, _), start in zip(reversed(self.parts), reversed(self.offsets)):
            if i >= start:
                return dataset[i - start]["tokens"].to(torch.int64)
        raise AssertionError("unreachable: offsets start at 0")

    def identity(self) -> dict:
        from kd_teacher.offline.format import blake2b_file

        prefixes = sorted({p for _, d, _ in self.parts for p in _prefixes(d)})
        files = {p: {"idx_blake2b": blake2b_file(Path(p + ".idx")), "bin_bytes": Path(p + ".bin").stat().st_size}
                 for p in prefixes}
        splits = [dict(split=s, samples=n, first_sample=o) for (s, _, n), o in zip(self.parts, self.offsets)]
        return dict(kind="megatron_lm", megatron_args=self.megatron_args, splits=splits, samples=self.length,
                    files=files)

    def tokenizer_identity(self) -> dict:
        t = self.tokenizer
        return dict(name=t.name, vocab_size=t.vocab_size, eod=t.eod, pad=getattr(t, "pad", None))


def _prefixes(dataset) -> list[str]:
    """The indexed-dataset path prefixes under a GPTDataset or a BlendedDataset."""
    inner = getattr(dataset, "datasets", None)
    if inner is not None:
        return [p for d in inner for p in _prefixes(d)]
    return [dataset.dataset_path]
