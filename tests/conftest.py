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
