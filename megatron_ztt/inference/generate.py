"""Generate text from an exported model or a training checkpoint (``ztt generate``).

    ztt generate --model DIR --prompt "Once upon a time" [--max-new-tokens 64]
                 [--exit-threshold 0.4] [--exit-mode sequence|token] [--exit-signal NAME]
                 [--num-cycles N] [--temperature 0.8 --top-p 0.9 --repetition-penalty 1.3
                 --seed 0]

DIR is either a Hugging Face export (``ztt export-hf``) or a training checkpoint, which is
exported (fp32) into a temporary directory first, through the same code. The continuation goes
to stdout; the mean number of cycles each new token ran goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path


def is_exported_model(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "ztt"
    except (OSError, ValueError):
        return False


@contextmanager
def exported_model_dir(model: str | os.PathLike):
    """Yield a directory that ``from_pretrained`` can load: ``model`` itself or a temporary export."""
    path = Path(model)
    if is_exported_model(path):
        yield path
        return
    from megatron_ztt.export.hf import export_hf, load_checkpoint_state

    config, full_state, tokenizer_model = load_checkpoint_state(path)
    with tempfile.TemporaryDirectory(prefix="ztt-generate-") as scratch:
        yield export_hf(config, full_state, tokenizer_model, Path(scratch) / "model", "fp32")


def load(directory: str | os.PathLike, dtype: str = "auto"):
    """(model, tokenizer) from an exported directory, without touching the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar for loading a local file is noise
    torch_dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True,
                                                 dtype=torch_dtype)
    # AutoTokenizer reads config.json first, which names the export's own code; without
    # trust_remote_code transformers would stop and ask (the tokenizer itself is plain).
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    return model.eval(), tokenizer


def fit_prompt(input_ids, max_new_tokens: int, context: int | None, notice=None):
    """The prompt's ids [1, n], checked against the model's context (its training
    seq_length): an empty prompt or one that cannot leave room for the new tokens is an
    error; a prompt that with the new tokens exceeds the context keeps its last tokens, and
    ``notice(message)`` says so."""
    length = input_ids.shape[1]
    if length == 0:
        raise ValueError("the prompt is empty (it encodes to no tokens): give some text to "
                         "continue")
    if not context:
        return input_ids
    if max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in "
                         f"the model's context of {context} tokens: use at most {context - 1}")
    room = context - max_new_tokens
    if length > room:
        if notice is not None:
            notice(f"the prompt has {length} tokens; with {max_new_tokens} new tokens that "
                   f"exceeds the model's context of {context}: using its last {room} tokens")
        return input_ids[:, -room:]
    return input_ids


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64,
                  exit_threshold: float | None = None, exit_mode: str | None = None,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  notice=None, exit_signal: str | None = None, num_cycles: int | None = None,
                  add_special_tokens: bool = False,
                  repetition_penalty: float | None = None):
    """-> (continuation, mean cycles per new token). temperature 0 is greedy decoding;
    ``repetition_penalty`` (> 1 discourages tokens already in the text) applies to both.

    ``notice(message)`` is told when the prompt is cut to fit the context (see fit_prompt).
    The prompt is encoded as ``ztt preprocess`` encodes the training data, without the
    special tokens a tokenizer's template adds (a BOS, or an EOS that would end the text
    before it is continued), unless ``add_special_tokens``.
    """
    import torch

    inputs = tokenizer(prompt, return_tensors="pt", verbose=False,  # fit_prompt says it
                       add_special_tokens=add_special_tokens)
    context = getattr(model.config, "max_position_embeddings", None)
    input_ids = fit_prompt(inputs["input_ids"], max_new_tokens, context, notice)
    if input_ids.shape[1] != inputs["input_ids"].shape[1]:
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    sampling = temperature > 0
    options = dict(max_new_tokens=max_new_tokens, do_sample=sampling,
                   pad_token_id=tokenizer.pad_token_id)
    if sampling:
        options.update(temperature=temperature, top_k=top_k, top_p=top_p)
    if repetition_penalty is not None:
        options["repetition_penalty"] = repetition_penalty
    if exit_threshold is not None:
        options["exit_threshold"] = exit_threshold
    if exit_mode is not None:
        options["exit_mode"] = exit_mode
    if exit_signal is not None:
        options["exit_signal"] = exit_signal
    if num_cycles is not None:
        options["num_cycles"] = num_cycles
    with torch.no_grad():
        output = model.generate(**inputs, **options)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new_tokens, skip_special_tokens=True), model.mean_cycles_used


def sampling_flag_problem(temperature: float, top_k, top_p,
                          repetition_penalty=None) -> str | None:
    """What is wrong with the sampling flags (transformers would ignore some silently)."""
    import math

    if not (math.isfinite(temperature) and temperature >= 0):
        return f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}"
    if top_k is not None and top_k < 1:
        return f"--top-k must be >= 1, got {top_k}"
    if top_p is not None and not 0 < top_p <= 1:
        return f"--top-p must be in (0, 1], got {top_p}"
    if repetition_penalty is not None and not (math.isfinite(repetition_penalty)
                                               and repetition_penalty > 0):
        return ("--repetition-penalty must be a finite number > 0 (1 is no penalty), "
                f"got {repetition_penalty}")
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="exported model directory, or a training checkpoint directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    from megatron_ztt.config import exit_signal_names, exit_threshold_arg, num_cycles_arg

    parser.add_argument("--exit-threshold", type=exit_threshold_arg(allow_inf=True), default=None,
                        help="stop cycling once a cycle's exit signal reaches this "
                             "(default: the model config's; 'inf' runs every cycle)")
    parser.add_argument("--exit-signal", choices=exit_signal_names(), default=None,
                        help="what the threshold is compared with (default: the model "
                             "config's; see docs/DESIGN.md)")
    parser.add_argument("--num-cycles", type=num_cycles_arg, default=None,
                        help="depth dial: cycles to run, 1 .. twice the trained cycles")
    parser.add_argument("--exit-mode", choices=("sequence", "token"), default=None,
                        help="early-exit decision per sequence (default) or per token")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 decodes greedily (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None, metavar="P",
                        help="divide the scores of tokens already in the text by P (> 1 "
                             "discourages loops such as 'the little little little'; "
                             "default: none)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed for sampling: the same seed gives the same sample")
    parser.add_argument("--add-special-tokens", action="store_true",
                        help="encode the prompt with the tokenizer's template (e.g. a BOS); by "
                             "default it is encoded as the training data is, without them")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="compute dtype (default: the exported weights' dtype)")


def run(args: argparse.Namespace) -> int:
    import torch

    from megatron_ztt.export.hf import ExportError

    if args.max_new_tokens < 1:
        print("ztt generate: error: --max-new-tokens must be >= 1", file=sys.stderr)
        return 1
    bad = sampling_flag_problem(args.temperature, args.top_k, args.top_p,
                                args.repetition_penalty)
    if bad:
        print(f"ztt generate: error: {bad}", file=sys.stderr)
        return 1
    if not args.prompt:  # checked again on the token ids, once the tokenizer is loaded
        print("ztt generate: error: the prompt is empty: give some text to continue",
              file=sys.stderr)
        return 1
    torch.manual_seed(args.seed)
    try:
        with exported_model_dir(args.model) as directory:
            model, tokenizer = load(directory, args.dtype)
    except (ExportError, OSError, KeyError, ValueError) as error:
        print(f"ztt generate: error: cannot load {args.model}: {error}", file=sys.stderr)
        return 1
    try:
        text, mean_cycles = generate_text(
            model, tokenizer, args.prompt, args.max_new_tokens, args.exit_threshold,
            args.exit_mode, args.temperature, args.top_k, args.top_p,
            notice=lambda message: print(f"ztt generate: note: {message}", file=sys.stderr),
            exit_signal=args.exit_signal, num_cycles=args.num_cycles,
            add_special_tokens=args.add_special_tokens,
            repetition_penalty=args.repetition_penalty)
    except ValueError as error:  # e.g. an exit threshold for a model without zero tokens
        print(f"ztt generate: error: {error}", file=sys.stderr)
        return 1
    print(text)
    threshold = args.exit_threshold if args.exit_threshold is not None else model.config.exit_threshold
    mode = args.exit_mode or model.config.exit_mode
    signal = args.exit_signal or model.config.exit_signal
    depth = args.num_cycles or model.config.inference_num_cycles or model.config.num_cycles
    print(f"mean cycles used: {mean_cycles:.2f} of {depth} per new token "
          f"(exit threshold {threshold}, exit mode {mode}, exit signal {signal})",
          file=sys.stderr)
    return 0
