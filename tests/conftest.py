import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("ZTT_DEVICE", "cpu")
# Tests run on 2 cores; several ranks per test must not oversubscribe them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SAMPLE_CORPUS = REPO / "data" / "sample"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def single_process():
    """torch.distributed + megatron-core parallel state for one in-test process (TP=PP=1)."""
    from megatron_ztt.parallel import runtime

    import torch.distributed as dist

    if not dist.is_initialized():
        runtime.init_distributed(seed=1234)
    yield


@pytest.fixture
def seeded(single_process):
    from megatron_ztt.parallel import runtime

    runtime.seed_everything(1234)
