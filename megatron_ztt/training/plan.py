"""`ztt plan`: size every rank of a layout before spending a cluster on it.

    ztt plan --config launch/configs/ztt_70b.yaml --nodes 16 --gpus-per-node 8 [overrides] [--json]

One process stands in for every rank: torch.distributed's fake backend gives megatron-core's
``parallel_state`` the groups of a job of ``nodes x gpus-per-node`` ranks, and each distinct
(pipeline, tensor) rank's module is built on the meta device by ``engines.build_model``, the
constructor training uses (no memory for the weights). Data-parallel ranks hold the same
module and differ only in their ZeRO partition, which is computed from the optimizer's own
parameter groups (``optimizer.parameter_groups``) the way DeepSpeed partitions them.

What is computed, and from what model (every byte figure is per rank):

* parameters: counted on the built module (frozen ones too; ``train.trainable=new`` freezes
  as training does), as ``status.json``'s ``parameters_per_rank``.
* weights, gradients, optimizer state: ``optimizer_state_bytes`` is the Adam moments and the
  fp32 master copy DeepSpeed keeps, what ``metrics.optimizer_state_bytes`` reads in training
  under ZeRO 0-2 (checked against real runs at ZeRO-1/2); under ZeRO-3 and bf16 ZeRO-0 it also
  counts the fp32 partition that that function does not read (DeepSpeed's
  ``fp32_partitioned_groups_flat``, ``fp32_groups_flat_partition``). ZeRO-1/2 flatten each parameter group, pad it to a multiple of
  2 x DP and give each rank 1/DP of it (fp32 master + 2 moments: 12 bytes per element);
  ZeRO-3 partitions each parameter (ceil(numel / DP)); ZeRO-0 keeps the moments of every
  parameter (8 bytes; bf16 adds DeepSpeed's BF16 optimizer's fp32 copy, partitioned).
  Gradients: the whole gradient in the training dtype (ZeRO 0-1) or its 1/DP partition
  (ZeRO 2-3), plus the fp32 gradient of the optimizer's partition under ZeRO 1-3;
  communication buckets are not counted.
* activations: :func:`activation_elements` below, a stated model of what megatron-core's
  layer, the zero-token attention, the gates and the exit losses keep for backward, for one
  micro batch, with and without ``model.activation_checkpointing``; times the micro batches a
  pipeline rank holds at once under its schedule (``bench/plan_activation_check.py`` checks
  the model against measured peaks).
* bubble: ``circular.bubble_fraction`` of the circular pipeline's interleaved schedule.
* FLOPs: ``metrics.model_flops_per_token`` (the MFU's count) x tokens per step; step time at
  the peak FLOP/s (``--peak`` or ``--device``), stretched by the bubble, and at ``--mfu``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

from megatron_ztt.parallel import runtime
from megatron_ztt.config import RunConfig, load_config, validate
from megatron_ztt.model.config import ConfigError
from megatron_ztt.model.cycle_engine import Application, application_plan
from megatron_ztt.parallel.circular import bubble_fraction, virtual_applications
from megatron_ztt.training.metrics import model_flops_per_token

# Dense bf16 peak FLOP/s of one device, for --device: the table the MFU setting reads.
PEAK_FLOPS = dict(runtime.KNOWN_BF16_PEAK_FLOPS)
ADAM_MOMENTS = 2  # exp_avg, exp_avg_sq: fp32 each
ALIGNMENT = 2  # DeepSpeed's nccl_start_alignment_factor: flat groups pad to 2 x DP elements


# --------------------------------------------------------------------------- the layout
def sequence_parallel(config: RunConfig) -> bool:
    return bool(config.parallel.sequence_parallel)


def dtype_bytes(config: RunConfig) -> int:
    return 2 if config.train.precision == "bf16" else 4


@contextlib.contextmanager
def fake_rank(world_size: int, rank: int, tensor: int, pipeline: int, seed: int):
    """This process as ``rank`` of ``world_size`` (fake backend: no peers, no communication),
    with megatron-core's parallel state of that layout and the run's seeds."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_ztt.parallel import runtime

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor,
                                                 pipeline_model_parallel_size=pipeline,
                                                 create_gloo_process_groups=False)
        runtime.seed_everything(seed)
        yield parallel_state
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- memory models
def zero_partition(numel: int, data_parallel: int) -> int:
    """Elements of one flat parameter group on each rank under ZeRO-1/2 (DeepSpeed pads the
    group to a multiple of 2 x DP and splits it evenly)."""
    alignment = ALIGNMENT * data_parallel
    return math.ceil(numel / alignment) * alignment // data_parallel


def optimizer_bytes(groups: List[List[int]], config: RunConfig, data_parallel: int) -> Dict:
    """groups: the numels of each optimizer parameter group's parameters on this rank.
    -> {"optimizer_state_bytes", "gradient_bytes", "weight_bytes"} under the config's ZeRO
    stage and precision (the model in the module docstring)."""
    stage, e = config.parallel.zero_stage, dtype_bytes(config)
    numel = sum(sum(g) for g in groups)
    step = 4  # torch's AdamW keeps a float32 step count per parameter it steps
    if stage in (1, 2):
        partition = sum(zero_partition(sum(g), data_parallel) for g in groups)
        state = (1 + ADAM_MOMENTS) * 4 * partition + step * len(groups)
    elif stage == 3:
        partition = sum(math.ceil(n / data_parallel) for g in groups for n in g)
        state = (1 + ADAM_MOMENTS) * 4 * partition + step * len(groups)
    elif e == 2:  # ZeRO-0 in bf16: DeepSpeed's BF16 optimizer, fp32 copy partitioned
        partition = sum(zero_partition(sum(g), data_parallel) for g in groups)
        state = (1 + ADAM_MOMENTS) * 4 * partition + step * len(groups)
    else:  # ZeRO-0, fp32: torch's AdamW over the model's own parameters
        partition = numel
        state = ADAM_MOMENTS * 4 * numel + step * sum(len(g) for g in groups)
    gradients = numel * e if stage <= 1 else partition * e
    if stage >= 1:
        gradients += partition * 4
    weights = (partition if stage == 3 else numel) * e
    return {"optimizer_state_bytes": state, "gradient_bytes": gradients, "weight_bytes": weights}


@dataclass
class ActivationShape:
    """Sizes the activation model reads (one micro batch on one tensor-parallel rank)."""

    batch: int
    seq: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    tensor: int
    sequence_parallel: bool
    zero_token: bool
    dtype_bytes: int


def application_elements(shape: ActivationShape) -> Dict[str, float]:
    """Bytes one megatron-core TransformerLayer application (local spec, RMSNorm, SwiGLU,
    our zero-token core attention) keeps for backward, as measured op by op on the CPU:

    * input norm (torch's RMSNorm): its input, the normalised input (for the weight's
      gradient) and its output (the QKV projection's input), [T, d] each, rstd [T] fp32;
    * RoPE: cos and sin of q and k, [s, h] fp32 each;
    * zero-token attention: q with the dummy query, k and v with the zero key, [b, *, s+1, h],
      SDPA's output (heads) and log-sum-exp [b, heads, s+1] fp32;
    * output projection input [T, d/t]; the pre-MLP norm as the input norm;
    * SwiGLU: fc1's output [T, 2f/t], silu's output and x_linear + offset [T, f/t] each, the
      product (fc2's input) [T, f/t].

    T = b s tokens; sequence parallelism keeps the norms' tensors at T/t; GeLU keeps fc1's
    output and gelu's (2 [T, f/t]).
    """
    e, t = shape.dtype_bytes, shape.tensor
    tokens = shape.batch * shape.seq
    norm_tokens = tokens / t if shape.sequence_parallel else tokens
    with_zero = shape.batch * (shape.seq + (1 if shape.zero_token else 0))
    h = shape.head_dim
    local_heads, local_groups = shape.heads / t, shape.groups / t
    return {
        "norms": 2 * (3 * norm_tokens * shape.hidden * e + norm_tokens * 4),
        "rope": 4 * shape.seq * h * 4,
        "attention": (with_zero * h * (2 * local_heads + 2 * local_groups) * e
                      + with_zero * local_heads * 4),
        "projection": tokens * shape.hidden / t * e,
        "mlp": 5 * tokens * shape.ffn / t * e,
    }


def activation_shape(config: RunConfig) -> ActivationShape:
    model = config.model
    return ActivationShape(
        batch=config.train.micro_batch_size, seq=model.seq_length, hidden=model.hidden_size,
        heads=model.num_attention_heads, groups=model.query_groups, head_dim=model.head_dim,
        ffn=model.ffn_size, vocab=model.padded_vocab_size, tensor=config.parallel.tensor,
        sequence_parallel=sequence_parallel(config), zero_token=model.zero_token,
        dtype_bytes=dtype_bytes(config))


def activation_bytes(config: RunConfig, apps: List[Application], first: bool, last: bool,
                     carried_states: int, checkpointing: bool,
                     exit_losses: Optional[int] = None) -> int:
    """Bytes one micro batch leaves for backward on a rank running ``apps`` (one virtual
    stage, or the whole plan): the layer applications (each exit loss computed here runs the
    tail too), the gates of the cycles ending here (the cycle's output and the update y - x,
    [T, d] each), the loss heads (final norm's three [T, d], the flattened input, and the
    hidden- and weight-gradients [T, d], [V/t, d] the fused cross entropy computes in forward)
    of the final loss on the last stage and of ``exit_losses`` exit losses (None: every
    weighted one, on the last stage, as one process computes them; the circular pipeline
    computes each at the end of its cycle on the last rank), and ``carried_states`` extra
    hidden states received (the open cycle's input).

    With checkpointing, an application keeps only its input [T, d]; backward recomputes one
    application at a time, so one application's activations come on top."""
    shape = activation_shape(config)
    model = config.model
    e, t = shape.dtype_bytes, shape.tensor
    tokens = shape.batch * shape.seq
    state = tokens * shape.hidden * e  # one hidden state [T, d]
    # sequence parallelism: what lives between the tensor-parallel regions (hidden states,
    # gates, the final norm) is this rank's sequence shard, T/t tokens
    shard_tokens = tokens / t if shape.sequence_parallel else tokens
    shard = shard_tokens * shape.hidden * e
    layer = sum(application_elements(shape).values())
    exits = sum(1 for c, w in enumerate(model.exit_weights) if w > 0 and c < model.num_cycles - 1)
    if exit_losses is None:
        exit_losses = exits if last else 0
    runs = len(apps) + (exit_losses if model.cycle_mode == "head_tail" else 0)
    gates = sum(1 for app in apps if app.ends_cycle) if model.gate else 0
    total = carried_states * shard + gates * (2 * shard + shard_tokens * 8)
    if first:
        total += tokens * 8  # the token ids the embedding's backward reads
    losses = int(last) + exit_losses
    if losses:
        # the final norm's three tensors on the shard; the loss's hidden gradient [T, d]
        total += losses * (3 * shard + state + tokens * 4 + shape.vocab / t * shape.hidden * e)
    if checkpointing:
        total += runs * shard + (layer if runs else 0)
    else:
        total += runs * layer
    return int(total)


def schedule_in_flight(micro_batches: int, pipeline: int, cycles: int, rank: int) -> List[int]:
    """Micro batches whose activations pipeline rank ``rank`` holds at once, per virtual stage
    (cycle), at its peak under the schedule ``circular.build_schedule`` picks: interleaved 1F1B
    (torch's warm-up: (C-1) x micro batches per round + 2 (P-1-rank) forwards before the first
    backward), looped BFS (every forward first) when the micro batches do not split into
    rounds, and one stage per rank (1F1B) for C = 1."""
    if pipeline == 1:
        return [1]
    if cycles == 1:
        return [min(micro_batches, pipeline - rank)]
    from torch.distributed.pipelining.schedules import _get_warmup_ops

    rounds = max(1, micro_batches // pipeline)
    if micro_batches % rounds:
        return [micro_batches] * cycles
    per_round = micro_batches // rounds
    # torch's own count of the forwards before the first backward (its schedule's)
    warmup = _get_warmup_ops(rank, cycles, per_round, pipeline, micro_batches)
    held = warmup + 1  # one more forward in the first 1F1B pair before its backward frees one
    # forwards go through the virtual stages in rounds of ``per_round`` micro batches
    counts = [0] * cycles
    for i in range(min(held, micro_batches * cycles)):
        counts[(i // per_round) % cycles] += 1
    return counts


# --------------------------------------------------------------------------- the plan
@dataclass
class RankPlan:
    rank: int
    node: int
    pipeline_rank: int
    tensor_rank: int
    data_rank: int
    parameters: int
    trainable_parameters: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int  # at the config's model.activation_checkpointing
    activation_bytes_without_checkpointing: int
    activation_bytes_with_checkpointing: int
    activation_bytes_per_micro_batch: int
    micro_batches_in_flight: int
    total_bytes: int


@dataclass
class Plan:
    config: str
    nodes: int
    gpus_per_node: int
    layout: Dict[str, object]
    micro_batches_per_step: int
    bubble: float
    model_flops_per_step: float
    peak_flops_per_device: Optional[float]
    step_seconds_at_peak: Optional[float]
    mfu: float
    step_seconds: Optional[float]
    tokens_per_step: int
    per_rank: List[RankPlan] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _stage_activations(config: RunConfig, module, pipeline_rank: int, micro_batches: int,
                       checkpointing: bool):
    """(peak activation bytes, bytes of one micro batch through every virtual stage, held
    micro batches) of this rank's module."""
    model, pipeline = config.model, config.parallel.pipeline
    if pipeline == 1:
        one = activation_bytes(config, application_plan(model), True, True, 0, checkpointing)
        return one, one, 1
    stages = virtual_applications(model, pipeline)
    engine = module.engine
    per_cycle = []
    for cycle in range(model.num_cycles):
        apps = stages[(cycle, pipeline_rank)]
        first = pipeline_rank == 0 and cycle == 0
        last = pipeline_rank == pipeline - 1 and cycle == model.num_cycles - 1
        # what arrives besides the hidden state: the open cycle's input (pack)
        carried = 0 if first else int(module.carries_cycle_input(apps[0], exits=False))
        # the exit loss of a cycle ending on the last rank is computed there (attach_exit_loss)
        exit_here = int(pipeline_rank == pipeline - 1 and cycle in engine.exit_cycles)
        per_cycle.append(activation_bytes(config, apps, first, last, carried, checkpointing,
                                          exit_here))
    held = schedule_in_flight(micro_batches, pipeline, model.num_cycles, pipeline_rank)
    peak = sum(n * b for n, b in zip(held, per_cycle))
    if checkpointing:  # recompute adds one application once, not per held micro batch
        layer = sum(application_elements(activation_shape(config)).values())
        peak -= int(layer) * (sum(1 for n in held if n) - 1)
    return peak, sum(per_cycle), sum(held)


def plan_layout(config: RunConfig, nodes: int, gpus_per_node: int, config_name: str = "",
                peak: Optional[float] = None, mfu: float = 0.4) -> Plan:
    """The plan of every rank of ``config`` on ``nodes x gpus_per_node`` ranks. Refuses a
    layout training would refuse, with training's own error (ConfigError)."""
    import torch.distributed as dist

    from megatron_ztt.training.engines import build_model, freeze_all_but_new
    from megatron_ztt.training.optimizer import parameter_groups

    if dist.is_initialized():
        raise RuntimeError("ztt plan stands in for every rank with a fake process group: run it "
                           "in a process without torch.distributed initialised")
    world = nodes * gpus_per_node
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} x {gpus_per_node}")
    tensor, pipeline = config.parallel.tensor, config.parallel.pipeline
    data = config.data_parallel_size(world)
    micro_batches = config.gradient_accumulation_steps(world)
    model = config.model
    checkpointing = model.activation_checkpointing
    per_rank: Dict[int, RankPlan] = {}
    for pipeline_rank in range(pipeline):
        for tensor_rank in range(tensor):
            # megatron-core orders ranks tensor-fastest, then data, then pipeline
            rank = (pipeline_rank * data) * tensor + tensor_rank
            with fake_rank(world, rank, tensor, pipeline, config.train.seed) as ps:
                assert (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                        ps.get_data_parallel_rank()) == (pipeline_rank, tensor_rank, 0)
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    module = build_model(config)
                if config.train.trainable == "new":
                    freeze_all_but_new(module)
                data_ranks = dist.get_process_group_ranks(ps.get_data_parallel_group())
                parameters = sum(p.numel() for p in module.parameters())
                groups = [[p.numel() for p in g["params"]]
                          for g in parameter_groups(module, config.train.weight_decay)]
                memory = optimizer_bytes(groups, config, data)
                activations = {ckpt: _stage_activations(config, module, pipeline_rank,
                                                        micro_batches, ckpt)
                               for ckpt in (False, True)}
                used, one, held = activations[checkpointing]
                for data_rank, global_rank in enumerate(data_ranks):
                    per_rank[global_rank] = RankPlan(
                        rank=global_rank, node=global_rank // gpus_per_node,
                        pipeline_rank=pipeline_rank, tensor_rank=tensor_rank,
                        data_rank=data_rank, parameters=parameters,
                        trainable_parameters=sum(sum(g) for g in groups),
                        activation_bytes=used,
                        activation_bytes_without_checkpointing=activations[False][0],
                        activation_bytes_with_checkpointing=activations[True][0],
                        activation_bytes_per_micro_batch=one, micro_batches_in_flight=held,
                        total_bytes=used + sum(memory.values()), **memory)
                del module
    assert sorted(per_rank) == list(range(world))
    tokens = config.train.global_batch_size * model.seq_length
    flops = model_flops_per_token(model, model.seq_length) * tokens
    bubble = (bubble_fraction(pipeline, model.num_cycles, micro_batches) if pipeline > 1 else 0.0)
    at_peak = flops / (world * peak) / (1.0 - bubble) if peak else None
    return Plan(config=config_name, nodes=nodes, gpus_per_node=gpus_per_node,
                layout={"world_size": world, "tensor": tensor, "pipeline": pipeline,
                        "data": data, "zero_stage": config.parallel.zero_stage,
                        "sequence_parallel": sequence_parallel(config),
                        "activation_checkpointing": checkpointing,
                        "micro_batch_size": config.train.micro_batch_size,
                        "global_batch_size": config.train.global_batch_size,
                        "precision": config.train.precision},
                micro_batches_per_step=micro_batches, bubble=bubble, model_flops_per_step=flops,
                peak_flops_per_device=peak, step_seconds_at_peak=at_peak, mfu=mfu,
                step_seconds=at_peak / mfu if at_peak else None, tokens_per_step=tokens,
                per_rank=[per_rank[r] for r in range(world)])


# --------------------------------------------------------------------------- the command
def load_plan_config(path: str, overrides: List[str]) -> RunConfig:
    """The run config as training reads it; the data settings, which a plan does not read,
    get placeholders where the file leaves them empty so that every other check runs."""
    config = load_config(path, overrides, check=False)
    if not config.data.blend:
        config.data.blend = ["(not read by ztt plan)"]
    if not config.data.tokenizer:
        config.data.tokenizer = "(not read by ztt plan)"
    validate(config)
    return config


def peak_flops(args, config: RunConfig) -> Optional[float]:
    if args.peak is not None:
        return args.peak
    if args.device is not None:
        return PEAK_FLOPS[args.device]
    value = getattr(config.logging, "peak_flops_per_device", None)
    if isinstance(value, str):  # "auto" (the MFU setting's device table): use --device here
        return PEAK_FLOPS.get(value)
    return float(value) if value else None


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def table(plan: Plan) -> List[str]:
    """The distinct ranks (DP ranks of a (pipeline, tensor) rank are alike), then the totals."""
    lay = plan.layout
    lines = [f"{plan.config}: {plan.nodes} x {plan.gpus_per_node} = {lay['world_size']} ranks: "
             f"TP={lay['tensor']} PP={lay['pipeline']} DP={lay['data']} ZeRO-{lay['zero_stage']}"
             f", sequence parallel {'on' if lay['sequence_parallel'] else 'off'}, activation "
             f"checkpointing {'on' if lay['activation_checkpointing'] else 'off'}, "
             f"{lay['precision']}",
             f"micro batch {lay['micro_batch_size']}, {plan.micro_batches_per_step} micro "
             f"batches per step per data-parallel rank, global batch {lay['global_batch_size']}",
             "",
             "| ranks | PP rank | parameters | weights GiB | grads GiB | optimizer GiB | "
             "activations GiB (ckpt off / on) | micro batches held | total GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    seen = {}
    for r in plan.per_rank:
        key = (r.pipeline_rank, r.parameters, r.optimizer_state_bytes, r.activation_bytes)
        seen.setdefault(key, []).append(r)
    for (pp, *_), ranks in sorted(seen.items()):
        r = ranks[0]
        lines.append(f"| {len(ranks)} ranks (e.g. {r.rank}) | {pp} | {r.parameters:,} | "
                     f"{_gib(r.weight_bytes)} | {_gib(r.gradient_bytes)} | "
                     f"{_gib(r.optimizer_state_bytes)} | "
                     f"{_gib(r.activation_bytes_without_checkpointing)} / "
                     f"{_gib(r.activation_bytes_with_checkpointing)} | "
                     f"{r.micro_batches_in_flight} | {_gib(r.total_bytes)} |")
    largest = max(plan.per_rank, key=lambda r: r.total_bytes)
    lines += ["",
              f"largest rank: {_gib(largest.total_bytes)} GiB (rank {largest.rank}, pipeline "
              f"rank {largest.pipeline_rank})",
              f"pipeline bubble: {plan.bubble:.3f}"
              + (" ((P-1)/(C m + P-1))" if lay["pipeline"] > 1 else ""),
              f"model FLOPs per step: {plan.model_flops_per_step:.3e} "
              f"({plan.tokens_per_step:,} tokens)"]
    if plan.step_seconds_at_peak:
        lines.append(f"step time: {plan.step_seconds_at_peak:.2f} s at "
                     f"{plan.peak_flops_per_device:.3g} FLOP/s per device (100 % of peak but "
                     f"the bubble), {plan.step_seconds:.2f} s at {100 * plan.mfu:.0f} % MFU")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run configuration")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--peak", type=float, default=None,
                        help="peak FLOP/s of one device (default: --device, else the config's "
                             "logging.peak_flops_per_device)")
    parser.add_argument("--device", choices=sorted(PEAK_FLOPS), default=None,
                        help="take the peak from this table (dense bf16)")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="model FLOPs utilisation for the step-time estimate (default 0.4)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor=8")


def run(args: argparse.Namespace) -> int:
    try:
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu must be in (0, 1], got {args.mfu}")
        config = load_plan_config(args.config, args.overrides)
        plan = plan_layout(config, args.nodes, args.gpus_per_node, args.config,
                           peak_flops(args, config), args.mfu)
    except (ConfigError, ValueError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr, flush=True)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict()))
    else:
        print("\n".join(table(plan)))
    return 0
