"""The device that the ``cuda``-marked tests compare with the CPU.

``ZTT_CHECK_DEVICE=cuda`` runs them on the visible CUDA device (and fails if there is none);
``ZTT_CHECK_DEVICE=cpu`` runs them on the CPU, where the parity checks compare the CPU with
itself but training, export and generation really run (``bash bench/gpu_check.sh --cpu``
does this, so that every line of the checks is exercised without a GPU). Unset: CUDA when a
device is visible, otherwise the tests skip, saying why. Call it at a test module's top level,
so that the skip comes before any fixture (torch.distributed takes seconds to start).

The reference side of every comparison stays on the CPU: the test process itself keeps
``ZTT_DEVICE=cpu`` (tests/conftest.py), and a model is moved to the checked device with
``.to(device)``. Only subprocesses (the DeepSpeed training run) get ``ZTT_DEVICE`` set to the
checked device.
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_ztt.parallel import runtime

SWITCH = "ZTT_CHECK_DEVICE"


def check_device() -> torch.device:
    wanted = os.environ.get(SWITCH, "").strip().lower()
    if wanted not in ("", "cpu", "cuda"):
        raise ValueError(f"{SWITCH} must be cpu or cuda, got {wanted!r}")
    if wanted == "cpu":
        return torch.device("cpu")
    if runtime.cuda_visible():
        return torch.device("cuda")
    if wanted == "cuda":
        pytest.fail(f"{SWITCH}=cuda but no CUDA device is visible", pytrace=False)
    # at import (collection) time: before any fixture starts torch.distributed
    pytest.skip(f"no CUDA device is visible ({SWITCH}=cpu runs these checks on the CPU; "
                "bash bench/gpu_check.sh --cpu does)", allow_module_level=True)
