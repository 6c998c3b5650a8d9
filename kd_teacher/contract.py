"""What a teacher serves: one dataclass, `TeacherContract`, and one comparison, `check(expected)`.

The facts a student must agree with before it uses a teacher's numbers (vocabulary, k, temperature, values
dtype, extraction, and which teacher under which precision recipe) live here once:

- every carrier of them inherits this class: `PayloadHeader` (each payload), `ServerInfo` (a streaming
  teacher's handshake), `Manifest` (an offline dump), `RemoteTeacherConfig` (what a student asks of a
  streaming teacher). So a field added here appears in the payload header's JSON, the handshake, the dump
  manifest and the remote config, and is compared everywhere, with no other change;
- every requirement is one too, with None for "any" (the training hook's, the offline reader's `expect=`,
  the loss's own);
- `served.check(expected)` compares them with one rule per field (temperatures as floats, everything else
  by equality; a field that either side leaves None is not compared) and raises the caller's error class
  with one line per mismatch, `<field>: <expecting> expects <want>, <served> has <have>`. It is what the hook
  (at start-up and per payload), the offline reader, both transports (at connect and per reply) and the KD
  loss call.

`docs/contract.md` says where each carrier travels and how to add a field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import typing
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Collection, Optional

from kd_teacher.precision import recipe_mismatch

log = logging.getLogger(__name__)

# Fields that say which teacher made the numbers (not how they are laid out): the streaming transport carries
# only their digest per reply, and a reply whose digest differs is refused alone, without breaking the channel.
IDENTITY_FIELDS = ("teacher_fingerprint", "recipe_fingerprint")

_HINTS = {
    "vocab_size": "teacher and student must share a tokenizer (padded sizes may differ, true sizes may not)",
    "temperature": "the teacher's log-sum-exp is only valid at the temperature it was computed at: serve the "
                   "teacher at the temperature the loss uses",
    "tokenizer_identity": "teacher and student must share a tokenizer (vocabulary and merges), so that an id "
                          "is the same token to both",
    "extraction": "a sampled payload holds draw counts, scored as an unbiased forward-KL estimate; a top-k payload "
                  "the k largest logits: set kd.extraction to what the teacher serves (reverse KL and JSD need "
                  "top-k)",
}


class ContractMismatchError(ValueError):
    """A teacher serves something other than what its consumer expects (the default error of `check`)."""


@dataclass(kw_only=True)
class TeacherContract:
    """What a teacher serves (None: not known, or, in a requirement, "any")."""

    vocab_size: Optional[int] = None  # true (tokenizer) vocabulary; ids are in [0, vocab_size)
    k: Optional[int] = None  # ids per token
    temperature: Optional[float] = None  # the log-sum-exp is of logits / temperature
    values_dtype: Optional[str] = None  # kd_teacher.dtypes name of the values' dtype
    extraction: Optional[str] = None  # how the ids were chosen: "topk"
    teacher_fingerprint: Optional[str] = None  # weights + model config
    recipe_fingerprint: Optional[str] = None  # precision recipe (kd_teacher.precision)
    # NAME@DIGEST of the vocabulary and merges (kd_teacher.tokenizer_identity); compared by digest alone
    tokenizer_identity: Optional[str] = None

    # ---- the one comparison --------------------------------------------------------------------------------
    def mismatches(self, expected: "TeacherContract", *, served: str = "the teacher",
                   expecting: str = "the student", identity: bool = True) -> list[str]:
        """One line per field where this (what is served) differs from `expected`; identity=False leaves out
        `IDENTITY_FIELDS`."""
        out = []
        for name in contract_fields():
            if not identity and name in IDENTITY_FIELDS:
                continue
            have, want = getattr(self, name), getattr(expected, name)
            if have is None or want is None or _same(name, have, want):
                continue
            if name == "recipe_fingerprint":
                out.append(f"recipe_fingerprint: {recipe_mismatch(have, want)}")
                continue
            line = f"{name}: {expecting} expects {want!r}, {served} has {have!r}"
            out.append(f"{line} ({_HINTS[name]})" if name in _HINTS else line)
        return out

    def check(self, expected: "TeacherContract", *, served: str = "the teacher", expecting: str = "the student",
              error: type[Exception] = ContractMismatchError, accept: Collection[str] = (), identity: bool = True,
              remedy: str = "") -> None:
        """Raise `error` naming every mismatch with `expected`. Mismatches of the fields in `accept` (a
        deliberate override, e.g. kd.allow_recipe_mismatch) are logged as warnings instead."""
        problems = self.mismatches(expected, served=served, expecting=expecting, identity=identity)
        if not problems:
            return
        accepted = [p for p in problems if p.split(":", 1)[0] in accept]
        if accepted:
            log.warning("accepted deliberately: %s does not fit %s: %s", served, expecting, "; ".join(accepted))
        refused = [p for p in problems if p not in accepted]
        if refused:
            text = f"{served} does not fit {expecting}: " + "; ".join(refused)
            raise error(f"{text}. {remedy}" if remedy else text)

    # ---- helpers for carriers --------------------------------------------------------------------------------
    def contract(self) -> "TeacherContract":
        """The contract part of a carrier (a PayloadHeader, ServerInfo, Manifest, ...) as a plain contract."""
        return TeacherContract(**{name: getattr(self, name) for name in contract_fields()})

    def identity_digest(self) -> bytes:
        """16-byte BLAKE2b of `IDENTITY_FIELDS` (what a binary reply header carries instead of them)."""
        return _identity_digest(tuple(getattr(self, name) for name in IDENTITY_FIELDS))

    def missing(self, names: Collection[str]) -> list[str]:
        """Which of `names` are None (a carrier that must state them)."""
        return [name for name in names if getattr(self, name) is None]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_mapping(cls, data, error: type[Exception] = ContractMismatchError, where: str = "teacher contract"):
        """`cls(**data)` for a parsed JSON object, refusing unknown fields and wrong types with `error`."""
        if not isinstance(data, dict):
            raise error(f"{where} is not a JSON object")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise error(f"{where} has unknown fields {unknown}")
        try:
            out = cls(**data)
        except TypeError as e:
            raise error(f"{where} is malformed: {e}") from None
        for name, allowed in _json_types().items():
            value = getattr(out, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, allowed)):
                raise error(f"{where} field {name}={value!r:.80} is not of type "
                            f"{' or '.join(t.__name__ for t in allowed)}")
        return out


@lru_cache(maxsize=1)
def _json_types() -> dict:
    """The JSON types each contract field may take (from its annotation; a float field takes an integer too)."""
    hints = typing.get_type_hints(TeacherContract)
    out = {}
    for name in contract_fields():
        allowed = tuple(t for t in typing.get_args(hints[name]) if t is not type(None))
        out[name] = allowed + (int,) if float in allowed else allowed
    return out


@lru_cache(maxsize=1)
def contract_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TeacherContract))


def _same(name: str, have, want) -> bool:
    # The one float rule: temperatures are compared as the float64 numbers they are (JSON, YAML and the binary
    # reply header all carry them exactly); a temperature written 2 in one place and 2.0 in another is equal.
    if name == "temperature":
        return float(have) == float(want)
    if name == "tokenizer_identity":  # one tokenizer under two names (directories) is the same tokenizer
        from kd_teacher.tokenizer_identity import identity_digest

        return identity_digest(have) == identity_digest(want)
    return have == want


@lru_cache(maxsize=16)
def _identity_digest(values: tuple) -> bytes:
    return hashlib.blake2b(json.dumps(values).encode(), digest_size=16).digest()
