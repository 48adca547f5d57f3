"""Run a `ztt` command as on a full disk: RLIMIT_FSIZE makes every write past ``limit`` bytes
per file fail with OSError (EFBIG), as ENOSPC would; no root or special mount needed."""

import os
import subprocess
import sys

from conftest import REPO

_FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from megatron_ztt.cli import main
sys.exit(main(sys.argv[2:]))
"""


def ztt_on_full_disk(limit: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", _FULL_DISK, str(limit), *args],
                          capture_output=True, text=True, env=env, timeout=300)
