"""The unrolled sequence of layer applications that one forward pass runs.

The model, the pipeline partitioner and the Hugging Face export all walk this list, so the
order of applications (and the name of each one's zero token) is decided here only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from megatron_ztt.model.config import ZTTConfig


@dataclass(frozen=True)
class Application:
    """One run of one distinct layer. ``cycle`` is None for the head and the tail."""

    index: int  # position in the unrolled sequence
    layer: int  # 0-based distinct layer
    cycle: Optional[int]  # 0-based cycle, None for head/tail
    starts_cycle: bool = False
    ends_cycle: bool = False

    @property
    def name(self) -> str:
        """Key of this application's zero token in the Zero-Token Pool (1-based, readable)."""
        if self.cycle is None:
            return "head" if self.layer == 0 else "tail"
        return f"cycle{self.cycle + 1}_layer{self.layer + 1}"


def application_plan(config: ZTTConfig) -> List[Application]:
    plan: List[Application] = []

    def add(layer, cycle, starts=False, ends=False):
        plan.append(Application(len(plan), layer, cycle, starts, ends))

    if config.cycle_mode == "head_tail":
        add(0, None)
    cycled = config.cycled_layers
    for cycle in range(config.num_cycles):
        for position, layer in enumerate(cycled):
            add(layer, cycle, starts=position == 0, ends=position == len(cycled) - 1)
    if config.cycle_mode == "head_tail":
        add(config.num_layers - 1, None)
    return plan


def tail_applications(plan: List[Application]) -> List[Application]:
    """Applications after the last cycle: they run on every exit path."""
    last_cycle_end = max(a.index for a in plan if a.ends_cycle)
    return [a for a in plan if a.index > last_cycle_end]
