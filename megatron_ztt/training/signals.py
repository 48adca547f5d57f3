"""Stop requests from the scheduler: SIGTERM (preemption, scancel) and SIGUSR1 (SLURM's
warning before the time limit, ``--signal=USR1@<seconds>``).

The handler only records the signal; the training loop asks :meth:`StopRequest.agreed` once
per iteration, which all-reduces the flag so that every rank stops after the same step even
if the signal reached only some of them.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from megatron_ztt.parallel import runtime

HANDLED = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _record(self, signum, _frame):
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> str | None:
        """Collective: the signal name if any rank received one, else None."""
        code = torch.tensor([0 if self.signal_name is None else
                             HANDLED.index(getattr(signal, self.signal_name)) + 1],
                            device=runtime.current_device())
        if dist.is_initialized():
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
        if code.item() == 0:
            return None
        self.signal_name = HANDLED[code.item() - 1].name
        return self.signal_name
