"""`OnPolicyIterator`: prompts in, Megatron micro-batches of prompt + the student's own completion out.

It stands where the training script's data iterator stood, so `forward_step`, the KD hook and the pipeline
schedule stay as they are. Each micro-batch is the dict a Megatron `forward_step` reads:

    tokens         [b, s]  prompt + completion, right-padded            (the model's input)
    labels         [b, s]  tokens shifted by one                        (next-token targets)
    loss_mask      [b, s]  1.0 where the label is a completion token, 0.0 on prompt and padding
    position_ids   [b, s]
    sampling_logprobs [b, s]  the student's log-prob of each completion label at sampling time (NaN elsewhere),
                              for the KD hook's `onpolicy logprob gap` report

The KD hook then scores `tokens` with the teacher, as for any micro-batch, and the loss counts the
completion tokens only.

Rounds: when its buffer is empty, the iterator makes the next `generate_every x num_microbatches`
micro-batches in one go. Each is the student's sample with probability `lmbda` (GKD's lambda; a seeded
generator decides, alike on every rank), else the next micro-batch of the `off_policy` iterator, drawn when it
is served. The student's ones are generated together, `generation_batch_size` prompts per call into
Megatron-Core. Prompts are drawn in a seeded order, epoch after epoch, each data-parallel rank its own share;
tensor-parallel ranks draw the same prompts and seeds, since generation is a collective of theirs.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Iterator, Optional, Sequence

import torch

from kd_teacher.config import ConfigError
from kd_teacher.onpolicy.config import OnPolicyConfig
from kd_teacher.onpolicy.generation import Rollout, StudentGenerator, batch_invariant_kernels

log = logging.getLogger(__name__)


def load_prompts(path: str) -> list[list[int]]:
    """Prompts from a JSONL file: one per line, a JSON list of token ids or {"tokens": [...]}."""
    from kd_teacher.offline.data import DataConfig, JsonlSource

    return JsonlSource(DataConfig(kind="jsonl", path=path)).rows


def check_prompts(prompts: Sequence[Sequence[int]], *, vocab_size: int, seq_length: int, max_new_tokens: int) -> None:
    """Refuse prompts that cannot be completed in this run, naming the first one and why."""
    if not prompts:
        raise ConfigError("kd.on_policy: no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ConfigError(f"kd.on_policy: prompt {i} is empty; every prompt needs at least one token")
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab_size:
            raise ConfigError(f"kd.on_policy: prompt {i} has token ids in [{lo}, {hi}], outside the student's "
                              f"vocabulary of {vocab_size}")
        if len(p) + max_new_tokens > seq_length:
            raise ConfigError(
                f"kd.on_policy: prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{len(p) + max_new_tokens} positions, more than the context of {seq_length} (seq_length): "
                f"shorten prompts to at most {seq_length - max_new_tokens} tokens or lower max_new_tokens")


def _dp_rank_and_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def _mixed_seed(*parts: int) -> int:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return seed


class PromptOrder:
    """Prompt indices in a seeded order, epoch after epoch; the same on every rank."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0
        self.order: list[int] = []

    def take(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if not self.order:
                g = torch.Generator().manual_seed(_mixed_seed(self.seed, self.epoch))
                self.order = torch.randperm(self.n, generator=g).tolist()
                self.epoch += 1
            out.append(self.order.pop(0))
        return out


def micro_batch(rows: Sequence[tuple[list[int], list[int], list[float]]], seq_length: int, pad_id: int,
                device=None) -> dict:
    """The micro-batch dict of (prompt, completion, sampling log-probs) rows (see the module docstring)."""
    b = len(rows)
    tokens = torch.full((b, seq_length), pad_id, dtype=torch.int64)
    labels = torch.full((b, seq_length), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros(b, seq_length)
    sampling = torch.full((b, seq_length), math.nan)
    for i, (prompt, completion, logprobs) in enumerate(rows):
        seq = torch.tensor(prompt + completion, dtype=torch.int64)
        n = seq.numel() - 1  # inputs: all but the last token; labels: all but the first
        tokens[i, :n], labels[i, :n] = seq[:-1], seq[1:]
        first = len(prompt) - 1  # the position whose label is the first completion token
        loss_mask[i, first:n] = 1.0
        sampling[i, first:first + len(logprobs)] = torch.tensor(logprobs, dtype=torch.float32)
    batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
             "position_ids": torch.arange(seq_length).expand(b, seq_length).contiguous(),
             "sampling_logprobs": sampling}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


class OnPolicyIterator:
    """The training script's data iterator for on-policy distillation; see the module docstring.

    model: the student as the training loop holds it (DDP-wrapped or not); generation runs on it.
    cfg: the `kd.on_policy` section. prompts: token-id lists (None: read `cfg.prompts`).
    vocab_size: the student's true (tokenizer) vocabulary; the teacher's must be the same.
    seq_length, micro_batch_size, num_microbatches: the training step's shapes.
    off_policy: the dataset's micro-batch iterator, drawn from for the 1 - lmbda share (required if lmbda < 1).
    """

    def __init__(self, model, cfg: OnPolicyConfig, *, vocab_size: int, seq_length: int, micro_batch_size: int,
                 num_microbatches: int, prompts: Optional[Sequence[Sequence[int]]] = None,
                 off_policy: Optional[Iterator[dict]] = None):
        self.cfg = cfg.check()
        if cfg.batch_invariant:
            # Process-wide and for good: the gap only closes if generation and training forwards use the same kernels.
            batch_invariant_kernels().enable_batch_invariant_mode()
            log.warning("kd.on_policy.batch_invariant: Megatron-Core's batch-invariant kernels are on for this process")
        if cfg.lmbda < 1.0 and off_policy is None:
            raise ConfigError(f"kd.on_policy.lmbda={cfg.lmbda} takes {1 - cfg.lmbda:.0%} of the micro-batches from "
                              "the dataset: pass its iterator as off_policy=")
        if prompts is None:
            if cfg.prompts is None:
                raise ConfigError("kd.on_policy.prompts: name a JSONL file of prompts, or pass prompts= in code")
            prompts = load_prompts(cfg.prompts)
        self.prompts = [list(map(int, p)) for p in prompts]
        check_prompts(self.prompts, vocab_size=vocab_size, seq_length=seq_length, max_new_tokens=cfg.max_new_tokens)
        self.seq_length, self.micro_batch_size, self.num_microbatches = seq_length, micro_batch_size, num_microbatches
        self.off_policy = off_policy
        self.pad_id = cfg.eos_id if cfg.eos_id is not None else 0
        round_prompts = cfg.generate_every * num_microbatches * micro_batch_size
        self.generator = StudentGenerator(
            model, cfg, vocab_size=vocab_size, max_sequence_length=seq_length,
            max_batch_size=min(cfg.generation_batch_size or round_prompts, round_prompts))
        gpt_max = getattr(self.generator.gpt, "max_sequence_length", seq_length)
        if seq_length > gpt_max:
            raise ConfigError(f"seq_length {seq_length} is longer than the student's max_sequence_length {gpt_max}")
        self.device = next(self.generator.gpt.parameters()).device
        self.dp_rank, self.dp_size = _dp_rank_and_size()
        self._order = PromptOrder(len(self.prompts), cfg.seed)
        # The same on every rank: data-parallel ranks then take equal slices of the prompt order.
        self._coin = torch.Generator().manual_seed(_mixed_seed(cfg.seed, 1))
        self._buffer: collections.deque = collections.deque()
        self.rounds = 0
        self.last_rollouts: list[Rollout] = []  # the latest round's, for reports and benchmarks

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._buffer:
            self._new_round()
        batch = self._buffer.popleft()
        return next(self.off_policy) if batch is None else batch

    # ---- one round -------------------------------------------------------------------------------------------
    def _new_round(self) -> None:
        cfg, mbs = self.cfg, self.micro_batch_size
        count = cfg.generate_every * self.num_microbatches
        on_policy = (torch.rand(count, generator=self._coin) < cfg.lmbda).tolist()
        # Every data-parallel rank draws the same global slice of the order and keeps its own part.
        n_local = sum(on_policy) * mbs
        drawn = self._order.take(n_local * self.dp_size)
        mine = [self.prompts[i] for i in drawn[self.dp_rank * n_local:(self.dp_rank + 1) * n_local]]
        rows = self._generate(mine)
        for is_student in on_policy:
            if is_student:
                self._buffer.append(micro_batch(rows[:mbs], self.seq_length, self.pad_id, self.device))
                rows = rows[mbs:]
            else:
                self._buffer.append(None)
        self.rounds += 1

    def _generate(self, prompts: list[list[int]]) -> list[tuple]:
        rows, self.last_rollouts = [], []
        size = self.generator.max_batch_size
        for chunk, lo in enumerate(range(0, len(prompts), size)):
            seed = _mixed_seed(self.cfg.seed, self.dp_rank, self.rounds, chunk)
            rollout = self.generator.generate(prompts[lo:lo + size], seed)
            self.last_rollouts.append(rollout)
            rows += list(zip(rollout.prompts, rollout.completions, rollout.logprobs))
        return rows
