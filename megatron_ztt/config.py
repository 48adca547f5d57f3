"""Run configuration: YAML files with dotted command-line overrides, checked at start.

    cfg = load_config("launch/configs/tiny.yaml", ["train.lr=1e-3", "model.num_cycles=4"])

OmegaConf merges the file and the overrides into typed dataclasses, so an unknown key or a
value of the wrong type fails at once naming the key; cross-field rules are checked in
:func:`validate`.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_ztt.data.datasets import DataConfig
from megatron_ztt.data.tokenizer import TOKENIZER_PATH_HINT, TokenizerError, tokenizer_kind
from megatron_ztt.model.config import ConfigError, ZTTConfig


@dataclass
class RunSection:
    dir: str = "runs/default"  # checkpoints/, tensorboard/ and status.json go here
    name: str = "ztt"


@dataclass
class ParallelSection:
    tensor: int = 1
    pipeline: int = 1
    zero_stage: int = 1
    # split the activations between the tensor-parallel regions along the sequence
    # (megatron-core's sequence_parallel; needs tensor > 1)
    sequence_parallel: bool = False
    # Unused: the circular pipeline splits the cycled layers evenly over the stages. Kept so
    # that the configs saved in checkpoints of the earlier pipeline still load.
    pipeline_partition: str = "applications"


@dataclass
class TrainSection:
    seed: int = 1234
    micro_batch_size: int = 4
    global_batch_size: int = 32  # = micro_batch_size x accumulation x data-parallel size
    train_iters: int = 1000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_iters: int = 100
    lr_decay_iters: Optional[int] = None  # default: train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: str = "fp32"  # fp32 | bf16
    nonfinite_loss: str = "skip"  # skip the optimizer step | stop the run
    load: Optional[str] = None  # None: fresh; "auto": latest in run.dir if any; or a path
    # Start a new run from these weights (a checkpoint of any layout, e.g. one written by
    # `ztt import-hf`, or a .pt file holding a full state dict under ZTTModel's names); the
    # optimizer starts fresh. With a checkpoint, the run's model section defaults to the
    # checkpoint's (load_run_config).
    init_from: Optional[str] = None
    # Earlier name of init_from, still read (configs and checkpoints of earlier runs); it is
    # moved to init_from when the config is loaded.
    init_weights: Optional[str] = None
    # Which parameters train: all | new (only the zero keys and gates; everything else is
    # frozen, e.g. to fit ZTT's new parts onto an imported pretrained model first).
    trainable: str = "all"


@dataclass
class CheckpointSection:
    interval: int = 500
    keep_last: int = 3
    save_at_end: bool = True
    # copy the state to host memory and write it in a background thread while training
    # goes on (the next save, a SIGTERM's final save and the end of the run wait for it)
    async_save: bool = False


@dataclass
class EvalSection:
    interval: int = 100
    iters: int = 10
    exit_thresholds: List[float] = field(default_factory=list)  # extra validation passes


@dataclass
class LoggingSection:
    interval: int = 10
    tensorboard: bool = True
    wandb_project: Optional[str] = None  # set to log the same scalars to Weights & Biases
    wandb_run_name: Optional[str] = None  # default: run.name
    wandb_entity: Optional[str] = None  # default: wandb's (your user)
    # MFU denominator, FLOP/s per device: "auto" (a table of known accelerators on CUDA, the
    # measured matmul peak on a CPU) or a number, which wins
    peak_flops_per_device: Any = "auto"


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ZTTConfig = field(default_factory=ZTTConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(blend=[]))
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.run.dir, "checkpoints")

    @property
    def tensorboard_dir(self) -> str:
        return os.path.join(self.run.dir, "tensorboard")

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.parallel.tensor * self.parallel.pipeline
        if world_size % model_parallel:
            raise ConfigError(
                f"parallel layout impossible: {world_size} processes are not divisible by "
                f"parallel.tensor ({self.parallel.tensor}) x parallel.pipeline "
                f"({self.parallel.pipeline})")
        return world_size // model_parallel

    def gradient_accumulation_steps(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size)
        per_step = self.train.micro_batch_size * dp
        if self.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.train.micro_batch_size}) x data-parallel size "
                f"({dp})")
        return self.train.global_batch_size // per_step

    def to_dict(self) -> dict:
        return asdict(self)


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                model_defaults: Optional[dict] = None, check: bool = True) -> RunConfig:
    """File, then overrides, merged onto the defaults; every error names the key.

    ``model_defaults``: a model section (e.g. the one saved with ``train.init_from``'s
    checkpoint) that replaces the built-in defaults; the file and the overrides still win.
    ``check=False`` skips the cross-field rules (a first pass that only reads a setting).
    """
    schema = OmegaConf.structured(RunConfig)
    layers = [schema]
    try:
        if model_defaults:
            layers.append(OmegaConf.create({"model": model_defaults}))
        if path:
            if not os.path.isfile(path):
                raise ConfigError(f"config file not found: {path}")
            try:
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as error:
                raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
            if not OmegaConf.is_dict(loaded):
                raise ConfigError(f"{path}: the file must map sections (run, model, data, "
                                  f"train, ...) to their settings, got a "
                                  f"{type(OmegaConf.to_container(loaded)).__name__}")
            layers.append(loaded)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like section.key=value, got {bad}")
            for override in overrides:  # one at a time, so that a YAML error names its override
                try:
                    layers.append(OmegaConf.from_dotlist([override]))
                except yaml.YAMLError as error:
                    raise ConfigError(f"override {override!r}: its value is not valid YAML "
                                      f"({_yaml_problem(error)}); quote it or close its "
                                      f"brackets") from None
        merged = OmegaConf.merge(*layers)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        message = str(error).splitlines()[0]
        raise ConfigError(f"bad setting {key!r}: {message}" if key
                          else f"bad configuration: {message}") from None
    if check:
        validate(config)
    return config


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: what is wrong, and where."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def config_from_dict(values: dict, overrides: Optional[List[str]] = None) -> RunConfig:
    """Rebuild a RunConfig from :meth:`RunConfig.to_dict` (checkpoint metadata)."""
    layers = [OmegaConf.structured(RunConfig), OmegaConf.create(values)]
    if overrides:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_object(OmegaConf.merge(*layers))


def validate(config: RunConfig) -> None:
    train, parallel = config.train, config.parallel

    def fail(key, message):
        raise ConfigError(f"{key}: {message}")

    check_numbers(config)
    if train.init_weights is not None:
        if train.init_from is not None and train.init_from != train.init_weights:
            fail("train.init_weights", f"is the earlier name of train.init_from; set only "
                 f"train.init_from (got init_from={train.init_from!r}, "
                 f"init_weights={train.init_weights!r})")
        train.init_from, train.init_weights = train.init_weights, None
    if train.trainable not in ("all", "new"):
        fail("train.trainable", f"must be all or new, got {train.trainable!r}")
    if train.trainable == "new":
        if not (config.model.zero_token or config.model.gate):
            fail("train.trainable", "new trains only the zero keys and gates, and this model "
                 "has neither (model.zero_token=false, model.gate=false); use all")
        if parallel.zero_stage == 3:
            fail("train.trainable", "new (frozen weights) is supported with "
                 "parallel.zero_stage 0-2; use parallel.zero_stage<=2")
        if parallel.pipeline > 1 and not config.model.zero_token:
            fail("train.trainable", "new with the circular pipeline (parallel.pipeline > 1) "
                 "needs model.zero_token=true: every stage must hold something to train")
    for key in ("micro_batch_size", "global_batch_size", "train_iters"):
        if getattr(train, key) < 1:
            fail(f"train.{key}", f"must be >= 1, got {getattr(train, key)}")
    if train.precision not in ("fp32", "bf16"):
        fail("train.precision", f"must be fp32 or bf16, got {train.precision!r}")
    if train.nonfinite_loss not in ("skip", "stop"):
        fail("train.nonfinite_loss", f"must be skip or stop, got {train.nonfinite_loss!r}")
    if not 0 <= train.min_lr <= train.lr:
        fail("train.min_lr", f"must be between 0 and train.lr ({train.lr}), got {train.min_lr}")
    if train.warmup_iters < 0:
        fail("train.warmup_iters", f"must be >= 0, got {train.warmup_iters}")
    if train.lr_decay_iters is not None and train.lr_decay_iters < 1:
        fail("train.lr_decay_iters", f"must be >= 1, got {train.lr_decay_iters}")
    if parallel.zero_stage not in (0, 1, 2, 3):
        fail("parallel.zero_stage", f"must be 0, 1, 2 or 3, got {parallel.zero_stage}")
    if parallel.pipeline > 1 and parallel.zero_stage > 1:
        fail("parallel.zero_stage", f"the circular pipeline (parallel.pipeline="
             f"{parallel.pipeline}) supports parallel.zero_stage 0 or 1 only, got "
             f"{parallel.zero_stage}: every cycle's backward adds into the same shared "
             f"parameters, which ZeRO-2's gradient partitioning (and ZeRO-3) refuses")
    if parallel.zero_stage == 3 and parallel.tensor > 1:
        fail("parallel.zero_stage", "ZeRO-3 with tensor parallelism is not supported; use 1 or 2")
    if parallel.sequence_parallel and parallel.tensor < 2:
        fail("parallel.sequence_parallel", f"true needs parallel.tensor > 1 (got "
             f"parallel.tensor={parallel.tensor}): it splits the sequence over the "
             f"tensor-parallel ranks")
    if parallel.sequence_parallel and config.model.seq_length % parallel.tensor:
        fail("parallel.sequence_parallel", f"needs model.seq_length ({config.model.seq_length}) "
             f"to be a multiple of parallel.tensor ({parallel.tensor})")
    if parallel.sequence_parallel and (config.model.exit_loss_fraction < 1
                                       or config.model.exit_objective != "none"):
        # both read every position's state after a cycle, which SP leaves split over the ranks
        fail("parallel.sequence_parallel", f"true does not combine with model.exit_loss_fraction"
             f"={config.model.exit_loss_fraction} or model.exit_objective="
             f"{config.model.exit_objective} yet: set model.exit_loss_fraction=1.0 and "
             f"model.exit_objective=none, or parallel.sequence_parallel=false")
    if train.nonfinite_loss == "skip" and parallel.zero_stage == 0:
        fail("train.nonfinite_loss", "skip relies on the ZeRO optimizer's overflow check "
             "(parallel.zero_stage >= 1); use stop with parallel.zero_stage=0")
    if not config.data.blend:
        fail("data.blend", "no dataset given: set data.blend=[PREFIX] (files PREFIX.bin/.idx)")
    if not config.data.tokenizer:
        fail("data.tokenizer",
             f"no tokenizer given: set data.tokenizer=PATH, {TOKENIZER_PATH_HINT}")
    if os.path.exists(config.data.tokenizer):  # a missing one is reported when training loads it
        try:
            tokenizer_kind(config.data.tokenizer)
        except TokenizerError as error:
            fail("data.tokenizer", str(error))
    if config.checkpoint.interval < 1 or config.checkpoint.keep_last < 1:
        fail("checkpoint.interval", "checkpoint.interval and checkpoint.keep_last must be >= 1")
    if config.eval.interval < 1:
        fail("eval.interval", f"must be >= 1, got {config.eval.interval}")
    if config.eval.iters < 0:
        fail("eval.iters", f"must be >= 0 (0: no validation), got {config.eval.iters}")
    if config.logging.interval < 1:
        fail("logging.interval", f"must be >= 1, got {config.logging.interval}")
    if config.logging.wandb_project is not None:
        if not config.logging.wandb_project.strip():
            fail("logging.wandb_project", "is empty: name a W&B project, or leave it unset")
        if importlib.util.find_spec("wandb") is None:
            fail("logging.wandb_project", "needs the wandb package: pip install wandb "
                 "(or leave logging.wandb_project unset)")
    peak = config.logging.peak_flops_per_device
    if peak != "auto":
        try:
            peak = float(peak)
        except (TypeError, ValueError):
            peak = float("nan")
        if not (math.isfinite(peak) and peak > 0):
            fail("logging.peak_flops_per_device", "must be auto or a finite number of FLOP/s "
                 f"> 0, got {config.logging.peak_flops_per_device!r}")
        config.logging.peak_flops_per_device = peak
    config.model.check_parallel_layout(parallel.tensor, parallel.pipeline)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def physical_memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _runs_on_cuda() -> bool:
    from megatron_ztt.parallel import runtime

    try:
        return runtime.use_cuda()
    except (ValueError, RuntimeError):  # a bad ZTT_DEVICE is reported where the run starts
        return False


def check_numbers(config: RunConfig) -> None:
    """Refuse, naming the setting, numbers that torch or DeepSpeed would reject on every rank
    with a traceback, or that break the math (a NaN learning rate trains NaN weights)."""
    train = config.train

    def fail(key, message):
        raise ConfigError(f"{key}: {message}")

    for key in ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                "clip_grad"):
        if not _finite(getattr(train, key)):
            fail(f"train.{key}", f"must be a finite number, got {getattr(train, key)}")
    if train.lr < 0:  # 0 is allowed: a run that only evaluates, or a frozen step in the tests
        fail("train.lr", f"must be >= 0, got {train.lr}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(train, key) < 1:
            fail(f"train.{key}", f"must be in [0, 1), got {getattr(train, key)}")
    if train.adam_eps <= 0:
        fail("train.adam_eps", f"must be > 0, got {train.adam_eps}")
    if train.weight_decay < 0:
        fail("train.weight_decay", f"must be >= 0, got {train.weight_decay}")
    if train.clip_grad < 0:
        fail("train.clip_grad", f"must be >= 0 (0: no clipping), got {train.clip_grad}")
    for threshold in config.eval.exit_thresholds:
        if not _finite(threshold) or threshold < 0:
            fail("eval.exit_thresholds", f"every threshold must be a finite number >= 0, got "
                 f"{list(config.eval.exit_thresholds)}")


def check_attention_memory(config: RunConfig) -> None:
    """A start check of a training run (``training.resume_checks.check_start``, in the
    launchers' pre-check and at the start of training), not of the config: a config for a GPU
    cluster is valid wherever it is read or planned."""
    train = config.train
    # On the CPU path attention materialises (micro batch x heads x seq x seq) scores per layer
    # application, and training keeps them for the backward of every application (one at a
    # time with activation checkpointing): a sequence length far beyond the memory would only
    # fail minutes later, in an allocation. CUDA's fused attention keeps no such scores, so a
    # GPU config is not judged by this machine's memory.
    if _runs_on_cuda():
        return
    model = config.model
    heads = model.num_attention_heads // max(1, config.parallel.tensor)
    kept = 1 if model.activation_checkpointing else model.num_applications
    scores = train.micro_batch_size * heads * model.seq_length ** 2 * 4 * kept
    memory = physical_memory_bytes()
    if memory and scores > memory:
        raise ConfigError(
            f"model.seq_length: {model.seq_length} needs {scores / 2**30:,.1f} GiB for the "
            f"attention scores training keeps (train.micro_batch_size {train.micro_batch_size} "
            f"x {heads} heads x {model.seq_length}^2 x 4 bytes x {kept} layer applications), "
            f"more than this machine's {memory / 2**30:,.1f} GiB; lower model.seq_length or "
            f"train.micro_batch_size, or set model.activation_checkpointing=true")


def exit_threshold_arg(allow_inf: bool = False):
    """argparse type of --exit-threshold (ztt eval, ztt generate): a number >= 0, never NaN;
    infinity ("run every cycle") only where ``allow_inf``, since JSON has no infinity."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if math.isnan(value) or value < 0 or (math.isinf(value) and not allow_inf):
            kind = "a number >= 0 or 'inf'" if allow_inf else "a finite number >= 0"
            raise argparse.ArgumentTypeError(
                f"must be {kind} (0 leaves after the first cycle, anything above 1 never "
                f"leaves), got {text!r}")
        return value

    parse.__name__ = "exit threshold"
    return parse


def num_cycles_arg(text: str) -> int:
    """argparse type of --num-cycles (the depth dial): an integer >= 1 (the upper bound, twice
    the trained cycles, is checked against the model)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (cycles to run), got {text!r}")
    return value


num_cycles_arg.__name__ = "num cycles"


def exit_signal_names() -> List[str]:
    """The choices of --exit-signal."""
    from megatron_ztt.model.cycle_engine import EXIT_SIGNALS

    return list(EXIT_SIGNALS)
