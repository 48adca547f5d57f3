"""Configuration of a Zero Token Transformer exported for Hugging Face transformers.

This file ships inside every exported model directory and needs only transformers.

Vocabulary: the exported embedding holds exactly ``vocab_size`` rows (the training run's
padding rows are dropped at export).

Depth: ``num_layers`` distinct layers. With ``cycle_mode="head_tail"`` layer 1 (head) and
layer L (tail) run once and layers 2..L-1 run ``num_cycles`` times; with ``"basic"`` the whole
stack runs ``num_cycles`` times; ``"vanilla"`` runs each layer once. ``num_hidden_layers`` is
derived: the number of layer *applications* per token, which is also the number of entries
in the key/value cache (transformers sizes its caches from that name).
"""

from transformers import PretrainedConfig

from .cycle_engine import CYCLE_MODES, EXIT_MODES, check_exit_signal, check_num_cycles, cycled_layers


class ZTTConfig(PretrainedConfig):
    model_type = "ztt"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_layers=4,
        num_attention_heads=8,
        num_key_value_heads=None,
        qkv_bias=False,
        num_cycles=3,
        cycle_mode="head_tail",
        zero_token=True,
        gate=True,
        normalization="RMSNorm",
        norm_eps=1e-5,
        activation="swiglu",
        rope_theta=10000.0,
        max_position_embeddings=2048,
        gate_bias_init=4.0,
        exit_threshold=None,
        exit_mode="token",
        exit_signal="zero_attention",
        exit_seed=0,
        exit_objective="none",
        inference_num_cycles=None,
        initializer_range=0.02,
        use_cache=True,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.qkv_bias = qkv_bias  # biases on q_proj, k_proj, v_proj (o_proj has none)
        self.num_cycles = num_cycles
        self.cycle_mode = cycle_mode
        self.zero_token = zero_token
        self.gate = gate
        self.normalization = normalization
        self.norm_eps = norm_eps
        self.activation = activation
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.gate_bias_init = gate_bias_init
        # Early exit at inference: stop cycling once the mean zero attention of a cycle's
        # middle block reaches this value (None: run every cycle). "sequence" decides per
        # sequence over the tokens of each forward call, "token" per token.
        self.exit_threshold = exit_threshold
        self.exit_mode = exit_mode
        # What the threshold is compared with (cycle_engine.EXIT_SIGNALS): "zero_attention"
        # and "zero_attention_relative" exit when >= threshold, "hidden_change" and "random"
        # when < threshold (for "random" the threshold is the exit probability per cycle,
        # drawn from exit_seed).
        self.exit_signal = exit_signal
        self.exit_seed = exit_seed
        # "none", or the objective that trained the exit head exit_signal=trained reads
        self.exit_objective = exit_objective
        # Depth dial: cycles run by default (the forward/generate kwarg num_cycles overrides
        # it), 1 .. 2 * num_cycles; None runs the trained num_cycles. Cycles beyond
        # num_cycles reuse the last trained cycle's zero keys and gate.
        self.inference_num_cycles = inference_num_cycles
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        # Derived (see the module docstring); a saved value is recomputed, not trusted.
        saved_depth = kwargs.pop("num_hidden_layers", None)
        kwargs.pop("head_dim", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        self._validate()
        if saved_depth is not None and saved_depth != self.num_hidden_layers:
            raise ValueError(f"config.json: num_hidden_layers={saved_depth} does not match the "
                             f"{self.num_hidden_layers} layer applications that num_layers="
                             f"{num_layers}, num_cycles={num_cycles}, cycle_mode={cycle_mode!r} run")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def cycled_layers(self):
        """0-based distinct layers that every cycle runs."""
        return cycled_layers(self.cycle_mode, self.num_layers)

    @property
    def num_hidden_layers(self):
        extra = 2 if self.cycle_mode == "head_tail" else 0
        return extra + self.num_cycles * len(self.cycled_layers)

    def _validate(self):
        def fail(message):
            raise ValueError(f"ZTTConfig: {message}")

        if self.cycle_mode not in CYCLE_MODES:
            fail(f"cycle_mode must be one of {CYCLE_MODES}, got {self.cycle_mode!r}")
        if self.cycle_mode == "head_tail" and self.num_layers < 3:
            fail(f"cycle_mode='head_tail' needs num_layers >= 3, got {self.num_layers}")
        if self.exit_mode not in EXIT_MODES:
            fail(f"exit_mode must be one of {EXIT_MODES}, got {self.exit_mode!r}")
        try:
            signal = check_exit_signal(self.exit_signal)
            if self.inference_num_cycles is not None:
                check_num_cycles(self.inference_num_cycles, self.num_cycles)
        except ValueError as error:
            fail(f"{'inference_' if 'num_cycles' in str(error) else ''}{error}")
        if self.exit_threshold is not None and signal.reads_zero_attention and not self.zero_token:
            fail(f"exit_threshold with exit_signal={self.exit_signal} reads the zero attention, "
                 f"so it needs zero_token=True")
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            fail(f"normalization must be RMSNorm or LayerNorm, got {self.normalization!r}")
        if self.activation not in ("swiglu", "gelu"):
            fail(f"activation must be swiglu or gelu, got {self.activation!r}")
        if self.hidden_size % self.num_attention_heads:
            fail(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                 f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            fail(f"num_key_value_heads {self.num_key_value_heads} must divide "
                 f"num_attention_heads {self.num_attention_heads}")
