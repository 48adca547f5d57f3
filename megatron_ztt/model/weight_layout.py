"""The canonical full state dict's names and shapes, and megatron-core's fused QKV layout.

One place for what the HF export (canonical -> Hugging Face names) and the HF import (Hugging
Face -> canonical) both need: the tensors a complete model holds, and how Q, K and V sit in
``linear_qkv``. megatron-core fuses them per key/value group: for each of the ``g`` groups,
the rows of its ``n / g`` query heads, then its key head, then its value head
(``[q_0 .. q_{n/g-1}, k, v]`` x g). The same layout holds for the weight (rows x hidden) and
the bias (rows).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from megatron_ztt.model.config import ZTTConfig
from megatron_ztt.model.cycle_engine import EXIT_HEAD_FEATURES, application_plan


def expected_canonical_shapes(config: ZTTConfig) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor a complete canonical full state dict holds."""
    d, ffn = config.hidden_size, config.ffn_size
    heads, groups, head_dim = config.num_attention_heads, config.query_groups, config.head_dim
    fc1_rows = 2 * ffn if config.activation == "swiglu" else ffn
    norm_parts = ("weight", "bias") if config.normalization == "LayerNorm" else ("weight",)
    shapes = {"embedding.word_embeddings.weight": (config.padded_vocab_size, d)}
    for i in range(config.num_layers):
        prefix = f"layers.{i}."
        for norm in ("input_layernorm", "pre_mlp_layernorm"):
            for part in norm_parts:
                shapes[f"{prefix}{norm}.{part}"] = (d,)
        shapes[prefix + "self_attention.linear_qkv.weight"] = ((heads + 2 * groups) * head_dim, d)
        if config.qkv_bias:
            shapes[prefix + "self_attention.linear_qkv.bias"] = ((heads + 2 * groups) * head_dim,)
        shapes[prefix + "self_attention.linear_proj.weight"] = (d, heads * head_dim)
        shapes[prefix + "mlp.linear_fc1.weight"] = (fc1_rows, d)
        shapes[prefix + "mlp.linear_fc2.weight"] = (d, ffn)
    if config.zero_token:
        for app in application_plan(config):
            shapes[f"zero_token_pool.keys.{app.name}"] = (groups, head_dim)
    if config.gate:
        for c in range(config.num_cycles):
            shapes[f"gates.{c}.weight"] = (d,)
            shapes[f"gates.{c}.bias"] = (1,)
    if config.exit_objective != "none":
        shapes["exit_head.weight"] = (config.num_cycles - 1, EXIT_HEAD_FEATURES)
        shapes["exit_head.bias"] = (config.num_cycles - 1,)
    for part in norm_parts:
        shapes[f"output_head.final_norm.{part}"] = (d,)
    if not config.tie_embeddings:
        shapes["output_head.output_layer.weight"] = (config.padded_vocab_size, d)
    return shapes


def split_qkv(fused: torch.Tensor, config: ZTTConfig) -> Tuple[torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    """``linear_qkv`` weight [(n + 2g)h, d] or bias [(n + 2g)h] -> (q [nh, ...], k [gh, ...],
    v [gh, ...]), heads in order."""
    groups, head_dim = config.query_groups, config.head_dim
    q_rows = config.num_attention_heads // groups * head_dim
    per_group = fused.reshape(groups, q_rows + 2 * head_dim, *fused.shape[1:])
    rest = fused.shape[1:]
    return (per_group[:, :q_rows].reshape(-1, *rest),
            per_group[:, q_rows:q_rows + head_dim].reshape(-1, *rest),
            per_group[:, q_rows + head_dim:].reshape(-1, *rest))


def fuse_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             config: ZTTConfig) -> torch.Tensor:
    """The inverse of :func:`split_qkv`: separate Q, K, V (weights or biases) -> the fused
    ``linear_qkv`` tensor, grouped per key/value group."""
    groups = config.query_groups
    rest = query.shape[1:]
    per_group = [t.reshape(groups, -1, *rest) for t in (query, key, value)]
    return torch.cat(per_group, dim=1).reshape(-1, *rest).contiguous()
