"""A tokenizer's identity: a name for people, and a digest of what gives token ids their meaning.

`"<name>@<32 hex digits>"`, the digest a BLAKE2b-128 of the vocabulary (token -> id), the BPE merges and the
added tokens, read from a Hugging Face `tokenizer.json` (sentencepiece-only tokenizers: of `tokenizer.model`'s
bytes; GPT-2 style: of `vocab.json` + `merges.txt`). Two tokenizers with the same digest map every id to the
same token, whatever their directories are called; the name only makes error messages readable.

It travels as `TeacherContract.tokenizer_identity` (payload headers, dump manifests, the streaming handshake),
and the training hook refuses a teacher whose digest differs from the student's (`kd.tokenizer`), naming both.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Optional

_IDENTITY = re.compile(r"(?P<name>.*)@(?P<digest>[0-9a-f]{32})")


class TokenizerIdentityError(ValueError):
    """No tokenizer files where a tokenizer was named, or an identity string that is not one."""


def tokenizer_identity(source: str | Path, name: Optional[str] = None) -> str:
    """Identity of the tokenizer at `source`: a directory holding tokenizer.json (or tokenizer.model, or
    vocab.json + merges.txt), a tokenizer.json file, or an identity string (returned as it is)."""
    text = str(source)
    if _IDENTITY.fullmatch(text) and not Path(text).exists():
        return text
    path = Path(source)
    if path.is_file():
        directory, files = path.parent, [path]
    elif path.is_dir():
        directory = path
        files = next(([path / f for f in group] for group in (["tokenizer.json"], ["tokenizer.model"],
                                                               ["vocab.json", "merges.txt"])
                      if all((path / f).is_file() for f in group)), None)
        if files is None:
            raise TokenizerIdentityError(f"{path} holds no tokenizer (tokenizer.json, tokenizer.model, or vocab.json "
                                         "+ merges.txt)")
    else:
        raise TokenizerIdentityError(f"tokenizer {text!r} is neither a tokenizer file or directory nor an identity "
                                     "of the form NAME@<32 hex digits>")
    h = hashlib.blake2b(digest_size=16)
    for file in files:
        h.update(_canonical(file))
    return f"{name or directory.resolve().name}@{h.hexdigest()}"


def _canonical(file: Path) -> bytes:
    """The bytes hashed for one file: for tokenizer.json only what decides ids (not its formatting, nor the
    normalizer/decoder settings that do not change which token an id is)."""
    if file.name != "tokenizer.json" and file.suffix != ".json":
        return file.read_bytes()
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerIdentityError(f"{file} is not valid JSON: {e}") from None
    if file.name == "vocab.json" or "model" not in data:
        return json.dumps(data, sort_keys=True).encode()
    model = data.get("model") or {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    added = sorted((t.get("id"), t.get("content"), bool(t.get("special"))) for t in data.get("added_tokens") or [])
    return json.dumps({"type": model.get("type"), "vocab": model.get("vocab"), "merges": merges, "added": added},
                      sort_keys=True).encode()


def identity_digest(identity: str) -> str:
    """The digest part of an identity string (what two identities are compared by)."""
    m = _IDENTITY.fullmatch(identity)
    if m is None:
        raise TokenizerIdentityError(f"{identity!r} is not a tokenizer identity (NAME@<32 hex digits>)")
    return m.group("digest")


def find_tokenizer(directory: str | Path) -> Optional[str]:
    """The identity of the tokenizer in a checkpoint directory, None if it holds none."""
    try:
        return tokenizer_identity(directory)
    except TokenizerIdentityError:
        return None
