"""Optimizer parameter groups, learning-rate schedule and the DeepSpeed config."""

from __future__ import annotations

import math
from typing import Callable, Dict, List

import torch

from megatron_ztt.parallel import runtime
from megatron_ztt.config import RunConfig

def decays(name: str, param: torch.nn.Parameter) -> bool:
    """Weight decay on matrices only: not on norms, biases, gates (all 1-d) or zero keys."""
    return param.ndim >= 2 and "zero_token_pool" not in name


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_multiplier(config: RunConfig) -> Callable[[int], float]:
    """Linear warmup to train.lr, then cosine decay to train.min_lr; as a factor of train.lr.

    ``step`` counts optimizer steps already taken, so the first step runs at
    lr / warmup_iters rather than at zero.
    """
    train = config.train
    warmup = train.warmup_iters
    decay_end = train.lr_decay_iters or train.train_iters
    floor = train.min_lr / train.lr if train.lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay_end <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (decay_end - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(config: RunConfig, world_size: int) -> Dict:
    train = config.train
    ds = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps(world_size),
        "train_batch_size": train.global_batch_size,
        "gradient_clipping": train.clip_grad,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": [train.adam_beta1, train.adam_beta2],
                "eps": train.adam_eps,
                "weight_decay": train.weight_decay,
                # DeepSpeed's fused Adam is a CUDA kernel; on CPU use torch's AdamW.
                "torch_adam": not runtime.use_cuda(),
            },
        },
        "zero_optimization": {"stage": config.parallel.zero_stage,
                              # ZeRO-3 partitions the weights themselves: gather them for the
                              # full model file each checkpoint also gets (export, eval)
                              "stage3_gather_16bit_weights_on_model_save": True},
        # DeepSpeed's ZeRO optimizer skips a step whose gradients are not finite; with bf16
        # that check must be asked for.
        "bf16": {"enabled": train.precision == "bf16", "check_grad_overflow": True},
        "steps_per_print": 10**9,  # our own logger prints
        "wall_clock_breakdown": False,
    }
    parallel = config.parallel
    if train.precision == "bf16" and parallel.pipeline == 1 and parallel.zero_stage >= 2:
        # ZeRO-2/3: the micro batches' gradients add up in DeepSpeed's fp32 buffer. Not at
        # ZeRO-0 (DeepSpeed 0.19.8 refuses the mix without ZeRO) nor at ZeRO-1 (it switches
        # to its BF16_Optimizer, which here trains measurably off the fp32 run; see
        # docs/TRAINING.md). The circular pipeline sums in fp32 itself (Fp32GradientSums).
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if config.parallel.pipeline > 1:
        # The circular pipeline's schedule runs all micro batches of a step before DeepSpeed
        # sees the gradients: to DeepSpeed one step is one (large) micro batch.
        ds["train_micro_batch_size_per_gpu"] = (train.micro_batch_size
                                                * config.gradient_accumulation_steps(world_size))
        ds["gradient_accumulation_steps"] = 1
        if config.parallel.zero_stage == 0:
            # DeepSpeed's own clipping without ZeRO counts the stages' replicated parameters
            # wrongly; the engine clips by the norm over all stages itself
            ds["gradient_clipping"] = 0.0
    return ds
