"""Tokenizer identity: one digest per vocabulary + merges whatever the directory is called, carried in payload
headers and compared by digest."""

import shutil

import pytest

from kd_teacher.assets import TOKENIZER_PATH
from kd_teacher.contract import ContractMismatchError, TeacherContract
from kd_teacher.payload import PayloadHeader
from kd_teacher.tokenizer_identity import (
    TokenizerIdentityError, find_tokenizer, identity_digest, tokenizer_identity,
)


def test_same_files_same_digest_other_vocabulary_other_digest(tmp_path):
    for name in ("teacher", "student"):
        (tmp_path / name).mkdir()
        shutil.copy(TOKENIZER_PATH, tmp_path / name / "tokenizer.json")
    teacher, student = tokenizer_identity(tmp_path / "teacher"), tokenizer_identity(tmp_path / "student")
    assert teacher.startswith("teacher@") and student.startswith("student@")
    assert identity_digest(teacher) == identity_digest(student)
    assert tokenizer_identity(tmp_path / "teacher" / "tokenizer.json") == teacher
    assert tokenizer_identity(teacher) == teacher  # an identity string stands for itself

    text = (tmp_path / "student" / "tokenizer.json").read_text()
    (tmp_path / "student" / "tokenizer.json").write_text(text.replace('"def"', '"fed"', 1))
    assert text != (tmp_path / "student" / "tokenizer.json").read_text()
    assert identity_digest(tokenizer_identity(tmp_path / "student")) != identity_digest(teacher)

    with pytest.raises(ContractMismatchError, match=f"expects '{tokenizer_identity(tmp_path / 'student')}', the "
                                                    f"teacher has '{teacher}'"):
        TeacherContract(tokenizer_identity=teacher).check(
            TeacherContract(tokenizer_identity=tokenizer_identity(tmp_path / "student")))
    TeacherContract(tokenizer_identity=teacher).check(TeacherContract(tokenizer_identity="x@" + teacher[-32:]))


def test_payload_header_carries_it_and_no_tokenizer_is_named(tmp_path):
    identity = tokenizer_identity(TOKENIZER_PATH)
    header = PayloadHeader(k=2, temperature=1.0, vocab_size=10, batch=1, seq_len=3, tokenizer_identity=identity)
    assert PayloadHeader.from_json(header.to_json()).tokenizer_identity == identity
    assert find_tokenizer(tmp_path) is None
    with pytest.raises(TokenizerIdentityError, match="holds no tokenizer"):
        tokenizer_identity(tmp_path)
    with pytest.raises(TokenizerIdentityError, match="neither a tokenizer file or directory nor an identity"):
        tokenizer_identity("no-such-tokenizer")
