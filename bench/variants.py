"""Equal-parameter (and equal-compute) comparison of vanilla, basic cycling, head-tail cycling
and ZTT, trained on the same tokens of the Gutenberg corpus, validated on held-out books.

    python bench/variants.py [--corpus ../shared/data/gutenberg] [--seeds 1 2 3] [--quick]

Steps, each skipped when its output already exists (re-running resumes where it stopped):

1. a BPE tokenizer trained on the training books, and .bin/.idx files for the training books
   and the held-out validation books (``results_common.prepare_corpus``);
2. for every seed and variant (``launch/configs/results/variants.yaml``), one training run
   through the normal entry point (``torchrun -m megatron_ztt.train --config
   launch/configs/results/base.yaml`` + the variant's overrides), then ``ztt eval`` of its
   final checkpoint on the held-out books;
3. a JSON report (parameters, FLOPs per token, validation loss and perplexity per seed and
   their mean, training speed, the validation curves), a markdown table and a PNG of the
   validation loss against training tokens.

``--quick`` trains 40 steps per run and writes under work/results/quick/, for smoke tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from results_common import (BASE_CONFIG, DEFAULT_CORPUS, REPO, VARIANT_CONFIGS,
                            add_train_iters_argument, default_paths, is_completed, prepare_corpus,
                            printable, relative, run_dir, run_logged, save_figure,
                            write_json)

from megatron_ztt.parallel.runtime import free_port

EQUAL_PARAMETERS = ["vanilla", "basic", "head_tail", "ztt", "head_tail_exit", "ztt_exit"]
EQUAL_COMPUTE = ["vanilla_8", "head_tail", "ztt", "head_tail_exit", "ztt_exit"]


def training_command(args, variant: dict, seed: int, directory: Path, data: dict) -> list:
    overrides = [f"run.dir={relative(directory)}", f"run.name={directory.name}",
                 f"data.blend=[{relative(data['prefixes']['train'])}]",
                 f"data.valid_blend=[{relative(data['prefixes']['valid'])}]",
                 f"data.tokenizer={relative(data['tokenizer'])}",
                 f"train.seed={seed}"] + list(variant["overrides"]) + list(args.override)
    if args.train_iters:
        overrides.append(f"train.train_iters={args.train_iters}")
    if args.quick:
        overrides += ["train.train_iters=40", "train.warmup_iters=5", "eval.interval=20",
                      "eval.iters=1", "logging.interval=5"]
    entry = ["-m", "megatron_ztt.train", "--config", relative(BASE_CONFIG)]
    if args.nproc == 1:
        return [sys.executable] + entry + overrides
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
            "--master-port", str(free_port())] + entry + overrides


def evaluation_command(directory: Path, iters: int) -> list:
    return [sys.executable, "-m", "megatron_ztt.cli", "eval",
            "--checkpoint", relative(directory / "checkpoints"), "--iters", str(iters),
            "--output", relative(directory / "eval.json"),
            # --iters counts global batches: of 8 sequences, as the recorded results read them
            "train.global_batch_size=8"]


def train_and_evaluate(args, name: str, variant: dict, seed: int, data: dict, env: dict):
    directory = run_dir(args.work, name, seed, args.train_iters)
    evaluation = directory / "eval.json"
    commands = {"train": training_command(args, variant, seed, directory, data),
                "eval": evaluation_command(directory, args.eval_iters)}
    if is_completed(directory) and evaluation.is_file():
        print(f"{directory.name}: done already", flush=True)
        return commands
    if not is_completed(directory) and directory.exists():
        shutil.rmtree(directory)  # an interrupted run: start it again from scratch
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "log.txt"
    if not is_completed(directory):
        seconds = run_logged(commands["train"], log_path, env)
        print(f"{directory.name}: trained in {seconds:.0f} s", flush=True)
    output = subprocess.run(commands["eval"], cwd=REPO, env=env, capture_output=True, text=True)
    if output.returncode:
        raise SystemExit(f"ztt eval failed for {directory}:\n{output.stderr[-3000:]}")
    return commands


# --------------------------------------------------------------------------- the report
def parameter_counts(model_config) -> dict:
    """Exact parameter counts by part (one process, TP=PP=1)."""
    from megatron_ztt.model.ztt import ZTTModel

    model = ZTTModel(model_config)
    parts = {"embedding": 0, "layers": 0, "zero_tokens": 0, "gates": 0, "final_norm": 0}
    for key, param in model.named_parameters():
        part = {"embedding": "embedding", "layers": "layers", "zero_token_pool": "zero_tokens",
                "gates": "gates", "output_head": "final_norm"}[key.split(".")[0]]
        parts[part] += param.numel()
    parts["total"] = sum(parts.values())
    parts["non_embedding"] = parts["total"] - parts["embedding"]
    return parts


def run_summary(directory: Path) -> dict:
    from megatron_ztt.tools.plot_runs import read_scalars

    evaluation = json.loads((directory / "eval.json").read_text())
    config = json.loads((directory / "config.json").read_text())
    status = json.loads((directory / "status.json").read_text())
    full_depth = evaluation["results"][0]
    steps, train_loss = read_scalars(str(directory), "lm loss")
    valid_steps, valid_loss = read_scalars(str(directory), "lm loss validation")
    _, speed = read_scalars(str(directory), "tokens-per-sec")
    tokens_per_step = config["train"]["global_batch_size"] * config["model"]["seq_length"]
    return {
        "run_dir": relative(directory),
        "train_tokens": config["train"]["train_iters"] * tokens_per_step,
        "validation_loss": full_depth["loss"],
        "validation_perplexity": full_depth["perplexity"],
        "validation_tokens": evaluation["tokens"],
        # the last logged training loss (mean over its logging interval)
        "final_train_loss": train_loss[-1],
        "train_seconds": status["seconds"],
        "median_tokens_per_sec": statistics.median(speed),
        "curve": {"tokens": [s * tokens_per_step for s in valid_steps], "validation_loss":
                  valid_loss},
        "train_curve": {"tokens": [s * tokens_per_step for s in steps], "loss": train_loss},
    }


def mean_std(values):
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def build_report(args, variants: dict, names: list, data: dict, commands: dict) -> dict:
    from megatron_ztt.model.config import ZTTConfig
    from megatron_ztt.config import load_config
    from megatron_ztt.training.metrics import model_flops_per_token

    from results_common import init_single_process

    init_single_process()
    base = yaml.safe_load(BASE_CONFIG.read_text())
    report = {"command": "python bench/variants.py " + " ".join(sys.argv[1:]),
              "setup": {"corpus_books": {k: len(v) for k, v in data["books"].items()},
                        "validation_books": data["books"]["valid"],
                        "corpus_tokens": data["tokens"], "vocab_size": data["vocab_size"],
                        "processes": args.nproc, "threads_per_process":
                            int(os.environ.get("OMP_NUM_THREADS", "1")),
                        "seeds": args.seeds, "eval_iters": args.eval_iters,
                        "base_config": relative(BASE_CONFIG),
                        "variants_config": relative(VARIANT_CONFIGS / "variants.yaml")},
              "variants": {}}
    for name in names:
        directories = {seed: run_dir(args.work, name, seed, args.train_iters)
                       for seed in args.seeds}
        done = {seed: d for seed, d in directories.items()
                if is_completed(d) and (d / "eval.json").is_file()}
        if not done:
            continue
        config = load_config(str(BASE_CONFIG), [
            "data.blend=[unused]", "data.tokenizer=unused"] + list(variants[name]["overrides"])
            + list(args.override))
        model_config: ZTTConfig = config.model
        runs = {seed: run_summary(d) for seed, d in done.items()}
        losses = [r["validation_loss"] for r in runs.values()]
        loss_mean, loss_std = mean_std(losses)
        ppl_mean, ppl_std = mean_std([r["validation_perplexity"] for r in runs.values()])
        report["variants"][name] = {
            "description": variants[name]["description"],
            "overrides": variants[name]["overrides"],
            "layers": model_config.num_layers, "cycles": model_config.num_cycles,
            "cycle_mode": model_config.cycle_mode, "zero_token": model_config.zero_token,
            "gate": model_config.gate, "exit_loss_weights": model_config.exit_loss_weights,
            "layer_applications": model_config.num_applications,
            "parameters": parameter_counts(model_config),
            "training_flops_per_token": model_flops_per_token(model_config,
                                                              model_config.seq_length),
            "train_tokens": next(iter(runs.values()))["train_tokens"],
            "seeds": sorted(runs),
            "validation_loss_mean": loss_mean, "validation_loss_std": loss_std,
            "validation_perplexity_mean": ppl_mean, "validation_perplexity_std": ppl_std,
            "commands": {seed: commands.get((name, seed)) for seed in sorted(runs)},
            "runs": runs,
        }
    report["setup"]["base"] = {k: base[k] for k in ("model", "train")}
    return report


def spread(variant: dict, key: str, digits: int) -> str:
    """mean ± sd over seeds (the mean alone for one seed)."""
    mean = f"{variant[key + '_mean']:.{digits}f}"
    if len(variant["seeds"]) < 2:
        return mean
    return f"{mean} ± {variant[key + '_std']:.{digits}f}"


def markdown(report: dict) -> str:
    variants = report["variants"]
    lines = []

    def table(title, names, reference):
        rows = [n for n in names if n in variants]
        if not rows:
            return
        ref = variants.get(reference)
        lines.append(f"### {title}\n")
        lines.append("| variant | layers L | cycles C | layer applications | parameters (total) "
                     "| non-embedding | training GFLOP per token | train tokens | seeds | "
                     "validation loss (mean ± sd) | perplexity (mean ± sd) | "
                     f"Δ loss vs {reference} |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name in rows:
            v = variants[name]
            delta = (f"{v['validation_loss_mean'] - ref['validation_loss_mean']:+.4f}"
                     if ref else "–")
            lines.append(
                f"| {name} | {v['layers']} | {v['cycles']} | {v['layer_applications']} | "
                f"{v['parameters']['total']:,} | {v['parameters']['non_embedding']:,} | "
                f"{v['training_flops_per_token'] / 1e9:.4f} | {v['train_tokens']:,} | "
                f"{len(v['seeds'])} | {spread(v, 'validation_loss', 4)} | "
                f"{spread(v, 'validation_perplexity', 2)} | {delta} |")
        lines.append("")

    table("Equal parameters", EQUAL_PARAMETERS, "vanilla")
    table("Equal compute (layer applications)", EQUAL_COMPUTE, "vanilla_8")
    lines.append("### Per seed: validation loss\n")
    seeds = sorted({s for v in variants.values() for s in v["seeds"]})
    lines.append("| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    lines.append("|---|" + "---|" * len(seeds))
    for name, v in variants.items():
        cells = [f"{v['runs'][s]['validation_loss']:.4f}" if s in v["runs"] else "–"
                 for s in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("### Training runs: speed on the shared machine (from TensorBoard)\n")
    lines.append("| variant | median tokens/s (mean over seeds) | training-loop seconds per run "
                 "(mean) | final training loss (mean) |")
    lines.append("|---|---|---|---|")
    for name, v in variants.items():
        runs = list(v["runs"].values())
        lines.append(f"| {name} | {statistics.fmean(r['median_tokens_per_sec'] for r in runs):,.0f}"
                     f" | {statistics.fmean(r['train_seconds'] for r in runs):.0f} | "
                     f"{statistics.fmean(r['final_train_loss'] for r in runs):.4f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 4.8))
    for name, v in report["variants"].items():
        runs = list(v["runs"].values())
        tokens = runs[0]["curve"]["tokens"]
        curves = np.array([r["curve"]["validation_loss"] for r in runs
                           if len(r["curve"]["validation_loss"]) == len(tokens)])
        left.plot(np.array(tokens) / 1e6, curves.mean(axis=0), marker="o", markersize=3,
                  label=f"{name} ({v['layer_applications']} appl.)")
        middle.plot(np.array(tokens) * v["training_flops_per_token"] / 1e12,
                    curves.mean(axis=0), marker="o", markersize=3,
                    label=f"{name} ({v['layer_applications']} appl.)")
        train_tokens = np.array(runs[0]["train_curve"]["tokens"]) / 1e6
        train = np.array([r["train_curve"]["loss"] for r in runs
                          if len(r["train_curve"]["loss"]) == len(train_tokens)]).mean(axis=0)
        right.plot(train_tokens, train, label=name)
    seeds = len(report["setup"]["seeds"])
    left.set_title(f"validation loss, held-out books (mean of {seeds} seed(s))")
    right.set_title(f"training loss (mean of {seeds} seed(s))")
    middle.set_title("validation loss against training compute")
    for axes in (left, middle, right):
        axes.set_xlabel("training tokens (millions)")
        axes.set_ylabel("LM loss (nats per token)")
        axes.grid(True, alpha=0.3)
        axes.legend()
    middle.set_xlabel("training compute (model TFLOP: tokens x FLOPs per token)")
    final = [v["validation_loss_mean"] for v in report["variants"].values()]
    if final:
        for axes in (left, middle, right):
            axes.set_ylim(min(final) - 0.2, min(final) + 1.5)
    save_figure(figure, output, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                        help="folder of .txt books (default: ../shared/data/gutenberg)")
    parser.add_argument("--work", type=Path, default=None,
                        help="data and runs (default: work/results, or work/results/quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=None,
                        help="subset of launch/configs/results/variants.yaml, in run order")
    parser.add_argument("--valid-books", type=int, default=5, help="books held out")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--nproc", type=int, default=2, help="training processes")
    parser.add_argument("--eval-iters", type=int, default=64,
                        help="ztt eval batches of 8 sequences (64: 65,536 tokens; "
                             "train.global_batch_size=8 in the eval command)")
    parser.add_argument("--override", nargs="*", default=[],
                        help="extra dotted overrides for every run (changes the results!)")
    add_train_iters_argument(parser)
    parser.add_argument("--quick", action="store_true", help="40 steps per run, smoke test")
    parser.add_argument("--report-only", action="store_true",
                        help="no training: rebuild the report from the finished runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="report prefix (default: docs/results/variants; quick: in --work)")
    args = parser.parse_args()
    default_paths(args, "variants")
    if args.quick:
        args.eval_iters = min(args.eval_iters, 4)

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for key, value in (("ZTT_DEVICE", "cpu"), ("DS_ACCELERATOR", "cpu"),
                       ("OMP_NUM_THREADS", "1")):
        env.setdefault(key, value)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    os.environ.update({k: env[k] for k in ("ZTT_DEVICE", "DS_ACCELERATOR", "OMP_NUM_THREADS")})

    variants = yaml.safe_load((VARIANT_CONFIGS / "variants.yaml").read_text())
    names = args.variants or list(variants)
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(variants)}")
    data = prepare_corpus(args.corpus.resolve(), args.work, args.vocab_size, args.valid_books)

    commands = {}
    for seed in args.seeds:  # seed by seed, so that a stopped sweep has whole seeds
        for name in names:
            if args.report_only:
                directory = run_dir(args.work, name, seed, args.train_iters)
                commands[(name, seed)] = {
                    "train": training_command(args, variants[name], seed, directory, data),
                    "eval": evaluation_command(directory, args.eval_iters)}
                continue
            commands[(name, seed)] = train_and_evaluate(args, name, variants[name], seed, data,
                                                        env)
    shown = {key: {k: printable(c) for k, c in value.items()} for key, value in commands.items()}
    ordered = [n for n in variants if n in names]
    report = build_report(args, variants, ordered, data, shown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), report)
    table = markdown(report)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    plot(report, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
