"""Zero-token attention and the Zero-Token Pool.

Every attention application (layer l at cycle c) gets one extra key ``k_z`` whose value is
all zeros, visible to every query. It never adds anything to the output; the share of
attention it takes (the *zero attention*) says how little the layer wants to change a token.

The core attention plugs into megatron-core's ``SelfAttention`` through its layer spec. The
layer's weights are shared by every cycle, but each application has its own ``k_z``, so the
key is handed over per call: megatron-core forwards the ``attention_bias`` argument of
``TransformerLayer.forward`` untouched to the core attention, and we pass a
:class:`ZeroTokenContext` through that channel. The context also carries the zero attention
back out when statistics are asked for.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule

from megatron_ztt.model.cycle_engine import Application
from megatron_ztt.model.seeding import init_scope


@dataclass
class ZeroTokenContext:
    """Per-call input (this application's zero key) and output (its zero attention)."""

    key: Optional[torch.Tensor]  # [local key/value groups, head_dim], or None: no zero token
    record: bool = False
    # Filled in by the core attention when ``record``: sum over this rank's heads of the
    # zero attention, [batch, seq], and how many heads that sum covers.
    zero_attention_sum: Optional[torch.Tensor] = None
    heads: int = 0
    # Early exit: tokens that left the cycles ([batch, seq] bool) attend no more, but later
    # tokens still see them through the key/value of their last computed cycle of this layer,
    # kept in ``kv_store[kv_layer]`` (the same rule as the export's cache).
    exited: Optional[torch.Tensor] = None
    kv_store: Optional[Dict[int, tuple]] = None
    kv_layer: int = -1

    def fill_in_exited(self, key: torch.Tensor, value: torch.Tensor):
        """key/value [b, groups, s, d] -> the same with exited tokens' entries replaced."""
        if self.kv_store is None:
            return key, value
        if self.exited is not None and self.kv_layer in self.kv_store and bool(self.exited.any()):
            last_key, last_value = self.kv_store[self.kv_layer]
            left = self.exited[:, None, :, None]
            key, value = torch.where(left, last_key, key), torch.where(left, last_value, value)
        self.kv_store[self.kv_layer] = (key, value)
        return key, value


def zero_token_attention(query, key, value, zero_key, scale, dropout_p=0.0):
    """Causal attention over ``[k_z; K]`` with a zero value for ``k_z``.

    query [b, heads, s, d]; key/value [b, groups, s, d]; zero_key [groups, d].
    A dummy query is prepended next to the zero key, which turns "every query sees k_z and
    the keys up to itself" into a plain square causal mask, so the fused causal kernels of
    ``scaled_dot_product_attention`` apply.
    """
    b, heads, _, d = query.shape
    groups = key.shape[1]
    zk = zero_key.to(key.dtype)[None, :, None, :].expand(b, groups, 1, d)
    q1 = torch.cat([query.new_zeros(b, heads, 1, d), query], dim=2)
    k1 = torch.cat([zk, key], dim=2)
    v1 = torch.cat([value.new_zeros(b, groups, 1, value.shape[-1]), value], dim=2)
    out = F.scaled_dot_product_attention(q1, k1, v1, dropout_p=dropout_p, is_causal=True,
                                         scale=scale, enable_gqa=heads != groups)
    return out[:, :, 1:], (q1, k1)


@torch.no_grad()
def zero_attention_probability(shifted_query, shifted_key, scale):
    """Softmax probability of the zero key for every query: [b, heads, s].

    Run with a one-hot value (1 on the zero key) through the same kernel, so that no
    [s, s] score matrix is materialised.
    """
    b, heads, s1, _ = shifted_query.shape
    groups = shifted_key.shape[1]
    indicator = shifted_key.new_zeros(b, groups, s1, 1)
    indicator[:, :, 0, 0] = 1
    probs = F.scaled_dot_product_attention(shifted_query, shifted_key, indicator, is_causal=True,
                                           scale=scale, enable_gqa=heads != groups)
    return probs[:, :, 1:, 0]


class ZeroTokenCoreAttention(MegatronModule):
    """Drop-in core attention for megatron-core's ``SelfAttention`` (any device)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type="self",
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None, **_unused):
        super().__init__(config=config)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias: Optional[ZeroTokenContext] = None, packed_seq_params=None):
        # megatron-core layout [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0
        context = attention_bias
        if context is not None:
            k, v = context.fill_in_exited(k, v)
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p else contextlib.nullcontext():
            if context is None or context.key is None:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                                     scale=self.scale,
                                                     enable_gqa=q.shape[1] != k.shape[1])
            else:
                out, (q1, k1) = zero_token_attention(q, k, v, context.key, self.scale, dropout_p)
                if context.record:
                    probs = zero_attention_probability(q1.detach(), k1.detach(), self.scale)
                    context.zero_attention_sum = probs.sum(dim=1).float()
                    context.heads = probs.shape[1]
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class ZeroTokenPool(torch.nn.Module):
    """The trainable zero keys, one per layer application, indexed by application name.

    Each tensor-parallel rank holds the key/value groups (hence heads) it owns; a pipeline
    stage builds the pool for its own applications only.
    """

    def __init__(self, applications: Iterable[Application], query_groups: int, head_dim: int,
                 init_std: float):
        super().__init__()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        local = query_groups // tp_size
        self.keys = torch.nn.ParameterDict()
        for app in applications:
            # Drawn at full size from a stream of its own and then sliced, so that every
            # layout (tensor split, pipeline stage) gets the same values.
            with init_scope(f"zero_key.{app.name}"):
                full = torch.empty(query_groups, head_dim).normal_(0.0, init_std)
            param = torch.nn.Parameter(full[tp_rank * local:(tp_rank + 1) * local].clone())
            tensor_parallel.set_tensor_model_parallel_attributes(param, True, 0, 1)
            self.keys[app.name] = param

    def __getitem__(self, name: str) -> torch.nn.Parameter:
        return self.keys[name]

    def __contains__(self, name: str) -> bool:
        return name in self.keys
