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

from megatron_ztt.model.cycle_engine import ActiveTokens, Application
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
    # Set while some tokens have left: the queries, keys and values are only those of the
    # tokens still cycling (``ActiveTokens``' block), the attention reads every token.
    active: Optional[ActiveTokens] = None

    def fill_in_exited(self, key: torch.Tensor, value: torch.Tensor):
        """key/value [b, groups, s, d] -> the same with exited tokens' entries replaced.

        With ``active``: key/value are the block's, [r, groups, n, d]; they are written into
        the stored ones (the tokens that left keep theirs) -> every token's, [b, groups, s, d].
        """
        if self.kv_store is None:
            return key, value
        if self.active is not None:
            last_key, last_value = self.kv_store[self.kv_layer]
            key = self.active.scatter(last_key, key, batch_axis=0, seq_axis=2)
            value = self.active.scatter(last_value, value, batch_axis=0, seq_axis=2)
        elif self.exited is not None and self.kv_layer in self.kv_store and bool(self.exited.any()):
            last_key, last_value = self.kv_store[self.kv_layer]
            left = self.exited[:, None, :, None]
            key, value = torch.where(left, last_key, key), torch.where(left, last_value, value)
        self.kv_store[self.kv_layer] = (key, value)
        return key, value


def zero_token_attention(query, key, value, zero_key, scale, dropout_p=0.0, active=None):
    """Causal attention over ``[k_z; K]`` with a zero value for ``k_z``.

    query [b, heads, s, d]; key/value [b, groups, s, d]; zero_key [groups, d].
    A dummy query is prepended next to the zero key, which turns "every query sees k_z and
    the keys up to itself" into a plain square causal mask, so the fused causal kernels of
    ``scaled_dot_product_attention`` apply.

    ``active`` (ActiveTokens): the queries are its block [r, heads, n, d], the keys/values
    every token's; each query sees k_z and the keys up to its own position (a boolean mask).
    Returns (output, (query, key, mask) for :func:`zero_attention_probability`).
    """
    b, heads, _, d = query.shape
    groups = key.shape[1]
    mask = None
    if active is not None:
        key, value = key[active.rows], value[active.rows]
        mask = active.memo("causal_mask", lambda: _block_causal_mask(active, key.shape[2]))
    else:
        query = torch.cat([query.new_zeros(b, heads, 1, d), query], dim=2)
    zk = zero_key.to(key.dtype)[None, :, None, :].expand(b, groups, 1, d)
    k1 = torch.cat([zk, key], dim=2)
    v1 = torch.cat([value.new_zeros(b, groups, 1, value.shape[-1]), value], dim=2)
    out = F.scaled_dot_product_attention(query, k1, v1, attn_mask=mask, dropout_p=dropout_p,
                                         is_causal=mask is None, scale=scale,
                                         enable_gqa=heads != groups)
    return (out if mask is not None else out[:, :, 1:]), (query, k1, mask)


def _block_causal_mask(active, length: int) -> torch.Tensor:
    """[r, 1, n, 1 + length]: each slot of the block sees the zero key and its causal keys."""
    keys = torch.arange(length, device=active.positions.device)
    causal = keys[None, None, :] <= active.positions[..., None]
    return torch.cat([causal.new_ones(*causal.shape[:2], 1), causal], dim=-1)[:, None]


@torch.no_grad()
def zero_attention_probability(query, key, mask, scale):
    """Softmax probability of the zero key (key row 0) for every query: [b, heads, s].

    Run with a one-hot value (1 on the zero key) through the same kernel, so that no
    [s, s] score matrix is materialised. ``mask`` None: the causal layout with the dummy
    query in front (see :func:`zero_token_attention`).
    """
    b, heads = query.shape[:2]
    groups = key.shape[1]
    indicator = key.new_zeros(b, groups, key.shape[2], 1)
    indicator[:, :, 0, 0] = 1
    probs = F.scaled_dot_product_attention(query, key, indicator, attn_mask=mask,
                                           is_causal=mask is None, scale=scale,
                                           enable_gqa=heads != groups)[..., 0]
    return probs if mask is not None else probs[:, :, 1:]


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
                out, (q1, k1, mask) = zero_token_attention(q, k, v, context.key, self.scale,
                                                           dropout_p, active=context.active)
                if context.record:
                    probs = zero_attention_probability(q1.detach(), k1.detach(), mask, self.scale)
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
