"""Where a dump's token sequences come from: the student's Megatron-Core dataset, or a JSONL file.

`gpt`: the very `GPTDataset` the student's pretraining builds, through Megatron-Core's own
`BlendedMegatronDatasetBuilder` from indexed `.bin/.idx` prefixes (or a weighted blend), with the student's
sequence length, split and seed. Sample i of the dump is `dataset[i]["tokens"]` (pads already mapped to 0
by the dataset), which is exactly the row the student's micro-batch will hold, so its token hash matches.

`megatron_lm`: the student's Megatron-LM command-line arguments (`data.megatron_args`, or `kd-teacher dump ...
--megatron-args <the student's arguments>`): the GPTDatasets its pretrain_gpt.py builds, with the samples it
reads, per split (`kd_teacher.megatron_lm.datasets`).

`jsonl`: one sequence per line, either a JSON list of token ids or an object with a `tokens` list; the
sample id is the line number (blank lines are errors, not skipped, so that ids stay line numbers).

Both give `len(source)`, `source.tokens(i)` (1-D int64) and an identity dict for the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from kd_teacher.config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class TokenizerConfig:
    """The tokenizer the dataset was made with: Megatron's datasets need its size, EOD and pad ids."""

    vocab_size: int
    eod: int
    pad: Optional[int] = None
    name: str = ""  # identity recorded in the manifest, e.g. "Qwen/Qwen2.5-7B@<revision>"


@dataclass
class DataConfig:
    kind: Literal["gpt", "jsonl", "megatron_lm"] = "gpt"
    # gpt: the student's dataset settings (Megatron-LM's --data-path / --split / --seq-length / --seed)
    blend: list[str] = field(default_factory=list)  # .bin/.idx prefixes
    blend_weights: Optional[list[float]] = None
    split: str = "969,30,1"
    split_name: Literal["train", "valid", "test"] = "train"
    seq_length: int = 4096
    seed: int = 1234
    # Samples the student draws from the split (train_iters x global batch size); needed with weights.
    # The dump covers samples [0, num_samples); None: one epoch of the split.
    num_samples: Optional[int] = None
    path_to_cache: Optional[str] = None
    tokenizer: Optional[TokenizerConfig] = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    # jsonl
    path: Optional[str] = None
    # megatron_lm: the student's Megatron-LM arguments (data ones are read, the rest ignored), and which of its
    # splits to dump (train; add valid so that evaluation gets KD metrics too). `tokenizer` gives EOD / pad ids
    # for tokenizers other than NullTokenizer.
    megatron_args: list[str] = field(default_factory=list)
    splits: list[Literal["train", "valid", "test"]] = field(default_factory=lambda: ["train"])


class _Tokenizer:
    """The attributes `GPTDataset` reads off a tokenizer, and nothing else (no text is tokenized here)."""

    def __init__(self, cfg: TokenizerConfig):
        self.vocab_size = cfg.vocab_size
        self.eod = cfg.eod
        if cfg.pad is not None:
            self.pad = cfg.pad
        self.unique_identifiers = {"class": "kd_teacher.offline.data._Tokenizer", "name": cfg.name,
                                   "vocab_size": cfg.vocab_size, "eod": cfg.eod, "pad": cfg.pad}


class GPTSource:
    def __init__(self, cfg: DataConfig):
        if not cfg.blend:
            raise ConfigError("data.blend: list at least one .bin/.idx prefix for data.kind: gpt")
        if cfg.tokenizer is None:
            raise ConfigError("data.tokenizer: vocab_size and eod are needed to build a Megatron GPTDataset")
        for prefix in cfg.blend:
            for ext in (".bin", ".idx"):
                if not Path(prefix + ext).is_file():
                    raise FileNotFoundError(f"data.blend: {prefix + ext} does not exist")
        if cfg.blend_weights is not None and len(cfg.blend_weights) != len(cfg.blend):
            raise ConfigError(f"data.blend_weights has {len(cfg.blend_weights)} weights for {len(cfg.blend)} prefixes")
        if cfg.blend_weights is not None and cfg.num_samples is None:
            raise ConfigError("data.num_samples is required with data.blend_weights (Megatron's blend needs a size)")
        self.cfg = cfg
        self.dataset = self._build()
        n = len(self.dataset)
        self.length = n if cfg.num_samples is None else min(n, cfg.num_samples)

    def _build(self):
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        cfg = self.cfg
        config = GPTDatasetConfig(
            random_seed=cfg.seed,
            sequence_length=cfg.seq_length,
            blend=(list(cfg.blend), cfg.blend_weights),
            split=cfg.split,
            path_to_cache=cfg.path_to_cache,
            tokenizer=_Tokenizer(cfg.tokenizer),
            reset_position_ids=cfg.reset_position_ids,
            reset_attention_mask=cfg.reset_attention_mask,
            eod_mask_loss=cfg.eod_mask_loss,
        )
        which = ("train", "valid", "test").index(cfg.split_name)
        sizes = [None, None, None]
        sizes[which] = cfg.num_samples
        datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
        dataset = datasets[which]
        if dataset is None or len(dataset) == 0:
            raise ConfigError(f"data.split {cfg.split!r} leaves the {cfg.split_name} split empty")
        return dataset

    def __len__(self) -> int:
        return self.length

    def tokens(self, i: int) -> torch.Tensor:
        return self.dataset[i]["tokens"].to(torch.int64)

    def identity(self) -> dict:
        cfg = self.cfg
        files = {p: {"idx_blake2b": _file_digest(Path(p + ".idx")), "bin_bytes": Path(p + ".bin").stat().st_size}
                 for p in cfg.blend}
        return dict(kind="gpt", blend=list(cfg.blend), blend_weights=cfg.blend_weights, split=cfg.split,
                    split_name=cfg.split_name, seq_length=cfg.seq_length, seed=cfg.seed,
                    num_samples=cfg.num_samples, samples=self.length, files=files)

    def tokenizer_identity(self) -> dict:
        t = self.cfg.tokenizer
        return dict(name=t.name, vocab_size=t.vocab_size, eod=t.eod, pad=t.pad)


class JsonlSource:
    def __init__(self, cfg: DataConfig):
        if not cfg.path:
            raise ConfigError("data.path: a JSONL file of token-id lists is needed for data.kind: jsonl")
        path = Path(cfg.path)
        if not path.is_file():
            raise FileNotFoundError(f"data.path: {path} does not exist")
        self.cfg = cfg
        self.rows = [_parse_line(line, path, n) for n, line in enumerate(path.read_text().splitlines(), 1)]
        if not self.rows:
            raise ConfigError(f"data.path: {path} holds no sequences")
        if cfg.num_samples is not None:
            self.rows = self.rows[: cfg.num_samples]

    def __len__(self) -> int:
        return len(self.rows)

    def tokens(self, i: int) -> torch.Tensor:
        return torch.tensor(self.rows[i], dtype=torch.int64)

    def identity(self) -> dict:
        return dict(kind="jsonl", path=self.cfg.path, blake2b=_file_digest(Path(self.cfg.path)),
                    num_samples=self.cfg.num_samples, samples=len(self.rows))

    def tokenizer_identity(self) -> dict:
        t = self.cfg.tokenizer
        return {} if t is None else dict(name=t.name, vocab_size=t.vocab_size, eod=t.eod, pad=t.pad)


def _parse_line(line: str, path: Path, lineno: int) -> list[int]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{lineno}: not JSON ({e})") from None
    ids = obj.get("tokens") if isinstance(obj, dict) else obj
    if not isinstance(ids, list) or not ids or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
        raise ConfigError(f"{path}:{lineno}: expected a non-empty list of token ids (or {{\"tokens\": [...]}})")
    return ids


def _file_digest(path: Path) -> str:
    from kd_teacher.offline.format import blake2b_file

    return blake2b_file(path)


def build_source(cfg: DataConfig):
    if cfg.kind == "megatron_lm":
        from kd_teacher.megatron_lm.datasets import MegatronLMSource

        if not cfg.megatron_args:
            raise ConfigError("data.megatron_args: the student's Megatron-LM arguments are needed for "
                              "data.kind: megatron_lm (or pass them after --megatron-args)")
        tokenizer = None if cfg.tokenizer is None else dataclasses.asdict(cfg.tokenizer)
        return MegatronLMSource(cfg.megatron_args, cfg.splits, tokenizer)
    return GPTSource(cfg) if cfg.kind == "gpt" else JsonlSource(cfg)


def check_token_range(tokens: torch.Tensor, vocab_size: int, sample_id: int) -> None:
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise ConfigError(
            f"sample {sample_id} has token ids in [{lo}, {hi}], outside the teacher's vocabulary of {vocab_size}: "
            "is this dataset tokenized with the teacher's tokenizer?"
        )
