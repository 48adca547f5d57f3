"""Initial values that do not depend on the parallel layout."""

from __future__ import annotations

import contextlib
import zlib

import torch


@contextlib.contextmanager
def init_scope(name: str):
    """Draw the initial values of the module built inside from a stream of its own.

    The stream depends only on the run's seed and ``name`` (``layer3``, ``embedding``, ...),
    not on which other modules this rank builds first, so every parallel layout (a pipeline
    stage builds only its own part) starts from the same weights.
    """
    seed = (torch.initial_seed() + zlib.crc32(name.encode())) % 2**63
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
