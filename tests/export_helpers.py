"""Shared pieces of the export tests: a SentencePiece model trained on the sample corpus,
model variants, and export + load through the public transformers entry points."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from model_helpers import tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub

CORPUS = Path(__file__).resolve().parent.parent / "data" / "sample"
TOKENIZER_VOCAB = 1000

# Architectures the exporter must reproduce exactly (the training model's config switches).
VARIANTS = {
    "ztt-gqa": dict(),
    "ztt-mha-untied-layernorm-gelu": dict(num_query_groups=None, tie_embeddings=False,
                                          normalization="LayerNorm", activation="gelu"),
    "qkv-bias": dict(qkv_bias=True),  # Qwen2 imports
    "basic-cycles": dict(cycle_mode="basic", num_layers=2),
    "head-tail-no-zero-token": dict(zero_token=False, gate=False),
    "vanilla": dict(cycle_mode="vanilla", num_cycles=1, zero_token=False, gate=False),
}


def variant_config(name: str, vocab_size: int = TOKENIZER_VOCAB, **overrides):
    # 128-row padding makes the embedding larger than the vocabulary, as in real runs.
    settings = dict(VARIANTS[name], vocab_size=vocab_size, make_vocab_size_divisible_by=128)
    settings.update(overrides)
    return tiny_config(**settings)


# The settings `ztt tokenizer train` uses: no Unicode normalisation, whitespace kept as is,
# digits split, so that decode(encode(text)) == text.
from megatron_ztt.data.tokenizer import LOSSLESS_OPTIONS as LOSSLESS  # noqa: E402


def train_sentencepiece(directory: Path, model_type: str = "bpe",
                        vocab_size: int = TOKENIZER_VOCAB, lossless: bool = True) -> Path:
    """A SentencePiece model with byte fallback and the project's fixed special ids
    (``lossless=False``: SentencePiece's default normaliser instead)."""
    import sentencepiece as spm

    prefix = directory / f"sp_{model_type}{'' if lossless else '_nfkc'}"
    spm.SentencePieceTrainer.train(
        input=",".join(str(p) for p in sorted(CORPUS.glob("*.txt"))), model_prefix=str(prefix),
        vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2, **(LOSSLESS if lossless else {}))
    return prefix.with_suffix(".model")


def load_export(directory, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True,
                                                dtype=dtype).eval()


def safetensors_tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def vary_small_parameters(model: torch.nn.Module, seed: int = 0) -> None:
    """Fresh init leaves every gate at w=0, b=4 and every norm at 1, which would hide a wrong
    gate or norm in the exported model; give them (and the zero keys) varied values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 or "zero_token_pool" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)


def build_and_export(name: str, directory: Path, tokenizer_model=None, dtype="fp32",
                     **overrides):
    """A training ZTTModel of variant ``name`` (TP=1, this process) and its export."""
    from megatron_ztt.export.hf import export_hf
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel.sharding import gather_full_state_dict

    config = variant_config(name, **overrides)
    model = ZTTModel(config).eval()
    vary_small_parameters(model)
    path = export_hf(config, gather_full_state_dict(model), tokenizer_model, directory, dtype)
    return model, config, path


def load_full_model_state(path):
    """(model config, canonical full state, tokenizer) of a checkpoint of any layout."""
    from megatron_ztt.checkpoint import load_trained

    trained = load_trained(str(path))
    return trained.model_config, trained.state, trained.tokenizer
