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
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule

from megatron_ztt.model.cycle_engine import (ActiveTokens, Application, keep_exited_kv,
                                             with_zero_key, zero_key_attention)
from megatron_ztt.model.seeding import init_scope


@dataclass
class ZeroTokenContext:
    """Per-call input (this application's zero key, the exit state) and output (its zero
    attention)."""

    key: Optional[torch.Tensor]  # [local key/value groups, head_dim], or None: no zero token
    record: bool = False
    # Filled in by the core attention when ``record``: sum over this rank's heads of the
    # zero attention, [batch, seq] (the block's while ``active``).
    zero_attention_sum: Optional[torch.Tensor] = None
    # Early exit: tokens that left the cycles attend no more, but later tokens still see them
    # through the key/value of their last computed cycle of this layer, kept in
    # ``kv_store[kv_layer]`` (``keep_exited_kv``, the export's rule too). ``active``: the
    # queries, keys and values are the block of the tokens still cycling; ``exited`` [b, s]:
    # every token computed (the reference).
    kv_store: Optional[Dict[int, tuple]] = None
    kv_layer: int = -1
    active: Optional[ActiveTokens] = None
    exited: Optional[torch.Tensor] = None


def block_causal_mask(active: ActiveTokens, length: int, zero_token: bool) -> torch.Tensor:
    """[r, 1, n, (1 +) length]: each slot of the block sees (the zero key and) its causal keys."""
    keys = torch.arange(length, device=active.positions.device)
    causal = keys[None, None, :] <= active.positions[..., None]
    if zero_token:
        causal = torch.cat([causal.new_ones(*causal.shape[:2], 1), causal], dim=-1)
    return causal[:, None]


class ZeroTokenCoreAttention(MegatronModule):
    """Drop-in core attention for megatron-core's ``SelfAttention`` (any device): the shipped
    ``zero_key_attention`` on megatron-core's layout."""

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
        context = attention_bias or ZeroTokenContext(key=None)
        active = context.active
        if context.kv_store is not None:
            k, v = keep_exited_kv(context.kv_store, context.kv_layer, k, v, active, context.exited)
        mask = None
        if active is not None:  # the block's queries read every token's keys of their rows
            if not active.every_row:
                k, v = k[active.rows], v[active.rows]
            mask = active.memo("causal_mask", lambda: block_causal_mask(
                active, k.shape[2], context.key is not None))
        if context.key is not None:
            k, v = with_zero_key(k, v, context.key)
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p else contextlib.nullcontext():
            out, probs = zero_key_attention(q, k, v, self.scale, zero_token=context.key is not None,
                                            mask=mask, causal=True, zero_attention=context.record,
                                            dropout_p=dropout_p)
        if probs is not None:
            context.zero_attention_sum = probs.sum(dim=1)
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
