"""A dump never serves wrong numbers: hostile or unlucky input is an error naming the problem, not a loss.

Shards, manifests and configs are damaged the ways users damage them (a changed byte, a file overwritten or
truncated while training reads it, a killed rerun, a typo in a config) on copies of the session's reference
dump (see conftest.py), and the reader, `verify` and `dump` must refuse or report, never crash or serve.
"""

from __future__ import annotations

import pytest
import torch

from kd_teacher.offline.reader import OfflineTeacher
from kd_teacher.payload import PayloadError
from offline_fixtures import build_dataset


def test_float_token_ids_are_refused_not_truncated(reference):
    cfg, out, _ = reference
    tokens = torch.stack([build_dataset(cfg).tokens(i) for i in range(2)])
    teacher = OfflineTeacher(out)
    with pytest.raises(PayloadError, match="token ids must be integers"):
        teacher.score(tokens.float() + 0.4)  # truncated to the dumped ids, these would be found and served
    with pytest.raises(PayloadError, match="token ids must be integers"):
        teacher.lookup(tokens.double())
    assert teacher.score(tokens.to(torch.int32)).header.batch == 2
