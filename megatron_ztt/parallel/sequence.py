"""Sequence parallelism (megatron-core's ``sequence_parallel``, Korthikanti et al. 2022).

With ``parallel.sequence_parallel=true`` the activations between the tensor-parallel regions
(layer norms, residuals, dropout, the gate, the kept exit states) are split along the sequence
over the tensor-parallel group, [s/t, b, d] per rank. A column-parallel linear all-gathers its
input (and reduce-scatters the input's gradient), a row-parallel linear reduce-scatters its
output instead of all-reducing it; the embedding's output is split, the loss gathers.
Parameters replicated over the tensor-parallel group (norm weights, gates) then see only
their rank's tokens: their gradients are summed over the group once per step
(:func:`all_reduce_replicated_grads`, :class:`DeferredReplicatedGradSum`), as megatron-core's
``finalize_model_grads`` does for the parameters it marks ``sequence_parallel``.

Why not megatron-core's own mappings and its linears' ``sequence_parallel`` path: they
allocate their buffers on the current CUDA device (``tensor_parallel/mappings.py``,
``get_global_memory_buffer`` in ``LinearWithGradAccumulationAndAsyncCommunication``), so they
cannot run on CPU/gloo. The functions here are the same collectives
(``all_gather_into_tensor``, ``reduce_scatter_tensor``) on the input's own device.
"""

from __future__ import annotations

from typing import Dict, Iterable, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def _group():
    return parallel_state.get_tensor_model_parallel_group()


def _size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def all_gather_sequence(shard: torch.Tensor) -> torch.Tensor:
    """[s/t, ...] on each rank -> [s, ...] (rank order); no gradient."""
    if _size() == 1:
        return shard
    full = shard.new_empty((shard.shape[0] * _size(), *shard.shape[1:]))
    dist.all_gather_into_tensor(full, shard.contiguous(), group=_group())
    return full


def _reduce_scatter(full: torch.Tensor) -> torch.Tensor:
    if _size() == 1:
        return full
    shard = full.new_empty((full.shape[0] // _size(), *full.shape[1:]))
    dist.reduce_scatter_tensor(shard, full.contiguous(), group=_group())
    return shard


def _split(full: torch.Tensor) -> torch.Tensor:
    if _size() == 1:
        return full
    length = full.shape[0] // _size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    return full[rank * length:(rank + 1) * length].contiguous()


class _ScatterToSequenceShards(torch.autograd.Function):
    """Replicated [s, ...] -> this rank's [s/t, ...]; backward all-gathers."""

    @staticmethod
    def forward(ctx, full):
        return _split(full)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_sequence(grad)


class _GatherSequenceShards(torch.autograd.Function):
    """[s/t, ...] -> [s, ...] for a tensor-parallel consumer (each rank's gradient is a
    partial sum): backward reduce-scatters."""

    @staticmethod
    def forward(ctx, shard):
        return all_gather_sequence(shard)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad)


class _ReduceScatterToSequenceShards(torch.autograd.Function):
    """Partial sums [s, ...] -> this rank's summed [s/t, ...]; backward all-gathers."""

    @staticmethod
    def forward(ctx, partial):
        return _reduce_scatter(partial)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_sequence(grad)


class _GatheredLinear(torch.autograd.Function):
    """all_gather(x) @ W^T keeping only the shard x for backward (which gathers it again),
    as megatron-core's linear does under sequence parallelism: the gathered [s, b, d] input
    is never held between forward and backward."""

    @staticmethod
    def forward(ctx, shard, weight):
        ctx.save_for_backward(shard, weight)
        return torch.matmul(all_gather_sequence(shard), weight.t())

    @staticmethod
    def backward(ctx, grad):
        shard, weight = ctx.saved_tensors
        grad_input = _reduce_scatter(grad.matmul(weight))
        grad_weight = None
        if ctx.needs_input_grad[1]:
            full = all_gather_sequence(shard)
            grad_weight = grad.reshape(-1, grad.shape[-1]).t().matmul(
                full.reshape(-1, full.shape[-1]))
        return grad_input, grad_weight


def scatter_to_sequence_shards(full: torch.Tensor) -> torch.Tensor:
    return _ScatterToSequenceShards.apply(full)


def gather_sequence_shards(shard: torch.Tensor) -> torch.Tensor:
    return _GatherSequenceShards.apply(shard)


def reduce_scatter_to_sequence_shards(partial: torch.Tensor) -> torch.Tensor:
    return _ReduceScatterToSequenceShards.apply(partial)


def gathered_linear(shard: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _GatheredLinear.apply(shard, weight)


def set_sequence_parallel(module: torch.nn.Module, on: bool) -> None:
    """Switch every sequence-parallel part of ``module`` (``shards_sequence``) on or off."""
    for sub in module.modules():
        if hasattr(sub, "shards_sequence"):
            sub.shards_sequence = on


# --------------------------------------------------------------------------- gradients
def replicated_parameters(module: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The trained parameters held whole on every tensor-parallel rank (megatron-core's
    ``tensor_model_parallel`` unset): under sequence parallelism each sees its rank's tokens
    only, so its gradient is a partial sum over the group."""
    return [p for p in module.parameters()
            if p.requires_grad and not getattr(p, "tensor_model_parallel", False)]


def all_reduce_replicated_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the replicated parameters' gradients over the tensor-parallel group, one
    collective per dtype (no host read)."""
    if _size() == 1:
        return
    by_dtype: Dict[torch.dtype, List[torch.nn.Parameter]] = {}
    for param in params:
        if param.grad is not None:
            by_dtype.setdefault(param.grad.dtype, []).append(param)
    for group in by_dtype.values():
        grads = [p.grad for p in group]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=_group())
        for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(summed)


class DeferredReplicatedGradSum:
    """The dense engine's sum over the tensor-parallel group of the replicated parameters'
    gradients, once per step.

    DeepSpeed takes each micro batch's gradients inside its backward (ZeRO-2/3 reduce and
    free them there), so no point after the step's last backward still holds them. A hook
    on each parameter therefore keeps the micro batches' contributions itself (handing
    DeepSpeed zeros) and, in the step's last backward (``last_micro_batch``), hands it their
    total summed over the group: one all-reduce per parameter and step.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.last_micro_batch = True
        self.pending: Dict[int, torch.Tensor] = {}
        self.handles = [p.register_hook(self._hook(id(p))) for p in params]

    def _hook(self, key: int):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            earlier = self.pending.pop(key, None)
            total = grad.to(torch.float32, copy=True) if earlier is None else earlier + grad
            if not self.last_micro_batch:
                self.pending[key] = total
                return torch.zeros_like(grad)
            dist.all_reduce(total, group=_group())
            return total.to(grad.dtype)
        return hook
