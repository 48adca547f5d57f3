"""Export a trained ZTT to a Hugging Face model directory (``ztt export-hf``).

    ztt export-hf --checkpoint CKPT_DIR --output OUT_DIR [--dtype bf16|fp32]

Input is the *canonical full state dict*: every parameter as one full tensor, named as in
``gather_full_state_dict(ZTTModel)``, as ``megatron_ztt.checkpoint.load_trained`` reads it
from a checkpoint of any layout. The result loads with
``AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)``:

    OUT_DIR/config.json                     model_type "ztt", auto_map -> the .py files
    OUT_DIR/configuration_ztt.py, modeling_ztt.py, cycle_engine.py, exit_policy.py
    OUT_DIR/model.safetensors               (model-0000k-of-0000n.safetensors + index if large)
    OUT_DIR/generation_config.json
    OUT_DIR/tokenizer.json, tokenizer_config.json, ...   (AutoTokenizer)

The tokenizer files are the run's SentencePiece model converted to a ``tokenizers`` tokenizer
(checked id for id), or, for a run on a Hugging Face tokenizer (an imported pretrained model),
that tokenizer's original files copied back unchanged.

Everything is written into a hidden sibling directory that is renamed into place at the end,
so OUT_DIR either does not exist or is complete; an existing OUT_DIR is replaced only with
``--overwrite`` and only once the new export is complete.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch

from megatron_ztt.data.tokenizer import (HUGGINGFACE, SPECIAL_IDS, HFTokenizer, TokenizerError,
                                         tokenizer_files, tokenizer_kind)
from megatron_ztt.model.config import ZTTConfig
from megatron_ztt.model.weight_layout import expected_canonical_shapes, split_qkv
from megatron_ztt.model.cycle_engine import EXIT_SIGNALS, application_plan

TEMPLATE_DIR = Path(__file__).resolve().parent / "hf_template"
# file in the export -> where it comes from; modeling_ztt.py runs the training code's own
# cycle loop, copied unchanged
EXPORTED_CODE = {
    "configuration_ztt.py": TEMPLATE_DIR / "configuration_ztt.py",
    "modeling_ztt.py": TEMPLATE_DIR / "modeling_ztt.py",
    "cycle_engine.py": Path(__file__).resolve().parent.parent / "model" / "cycle_engine.py",
    "exit_policy.py": Path(__file__).resolve().parent.parent / "model" / "exit_policy.py",
}
AUTO_MAP = {
    "AutoConfig": "configuration_ztt.ZTTConfig",
    "AutoModel": "modeling_ztt.ZTTModel",
    "AutoModelForCausalLM": "modeling_ztt.ZTTForCausalLM",
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Encoded by SentencePiece and by the exported tokenizer at export time: every id must agree.
# Non-ASCII scripts, emoji and control characters push a small vocabulary into byte fallback.
TOKENIZER_PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces,   runs of spaces, and trailing ones.  ",
    "Tabs\tand\nnew lines\n\nstay.",
    "Ünïcödé café, naïve façade — “quotes” … and 1,234.56 numbers!",
    "日本語のテキスト、中文文本，한국어 텍스트, Ελληνικά, русский текст, עברית, العربية",
    "Emoji 🙂🚀👍🏽 and symbols ∑∫√∞ ≤ ≥ ≠ € £ ¥ © ®",
    "Control \x07 bell and \u200b zero-width space and \ufeff BOM.",
)


class ExportError(RuntimeError):
    """The export cannot be done as asked; the message says why and what to change."""


# --------------------------------------------------------------------------- state dicts
def check_full_state(config: ZTTConfig, full_state: Mapping[str, torch.Tensor]) -> None:
    """Fail, naming the tensors, unless ``full_state`` is exactly one complete model."""
    expected = expected_canonical_shapes(config)
    missing = sorted(set(expected) - set(full_state))
    unexpected = sorted(set(full_state) - set(expected))
    if missing or unexpected:
        raise ExportError(
            f"the checkpoint's state does not match the model config: {len(missing)} tensors "
            f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, {len(unexpected)} "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''} (a partial "
            f"checkpoint, a missing pipeline stage, or unmerged tensor-parallel shards?)")
    wrong = [f"{name}: {tuple(full_state[name].shape)} instead of {shape}"
             for name, shape in expected.items() if tuple(full_state[name].shape) != shape]
    if wrong:
        raise ExportError("tensor shapes do not match the model config (unmerged tensor-parallel "
                          "shards?): " + "; ".join(wrong[:6]))


def to_hf_state(config: ZTTConfig, full_state: Mapping[str, torch.Tensor],
                dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Canonical (Megatron) names and layouts -> the exported model's.

    Megatron fuses Q, K and V (weight and, with ``qkv_bias``, bias) grouped per key/value
    group (``weight_layout.split_qkv``); SwiGLU's fc1 stacks the gate rows over the up rows.
    Vocabulary padding rows are dropped.
    """
    check_full_state(config, full_state)
    vocab = config.vocab_size
    out: Dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": full_state["embedding.word_embeddings.weight"][:vocab]}
    for i in range(config.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for name, tensor in full_state.items():
            if name.startswith(src + "input_layernorm."):
                out[dst + name[len(src):]] = tensor
            elif name.startswith(src + "pre_mlp_layernorm."):
                out[dst + "post_attention_layernorm." + name.rsplit(".", 1)[1]] = tensor
        qkv = full_state[src + "self_attention.linear_qkv.weight"]
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), split_qkv(qkv, config)):
            out[dst + f"self_attn.{proj}.weight"] = part
        if config.qkv_bias:
            bias = full_state[src + "self_attention.linear_qkv.bias"]
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), split_qkv(bias, config)):
                out[dst + f"self_attn.{proj}.bias"] = part
        out[dst + "self_attn.o_proj.weight"] = full_state[src + "self_attention.linear_proj.weight"]
        fc1 = full_state[src + "mlp.linear_fc1.weight"]
        if config.activation == "swiglu":
            out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = fc1.chunk(2, dim=0)
        else:
            out[dst + "mlp.up_proj.weight"] = fc1
        out[dst + "mlp.down_proj.weight"] = full_state[src + "mlp.linear_fc2.weight"]
    for name, tensor in full_state.items():
        if name.startswith("zero_token_pool.keys."):
            out["model.zero_keys." + name[len("zero_token_pool.keys."):]] = tensor
        elif name.startswith("gates.") or name.startswith("exit_head."):
            out["model." + name] = tensor
        elif name.startswith("output_head.final_norm."):
            out["model.norm." + name.rsplit(".", 1)[1]] = tensor
    if not config.tie_embeddings:
        out["lm_head.weight"] = full_state["output_head.output_layer.weight"][:vocab]
    # Own, contiguous storage per tensor: safetensors refuses tensors that share memory.
    return {name: tensor.detach().to("cpu", dtype).clone().contiguous()
            for name, tensor in out.items()}


# --------------------------------------------------------------------------- config, tokenizer
def hf_config(config: ZTTConfig, special_ids: Mapping[str, Optional[int]], dtype: torch.dtype):
    """The exported directory's ZTTConfig (the template class, a transformers config)."""
    from megatron_ztt.export.hf_template.configuration_ztt import ZTTConfig as HFZTTConfig

    exported = HFZTTConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_size,
        num_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.query_groups,
        qkv_bias=config.qkv_bias,
        num_cycles=config.num_cycles,
        cycle_mode=config.cycle_mode,
        zero_token=config.zero_token,
        gate=config.gate,
        normalization=config.normalization,
        norm_eps=config.norm_epsilon,
        activation=config.activation,
        rope_theta=config.rotary_base,
        max_position_embeddings=config.seq_length,
        gate_bias_init=config.gate_bias_init,
        exit_threshold=config.exit_threshold,
        exit_signal=config.exit_signal,
        exit_seed=config.exit_seed,
        exit_objective=config.exit_objective,
        initializer_range=config.init_std,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
        architectures=["ZTTForCausalLM"],
        dtype=dtype,
    )
    exported.auto_map = dict(AUTO_MAP)
    return exported


def build_hf_tokenizer(tokenizer_model: str | os.PathLike):
    """SentencePiece model -> a transformers fast tokenizer with the same ids, and its special ids.

    Not ``LlamaTokenizer(vocab_file=...)``: transformers 5 ignores the file there. The
    SentencePiece model's own pieces, merges and normalizer settings are converted into a
    ``tokenizers`` object (byte fallback included), then checked against SentencePiece's encode.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    path = Path(tokenizer_model)
    if not path.is_file():
        raise ExportError(f"tokenizer model {path} not found")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as error:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise ExportError(f"{path} is not a SentencePiece model: {error}") from error
    model_type = proto.trainer_spec.model_type
    if model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    elif model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    else:
        raise ExportError(f"{path}: only BPE and unigram SentencePiece models can be exported, "
                          f"this one is {sentencepiece_model_pb2.TrainerSpec.ModelType.Name(model_type)}")
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    spec = proto.trainer_spec
    special_ids = {"unk": spec.unk_id, "bos": spec.bos_id, "eos": spec.eos_id, "pad": spec.pad_id}
    special_ids = {role: i if i >= 0 else None for role, i in special_ids.items()}
    tokens = {f"{role}_token": proto.pieces[i].piece for role, i in special_ids.items() if i is not None}
    # Left padding: batched generation appends after the last real token of every row.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **tokens)

    processor = spm.SentencePieceProcessor(model_file=str(path))
    for role, i in special_ids.items():
        if i is not None and getattr(tokenizer, f"{role}_token_id") != i:
            raise ExportError(f"{path}: the exported tokenizer maps the {role} token to id "
                              f"{getattr(tokenizer, f'{role}_token_id')}, SentencePiece to {i}")
    for text in TOKENIZER_PROBES:
        expected = processor.encode(text)
        got = tokenizer(text)["input_ids"]
        if got != expected:
            raise ExportError(f"{path}: the converted tokenizer encodes {text!r} as {got[:16]}..., "
                              f"SentencePiece as {expected[:16]}...; refusing to export a tokenizer "
                              f"with different ids")
    return tokenizer, special_ids, len(proto.pieces)


def original_tokenizer_files(tokenizer_path: str | os.PathLike, config: ZTTConfig):
    """A Hugging Face tokenizer (tokenizer.json or its directory) -> (name in the export ->
    source file, special ids): its own files, written back unchanged."""
    try:
        tokenizer = HFTokenizer(tokenizer_path)
    except TokenizerError as error:
        raise ExportError(str(error)) from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ExportError(f"model.vocab_size is {config.vocab_size} but the tokenizer "
                          f"{tokenizer_path} has ids up to {tokenizer.vocab_size - 1}")
    return tokenizer_files(tokenizer_path), tokenizer.special_ids()


# --------------------------------------------------------------------------- writing
def _check_against_template(hf_state: Mapping[str, torch.Tensor], exported_config) -> None:
    """The converted names and shapes must be exactly what the exported model class expects."""
    from megatron_ztt.export.hf_template.modeling_ztt import ZTTForCausalLM

    with torch.device("meta"):
        model = ZTTForCausalLM(exported_config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if exported_config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    got = {name: tuple(t.shape) for name, t in hf_state.items()}
    if expected != got:
        differ = sorted(set(expected.items()) ^ set(got.items()))
        raise ExportError(f"converted weights do not fit the exported model class: {differ[:8]}")


def _write_weights(hf_state: Dict[str, torch.Tensor], directory: Path, max_shard_size) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(
        hf_state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: hf_state[name] for name in names}, str(directory / filename),
                  metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                for t in hf_state.values())},
                 "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# What an export writes: only a directory made of these is replaced by --overwrite.
EXPORT_FILE_PATTERNS = ("config.json", "generation_config.json", "README.md",
                        "model*.safetensors", "model.safetensors.index.json",
                        "tokenizer*.json", "tokenizer.model", "special_tokens_map.json",
                        "added_tokens.json", "chat_template.jinja", "chat_template.json",
                        "vocab.json", "merges.txt", "vocab.txt") + tuple(EXPORTED_CODE)
# the files that mark a directory as a ZTT export (older exports had no cycle_engine.py)
MARKER_FILES = ("configuration_ztt.py", "modeling_ztt.py")


def is_ztt_export(path: Path) -> bool:
    """A directory written by ``export_hf``: config.json of model_type "ztt" and our code."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and config.get("model_type") == "ztt"
            and all((path / name).is_file() for name in MARKER_FILES))


def check_replaceable(output: Path) -> None:
    """--overwrite replaces a previous ZTT export only, and only one holding nothing else."""
    if not output.is_dir() or not is_ztt_export(output):
        raise ExportError(f"{output} exists and is not a ZTT export (no config.json of "
                          f"model_type 'ztt' with {' and '.join(MARKER_FILES)}); --overwrite "
                          f"replaces only a previous export: choose a new --output")
    foreign = sorted(entry.name for entry in output.iterdir()
                     if entry.is_dir() or not any(fnmatch.fnmatch(entry.name, pattern)
                                                  for pattern in EXPORT_FILE_PATTERNS))
    if foreign:
        raise ExportError(f"{output} is a ZTT export but also holds {', '.join(foreign[:5])}"
                          f"{' ...' if len(foreign) > 5 else ''}, which an export does not "
                          f"write; --overwrite would delete them: move them out or choose a "
                          f"new --output")


def _give_normal_permissions(directory: Path) -> None:
    """mkdtemp makes the staging directory 0700 (and safetensors writes 0600 files): give the
    export the modes any new file gets, 0777/0666 less the umask, so that the other users of
    a shared file system can read it as they can read the user's other files."""
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, files in os.walk(directory):
        os.chmod(folder, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def training_summary(checkpoint: str | os.PathLike) -> dict:
    """What a checkpoint's metadata and its run directory say about the training (for the
    model card): iteration, training tokens, and the last validation loss logged to
    TensorBoard at or before the checkpoint's iteration (when the run's tensorboard/ is there)."""
    from megatron_ztt.checkpoint import read_meta, resolve

    root, tag = resolve(str(checkpoint), note=False)  # load_checkpoint_state gave the note
    meta = read_meta(os.path.join(root, tag))
    run = meta["config"].get("run", {})
    summary = {"checkpoint": tag, "iteration": meta["iteration"],
               "training_tokens": meta["consumed_train_samples"]
               * meta["config"]["model"]["seq_length"],
               "run_name": run.get("name"), "data": meta["config"].get("data", {}).get("blend")}
    loss = _last_validation_loss(Path(root).parent / "tensorboard", meta["iteration"])
    if loss is not None:
        summary["validation_loss"], summary["validation_iteration"] = loss
    return summary


def _last_validation_loss(log_dir: Path, iteration: int) -> Optional[Tuple[float, int]]:
    if not log_dir.is_dir():
        return None
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
        events.Reload()
        if "lm loss validation" not in events.Tags().get("scalars", []):
            return None
        points = [e for e in events.Scalars("lm loss validation") if e.step <= iteration]
    except Exception:  # noqa: BLE001 - the card says "not recorded" rather than failing
        return None
    return (points[-1].value, points[-1].step) if points else None


def model_card(config: ZTTConfig, dtype: torch.dtype, hf_state: Mapping[str, torch.Tensor],
               training: Optional[Mapping], name: str) -> str:
    """README.md of the export: architecture, cycles, exit threshold, training, how to load."""
    from huggingface_hub import ModelCardData

    parameters = sum(t.numel() for t in hf_state.values())
    kind = {"head_tail": "head-tail cycling: layer 1 and layer L once, layers 2..L-1 cycled",
            "basic": "basic cycling: all L layers cycled", "vanilla": "no cycling"}
    threshold = config.exit_threshold
    rows = [
        ("model", "ZTT (Zero Token Transformer)" if config.zero_token and config.gate
         else f"{config.cycle_mode} baseline"),
        ("cycle mode", f"`{config.cycle_mode}` ({kind.get(config.cycle_mode, '')})"),
        ("distinct layers (L) / cycles (C)", f"{config.num_layers} / {config.num_cycles}"),
        ("layer applications per token", str(config.num_applications)),
        ("zero token / gate", f"{'yes' if config.zero_token else 'no'} / "
                              f"{'yes' if config.gate else 'no'}"),
        ("default exit threshold", "none (every cycle runs)" if threshold is None else
         f"{threshold:g} (exit signal `{config.exit_signal}`: "
         f"{EXIT_SIGNALS[config.exit_signal].meaning})"),
        ("hidden size / FFN", f"{config.hidden_size} / {config.ffn_size} ({config.activation})"),
        ("attention heads / key-value groups", f"{config.num_attention_heads} / "
                                               f"{config.query_groups}"),
        ("normalization", config.normalization),
        ("vocabulary / context", f"{config.vocab_size} / {config.seq_length} tokens"),
        ("parameters", f"{parameters:,} ({'tied' if config.tie_embeddings else 'untied'} "
                       f"embeddings; weights in {str(dtype).replace('torch.', '')})"),
    ]
    if training:
        loss = training.get("validation_loss")
        rows += [
            ("trained for", f"{training['iteration']:,} iterations, "
                            f"{training['training_tokens']:,} tokens "
                            f"(checkpoint {training['checkpoint']})"),
            ("final validation loss", "not recorded" if loss is None else
             f"{loss:.4f} (iteration {training['validation_iteration']:,})"),
        ]
        if training.get("data"):
            rows.append(("training data", ", ".join(f"`{d}`" for d in training["data"])))
    else:
        rows.append(("training", "not recorded (exported from weights, not a checkpoint)"))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    exit_options = (',\n                     exit_threshold=0.4, exit_mode="token",   # all optional'
                    '\n                     exit_signal="zero_attention", num_cycles='
                    f'{config.num_cycles})' if config.zero_token else
                    f',\n                     num_cycles={config.num_cycles})   # optional')
    header = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                           tags=["ztt", "zero-token-transformer", "looped-transformer",
                                 "custom_code"]).to_yaml()
    return f"""---
{header}
---

# {name}

A Zero Token Transformer exported by `ztt export-hf` (megatron_ztt): a decoder-only language
model whose middle layers are reused for several cycles, with a learned zero key in every
attention, a per-cycle gate and early exit. The model code ships in this directory
(`configuration_ztt.py`, `modeling_ztt.py`), so loading needs `trust_remote_code=True`.

| | |
|---|---|
{table}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)
inputs = tokenizer("Once upon a time", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64, do_sample=False{exit_options}
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:]))
print(model.mean_cycles_used)   # cycles the new tokens ran
```

The tokenizer pads on the left (for batched generation) and adds no BOS/EOS; the context is
{config.seq_length} tokens.
"""


def _move_into_place(staging: Path, output: Path) -> None:
    """Rename the finished export to ``output``; an old ``output`` goes only after that."""
    if not output.exists():
        os.rename(staging, output)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.replaced-", dir=output.parent))
    os.rename(output, retired / output.name)
    try:
        os.rename(staging, output)
    except BaseException:
        os.rename(retired / output.name, output)
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def export_hf(config: ZTTConfig, full_state: Mapping[str, torch.Tensor],
              tokenizer_model: str | os.PathLike | None, output_dir: str | os.PathLike,
              dtype: str | torch.dtype = "bf16", *, overwrite: bool = False,
              max_shard_size: int | str = "5GB",
              training: Optional[Mapping] = None) -> Path:
    """Write a Hugging Face model directory; returns its path.

    ``full_state``: canonical full state dict (see the module docstring). ``tokenizer_model``:
    the run's tokenizer: a SentencePiece ``.model`` (converted), or a Hugging Face
    ``tokenizer.json`` or directory (its files copied unchanged); None writes the weights
    without a tokenizer (benchmarks, tests), with the project's special ids. ``dtype``:
    "bf16", "fp32" or a torch dtype. ``training``: what :func:`training_summary` knows of the
    run, for the model card.
    """
    torch_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if torch_dtype not in DTYPES.values():
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    output = Path(output_dir).absolute()
    if output.exists() and not overwrite:
        raise ExportError(f"{output} already exists; choose another --output or pass --overwrite")
    if output.exists():
        check_replaceable(output)

    # without a tokenizer, the ids of the project's tokenizer convention
    tokenizer, special_ids, original_files = None, dict(SPECIAL_IDS), {}
    try:
        kind = tokenizer_kind(tokenizer_model) if tokenizer_model is not None else None
    except TokenizerError as error:
        raise ExportError(str(error)) from None
    if kind == HUGGINGFACE:
        original_files, special_ids = original_tokenizer_files(tokenizer_model, config)
    elif tokenizer_model is not None:
        tokenizer, special_ids, pieces = build_hf_tokenizer(tokenizer_model)
        if pieces != config.vocab_size:
            raise ExportError(f"model.vocab_size is {config.vocab_size} but the tokenizer "
                              f"{tokenizer_model} has {pieces} pieces")
    exported_config = hf_config(config, special_ids, torch_dtype)
    hf_state = to_hf_state(config, full_state, torch_dtype)
    _check_against_template(hf_state, exported_config)
    if tokenizer is not None:
        tokenizer.model_max_length = config.seq_length  # the context it was trained on

    from transformers import GenerationConfig

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        exported_config.save_pretrained(staging)
        GenerationConfig(bos_token_id=special_ids.get("bos"), eos_token_id=special_ids.get("eos"),
                         pad_token_id=special_ids.get("pad")).save_pretrained(staging)
        for name, source in EXPORTED_CODE.items():
            shutil.copyfile(source, staging / name)
        _write_weights(hf_state, staging, max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, source in original_files.items():
            shutil.copyfile(source, staging / name)
        (staging / "README.md").write_text(
            model_card(config, torch_dtype, hf_state, training, output.name), encoding="utf-8")
        _give_normal_permissions(staging)
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="training checkpoint directory (any TP/PP/ZeRO layout)")
    parser.add_argument("--output", required=True, help="model directory to create")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="dtype of the exported weights (default: bf16)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output directory once the new export is complete")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="split model.safetensors into shards of at most this size")


def load_checkpoint_state(checkpoint: str | os.PathLike):
    """(ZTTConfig, canonical full state dict, tokenizer model path) from a training checkpoint
    of any layout (tensor-parallel shards merged, pipeline stages united)."""
    from megatron_ztt.checkpoint import CheckpointError, load_trained

    try:
        trained = load_trained(str(checkpoint))
    except CheckpointError as error:
        raise ExportError(str(error)) from error
    return trained.model_config, trained.state, trained.tokenizer


def run(args: argparse.Namespace) -> int:
    from megatron_ztt.checkpoint import CheckpointError, resolve
    from megatron_ztt.files import check_output_path, run_files

    try:
        try:  # never into the checkpoint or its run (before the slow part)
            check_output_path(args.output, "--output",
                              run_files(resolve(args.checkpoint, note=False)[0]), folder=True)
        except CheckpointError as error:
            raise ExportError(str(error)) from None
        if args.overwrite and Path(args.output).exists():  # before the slow part
            check_replaceable(Path(args.output).absolute())
        config, full_state, tokenizer_model = load_checkpoint_state(args.checkpoint)
        path = export_hf(config, full_state, tokenizer_model, args.output, args.dtype,
                         overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                         training=training_summary(args.checkpoint))
    except (ExportError, FileNotFoundError, KeyError, ValueError) as error:
        print(f"ztt export-hf: error: {error}", file=sys.stderr)
        return 1
    print(f"exported {args.checkpoint} -> {path}")
    return 0
