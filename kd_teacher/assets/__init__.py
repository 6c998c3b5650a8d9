"""The embedded demo data: a fixed CPython standard-library corpus, its BPE tokenizer, and token splits.

Everything here is committed in the package (no download): `corpus/cpython-3.11.7-stdlib.jsonl.gz` (one JSON
document per line: `{"name", "text"}`; Python 3.11.7 standard-library sources plus the pydoc topic texts, under
the PSF license in `corpus/LICENSE`), `tokenizer.json` (byte-level BPE, trained by
`examples/train_tiny_teacher.py corpus`) and the tiny teacher in `tiny_teacher/` (see `teacher.py`).

A document's split is a hash of its name, not its position, so that the split of one file never depends on
which other files are in the corpus: the teacher, the tokenizer and the demo's students all agree on it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import torch

ASSETS_DIR = Path(__file__).resolve().parent
CORPUS_PATH = ASSETS_DIR / "corpus" / "cpython-3.11.7-stdlib.jsonl.gz"
TOKENIZER_PATH = ASSETS_DIR / "tokenizer.json"
TINY_TEACHER_DIR = ASSETS_DIR / "tiny_teacher"

EOD_TOKEN = "<|endoftext|>"
Split = Literal["train", "valid", "heldout"]
# Percent of documents (by name hash) in each split; the rest is "train".
HELDOUT_PERCENT = 5
VALID_PERCENT = 5


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def split_of(name: str) -> Split:
    """Which split a document belongs to: a stable function of its name alone."""
    bucket = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") % 100
    if bucket < HELDOUT_PERCENT:
        return "heldout"
    if bucket < HELDOUT_PERCENT + VALID_PERCENT:
        return "valid"
    return "train"


def read_corpus(path: str | Path = CORPUS_PATH) -> list[Document]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus {path} is missing: run `examples/train_tiny_teacher.py corpus` to rebuild it")
    docs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                item = json.loads(line)
                docs.append(Document(item["name"], item["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a corpus document line ({e})") from e
    return docs


def write_corpus(docs: Iterable[Document], path: str | Path = CORPUS_PATH) -> None:
    """Byte-reproducible: gzip without a timestamp or file name, documents in the given order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        for d in docs:
            f.write((json.dumps({"name": d.name, "text": d.text}, ensure_ascii=False) + "\n").encode("utf-8"))
    tmp.replace(path)


def documents(split: Split, docs: list[Document] | None = None) -> list[Document]:
    docs = read_corpus() if docs is None else docs
    return [d for d in docs if split_of(d.name) == split]


def load_tokenizer(path: str | Path = TOKENIZER_PATH):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} is missing: run `examples/train_tiny_teacher.py corpus`")
    tok = Tokenizer.from_file(str(path))
    if tok.token_to_id(EOD_TOKEN) is None:
        raise ValueError(f"tokenizer {path} has no {EOD_TOKEN} token")
    return tok


def tokenizer_id(path: str | Path = TOKENIZER_PATH) -> str:
    """A short content hash naming the tokenizer (recorded in dump manifests and the teacher's metadata)."""
    return "bpe-" + hashlib.blake2b(Path(path).read_bytes(), digest_size=8).hexdigest()


def encode_documents(tokenizer, docs: list[Document]) -> torch.Tensor:
    """One long 1-D stream of token ids: documents in order, each followed by the end-of-document token."""
    eod = tokenizer.token_to_id(EOD_TOKEN)
    encoded = tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
    ids: list[int] = []
    for e in encoded:
        ids.extend(e.ids)
        ids.append(eod)
    return torch.tensor(ids, dtype=torch.int32)


def sequences(stream: torch.Tensor, seq_len: int, max_sequences: int | None = None) -> torch.Tensor:
    """Cut a token stream into non-overlapping rows of `seq_len + 1` tokens ([n, seq_len+1], int64):
    the first `seq_len` are the inputs, the last `seq_len` the next-token labels."""
    width = seq_len + 1
    n = stream.numel() // width
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise ValueError(f"token stream of {stream.numel()} tokens is shorter than one sequence of {width}")
    return stream[: n * width].view(n, width).long()


def split_sequences(split: Split, seq_len: int, tokenizer=None, docs: list[Document] | None = None,
                    max_sequences: int | None = None) -> torch.Tensor:
    tokenizer = tokenizer or load_tokenizer()
    return sequences(encode_documents(tokenizer, documents(split, docs)), seq_len, max_sequences)
