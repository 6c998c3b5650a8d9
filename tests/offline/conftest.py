"""The dumps the offline tests share: one small indexed corpus and one reference dump, made once per session."""

import pytest

from kd_teacher.testing.distributed import run_distributed
from offline_fixtures import dump_on_ranks, file_bytes, gpt_dump_config, write_indexed_dataset


@pytest.fixture(scope="session")
def data_prefix(tmp_path_factory) -> str:
    return write_indexed_dataset(tmp_path_factory.mktemp("data") / "corpus", vocab=1000)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_prefix):
    """The dump written by 2 teacher data-parallel ranks: the bytes every other run must reproduce.
    (config, directory, {file: bytes}); tests that change it work on a copy (`copy_dump`)."""
    out = tmp_path_factory.mktemp("ref") / "dump"
    cfg = gpt_dump_config(out, data_prefix)
    results = run_distributed(dump_on_ranks, 2, cfg)
    assert results[0] == results[1] and results[0]["complete"]
    return cfg, out, file_bytes(out)
