"""Import a pretrained Hugging Face Llama-family model as a ZTT checkpoint (``ztt import-hf``).

    ztt import-hf --model HF_DIR --output CKPT_DIR [--num-cycles C] [--middle-layers A:B] ...
    ztt import-hf --gguf FILE.gguf --output CKPT_DIR ...   (needs `pip install gguf accelerate`)

Supported: ``model_type`` llama (SmolLM2 is one), mistral (without a sliding window) and qwen2
(q/k/v biases; without a sliding window), with SwiGLU (silu), RMSNorm, plain RoPE, any number
of key/value groups, tied or untied embeddings. Everything else is refused with a one-line
error naming the setting.

Layer mapping (``cycle_mode=head_tail``): HF layer 0 is the head, the last HF layer the tail,
and the HF layers ``A..B-1`` (default: all the others) form the middle block that runs C
times with shared weights; HF layers outside head, middle and tail are dropped. With C = 1
and no zero token the imported model computes what the source model computes.

New parameters: one zero key per layer application (``--zero-key-init``: zeros or
normal(0, initializer_range)) and one gate per cycle (``--gate-init``: ``open`` gives every
cycle a bias of ``+--gate-bias`` (g ~ 1), ``closed-after-first`` gives cycle 1 ``+bias`` and
the later cycles ``-bias``, so that they start as (near) identity).

The output is a complete checkpoint of the format in ``megatron_ztt.checkpoint`` (one
``iter_0000000`` folder, the full single-layout model file, ``ztt_meta.json``, ``latest``)
with the source's tokenizer files copied unchanged into ``iter_0000000/tokenizer/``. It is
written into a hidden sibling folder that is renamed into place at the end: on any error
nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from megatron_ztt.checkpoint import FORMAT_VERSION, LATEST, META, model_file, tag_for
from megatron_ztt.config import RunConfig
from megatron_ztt.data.datasets import DataConfig
from megatron_ztt.data.tokenizer import (CHECKPOINT_ENTRY, HF_TOKENIZER_JSON, HUGGINGFACE,
                                         copy_tokenizer)
from megatron_ztt.files import write_text_atomic
from megatron_ztt.model.config import ConfigError, ZTTConfig
from megatron_ztt.model.cycle_engine import application_plan
from megatron_ztt.model.weight_layout import expected_canonical_shapes, fuse_qkv

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_DIR = CHECKPOINT_ENTRY[HUGGINGFACE]
ZERO_KEY_INITS = ("zeros", "normal")
GATE_INITS = ("open", "closed-after-first")
DEFAULT_GATE_BIAS = 8.0  # sigmoid(8) = 0.99966: open, yet the gate still trains
DEFAULT_MAX_SEQ_LENGTH = 2048


class ImportRefused(RuntimeError):
    """The model cannot be imported as asked; the message names the setting or file."""


@dataclass
class ImportOptions:
    num_cycles: int = 1
    middle_layers: Optional[Tuple[int, int]] = None  # half-open HF layer range; None: 1..L-2
    zero_token: bool = True
    gate: bool = True
    zero_key_init: str = "zeros"
    gate_init: str = "open"
    gate_bias: float = DEFAULT_GATE_BIAS
    seq_length: Optional[int] = None  # None: max_position_embeddings, at most 2048
    seed: int = 1234  # for --zero-key-init normal
    # A tokenizer with more ids than the model's vocabulary (e.g. a GGUF file's tokenizer,
    # rebuilt by transformers, gains a special token): False refuses, True adds embedding
    # (and output) rows for the extra ids, each the mean of the existing rows.
    grow_vocab: bool = False


@dataclass
class LayerMap:
    """Which HF layer becomes which ZTT layer."""

    head: int
    middle: List[int]
    tail: int
    dropped: List[int]

    @property
    def hf_layers(self) -> List[int]:  # ZTT layer j <- HF layer hf_layers[j]
        return [self.head, *self.middle, self.tail]

    def describe(self, num_cycles: int) -> str:
        middle = (f"{self.middle[0]}..{self.middle[-1]}" if len(self.middle) > 1
                  else str(self.middle[0]))
        return (f"HF layer {self.head} -> head (once), HF layers {middle} -> cycled block "
                f"(x{num_cycles}), HF layer {self.tail} -> tail (once)")


# --------------------------------------------------------------------------- checks
def _refuse(message: str):
    raise ImportRefused(message)


def layer_map(num_layers: int, middle: Optional[Tuple[int, int]]) -> LayerMap:
    if num_layers < 3:
        _refuse(f"num_hidden_layers={num_layers}: a head-tail ZTT needs at least 3 layers "
                f"(head, a middle block, tail)")
    start, stop = middle if middle is not None else (1, num_layers - 1)
    if not 1 <= start < stop <= num_layers - 1:
        _refuse(f"--middle-layers {start}:{stop}: must be A:B with 1 <= A < B <= "
                f"{num_layers - 1} (HF layer 0 is the head, layer {num_layers - 1} the tail)")
    return LayerMap(0, list(range(start, stop)), num_layers - 1,
                    [i for i in range(1, num_layers - 1) if not start <= i < stop])


def check_supported(hf) -> None:
    """Refuse, naming the setting, anything the ZTT layers do not compute the same way."""
    model_type = getattr(hf, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        _refuse(f"model_type {model_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (SmolLM2 is llama)")
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        _refuse(f"hidden_act={act!r}: only silu (SwiGLU) is supported")
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    rope_type = (rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict)
                 else rope)
    if rope_type not in (None, "default"):
        _refuse(f"rope_scaling / rope_parameters rope_type={rope_type!r}: only plain RoPE "
                f"(rope_type 'default') is supported")
    if getattr(hf, "partial_rotary_factor", 1.0) not in (None, 1.0):
        _refuse(f"partial_rotary_factor={hf.partial_rotary_factor}: only full RoPE is supported")
    if getattr(hf, "attention_bias", False):
        _refuse("attention_bias=true: biases on q/k/v and o_proj; ZTT layers support q/k/v "
                "biases only (o_proj has none)")
    if getattr(hf, "mlp_bias", False):
        _refuse("mlp_bias=true: MLP biases are not supported")
    if model_type == "mistral" and getattr(hf, "sliding_window", None) is not None:
        _refuse(f"sliding_window={hf.sliding_window}: sliding-window attention is not supported "
                f"(ZTT attends to the whole context)")
    if model_type == "qwen2" and getattr(hf, "use_sliding_window", False):
        _refuse("use_sliding_window=true: sliding-window attention is not supported")
    other = sorted({t for t in getattr(hf, "layer_types", None) or [] if t != "full_attention"})
    if other:
        _refuse(f"layer_types {other}: only full_attention layers are supported")
    heads = hf.num_attention_heads
    if hf.hidden_size % heads:
        _refuse(f"hidden_size={hf.hidden_size} is not divisible by num_attention_heads={heads}")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim is not None and head_dim != hf.hidden_size // heads:
        _refuse(f"head_dim={head_dim} differs from hidden_size / num_attention_heads = "
                f"{hf.hidden_size // heads}; not supported")


def ztt_config(hf, options: ImportOptions, layers: LayerMap,
               vocab: Optional[int] = None) -> ZTTConfig:
    """The ZTT model config of the import (the model section of the run config); ``vocab``:
    the vocabulary, when grown beyond the source's for its tokenizer."""
    rope = getattr(hf, "rope_parameters", None) or {}
    rotary_base = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    vocab = vocab or hf.vocab_size
    seq_length = options.seq_length or min(hf.max_position_embeddings, DEFAULT_MAX_SEQ_LENGTH)
    try:
        return ZTTConfig(
            vocab_size=vocab,
            hidden_size=hf.hidden_size,
            ffn_hidden_size=hf.intermediate_size,
            num_layers=len(layers.hf_layers),
            num_attention_heads=hf.num_attention_heads,
            num_query_groups=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            seq_length=seq_length,
            num_cycles=options.num_cycles,
            cycle_mode="head_tail",
            zero_token=options.zero_token,
            gate=options.gate,
            normalization="RMSNorm",
            norm_epsilon=hf.rms_norm_eps,
            activation="swiglu",
            rotary_base=float(rotary_base),
            tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=hf.model_type == "qwen2",
            init_std=getattr(hf, "initializer_range", 0.02),
            attention_dropout=float(getattr(hf, "attention_dropout", 0.0) or 0.0),
            # No padding rows where the vocabulary allows it (padding rows add logits of 0 to
            # the softmax, which would change the source model's loss): the largest power of
            # two up to 128 that divides the vocabulary.
            make_vocab_size_divisible_by=math.gcd(vocab, 128),
        )
    except ConfigError as error:
        raise ImportRefused(f"the imported model config is invalid: {error}") from None


# --------------------------------------------------------------------------- reading the source
def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        _refuse(f"--model {path}: no such directory")
    if not (path / "config.json").is_file():
        _refuse(f"--model {path}: no config.json (not a Hugging Face model directory)")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        _refuse(f"--model {path}: no weights file ({', '.join(WEIGHT_FILES)})")


GGUF_MAGIC = b"GGUF"


def _gguf_location(gguf: Path) -> Tuple[str, dict]:
    if not gguf.is_file():
        _refuse(f"--gguf {gguf}: no such file")
    with open(gguf, "rb") as stream:
        magic = stream.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        _refuse(f"--gguf {gguf}: not a GGUF file (it starts with {magic!r}, a GGUF file with "
                f"{GGUF_MAGIC!r})")
    # transformers' GGUF loader needs gguf, and accelerate for the device_map it is given
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        _refuse(f"--gguf needs the {' and '.join(missing)} package{'s' * (len(missing) > 1)}: "
                f"pip install gguf accelerate (or pip install 'megatron_ztt[import]')")
    return str(gguf.parent), {"gguf_file": gguf.name}


def read_source_config(model_dir: Optional[str], gguf: Optional[str]):
    """(HF config, from_pretrained location and arguments), checked before any weight is read."""
    from transformers import AutoConfig

    if gguf is not None:
        location, extra = _gguf_location(Path(gguf))
    else:
        _check_model_dir(Path(model_dir))
        location, extra = str(model_dir), {}
    try:
        hf = AutoConfig.from_pretrained(location, **extra)
    except Exception as error:  # noqa: BLE001 - the GGUF reader raises struct.error and more
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        hint = " (a truncated or corrupt GGUF file?)" if gguf is not None else ""
        _refuse(f"cannot read the model config of {gguf or model_dir}{hint}: {reason}")
    check_supported(hf)
    return hf, location, extra


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_source_model(hf, location: str, extra: dict, name: str):
    """The HF model in fp32 on the CPU; refuses missing, misshapen or undeclared tensors."""
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_transformers():  # its load report and progress bar: we report ourselves
            model, info = AutoModelForCausalLM.from_pretrained(
                location, dtype=torch.float32, device_map="cpu", output_loading_info=True,
                **extra)
    except Exception as error:  # noqa: BLE001 - safetensors, torch and gguf raise their own
        _refuse(f"cannot load the weights of {name}: {str(error).splitlines()[0]}")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        _refuse(f"{name}: the weights file lacks {len(missing)} tensors the config "
                f"asks for ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        _refuse(f"{name}: tensors of the wrong shape for the config: "
                f"{', '.join(str(m[0] if isinstance(m, tuple) else m) for m in mismatched[:4])}")
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if "rotary_emb" not in k)
    if unexpected:
        _refuse(f"{name}: the weights file holds tensors the config does not use "
                f"(e.g. {', '.join(unexpected[:4])}); a bias or layer the config does not "
                f"declare?")
    tied = model.lm_head.weight is model.model.embed_tokens.weight or (
        model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())
    if bool(getattr(hf, "tie_word_embeddings", False)) != tied:
        _refuse(f"tie_word_embeddings={getattr(hf, 'tie_word_embeddings', False)} but the loaded "
                f"model's lm_head is {'' if tied else 'not '}the input embedding")
    return model.eval()  # fp32 (from_pretrained dtype); GGUF models refuse .float()


# --------------------------------------------------------------------------- conversion
def canonical_state(hf_state: Dict[str, torch.Tensor], config: ZTTConfig, layers: LayerMap,
                    options: ImportOptions) -> Dict[str, torch.Tensor]:
    """HF names and layouts -> the canonical full state dict (ZTTModel's names), with the new
    zero keys and gates initialised as ``options`` say."""
    def take(name):
        return hf_state[name].detach().to(torch.float32).clone()

    def padded(weight):  # rows for the grown vocabulary (the mean row), then zero padding
        grown = config.vocab_size - weight.shape[0]
        if grown > 0:
            weight = torch.cat([weight, weight.mean(0, keepdim=True).expand(grown, -1)])
        extra = config.padded_vocab_size - weight.shape[0]
        return torch.cat([weight, weight.new_zeros(extra, weight.shape[1])]) if extra else weight

    state = {"embedding.word_embeddings.weight": padded(take("model.embed_tokens.weight"))}
    for j, i in enumerate(layers.hf_layers):
        src, dst = f"model.layers.{i}.", f"layers.{j}."
        attn = src + "self_attn."
        state[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        state[dst + "pre_mlp_layernorm.weight"] = take(src + "post_attention_layernorm.weight")
        state[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(
            *(take(f"{attn}{p}_proj.weight") for p in "qkv"), config)
        if config.qkv_bias:
            state[dst + "self_attention.linear_qkv.bias"] = fuse_qkv(
                *(take(f"{attn}{p}_proj.bias") for p in "qkv"), config)
        state[dst + "self_attention.linear_proj.weight"] = take(attn + "o_proj.weight")
        state[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")])
        state[dst + "mlp.linear_fc2.weight"] = take(src + "mlp.down_proj.weight")
    state["output_head.final_norm.weight"] = take("model.norm.weight")
    if not config.tie_embeddings:
        state["output_head.output_layer.weight"] = padded(take("lm_head.weight"))
    state.update(new_parameters(config, options))
    expected = expected_canonical_shapes(config)
    wrong = sorted(set(expected) ^ set(state)) + [
        name for name in expected if name in state and tuple(state[name].shape) != expected[name]]
    if wrong:  # a mapping bug, not a user error
        raise AssertionError(f"imported state does not match the ZTT config: {wrong[:6]}")
    return state


def new_parameters(config: ZTTConfig, options: ImportOptions) -> Dict[str, torch.Tensor]:
    """The zero keys and gates a plain transformer does not have."""
    out = {}
    if config.zero_token:
        generator = torch.Generator().manual_seed(options.seed)
        for app in application_plan(config):
            key = torch.zeros(config.query_groups, config.head_dim)
            if options.zero_key_init == "normal":
                key.normal_(0.0, config.init_std, generator=generator)
            out[f"zero_token_pool.keys.{app.name}"] = key
    if config.gate:
        for c in range(config.num_cycles):
            closed = options.gate_init == "closed-after-first" and c > 0
            out[f"gates.{c}.weight"] = torch.zeros(config.hidden_size)
            out[f"gates.{c}.bias"] = torch.full((1,), -options.gate_bias if closed
                                                else options.gate_bias)
    return out


# --------------------------------------------------------------------------- writing
def _check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        _refuse(f"--output {output} exists and is not an empty directory; choose a new one "
                f"(an import never writes over anything)")


def _versions() -> dict:
    import megatron.core
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "megatron_core": megatron.core.__version__}


def _gguf_tokenizer(location: str, extra: dict):
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(location, **extra)
    except Exception as error:  # noqa: BLE001 - the GGUF reader raises its own errors
        _refuse(f"cannot build the tokenizer of the GGUF file: {str(error).splitlines()[0]}")


def tokenizer_size(location: str, extra: dict) -> Optional[int]:
    """The ids the source's tokenizer can produce (None without a tokenizer): the rows the
    model's embedding needs."""
    if extra.get("gguf_file"):
        return len(_gguf_tokenizer(location, extra))
    if not (Path(location) / HF_TOKENIZER_JSON).is_file():
        return None
    from megatron_ztt.data.tokenizer import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(location).vocab_size
    except TokenizerError as error:
        _refuse(f"--model {location}: {error}")


def import_vocabulary(hf, tokenizer_ids: Optional[int], options: ImportOptions) -> int:
    """The imported model's vocabulary: the source's, or grown to fit its tokenizer."""
    vocab = hf.vocab_size
    if tokenizer_ids is None or tokenizer_ids <= vocab:
        return vocab
    if not options.grow_vocab:
        missing = (f"id {vocab} has" if tokenizer_ids == vocab + 1
                   else f"ids {vocab}..{tokenizer_ids - 1} have")
        _refuse(f"the tokenizer has {tokenizer_ids} ids but the model's vocabulary (vocab_size) "
                f"{vocab}: {missing} no embedding row; pass "
                f"--grow-vocab to add rows for them (each the mean of the others)")
    return tokenizer_ids


def _save_tokenizer(location: str, extra: dict, target: Path) -> bool:
    """Copy the source's tokenizer files (unchanged bytes), or, for a GGUF file, save the
    tokenizer transformers builds from it. Returns whether there was a tokenizer."""
    if extra.get("gguf_file"):
        tokenizer = _gguf_tokenizer(location, extra)
        target.mkdir()
        tokenizer.save_pretrained(target)
        return True
    if not (Path(location) / HF_TOKENIZER_JSON).is_file():
        print(f"note: {location} has no {HF_TOKENIZER_JSON}; the checkpoint holds no tokenizer "
              f"(pass data.tokenizer=... to train on it)", file=sys.stderr)
        return False
    copy_tokenizer(location, target.parent)
    return True


def write_checkpoint(output: Path, config: ZTTConfig, state: Dict[str, torch.Tensor],
                     location: str, extra: dict, source: dict) -> Path:
    """The checkpoint folder, complete or not at all."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    tag = tag_for(0)
    try:
        tag_dir = staging / tag
        tag_dir.mkdir()
        torch.save(state, tag_dir / model_file(0, 0))
        has_tokenizer = _save_tokenizer(location, extra, tag_dir / TOKENIZER_DIR)
        run_config = RunConfig(model=config, data=DataConfig(
            blend=[], tokenizer=str(output / tag / TOKENIZER_DIR) if has_tokenizer else ""))
        run_config.run.name = f"import-{source['name']}"
        meta = {
            "format_version": FORMAT_VERSION,
            "iteration": 0,
            "consumed_train_samples": 0,
            "skipped_steps": 0,
            "layout": {"tensor": 1, "pipeline": 1, "data": 1, "zero_stage": 0},
            "partition_spec": {},  # one full model file: nothing to merge
            "config": run_config.to_dict(),
            "tokenizer": TOKENIZER_DIR if has_tokenizer else None,
            "tokenizer_kind": "huggingface" if has_tokenizer else None,
            "imported_from": source,
            "versions": _versions(),
        }
        write_text_atomic(tag_dir / META, json.dumps(meta, indent=2))  # last: marks it complete
        write_text_atomic(staging / LATEST, tag)
        os.chmod(staging, 0o777 & ~_umask())
        if output.exists():  # an empty directory (checked): replaced by the finished import
            output.rmdir()
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def import_hf(output: str, model_dir: Optional[str] = None, gguf: Optional[str] = None,
              options: Optional[ImportOptions] = None, log=print) -> Path:
    """Import ``model_dir`` (or the GGUF file ``gguf``) into the checkpoint folder ``output``."""
    options = options or ImportOptions()
    if (model_dir is None) == (gguf is None):
        _refuse("give exactly one of --model and --gguf")
    if options.num_cycles < 1:
        _refuse(f"--num-cycles must be >= 1, got {options.num_cycles}")
    if options.zero_key_init not in ZERO_KEY_INITS:
        _refuse(f"--zero-key-init must be one of {', '.join(ZERO_KEY_INITS)}")
    if options.gate_init not in GATE_INITS:
        _refuse(f"--gate-init must be one of {', '.join(GATE_INITS)}")
    if not (math.isfinite(options.gate_bias) and options.gate_bias > 0):
        _refuse(f"--gate-bias must be a finite number > 0 (its sign comes from --gate-init), "
                f"got {options.gate_bias}")
    if options.seq_length is not None and options.seq_length < 1:
        _refuse(f"--seq-length must be >= 1, got {options.seq_length}")
    target = Path(output).absolute()
    _check_output(target)
    hf, location, extra = read_source_config(model_dir, gguf)
    layers = layer_map(hf.num_hidden_layers, options.middle_layers)
    vocab = import_vocabulary(hf, tokenizer_size(location, extra), options)
    config = ztt_config(hf, options, layers, vocab)
    model = load_source_model(hf, location, extra, gguf or model_dir)
    state = canonical_state(model.state_dict(), config, layers, options)
    del model
    source = {"name": Path(gguf or model_dir).name.removesuffix(".gguf"),
              "path": str(Path(gguf or model_dir).absolute()), "model_type": hf.model_type,
              "hf_layers": layers.hf_layers, "dropped_hf_layers": layers.dropped,
              "num_cycles": options.num_cycles, "zero_key_init": options.zero_key_init,
              "gate_init": options.gate_init, "gate_bias": options.gate_bias,
              "vocab_size": hf.vocab_size}
    log(f"layer mapping: {layers.describe(options.num_cycles)}")
    if vocab != hf.vocab_size:
        log(f"note: the tokenizer has {vocab} ids, the model's vocabulary {hf.vocab_size}: "
            f"grew it by {vocab - hf.vocab_size} rows (--grow-vocab), each the mean of the others")
    if layers.dropped:
        log(f"note: HF layers {', '.join(map(str, layers.dropped))} are outside head, middle "
            f"block and tail (--middle-layers) and are not imported")
    path = write_checkpoint(target, config, state, location, extra, source)
    log(f"imported {gguf or model_dir} ({hf.model_type}, {hf.num_hidden_layers} layers) -> "
        f"{path} ({config.num_layers} ZTT layers, {config.num_cycles} cycles, "
        f"{config.num_applications} layer applications per token)")
    return path


# --------------------------------------------------------------------------- CLI
def _middle_layers(text: str) -> Tuple[int, int]:
    try:
        start, stop = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be A:B (a half-open range of HF layer "
                                         f"indices), got {text!r}") from None
    return start, stop


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face model directory (config.json + "
                                        "safetensors or .bin weights)")
    source.add_argument("--gguf", help="a GGUF file (needs `pip install gguf accelerate`)")
    parser.add_argument("--output", required=True,
                        help="checkpoint directory to create (must not exist or be empty)")
    parser.add_argument("--num-cycles", type=int, default=1,
                        help="cycles C of the middle block (default 1)")
    parser.add_argument("--middle-layers", type=_middle_layers, default=None, metavar="A:B",
                        help="HF layers A..B-1 form the cycled block (default: 1:L-1, all "
                             "but the first and the last); others in between are dropped")
    parser.add_argument("--zero-token", action=argparse.BooleanOptionalAction, default=True,
                        help="add a zero key to every attention (default: on)")
    parser.add_argument("--gate", action=argparse.BooleanOptionalAction, default=True,
                        help="add a gate after every cycle (default: on)")
    parser.add_argument("--zero-key-init", choices=ZERO_KEY_INITS, default="zeros",
                        help="initial zero keys: zeros or normal(0, initializer_range) "
                             "(default zeros)")
    parser.add_argument("--gate-init", choices=GATE_INITS, default="open",
                        help="open: every cycle's gate at +gate-bias (g~1); closed-after-first: "
                             "cycle 1 open, later cycles at -gate-bias (near identity)")
    parser.add_argument("--gate-bias", type=float, default=DEFAULT_GATE_BIAS,
                        help=f"magnitude of the initial gate bias (default {DEFAULT_GATE_BIAS:g})")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="model.seq_length of the run config (default: the model's "
                             f"max_position_embeddings, at most {DEFAULT_MAX_SEQ_LENGTH})")
    parser.add_argument("--seed", type=int, default=1234, help="seed of --zero-key-init normal")
    parser.add_argument("--grow-vocab", action="store_true",
                        help="when the tokenizer has more ids than the model's vocabulary, add "
                             "embedding rows for them (each the mean of the others) instead of "
                             "refusing")


def run(args: argparse.Namespace) -> int:
    options = ImportOptions(num_cycles=args.num_cycles, middle_layers=args.middle_layers,
                            zero_token=args.zero_token, gate=args.gate,
                            zero_key_init=args.zero_key_init, gate_init=args.gate_init,
                            gate_bias=args.gate_bias, seq_length=args.seq_length, seed=args.seed,
                            grow_vocab=args.grow_vocab)
    try:
        import_hf(args.output, model_dir=args.model, gguf=args.gguf, options=options)
    except ImportRefused as error:
        print(f"ztt import-hf: error: {error}", file=sys.stderr)
        return 1
    return 0
