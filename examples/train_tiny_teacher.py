"""Reproduce the embedded tiny teacher in kd_teacher/assets/ (corpus, tokenizer, Megatron-Core GPT teacher).

Three steps, each reproducible on its own:

  corpus    extract the corpus from a local CPython 3.11.7 install (standard-library sources + pydoc topic
            texts), copy its license, train the byte-level BPE tokenizer on the corpus's train split
  train     train the teacher (a Megatron-Core GPTModel built by kd_teacher.engine.model.build_gpt_model) on
            the train split, keep the weights with the best validation loss, write model.safetensors (bf16) +
            model.yaml + training.json into --out
  evaluate  the held-out loss of the *saved* bf16 teacher in fp32 on this machine, recorded into training.json
            (the test suite checks the committed teacher against it)

    python examples/train_tiny_teacher.py corpus --python-lib /root/.pyenv/versions/3.11.7/lib/python3.11
    python examples/train_tiny_teacher.py train --out kd_teacher/assets/tiny_teacher        # GPU: minutes
    python examples/train_tiny_teacher.py evaluate --dir kd_teacher/assets/tiny_teacher      # CPU
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from kd_teacher import assets
from kd_teacher.assets import Document

log = logging.getLogger("train_tiny_teacher")

# Standard-library parts left out of the corpus: tests, generated tables (encodings), vendored or legacy
# trees and pure-Python twins of C modules; what is left is ordinary, varied library code.
EXCLUDED_DIRS = {
    "test", "tests", "idle_test", "idlelib", "lib2to3", "distutils", "encodings", "ensurepip", "turtledemo",
    "tkinter", "site-packages", "__pycache__", "__phello__", "pydoc_data", "lib-dynload",
}
EXCLUDED_FILES = {"_pydecimal.py", "_pyio.py", "__hello__.py", "antigravity.py", "this.py"}
VOCAB_SIZE = 4096

# The teacher: ~4.0M parameters (tied embeddings), 8 MB in bf16.
TEACHER_SHAPE = dict(
    num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=704,
    vocab_size=VOCAB_SIZE, max_sequence_length=256, make_vocab_size_divisible_by=128,
    share_embeddings_and_output_weights=True,
)


# ---- corpus + tokenizer ---------------------------------------------------------------------------------
def stdlib_sources(lib: Path) -> list[Document]:
    docs = []
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if any(part in EXCLUDED_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name in EXCLUDED_FILES or rel.name.startswith("_sysconfigdata"):
            continue
        docs.append(Document(str(rel), path.read_text(encoding="utf-8")))
    return docs


def pydoc_topics(lib: Path) -> list[Document]:
    """The prose of the language reference as pydoc ships it: `topics = {...}` read as a literal, not run."""
    tree = ast.parse((lib / "pydoc_data" / "topics.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "topics":
            topics = ast.literal_eval(node.value)
            return [Document(f"pydoc_data/topics/{name}", text) for name, text in sorted(topics.items())]
    raise ValueError(f"{lib}/pydoc_data/topics.py has no `topics = {{...}}` literal")


def train_tokenizer(docs: list[Document]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[assets.EOD_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([d.text for d in docs], trainer)
    return tok


def cmd_corpus(args) -> None:
    lib = Path(args.python_lib)
    if not (lib / "LICENSE.txt").is_file():
        raise FileNotFoundError(f"{lib} does not look like a CPython lib directory (no LICENSE.txt)")
    docs = stdlib_sources(lib) + pydoc_topics(lib)
    assets.write_corpus(docs)
    shutil.copyfile(lib / "LICENSE.txt", assets.CORPUS_PATH.parent / "LICENSE")
    train_docs = assets.documents("train", docs)
    tok = train_tokenizer(train_docs)
    tok.save(str(assets.TOKENIZER_PATH))
    counts = {s: len(assets.documents(s, docs)) for s in ("train", "valid", "heldout")}
    chars = sum(len(d.text) for d in docs)
    log.info("corpus: %d documents (%s), %.1f M characters -> %s (%.2f MB)", len(docs), counts, chars / 1e6,
             assets.CORPUS_PATH, assets.CORPUS_PATH.stat().st_size / 1e6)
    log.info("tokenizer: %d tokens -> %s", tok.get_vocab_size(), assets.TOKENIZER_PATH)


# ---- training --------------------------------------------------------------------------------------------
def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step <= args.warmup:
        return args.lr * step / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def mean_loss(model, rows: torch.Tensor, batch: int, device) -> float:
    """Mean next-token cross-entropy over all positions of `rows` [n, s+1], in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, rows.shape[0], batch):
        chunk = rows[i:i + batch].to(device)
        tokens, labels = chunk[:, :-1], chunk[:, 1:]
        pos = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        loss = model(tokens, pos, None, labels=labels)
        total += float(loss.double().sum())
        count += loss.numel()
    model.train(was_training)
    return total / count


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def build_model(args):
    from kd_teacher.engine.model import ModelConfig, build_gpt_model

    cfg = ModelConfig(**TEACHER_SHAPE, hidden_dropout=args.dropout, attention_dropout=args.dropout, seed=args.seed)
    torch.manual_seed(args.seed)
    model, _ = build_gpt_model(cfg)
    return model, cfg


def cmd_train(args) -> None:
    from kd_teacher.assets.teacher import TRAINING_FILE, save_teacher
    from kd_teacher.runtime import init_distributed

    init_distributed(1, 1, seed=args.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    tok = assets.load_tokenizer()
    docs = assets.read_corpus()
    train = assets.split_sequences("train", args.seq_len, tok, docs).to(device)
    valid = assets.split_sequences("valid", args.seq_len, tok, docs)
    log.info("train %d x %d tokens, valid %d x %d", *train.shape, *valid.shape)

    model, cfg = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    pos = torch.arange(args.seq_len, device=device).expand(args.batch, args.seq_len)
    history, best = [], (float("inf"), None, 0)
    start, step, train_loss = time.time(), 0, float("nan")
    model.train()
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        rows = train[torch.randint(train.shape[0], (args.batch,), generator=gen).to(device)]
        loss = model(rows[:, :-1], pos, None, labels=rows[:, 1:]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        out_of_time = args.time_limit_min and time.time() - start > args.time_limit_min * 60
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            train_loss = float(loss)
            valid_loss = mean_loss(model, valid, 64, device)
            history.append({"step": step, "train_loss": train_loss, "valid_loss": valid_loss,
                            "seconds": round(time.time() - start, 1)})
            log.info("step %d  train %.4f  valid %.4f  (%.0f s)", step, train_loss, valid_loss, time.time() - start)
            if valid_loss < best[0]:
                best = (valid_loss, snapshot(model), step)
        if out_of_time:
            log.warning("time limit reached at step %d of %d", step, args.steps)
            break

    model.load_state_dict(best[1], strict=False)  # strict=False: _extra_state entries are not snapshot
    # The served config: dropout off (teacher mode runs in eval() anyway), same shape and seed.
    cfg.hidden_dropout = cfg.attention_dropout = 0.0
    out = save_teacher(model, cfg, args.out, tokenizer_id=assets.tokenizer_id())
    record = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": machine_description(device),
        "parameters": n_params,
        "tokens_per_step": args.batch * args.seq_len,
        "steps_run": step,
        "best_step": best[2],
        "best_valid_loss": best[0],
        "final_train_loss": train_loss,
        "train_seconds": round(time.time() - start, 1),
        "train_tokens": int(train.numel()),
        "args": vars(args) | {"func": None},
        "history": history,
    }
    (out / TRAINING_FILE).write_text(json.dumps(record, indent=1))
    log.info("saved teacher (best valid %.4f at step %d) to %s", best[0], best[2], out)


def machine_description(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads, torch {torch.__version__}"


# ---- evaluation of the saved teacher ----------------------------------------------------------------------
def cmd_evaluate(args) -> None:
    from kd_teacher.assets.teacher import TRAINING_FILE, build_tiny_teacher, load_training_record
    from kd_teacher.runtime import init_distributed

    init_distributed(1, 1)
    model, cfg, _ = build_tiny_teacher(args.dir)
    device = next(model.parameters()).device
    heldout = assets.split_sequences("heldout", args.seq_len)
    record = load_training_record(args.dir)
    record["heldout"] = {
        "seq_len": args.seq_len,
        "sequences": int(heldout.shape[0]),
        "loss": mean_loss(model, heldout, 32, device),
        # A slice small enough for the test suite to re-check in a second.
        "first_32_sequences_loss": mean_loss(model, heldout[:32], 32, device),
        "evaluated_on": machine_description(device) + ", fp32 compute of the bf16 weights",
    }
    (Path(args.dir) / TRAINING_FILE).write_text(json.dumps(record, indent=1))
    log.info("held-out loss %.4f (perplexity %.1f) over %d x %d tokens", record["heldout"]["loss"],
             math.exp(record["heldout"]["loss"]), heldout.shape[0], args.seq_len)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corpus", help="extract corpus + license, train the tokenizer")
    c.add_argument("--python-lib", default=f"{sys.base_prefix}/lib/python3.11")
    c.set_defaults(func=cmd_corpus)
    t = sub.add_parser("train", help="train the teacher")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--dropout", type=float, default=0.1)
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--time-limit-min", type=float, default=0.0, help="stop early (keeping the best) after this")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("evaluate", help="record the saved teacher's held-out loss")
    e.add_argument("--dir", default=str(assets.TINY_TEACHER_DIR))
    e.add_argument("--seq-len", type=int, default=256)
    e.set_defaults(func=cmd_evaluate)
    return p.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
