"""The model configuration: one dataclass, validated when it is built."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

from megatron_ztt.model.cycle_engine import (CYCLE_MODES, EXIT_OBJECTIVES, check_exit_signal,
                                             cycled_layers)

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
ACTIVATIONS = ("swiglu", "gelu")


class ConfigError(ValueError):
    """A setting, or a combination of settings, that cannot work. The message names it."""


@dataclass
class ZTTConfig:
    """Zero Token Transformer hyper-parameters.

    ``cycle_mode`` picks the architecture family: ``vanilla`` (L layers once), ``basic``
    (the whole stack of L layers cycled C times) or ``head_tail`` (layer 1 and layer L once,
    layers 2..L-1 cycled C times). ``zero_token`` and ``gate`` switch on the ZTT parts, so
    ZTT itself is ``head_tail`` + ``zero_token`` + ``gate``.
    """

    vocab_size: int = 32000
    hidden_size: int = 512
    ffn_hidden_size: Optional[int] = None  # None: 8/3 * hidden for SwiGLU, 4 * hidden for GeLU
    num_layers: int = 4  # distinct layers L
    num_attention_heads: int = 8
    num_query_groups: Optional[int] = None  # key/value groups for GQA; None: one per head
    seq_length: int = 256
    num_cycles: int = 3  # C
    cycle_mode: str = "head_tail"
    zero_token: bool = True
    gate: bool = True
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    activation: str = "swiglu"
    rotary_base: float = 10000.0
    tie_embeddings: bool = True
    # Biases on the query, key and value projections (Qwen2); megatron-core's add_qkv_bias.
    qkv_bias: bool = False
    # Weight of the LM loss after each cycle (length C). None: only the final cycle counts.
    exit_loss_weights: Optional[List[float]] = None
    init_std: float = 0.02
    # Gate bias at init: sigmoid(4) = 0.98, so every cycle starts (almost) fully open.
    gate_bias_init: float = 4.0
    # Default early-exit threshold for inference; None runs every cycle.
    exit_threshold: Optional[float] = None
    # What the exit threshold is compared with (cycle_engine.EXIT_SIGNALS): zero_attention,
    # zero_attention_relative (exit when >= threshold), hidden_change, random (exit when <).
    exit_signal: str = "zero_attention"
    exit_seed: int = 0  # seeds exit_signal=random
    # --- cheaper exit losses and a trained exit (model/exit_losses.py, issue 24)
    # Share of positions (per row, drawn per step) whose intermediate exit losses count,
    # scaled to stay unbiased; the final loss always reads every position.
    exit_loss_fraction: float = 1.0
    # A trained exit (exit_policy.ExitHead, read by exit_signal=trained): "none" or
    # "next_cycle_gain" (predict whether the next cycle lowers the token's loss by more than
    # exit_objective_margin nats; its own loss, weighted by exit_objective_weight, reaches
    # only the exit head).
    exit_objective: str = "none"
    exit_objective_margin: float = 0.0
    exit_objective_weight: float = 0.1
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # Vocabulary rows are padded to a multiple of this (kept independent of the parallel
    # layout so that checkpoints of every layout hold tensors of the same shapes).
    make_vocab_size_divisible_by: int = 128
    activation_checkpointing: bool = False

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.activation == "swiglu":
            return 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        return 4 * self.hidden_size

    @property
    def padded_vocab_size(self) -> int:
        step = self.make_vocab_size_divisible_by
        return step * math.ceil(self.vocab_size / step)

    @property
    def cycled_layers(self) -> List[int]:
        """0-based indices of the distinct layers that every cycle runs."""
        return cycled_layers(self.cycle_mode, self.num_layers)

    @property
    def num_applications(self) -> int:
        """Layer applications per forward pass: 2 + C(L-2) for head_tail, C*L otherwise."""
        extra = 2 if self.cycle_mode == "head_tail" else 0
        return extra + self.num_cycles * len(self.cycled_layers)

    @property
    def exit_weights(self) -> List[float]:
        if self.exit_loss_weights is None:
            return [0.0] * (self.num_cycles - 1) + [1.0]
        return [float(w) for w in self.exit_loss_weights]

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        def fail(setting, message):
            raise ConfigError(f"model.{setting}: {message}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                     "seq_length", "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}")
        if self.cycle_mode not in CYCLE_MODES:
            fail("cycle_mode", f"must be one of {', '.join(CYCLE_MODES)}, got {self.cycle_mode!r}")
        if self.num_cycles < 1:
            fail("num_cycles", f"must be >= 1, got {self.num_cycles}")
        if self.cycle_mode == "vanilla" and self.num_cycles != 1:
            fail("num_cycles", f"cycle_mode=vanilla runs each layer once, so num_cycles must be 1 "
                 f"(got {self.num_cycles}); use cycle_mode=basic or head_tail to cycle")
        if self.cycle_mode == "head_tail" and self.num_layers < 3:
            fail("num_layers", f"cycle_mode=head_tail needs a head, a tail and at least one "
                 f"middle layer: num_layers >= 3, got {self.num_layers}")
        if self.gate and self.cycle_mode == "vanilla":
            fail("gate", "the gate blends each cycle's update and cycle_mode=vanilla has no "
                 "cycles; set gate=false or cycle_mode=basic/head_tail")
        if self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", f"hidden_size {self.hidden_size} is not divisible by "
                 f"num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 2:
            fail("num_attention_heads", f"rotary embeddings need an even head size, got "
                 f"{self.head_dim} (= hidden_size / num_attention_heads)")
        if self.num_query_groups is not None and (
                self.num_query_groups < 1 or self.num_attention_heads % self.num_query_groups):
            fail("num_query_groups", f"must divide num_attention_heads "
                 f"({self.num_attention_heads}), got {self.num_query_groups}")
        if self.normalization not in NORMALIZATIONS:
            fail("normalization", f"must be one of {', '.join(NORMALIZATIONS)}, got "
                 f"{self.normalization!r}")
        if self.activation not in ACTIVATIONS:
            fail("activation", f"must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size < 1:
            fail("ffn_hidden_size", f"must be >= 1, got {self.ffn_hidden_size}")
        for name in ("init_std", "rotary_base", "norm_epsilon"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                fail(name, f"must be a finite number > 0, got {value}")
        if not math.isfinite(self.gate_bias_init):
            fail("gate_bias_init", f"must be a finite number, got {self.gate_bias_init}")
        if self.exit_loss_weights is not None:
            weights = self.exit_weights
            if len(weights) != self.num_cycles:
                fail("exit_loss_weights", f"needs one weight per cycle ({self.num_cycles}), "
                     f"got {len(weights)}")
            if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
                fail("exit_loss_weights", f"weights must be >= 0 with a positive sum, got {weights}")
        fraction = self.exit_loss_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
                0.0 < fraction <= 1.0):
            fail("exit_loss_fraction", f"must be a number in (0, 1] (the share of positions "
                 f"whose intermediate exit losses count), got {fraction!r}")
        self.validate_exit_objective(fail)
        try:
            signal = check_exit_signal(self.exit_signal)
        except ValueError as error:
            fail("exit_signal", str(error))
        if self.exit_threshold is not None:
            if signal.reads_zero_attention and not self.zero_token:
                fail("exit_threshold", f"early exit on exit_signal={self.exit_signal} reads the "
                     f"zero attention, so it needs zero_token=true (or exit_signal="
                     f"hidden_change / random)")
            if math.isnan(self.exit_threshold) or self.exit_threshold < 0:
                fail("exit_threshold", f"must be a number >= 0, got {self.exit_threshold}")
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0 <= getattr(self, name) < 1:
                fail(name, f"must be in [0, 1), got {getattr(self, name)}")

    def validate_exit_objective(self, fail) -> None:
        if self.exit_objective not in EXIT_OBJECTIVES:
            fail("exit_objective", f"must be one of {', '.join(EXIT_OBJECTIVES)}, got "
                 f"{self.exit_objective!r}")
        for name in ("exit_objective_margin", "exit_objective_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                fail(name, f"must be a finite number >= 0, got {value!r}")
        if self.exit_objective == "none":
            if self.exit_signal == "trained":
                fail("exit_signal", "trained reads the exit head that model.exit_objective "
                     "trains; set model.exit_objective=next_cycle_gain")
            return
        if not self.zero_token or self.num_cycles < 2:
            fail("exit_objective", "the exit head reads the zero attention between cycles: it "
                 "needs zero_token=true and num_cycles >= 2")
        if self.exit_objective_weight <= 0:
            fail("exit_objective_weight", f"must be > 0 with exit_objective="
                 f"{self.exit_objective}, got {self.exit_objective_weight}")
        if any(w <= 0 for w in self.exit_weights):
            fail("exit_objective", f"its targets compare every cycle's exit loss, so "
                 f"exit_loss_weights must be positive for every cycle, got {self.exit_weights}")

    def check_parallel_layout(self, tensor_parallel: int, pipeline_parallel: int = 1) -> None:
        """Fail early, naming the setting, if the model cannot be split this way."""

        def fail(message):
            raise ConfigError(f"parallel layout (parallel.tensor={tensor_parallel}, "
                              f"parallel.pipeline={pipeline_parallel}): {message}")

        if tensor_parallel < 1 or pipeline_parallel < 1:
            fail("sizes must be >= 1")
        if self.num_attention_heads % tensor_parallel:
            fail(f"model.num_attention_heads ({self.num_attention_heads}) is not divisible by "
                 f"parallel.tensor")
        if self.query_groups % tensor_parallel:
            fail(f"model.num_query_groups ({self.query_groups}) is not divisible by "
                 f"parallel.tensor (zero tokens are split over ranks by key/value group)")
        if self.ffn_size % tensor_parallel:
            fail(f"the FFN size ({self.ffn_size}) is not divisible by parallel.tensor")
        if self.padded_vocab_size % tensor_parallel:
            fail(f"the padded vocabulary ({self.padded_vocab_size}) is not divisible by "
                 f"parallel.tensor; raise model.make_vocab_size_divisible_by")
        if pipeline_parallel > 1 and self.exit_objective != "none":
            fail(f"model.exit_objective={self.exit_objective} is built for one pipeline stage "
                 f"(its features and targets meet on no one stage of the circular pipeline); "
                 f"use parallel.pipeline=1")
        if pipeline_parallel > 1:
            # The circular pipeline splits the cycled block over the stages, each stage
            # holding its slice once (parallel/circular.py): head_tail cycles layers 2..L-1,
            # basic all L layers, vanilla runs its L layers as one cycle.
            cycled = len(self.cycled_layers)
            block = (f"the {cycled} cycled layers (layers 2..{self.num_layers - 1} with "
                     f"cycle_mode=head_tail)" if self.cycle_mode == "head_tail" else
                     f"the {cycled} layers (cycle_mode={self.cycle_mode} cycles all of them)")
            if pipeline_parallel > cycled:
                fail(f"more pipeline stages than cycled layers: {block} give each stage at "
                     f"most one; use parallel.pipeline <= {cycled}")
            if cycled % pipeline_parallel:
                fail(f"{block} do not split evenly over {pipeline_parallel} stages (each stage "
                     f"holds an equal slice of the cycled block); choose parallel.pipeline "
                     f"dividing {cycled}")

