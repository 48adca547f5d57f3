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


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """The bundled sample corpus, tokenised: (dataset prefix, tokenizer .model path).

    Each book is cut into ~40-line documents so that every split gets some."""
    from megatron_ztt.data.preprocess import preprocess
    from megatron_ztt.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("sample_data")
    docs = root / "docs"
    docs.mkdir()
    for book in sorted(SAMPLE_CORPUS.glob("*.txt"))[:4]:
        lines = book.read_text(encoding="utf-8").splitlines(keepends=True)
        for i in range(0, len(lines), 40):
            (docs / f"{book.stem}_{i:05d}.txt").write_text("".join(lines[i:i + 40]),
                                                          encoding="utf-8")
    train_tokenizer([str(docs)], 512, str(root / "tokenizer"))
    preprocess([str(docs)], str(root / "tokenizer.model"), str(root / "sample"),
               append_eod=True, progress=False)
    return str(root / "sample"), str(root / "tokenizer.model")
