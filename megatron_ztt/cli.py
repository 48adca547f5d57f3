"""The `ztt` command. Each subcommand lives in the module that does the work; this file only
routes to it, importing the module lazily so that `ztt --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Each module defines add_arguments(parser) and run(args).
COMMANDS = {
    "tokenizer": ("megatron_ztt.data.tokenizer", "train a SentencePiece tokenizer"),
    "preprocess": ("megatron_ztt.data.preprocess", "tokenize text into Megatron .bin/.idx files"),
    "train": ("megatron_ztt.training.train", "pretrain a model (run under torchrun or srun)"),
    "eval": ("megatron_ztt.training.evaluate", "evaluate a checkpoint at several exit thresholds"),
    "export-hf": ("megatron_ztt.export.hf", "export a checkpoint to a Hugging Face model directory"),
    "import-hf": ("megatron_ztt.pretrained.import_hf",
                  "import a pretrained Hugging Face Llama/Mistral/Qwen2 model as a checkpoint"),
    "generate": ("megatron_ztt.inference.generate", "generate text from an export or checkpoint"),
    "plan": ("megatron_ztt.training.plan",
             "size every rank of a layout (parameters, memory, bubble, FLOPs) on the meta device"),
    "plot": ("megatron_ztt.tools.plot_runs", "plot a TensorBoard scalar of several runs (PNG)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ztt", description="Zero Token Transformer pretraining")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text)
        if name == chosen:  # import only the module the user asked for
            importlib.import_module(module_name).add_arguments(cmd)
            cmd.set_defaults(module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return importlib.import_module(args.module).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
