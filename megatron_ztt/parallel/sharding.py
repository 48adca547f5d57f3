"""Tensor-parallel shards <-> full tensors.

megatron-core marks every split parameter with ``tensor_model_parallel``, ``partition_dim``
and ``partition_stride``. A stride of k means the full tensor is cut into k * tp pieces
along that dimension and rank r holds pieces r, r + tp, ... (SwiGLU's fc1 uses k = 2 so that
each rank holds matching halves of the gate and up projections). The export, the checkpoint
converter and the layout tests all go through these functions.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

PartitionSpec = Dict[str, Tuple[int, int]]  # parameter name -> (partition dim, stride)


def partition_spec(module: torch.nn.Module) -> PartitionSpec:
    """Which parameters of ``module`` are split over tensor-parallel ranks, and how."""
    return {
        name: (int(param.partition_dim), int(getattr(param, "partition_stride", 1)))
        for name, param in module.named_parameters()
        if getattr(param, "tensor_model_parallel", False)
    }


def merge_shards(shards: List[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Rank-ordered shards -> the full tensor."""
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([pieces[r][s] for s in range(stride) for r in range(len(shards))], dim=dim)


def split_full(full: torch.Tensor, rank: int, size: int, dim: int, stride: int = 1) -> torch.Tensor:
    """The piece of ``full`` that tensor-parallel ``rank`` of ``size`` holds."""
    if full.shape[dim] % (size * stride):
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} cannot be split into "
                         f"{size} ranks x stride {stride}")
    pieces = full.chunk(size * stride, dim=dim)
    return torch.cat(pieces[rank::size], dim=dim).clone()


def _gather(module: torch.nn.Module, tensor_of) -> Dict[str, torch.Tensor]:
    spec = partition_spec(module)
    size = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    full = {}
    for name, param in module.named_parameters():
        tensor = tensor_of(param)
        if tensor is None:
            continue
        if name in spec and size > 1:
            shards = [torch.empty_like(tensor) for _ in range(size)]
            dist.all_gather(shards, tensor.contiguous(), group=group)
            tensor = merge_shards(shards, *spec[name])
        full[name] = tensor.clone()
    return full


def gather_full_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Full tensors of every parameter, on every rank of the tensor-parallel group.

    Collective over the tensor-parallel group. Buffers and ``_extra_state`` entries are left
    out: the model has no buffers that carry learned state.
    """
    return _gather(module, lambda param: param.detach())


def gather_full_grads(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Full gradients (parameters without a gradient are left out); for layout tests."""
    return _gather(module, lambda param: None if param.grad is None else param.grad.detach())


@torch.no_grad()
def load_full_state_dict(module: torch.nn.Module, full: Dict[str, torch.Tensor],
                         strict: bool = True) -> None:
    """Copy full tensors into this rank's shards. ``strict``: every parameter must be given."""
    spec = partition_spec(module)
    size = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(full))
    unexpected = sorted(set(full) - set(params))
    if strict and (missing or unexpected):
        raise KeyError(f"state dict does not match the model: missing {missing[:8]}, "
                       f"unexpected {unexpected[:8]}")
    for name, param in params.items():
        if name not in full:
            continue
        tensor = full[name]
        if name in spec:
            tensor = split_full(tensor, rank, size, *spec[name])
        if tensor.shape != param.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not match "
                             f"the model's {tuple(param.shape)} on this rank")
        param.copy_(tensor.to(param.dtype))
