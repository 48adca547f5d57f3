"""Zero Token Transformer (ZTT) for Hugging Face transformers.

This file ships inside every exported model directory and needs only torch and transformers.

    x = embed(tokens)
    x = head(x)                                  # cycle_mode "head_tail" (layer 1, once)
    for c in 1..C:                               # every cycle reuses the middle layers' weights
        y = middle_c(x)                          # layers 2..L-1, with cycle c's zero keys
        x = x + g_c * (y - x)                    # g_c = sigmoid(w_c . rmsnorm(y) + b_c), per token
        stop cycling once the exit signal crosses exit_threshold (per token)
    logits = lm_head(norm(tail(x)))              # layer L, once

Zero token: every layer application has its own key ``k_z`` (one per key/value group, never
rotated) whose value is all zeros, visible to every query. It adds nothing to the output; the
share of attention it takes (the *zero attention*) says how little the layer wants to change
the token. The keys of all applications are ``model.zero_keys[<application name>]``.

Key/value cache: one cache layer per layer application (head, every cycle of every middle
layer, tail), i.e. ``config.num_hidden_layers`` of them. Each cache layer holds its
application's zero key in row 0 (:class:`ZeroTokenCacheLayer`), so a decoding step is one
plain SDPA call per application.

The cycle loop (gate, exits, the order of applications) is ``cycle_engine.py`` next to this
file: the very file the training code runs, copied in by the exporter.

Early exit (``exit_threshold``, ``exit_signal``, ``exit_mode``: from the config or per call /
per ``generate``): after cycle c < C each token's exit signal is compared with the threshold
(``cycle_engine.EXIT_SIGNALS``): ``zero_attention`` (the zero attention of the cycle's middle
layers averaged over heads and layers) and ``zero_attention_relative`` (the zero key's weight
over the average real key's) exit when >= threshold; ``hidden_change`` (relative change of the
token's state over the cycle) and ``random`` (a seeded draw, threshold = exit probability)
when < threshold. ``exit_mode="token"`` (the default) stops each token on its own, causally;
``exit_mode="sequence"`` averages it further over the tokens of the forward call (the prompt
at prefill, the new token at each decoding step) and stops the whole row. A token that stops
after cycle c keeps its state from cycle c, runs the tail, and -- because later tokens that
run deeper still attend to it -- serves the cycles it skipped with the key/values of its last
computed cycle (same layer), in the cache too. The skipped cycles are not computed: each
cycle runs on the tokens still cycling only (at a decoding step, the rows still cycling).
Outputs carry ``cycles_used`` per token; after
``generate`` the model holds ``generation_cycles_used`` [batch, new tokens] and
``mean_cycles_used``.

Depth dial (``num_cycles``, per call / per ``generate``, default ``config.inference_num_cycles``
or the trained ``config.num_cycles``): run 1 .. 2C cycles; cycles beyond the trained C reuse
cycle C's zero keys and gate. The cache then holds one layer per application of that depth,
so one cache serves one depth: passing a cache filled at another depth is an error.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .configuration_ztt import ZTTConfig
from .cycle_engine import (CycleEngine, CycleGate, ExitHead, ExitRule, application_plan,
                           check_exit_signal, check_num_cycles, keep_exited_kv, with_zero_key,
                           zero_key_attention)

try:  # transformers' init helpers skip weights that were loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older transformers
    from torch.nn import init

# transformers 5.x renamed the cache argument from `past_key_values` to `cache`; take either.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# --------------------------------------------------------------------------- rotary embedding
def rotary_cos_sin(position_ids, head_dim, base, dtype):
    """cos/sin [batch, 1, seq, head_dim], rotate-half layout (as Megatron and Llama)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                            device=position_ids.device) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------- cache and attention
class ZeroTokenCacheLayer(DynamicLayer):
    """A DynamicLayer whose row 0 is the application's zero key, with a zero value.

    Keeping the zero key in the cache spares every decoding step a concatenation of the whole
    cache; ``get_seq_length`` still counts tokens only.
    """

    def __init__(self, zero_key: torch.Tensor):
        super().__init__()
        self.zero_key = zero_key.detach()  # [key/value groups, head_dim]

    def lazy_initialization(self, key_states, value_states, *args, **kwargs):
        super().lazy_initialization(key_states, value_states)
        batch, groups, _, head_dim = key_states.shape
        self.keys = self.zero_key.to(key_states.dtype)[None, :, None, :].expand(
            batch, groups, 1, head_dim).contiguous()
        self.values = value_states.new_zeros(batch, groups, 1, value_states.shape[-1])

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the new tokens' key/values. They are written into a buffer with room to grow
        (doubling), and ``keys``/``values`` are views of its filled part: a decoding step
        copies its own rows only, where ``torch.cat`` would copy the whole cache of every
        application at every step."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        filled, new = self.keys.shape[-2], key_states.shape[-2]
        buffers = getattr(self, "_storage", None)
        if not (buffers is not None and self._views_of(buffers)
                and buffers[0].shape[-2] >= filled + new):
            buffers = tuple(self._grown(t, max(filled + new, 2 * filled))
                            for t in (self.keys, self.values))
            self._storage = buffers
        buffers[0][..., filled:filled + new, :] = key_states
        buffers[1][..., filled:filled + new, :] = value_states
        self.keys = buffers[0][..., :filled + new, :]
        self.values = buffers[1][..., :filled + new, :]
        return self.keys, self.values

    def _views_of(self, buffers) -> bool:
        """Whether ``keys``/``values`` still are the buffers' filled part (transformers'
        cache methods, e.g. ``batch_select_indices``, may have replaced them)."""
        return all(t.data_ptr() == b.data_ptr() and t.shape[:2] == b.shape[:2]
                   and t.stride() == b.stride() for t, b in zip((self.keys, self.values), buffers))

    @staticmethod
    def _grown(tensor, capacity):
        grown = tensor.new_empty(*tensor.shape[:2], capacity, tensor.shape[-1])
        grown[..., :tensor.shape[-2], :] = tensor
        return grown

    def get_seq_length(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        return self.keys.shape[-2] - 1


class AttentionLayout:
    """How the queries of one forward call see the keys; the same for every application.

    - ``prefill``: no earlier tokens, no padding. With a zero token, a dummy query is put next
      to the zero key, which turns "every query sees k_z and the keys up to itself" into a
      square causal mask, so SDPA's fused causal kernel applies.
    - ``decode``: one new token per row, no padding: it sees every key, no mask at all.
    - ``masked``: anything else (padding, several new tokens after a cache): a boolean mask.
    """

    def __init__(self, kind, zero_token, mask=None, padded=False):
        self.kind, self.zero_token, self.mask, self.padded = kind, zero_token, mask, padded

    @classmethod
    def build(cls, attention_mask, past, length, zero_token, device):
        # the forward's one host sync outside the cycles (none without an attention mask)
        padded = attention_mask is not None and not bool(attention_mask.all())
        if not padded and past == 0:
            return cls("prefill", zero_token)
        if not padded and length == 1:
            return cls("decode", zero_token)
        return cls("masked", zero_token, cls.allowed(attention_mask, past, length, zero_token,
                                                      device, padded), padded)

    def for_active(self, active, attention_mask, past, length, batch, device):
        """The layout of the block of tokens still cycling (``ActiveTokens``), whose queries
        see every token's keys: one new token per row stays a mask-free decode step."""
        if self.kind == "decode":
            return self
        mask = self.mask if self.kind == "masked" else self.allowed(
            attention_mask, past, length, self.zero_token, device, self.padded)
        mask = mask.expand(batch, -1, -1, -1)
        return AttentionLayout("masked", self.zero_token,
                               active.gather(mask, batch_axis=0, seq_axis=2))

    @staticmethod
    def allowed(attention_mask, past, length, zero_token, device, padded):
        """[batch or 1, 1, length, (1 +) past + length] bool: the keys each query sees."""
        total = past + length
        key_pos = torch.arange(total, device=device)
        query_pos = torch.arange(past, total, device=device)
        allowed = (key_pos[None, :] <= query_pos[:, None])[None, None]  # [1, 1, q, total]
        if padded:
            allowed = allowed & attention_mask[:, None, None, :].bool()
            if not zero_token:  # a left-pad query would see no key at all: let it see itself
                allowed = allowed | (key_pos[None, :] == query_pos[:, None])
        if zero_token:
            allowed = torch.cat([allowed.new_ones(*allowed.shape[:-1], 1), allowed], dim=-1)
        return allowed

    def attend(self, query, keys, values, scale, zero_attention=False):
        """-> (output [b, heads, q, d], zero attention [b, heads, q] or None)."""
        return zero_key_attention(query, keys, values, scale, zero_token=self.zero_token,
                                  mask=self.mask, causal=self.kind == "prefill",
                                  zero_attention=zero_attention)


class ZTTAttention(nn.Module):
    def __init__(self, config: ZTTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        width = config.hidden_size
        bias = getattr(config, "qkv_bias", False)  # exports before qkv_bias have none
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, width, bias=False)

    def forward(self, hidden, cos, sin, layout, zero_key=None, cache=None, cache_index=None,
                kv_store=None, kv_layer=None, active=None, exited=None, zero_attention=False):
        """-> (output, zero attention [b, heads, q] or None).

        ``kv_store`` (early exit): the layer's key/values of this call's tokens, where tokens
        that left keep their last computed cycle's (``keep_exited_kv``); ``active``
        (``ActiveTokens``): ``hidden`` is the block of the tokens still cycling, whose rows
        attend over every token; ``exited`` [b, q]: every token computed (the reference).
        """
        batch, length, _ = hidden.shape
        query = self.q_proj(hidden).view(batch, length, self.num_heads, self.head_dim)
        key = self.k_proj(hidden).view(batch, length, self.num_kv_heads, self.head_dim)
        value = self.v_proj(hidden).view(batch, length, self.num_kv_heads, self.head_dim)
        query = apply_rotary(query.transpose(1, 2), cos, sin)
        key = apply_rotary(key.transpose(1, 2), cos, sin)
        value = value.transpose(1, 2)
        if kv_store is not None:
            key, value = keep_exited_kv(kv_store, kv_layer, key, value, active, exited)
        if cache is not None:  # a zero-token cache layer holds the zero key in row 0
            keys, values = cache.update(key, value, cache_index)
        elif zero_key is not None:
            keys, values = with_zero_key(key, value, zero_key)
        else:
            keys, values = key, value
        if active is not None and not active.every_row and layout.kind == "decode" \
                and 3 * active.rows.numel() > keys.shape[0]:
            # a decoding step where most rows still cycle: their queries in a zero query
            # batch over the whole cache read its rows once, where gathering the cycling rows'
            # cache first reads (and writes) them again
            rows = active.rows
            every_query = query.new_zeros(keys.shape[0], *query.shape[1:]).index_copy_(0, rows, query)
            out, probs = layout.attend(every_query, keys, values, self.scale, zero_attention)
            out, probs = out[rows], None if probs is None else probs[rows]
        else:
            if active is not None and not active.every_row:
                keys, values = keys[active.rows], values[active.rows]
            out, probs = layout.attend(query, keys, values, self.scale, zero_attention)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out), probs


# --------------------------------------------------------------------------- blocks
def make_norm(config: ZTTConfig) -> nn.Module:
    if config.normalization == "LayerNorm":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)


class ZTTMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); GeLU: down(gelu(up(x)))."""

    def __init__(self, config: ZTTConfig):
        super().__init__()
        self.swiglu = config.activation == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class ZTTDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm transformer layer: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: ZTTConfig):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = ZTTAttention(config)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = ZTTMLP(config)

    def forward(self, hidden, **attention_args):
        attended, zero_attention = self.self_attn(self.input_layernorm(hidden), **attention_args)
        hidden = hidden + attended
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, zero_attention


# --------------------------------------------------------------------------- models
@dataclass
class ZTTModelOutput(ModelOutput):
    last_hidden_state: Optional[torch.FloatTensor] = None
    cache: Optional[Cache] = None
    # embeddings, then the state after every layer application (head, each cycle's layers, tail)
    hidden_states: Optional[tuple] = None
    cycles_used: Optional[torch.LongTensor] = None  # [batch, tokens of this call]


@dataclass
class ZTTCausalLMOutput(CausalLMOutputWithPast):
    cycles_used: Optional[torch.LongTensor] = None  # [batch, tokens of this call]


class ZTTPreTrainedModel(PreTrainedModel):
    config: ZTTConfig
    config_class = ZTTConfig
    base_model_prefix = "model"
    _no_split_modules = ["ZTTDecoderLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CycleGate):  # starts (almost) fully open
            init.zeros_(module.weight)
            init.constant_(module.bias, self.config.gate_bias_init)
        elif isinstance(module, ZTTModel) and module.zero_keys is not None:
            for key in module.zero_keys.values():
                init.normal_(key, mean=0.0, std=self.config.initializer_range)


class ZTTModel(ZTTPreTrainedModel):
    def __init__(self, config: ZTTConfig):
        super().__init__(config)
        self.plan = application_plan(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ZTTDecoderLayer(config) for _ in range(config.num_layers))
        self.zero_keys = nn.ParameterDict(
            {app.name: nn.Parameter(torch.zeros(config.num_key_value_heads, config.head_dim))
             for app in self.plan}) if config.zero_token else None
        self.gates = nn.ModuleList(
            CycleGate(config.hidden_size, config.gate_bias_init, config.norm_eps)
            for _ in range(config.num_cycles)) if config.gate else None
        self.norm = make_norm(config)
        self.engine = CycleEngine(self.plan, num_cycles=config.num_cycles,
                                  num_heads=config.num_attention_heads, gates=self.gates)
        # exit_signal=trained's head (a model trained with model.exit_objective)
        self.exit_head = (ExitHead(config.num_cycles - 1)
                          if getattr(config, "exit_objective", "none") != "none" else None)
        self.engine.exit_head = self.exit_head
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _adopt_cache(self, cache: Cache, plan, num_cycles: int) -> None:
        """Give every application of ``plan`` a cache layer (with a zero token: one that holds
        its zero key in row 0). A cache serves the depth it was first filled at."""
        filled_at = getattr(cache, "ztt_num_cycles", None)
        if cache.get_seq_length() > 0 and filled_at not in (None, num_cycles):
            raise ValueError(f"num_cycles={num_cycles}, but this cache was filled at "
                             f"num_cycles={filled_at}: keep num_cycles fixed over a generation "
                             f"or pass a fresh cache")
        cache.ztt_num_cycles = num_cycles
        layers = cache.layers
        for app in plan:
            present = app.index < len(layers)
            if not self.config.zero_token:
                if not present:
                    layers.append(DynamicLayer())
                continue
            if present and isinstance(layers[app.index], ZeroTokenCacheLayer):
                continue
            if present and layers[app.index].get_seq_length() > 0:
                raise ValueError(f"cache layer {app.index} already holds keys without this "
                                 f"model's zero token; pass a fresh cache")
            layer = ZeroTokenCacheLayer(self.zero_keys[app.name])
            if present:
                layers[app.index] = layer
            else:
                layers.append(layer)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, exit_threshold=None, exit_mode=None,
                exit_signal=None, num_cycles=None, past_key_values=None,
                output_hidden_states=None, output_attentions=None, return_dict=None,
                **kwargs) -> ZTTModelOutput:
        config = self.config
        if num_cycles is None:
            num_cycles = config.inference_num_cycles or config.num_cycles
        num_cycles = check_num_cycles(num_cycles, config.num_cycles)
        plan = self.plan if num_cycles == config.num_cycles else application_plan(config, num_cycles)
        if output_attentions:
            raise NotImplementedError(
                "ZTT computes attention with fused scaled_dot_product_attention kernels and "
                "does not return attention weights (output_attentions=True); the zero "
                "attention per token is what early exit reads, see cycles_used")
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden.shape[:2]
        device = hidden.device
        if use_cache is None:
            use_cache = config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        if cache is not None:
            self._adopt_cache(cache, plan, num_cycles)
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] != past + length:
                raise ValueError(f"attention_mask must be [batch, cached + new tokens] = "
                                 f"[{batch}, {past + length}], got {tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is not None:  # left padding: count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                position_ids = torch.arange(past, past + length, device=device)[None]
        cos, sin = rotary_cos_sin(position_ids, config.head_dim, config.rope_theta, hidden.dtype)
        layout = AttentionLayout.build(attention_mask, past, length, config.zero_token, device)

        threshold = config.exit_threshold if exit_threshold is None else exit_threshold
        mode = exit_mode or config.exit_mode
        signal = exit_signal or config.exit_signal
        exit_rule = None
        if threshold is not None:
            check_exit_signal(signal, config.zero_token)
            weights = None
            if attention_mask is not None and mode == "sequence":
                weights = attention_mask[:, -length:].to(torch.float32)
            # each query's position among its row's real tokens: it sees that many + 1 keys
            if attention_mask is not None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                positions = torch.arange(past, past + length, device=device)[None].expand(batch, -1)
            exit_rule = ExitRule(float(threshold), mode, token_axis=1, token_weights=weights,
                                 signal=signal, positions=positions, seed=config.exit_seed)

        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        all_hidden = [hidden] if output_hidden_states else None
        kv_store = {}  # middle layer -> (key, value) of each token's last computed cycle

        def run(app, states, state, record):
            app_cos, app_sin, app_layout = cos, sin, layout
            tokens = state.active
            if tokens is not None:  # ``states`` is the block of tokens still cycling
                app_cos, app_sin = tokens.memo("rotary", lambda: tuple(
                    tokens.gather(t.expand(batch, -1, -1, -1), batch_axis=0, seq_axis=2)
                    for t in (cos, sin)))
                app_layout = tokens.memo("layout", lambda: layout.for_active(
                    tokens, attention_mask, past, length, batch, device))
            exits = exit_rule is not None and app.cycle is not None
            states, zero_attention = self.layers[app.layer](
                states, cos=app_cos, sin=app_sin, layout=app_layout,
                zero_key=self.zero_keys[app.name] if self.zero_keys is not None else None,
                cache=cache, cache_index=app.index, kv_store=kv_store if exits else None,
                kv_layer=app.layer, active=tokens,
                exited=state.exited if exits and state.overwrite_exited else None,
                zero_attention=record)
            return states, None if zero_attention is None else zero_attention.float().sum(dim=1)

        def skip(app, state):  # every token has left: the cache still needs this layer's rows
            if cache is not None:
                cache.update(*kv_store[app.layer], app.index)

        def keep(state):  # the state after each application (gated, exits kept)
            all_hidden.append(state.hidden)

        policy = self.engine.policy(exit_rule)
        state = self.engine.begin(hidden, policy, num_cycles)
        state = self.engine.run(plan, state, run, policy, skip=skip,
                                after=keep if all_hidden is not None else None)
        output = ZTTModelOutput(last_hidden_state=self.norm(state.hidden), cache=cache,
                                hidden_states=tuple(all_hidden) if all_hidden else None,
                                cycles_used=state.cycles_used)
        return output if return_dict is not False else output.to_tuple()


class ZTTForCausalLM(ZTTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ZTTConfig):
        super().__init__(config)
        self.model = ZTTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # exit_signal=kl reads the next-token distribution of a state: norm + lm_head
        self.model.engine.readout = lambda states: self.lm_head(self.model.norm(states))
        self._cycle_log = None  # filled during generate()
        self.generation_cycles_used = None  # [batch, new tokens] after generate()
        self.mean_cycles_used = None
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                exit_threshold=None, exit_mode=None, exit_signal=None, num_cycles=None,
                past_key_values=None, output_hidden_states=None, output_attentions=None,
                return_dict=None, num_items_in_batch=None, **kwargs):
        """``num_items_in_batch`` (passed by transformers' Trainer under gradient
        accumulation) makes the loss a sum over the batch's tokens divided by that count, so
        that accumulated gradients equal the full batch's."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, exit_threshold=exit_threshold,
                         exit_mode=exit_mode, exit_signal=exit_signal, num_cycles=num_cycles,
                         past_key_values=past_key_values,
                         output_hidden_states=output_hidden_states,
                         output_attentions=output_attentions, return_dict=True)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size,
                                      num_items_in_batch=num_items_in_batch)
        if self._cycle_log is not None:  # the last position is the one that predicts
            self._cycle_log.append(out.cycles_used[:, -1])
        output = ZTTCausalLMOutput(loss=loss, logits=logits, cycles_used=out.cycles_used,
                                   hidden_states=out.hidden_states,
                                   **{_CACHE_FIELD: out.cache})
        return output if return_dict is not False else output.to_tuple()

    def generate(self, *args, **kwargs):
        """transformers' generate; also records the cycles each new token used.

        Early-exit and depth settings pass through as keyword arguments:
        ``generate(ids, exit_threshold=0.5, exit_mode="token", exit_signal="zero_attention",
        num_cycles=6)``.
        """
        self._cycle_log = []
        try:
            output = super().generate(*args, **kwargs)
        finally:
            log, self._cycle_log = self._cycle_log, None
        self.generation_cycles_used = torch.stack(log, dim=1) if log else None
        self.mean_cycles_used = (float(self.generation_cycles_used.float().mean())
                                 if log else None)
        return output


__all__ = ["ZTTForCausalLM", "ZTTModel", "ZTTPreTrainedModel"]
