import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _shutdown_worker_pools():
    yield
    from kd_teacher.testing.distributed import shutdown_pools

    shutdown_pools()
