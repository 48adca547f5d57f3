"""Building blocks of the model, from megatron-core parts.

Shared by the whole model (``ztt.py``) and the pipeline stages (``parallel/circular.py``) so
that both run exactly the same modules.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_ztt.model.attention import ZeroTokenCoreAttention
from megatron_ztt.model.config import ZTTConfig
from megatron_ztt.parallel.sequence import (gather_sequence_shards, gathered_linear,
                                            reduce_scatter_to_sequence_shards,
                                            scatter_to_sequence_shards)


def tensor_parallel_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def all_reduce_tensor_parallel(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the tensor-parallel group (statistics only: no gradient flows through it)."""
    if tensor_parallel_size() > 1:
        tensor = tensor.detach().clone()
        dist.all_reduce(tensor, group=parallel_state.get_tensor_model_parallel_group())
    return tensor


def rng_tracker_checkpoint_contexts():
    """``context_fn`` for ``torch.utils.checkpoint``: the recompute in backward draws the same
    dropout masks as the forward.

    torch restores its own generator for the recompute, but attention dropout draws from
    megatron-core's RNG tracker (a separate stream per tensor-parallel rank), which torch
    does not know about: without this, the recompute used other masks than the forward.
    """
    tracker = tensor_parallel.get_cuda_rng_tracker()
    at_forward: dict = {}

    @contextlib.contextmanager
    def forward():
        at_forward.update(tracker.get_states())
        yield

    @contextlib.contextmanager
    def recompute():
        after_forward = tracker.get_states()
        tracker.set_states(at_forward)
        try:
            yield
        finally:
            tracker.set_states(after_forward)

    return forward(), recompute()


def transformer_config(config: ZTTConfig) -> TransformerConfig:
    """megatron-core's config for one layer, with the fused CUDA-only kernels turned off."""
    swiglu = config.activation == "swiglu"
    return TransformerConfig(
        # Init scaling follows the depth the residual stream really sees: applications.
        num_layers=config.num_applications,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.query_groups,
        kv_channels=config.head_dim,
        normalization=config.normalization,
        layernorm_epsilon=config.norm_epsilon,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=config.qkv_bias,
        attention_dropout=config.attention_dropout,
        hidden_dropout=config.hidden_dropout,
        init_method_std=config.init_std,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        # Weights are drawn at full size on the CPU and then sliced: every parallel layout
        # starts from the same values, and the CPU path needs no CUDA RNG.
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )


class ColumnLinear(tensor_parallel.ColumnParallelLinear):
    """megatron-core's column-parallel linear; with ``shards_sequence`` (sequence
    parallelism, ``parallel/sequence.py``) its input is this rank's sequence shard, gathered
    for the product (megatron-core's own sequence-parallel path needs CUDA)."""

    shards_sequence = False

    def parallel_input(self, input_: torch.Tensor) -> torch.Tensor:
        """What megatron-core's linear does to its input before the product, for a caller
        that multiplies by the weight itself (the fused output loss): the sequence gathered
        under sequence parallelism, else identity with the gradient summed over the group."""
        if self.shards_sequence:
            return gather_sequence_shards(input_)
        return tensor_parallel.copy_to_tensor_model_parallel_region(input_)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not self.shards_sequence:
            return super().forward(input_, weight=weight,
                                   runtime_gather_output=runtime_gather_output)
        weight = self.weight if weight is None else weight
        output = gathered_linear(input_, weight)
        if self.bias is not None and not self.skip_bias_add:
            output = output + self.bias
        return output, self.bias if self.skip_bias_add else None


class RowLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's row-parallel linear; with ``shards_sequence`` its partial outputs are
    reduce-scattered to sequence shards instead of all-reduced."""

    shards_sequence = False

    def forward(self, input_):
        if not self.shards_sequence:
            return super().forward(input_)
        output = reduce_scatter_to_sequence_shards(torch.matmul(input_, self.weight.t()))
        if self.bias is not None and not self.skip_bias_add:
            output = output + self.bias
        return output, self.bias if self.skip_bias_add else None


def layer_spec(config: ZTTConfig):
    """megatron-core's local (no Transformer Engine) GPT layer with our core attention and
    linears that can run sequence parallel."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Apex is not installed": the torch norm is intended
        spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=config.normalization))
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = ZeroTokenCoreAttention
    attention.linear_qkv, attention.linear_proj = ColumnLinear, RowLinear
    mlp = spec.submodules.mlp.submodules
    mlp.linear_fc1, mlp.linear_fc2 = ColumnLinear, RowLinear
    return spec


def build_transformer_layer(config: ZTTConfig, layer_index: int) -> TransformerLayer:
    spec = layer_spec(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerLayer(transformer_config(config), spec.submodules,
                                layer_number=layer_index + 1)


def build_norm(config: ZTTConfig) -> torch.nn.Module:
    spec = layer_spec(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_module(spec.submodules.input_layernorm, config=transformer_config(config),
                            hidden_size=config.hidden_size, eps=config.norm_epsilon)


def rotary_embedding(config: ZTTConfig, seq_len: int, device, offset: int = 0) -> torch.Tensor:
    """RoPE angles in megatron-core's layout [s, 1, 1, head_dim] (rotate-half convention).

    megatron-core's ``RotaryEmbedding`` moves its frequencies to CUDA, so the angles are
    computed here and handed to its device-neutral ``apply_rotary_pos_emb``.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                                          device=device) / dim))
    positions = torch.arange(offset, offset + seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(positions, inv_freq)
    return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]


class TokenEmbedding(torch.nn.Module):
    """Vocabulary-parallel word embedding: ids [b, s] -> hidden [s, b, d] (with
    ``shards_sequence``: this rank's [s/t, b, d])."""

    shards_sequence = False

    def __init__(self, config: ZTTConfig):
        super().__init__()
        megatron_config = transformer_config(config)
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            config.padded_vocab_size, config.hidden_size,
            init_method=megatron_config.init_method, config=megatron_config)

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.word_embeddings(input_ids).transpose(0, 1).contiguous()
        # megatron-core reduce-scatters here instead of all-reducing and splitting; its
        # reduce-scatter needs CUDA, and the all-reduce inside the embedding is its own
        return scatter_to_sequence_shards(hidden) if self.shards_sequence else hidden


class OutputHead(torch.nn.Module):
    """Final norm + vocabulary-parallel output projection: [s, b, d] -> logits [s, b, V/tp].

    ``loss`` computes the language-model loss of hidden states directly, without the logits.
    """

    def __init__(self, config: ZTTConfig):
        super().__init__()
        self.tie_embeddings = config.tie_embeddings
        self.final_norm = build_norm(config)
        megatron_config = transformer_config(config)
        self.output_layer = ColumnLinear(
            config.hidden_size, config.padded_vocab_size, config=megatron_config,
            init_method=megatron_config.init_method, bias=False, gather_output=False,
            skip_weight_param_allocation=config.tie_embeddings)

    def projection_weight(self, embedding_weight: torch.Tensor | None) -> torch.Tensor:
        if not self.tie_embeddings:
            return self.output_layer.weight
        if embedding_weight is None:
            raise ValueError("tied embeddings: pass the word embedding weight to the output head")
        return embedding_weight

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor | None = None):
        weight = self.projection_weight(embedding_weight)
        logits, _ = self.output_layer(self.final_norm(hidden), weight=weight)
        return logits

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor,
             loss_mask: torch.Tensor | None = None,
             embedding_weight: torch.Tensor | None = None,
             denominator: torch.Tensor | None = None,
             objective_weights: torch.Tensor | None = None):
        """``language_model_loss(self(hidden), labels, loss_mask)`` without the logits:
        hidden [s, b, d], labels/loss_mask [b, s] -> mean token cross entropy.

        ``denominator``: divide the summed token losses by this instead of by this micro
        batch's counted tokens (the per-token loss over a global batch, ``counted_tokens``).
        ``objective_weights`` [b, s]: returns (the loss with these token weights instead of
        the mask, which the gradient follows; the loss, a value), one pass for both."""
        weight = self.projection_weight(embedding_weight)
        normed = self.final_norm(hidden)
        # as in the linear: each rank holds a slice of the vocabulary, so the input gradient
        # sums over the tensor-parallel ranks (and the sequence is gathered, if split)
        normed = self.output_layer.parallel_input(normed)
        labels = labels.transpose(0, 1).reshape(-1)
        mask = None if loss_mask is None else loss_mask.transpose(0, 1).reshape(-1)
        objective = (None if objective_weights is None
                     else objective_weights.transpose(0, 1).reshape(-1))
        total = OutputCrossEntropy.apply(normed.reshape(-1, normed.shape[-1]), weight, labels,
                                         mask, torch.is_grad_enabled(), objective)
        if objective is not None:
            if denominator is None:
                denominator = counted_tokens(labels, mask)
            return total[0] / denominator, total[1] / denominator
        if denominator is not None:
            return total / denominator
        if mask is None:
            return total / labels.numel()
        return total / mask.to(total.dtype).sum().clamp(min=1.0)


def counted_tokens(labels: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Tokens whose loss counts (fp32 scalar on the labels' device, no host read)."""
    if loss_mask is None:
        return torch.tensor(float(labels.numel()), device=labels.device)
    return loss_mask.to(torch.float32).sum()


# Output-layer rows x vocabulary entries of one chunk's logits (fp32: 4 MiB), small enough
# to stay in cache on a CPU and to keep the logits' memory flat on a GPU.
OUTPUT_CHUNK_ELEMENTS = 1 << 20


class OutputCrossEntropy(torch.autograd.Function):
    """sum_t m_t * CE(h_t W^T, y_t) over tokens t, never holding the whole [tokens, vocab]
    logits: chunk by chunk of tokens, the chunk's logits, its losses (megatron-core's
    vocab-parallel cross entropy: max, target logit and sum of exponentials reduced over the
    tensor-parallel group) and, when gradients are wanted, their gradients w.r.t. h and W.

    The gradients are computed in the forward: the output is one scalar, so backward only
    scales them by its incoming gradient, and the logits need not be kept or recomputed.
    hidden [N, d] (this rank's copy), weight [V/tp, d] (this rank's vocabulary slice),
    labels [N], mask [N] or None (all ones).

    ``objective`` [N] (or None): other token weights, those of the objective: the output is
    then (sum_t objective_t * CE_t, differentiated; sum_t m_t * CE_t, a value only), the
    final loss whose gradient carries the exit losses' control variate
    (``exit_losses.ExitLossPositions.final_loss_weights``) at no extra pass.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, mask, want_grads: bool, objective=None):
        from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as CE
        from megatron.core.tensor_parallel.utils import VocabUtility

        group = parallel_state.get_tensor_model_parallel_group()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        vocab_local = weight.shape[0]
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            vocab_local, parallel_state.get_tensor_model_parallel_rank(), tp)
        want_grads = want_grads and (hidden.requires_grad or weight.requires_grad)
        grad_hidden = torch.empty_like(hidden) if want_grads else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grads else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        objective_total = torch.zeros_like(total) if objective is not None else None
        rows = max(1, OUTPUT_CHUNK_ELEMENTS // vocab_local)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows]
            logits = (h @ weight.t()).float()
            logits_max = logits.amax(dim=-1)
            if tp > 1:
                dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
            target_mask, target_1d, predicted, sum_exp, exp_logits = CE.calculate_predicted_logits(
                logits, labels[start:start + rows], logits_max, vocab_start, vocab_end)
            if tp > 1:  # one collective for both sums
                sums = torch.stack([predicted, sum_exp])
                dist.all_reduce(sums, group=group)
                predicted, sum_exp = sums[0], sums[1]
            softmax, losses = CE.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
            weights = None if mask is None else mask[start:start + rows].to(losses.dtype)
            total += losses.sum() if weights is None else (losses * weights).sum()
            if objective is not None:  # and the gradient below follows these weights
                weights = objective[start:start + rows].to(losses.dtype)
                objective_total += (losses * weights).sum()
            if want_grads:
                # d loss_t / d logits_t = softmax_t - onehot(y_t), in place of the softmax
                grad_logits, arange_1d, target_update, _ = CE.prepare_gradient_calculation_operands(
                    softmax, target_mask)
                grad_logits[arange_1d, target_1d] -= target_update
                if weights is not None:
                    grad_logits.mul_(weights.unsqueeze(-1))
                grad_logits = grad_logits.to(weight.dtype)
                grad_hidden[start:start + rows] = grad_logits @ weight
                grad_weight.addmm_(grad_logits.t().float(), h.float())
        if want_grads:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.want_grads = want_grads
        if objective is None:
            return total
        ctx.mark_non_differentiable(total)
        return objective_total, total

    @staticmethod
    def backward(ctx, grad_total, *_value_only):
        if not ctx.want_grads:
            raise RuntimeError("OutputCrossEntropy ran without gradients (no_grad or "
                               "want_grads=False); it cannot be differentiated")
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total, grad_weight * grad_total, None, None, None, None


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor,
                        loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean token cross entropy of given logits [s, b, V/tp] (vocab-parallel), labels [b, s]
    (``OutputHead.loss`` computes the same from hidden states without whole logits).

    megatron-core's vocab-parallel cross entropy overwrites fp32 logits in place: read
    anything else from ``logits`` before calling this.
    """
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(),
                                                          labels.transpose(0, 1).contiguous())
    losses = losses.transpose(0, 1)  # [b, s]
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def gather_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Vocab-parallel [s, b, V/tp] -> full [b, s, vocab_size] (the padding rows dropped)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        full = logits.clone()  # not a view of the tensor the loss will overwrite
    else:
        # megatron-core's gather allocates its buffer on CUDA; torch's is device-neutral
        # and differentiable.
        shards = dist_nn.all_gather(logits.contiguous(),
                                    group=parallel_state.get_tensor_model_parallel_group())
        full = torch.cat(shards, dim=-1)
    return full.transpose(0, 1)[..., :vocab_size]
