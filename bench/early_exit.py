"""Early exit of trained ZTT models: validation loss against mean cycles used, over a sweep of
exit thresholds (the loss-versus-compute curve), on the held-out books.

    python bench/early_exit.py [--variants ztt_exit ztt] [--seeds 1 2 3] [--samples 512]

Needs the runs of ``bench/variants.py``. For every run:

1. one pass per validation sequence measures, after every cycle c, the cycle's mean zero
   attention A_c (the exit signal) and the LM loss of exiting there (tail + output head on
   the cycle's state);
2. the thresholds are quantiles of the observed A_c (c < C), so that the sweep spans "every
   sequence exits after cycle 1" to "no sequence exits", whatever the scale of A_c;
3. for each threshold the model's own early-exit path (``forward(..., exit_threshold=t)``,
   per-sequence decision) is evaluated on the same sequences: loss and mean cycles used;
4. the baseline at the same compute: the same number of sequences leaving after each cycle,
   chosen at random instead of by zero attention (its expected loss follows from step 1).

Writes docs/results/early_exit.json, .md and .png (``--quick``: fewer samples, work/results/quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from results_common import (add_analysis_arguments, batches, default_paths, init_single_process,
                            load_model, relative, save_figure, trained_runs, validation_samples,
                            write_json)


@torch.no_grad()
def per_sequence_exits(model, samples) -> dict:
    """A_c and the exit loss after every cycle c, for each sequence (one at a time)."""
    config = model.config
    cycles = config.num_cycles
    # All exit losses computed (training-mode forward; there is no dropout in these models),
    # whatever weights the model was trained with.
    model.config = dataclasses.replace(config, exit_loss_weights=[1.0] * cycles)
    model.train()
    zero_attention, losses = [], []
    try:
        for batch in batches(samples, 1):
            out = model(batch["tokens"], batch["labels"], loss_mask=batch["loss_mask"],
                        collect_stats=True)
            by_cycle = out.zero_attention_by_cycle(model.plan)
            zero_attention.append([by_cycle[c].item() for c in range(1, cycles + 1)])
            losses.append([out.exit_losses[c].item() for c in range(1, cycles + 1)])
    finally:
        model.config = config
        model.eval()
    return {"zero_attention": np.array(zero_attention), "loss": np.array(losses)}


@torch.no_grad()
def early_exit_eval(model, samples, threshold, batch_size: int) -> dict:
    """The model's own early-exit path (library ``evaluate``), per sequence: the rule this
    benchmark compares with random exits of whole sequences (``ztt eval`` decides per token)."""
    from megatron_ztt.training.evaluate import evaluate

    def forward(batch, exit_threshold):
        return model(batch["tokens"], batch["labels"], loss_mask=batch["loss_mask"],
                     exit_threshold=exit_threshold, exit_mode="sequence", collect_stats=False)

    count = len(samples) // batch_size
    return evaluate(forward, batches(samples[:count * batch_size], batch_size), count, threshold)


def exit_depths(zero_attention: np.ndarray, threshold: float) -> np.ndarray:
    """Cycle (1-based) at which each sequence leaves: first c < C with A_c >= threshold."""
    cycles = zero_attention.shape[1]
    reached = zero_attention[:, :-1] >= threshold
    first = np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, cycles)
    return first


def analyse_run(directory: Path, samples_count: int, quantiles: int, batch_size: int,
                thresholds=None) -> dict:
    model, config = load_model(directory / "checkpoints")
    model_config = model.config
    if not model_config.zero_token:
        raise SystemExit(f"{directory}: no zero tokens, no early exit")
    samples = validation_samples(config, samples_count)
    per_sequence = per_sequence_exits(model, samples)
    za, loss = per_sequence["zero_attention"], per_sequence["loss"]
    cycles = model_config.num_cycles
    middle = len(model_config.cycled_layers)
    extra = model_config.num_applications - cycles * middle

    if thresholds is None:
        observed = za[:, :-1].ravel()
        grid = np.quantile(observed, np.linspace(0, 1, quantiles))
        span = observed.max() - observed.min()
        thresholds = sorted({float(observed.min() - 1e-3 * span - 1e-9)}
                            | {float(t) for t in grid[1:-1]}
                            | {float(observed.max() + 1e-3 * span + 1e-9)})
    fixed_depth = loss.mean(axis=0)
    points = []
    full = early_exit_eval(model, samples, None, batch_size)
    for threshold in [None] + list(thresholds):
        measured = full if threshold is None else early_exit_eval(model, samples, threshold,
                                                                  batch_size)
        depths = (np.full(len(za), cycles) if threshold is None
                  else exit_depths(za, threshold))
        share = np.array([(depths == c).mean() for c in range(1, cycles + 1)])
        points.append({
            "threshold": threshold,
            "loss": measured["loss"],
            "perplexity": float(np.exp(measured["loss"])),
            "mean_cycles": measured["mean_cycles"],
            "mean_layer_applications": extra + middle * measured["mean_cycles"],
            "exit_share_by_cycle": share.tolist(),
            # the same exits predicted from the per-sequence pass (a consistency check)
            "predicted_loss": float(loss[np.arange(len(depths)), depths - 1].mean()),
            "predicted_mean_cycles": float(depths.mean()),
            # the same number of exits after each cycle, sequences chosen at random
            "random_exit_loss": float(share @ fixed_depth),
        })
    # The premise of the exit rule: a sequence whose zero attention is high after cycle c
    # gains little from the remaining cycles. Rank correlation of A_c with that gain
    # (negative: the signal works; about 0: it carries no information about the gain).
    gain_correlation = [spearman(za[:, c], loss[:, c] - loss[:, -1]) for c in range(cycles - 1)]
    return {
        "run_dir": relative(directory),
        "spearman_zero_attention_vs_gain_of_remaining_cycles": gain_correlation,
        "iteration": json.loads((directory / "status.json").read_text())["iteration"],
        "sequences": len(samples), "tokens": len(samples) * model_config.seq_length,
        "num_cycles": cycles, "exit_loss_weights": model_config.exit_loss_weights,
        "fixed_depth_loss": fixed_depth.tolist(),
        "fixed_depth_layer_applications": [extra + middle * c for c in range(1, cycles + 1)],
        "zero_attention_by_cycle": {
            "mean": za.mean(axis=0).tolist(), "std": za.std(axis=0).tolist(),
            "quantiles_5_50_95": np.quantile(za, [0.05, 0.5, 0.95], axis=0).T.tolist()},
        "points": points,
        "zero_attention_histogram": histogram(za),
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (no ties expected in continuous values)."""
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def histogram(zero_attention: np.ndarray, bins: int = 40) -> dict:
    """Per-cycle histograms of the per-sequence A_c, on shared bin edges."""
    edges = np.histogram_bin_edges(zero_attention, bins=bins)
    return {"edges": edges.tolist(),
            "counts_by_cycle": [np.histogram(zero_attention[:, c], bins=edges)[0].tolist()
                                for c in range(zero_attention.shape[1])]}


def summary_table(report: dict) -> list:
    lines = ["| variant | seed | loss, every sequence exits after cycle 1 / 2 / 3 | threshold "
             "exit vs random exits, best point: Δ loss (mean cycles) | worst point | rank "
             "correlation of A_c with the gain of the remaining cycles, c = 1 / 2 |",
             "|---|---|---|---|---|---|"]
    for name, runs in report["variants"].items():
        for seed, run in runs.items():
            deltas = [(p["loss"] - p["random_exit_loss"], p["mean_cycles"])
                      for p in run["points"]]
            best, worst = min(deltas), max(deltas)
            fixed = " / ".join(f"{v:.4f}" for v in run["fixed_depth_loss"])
            correlation = " / ".join(
                f"{r:+.3f}" for r in run["spearman_zero_attention_vs_gain_of_remaining_cycles"])
            lines.append(f"| {name} | {seed} | {fixed} | {best[0]:+.4f} ({best[1]:.2f}) | "
                         f"{worst[0]:+.4f} ({worst[1]:.2f}) | {correlation} |")
    return lines + [""]


def markdown(report: dict) -> str:
    lines = summary_table(report)
    for name, runs in report["variants"].items():
        for seed, run in runs.items():
            lines.append(f"#### {name}, seed {seed} ({run['sequences']} held-out sequences, "
                         f"{run['tokens']:,} tokens)\n")
            fixed = ", ".join(f"after cycle {c + 1}: {v:.4f}"
                              for c, v in enumerate(run["fixed_depth_loss"]))
            za = ", ".join(f"A_{c + 1} {m:.4f} ± {s:.4f}" for c, (m, s) in enumerate(
                zip(run["zero_attention_by_cycle"]["mean"],
                    run["zero_attention_by_cycle"]["std"])))
            lines.append(f"Fixed-depth loss (every sequence exits there): {fixed}.  ")
            lines.append(f"Zero attention per sequence (mean ± sd): {za}.  ")
            correlation = ", ".join(
                f"A_{c + 1}: {r:+.3f}" for c, r in enumerate(
                    run["spearman_zero_attention_vs_gain_of_remaining_cycles"]))
            lines.append("Rank correlation of A_c with the loss a sequence gains from the "
                         f"remaining cycles (negative = the exit signal works): {correlation}.\n")
            lines.append("| threshold | mean cycles | layer applications | loss | perplexity | "
                         "random exits, same cycles: loss | Δ (threshold − random) | "
                         "exits after cycle 1 / 2 / … |")
            lines.append("|---|---|---|---|---|---|---|---|")
            for p in run["points"]:
                threshold = "none" if p["threshold"] is None else f"{p['threshold']:.5f}"
                shares = " / ".join(f"{100 * s:.0f}%" for s in p["exit_share_by_cycle"])
                lines.append(f"| {threshold} | {p['mean_cycles']:.3f} | "
                             f"{p['mean_layer_applications']:.2f} | {p['loss']:.4f} | "
                             f"{p['perplexity']:.2f} | {p['random_exit_loss']:.4f} | "
                             f"{p['loss'] - p['random_exit_loss']:+.4f} | {shares} |")
            lines.append("")
    return "\n".join(lines)


def plot(report: dict, output: Path, baselines: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    figure, axes_row = plt.subplots(1, len(names) + 1, figsize=(6 * (len(names) + 1), 4.8),
                                    squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axes, name in zip(axes_row[0], names):
        for index, (seed, run) in enumerate(report["variants"][name].items()):
            color = colors[index % len(colors)]
            points = sorted(run["points"], key=lambda p: p["mean_layer_applications"])
            x = [p["mean_layer_applications"] for p in points]
            axes.plot(x, [p["loss"] for p in points], marker="o", markersize=3, color=color,
                      label=f"seed {seed}: exit on zero attention")
            axes.plot(x, [p["random_exit_loss"] for p in points], linestyle="--", color=color,
                      label=f"seed {seed}: random exits, same cycles")
            axes.plot(run["fixed_depth_layer_applications"], run["fixed_depth_loss"],
                      linestyle="none", marker="s", color=color, markersize=6,
                      label=f"seed {seed}: every sequence exits after cycle 1, 2, 3")
        for (base_name, (applications, value)), (color, marker) in zip(
                baselines.items(), [("black", "*"), ("tab:gray", "P"), ("tab:purple", "X"),
                                    ("tab:brown", "D")]):
            axes.plot([applications], [value], marker=marker, markersize=10, linestyle="none",
                      color=color, label=f"{base_name} (trained, full depth, seed mean)")
        axes.set_xlabel("mean layer applications per sequence (2 + 2 × mean cycles)")
        axes.set_ylabel("validation LM loss (held-out books)")
        axes.set_title(f"{name}: early exit (loss vs compute)")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7)
    # the exit signal's distribution
    axes = axes_row[0][-1]
    for name in names:
        seed, run = next(iter(report["variants"][name].items()))
        hist = run["zero_attention_histogram"]
        for c, counts in enumerate(hist["counts_by_cycle"]):
            axes.stairs(counts, hist["edges"], label=f"{name} (seed {seed}): A_{c + 1}")
    axes.set_xlabel("mean zero attention of the cycle, per sequence (A_c)")
    axes.set_ylabel("sequences")
    axes.set_title("exit signal distribution")
    axes.legend(fontsize=7)
    save_figure(figure, output)


def baseline_points(path: Path) -> dict:
    """Full-depth losses of the trained baselines within ZTT's compute range (bench/variants.py:
    vanilla, head-tail cycling, vanilla with 8 layers; basic cycling runs 12 applications and
    is left out of the plot), for the plot."""
    if not path.is_file():
        return {}
    variants = json.loads(path.read_text())["variants"]
    return {name: (v["layer_applications"], v["validation_loss_mean"])
            for name, v in variants.items() if name in ("vanilla", "head_tail", "vanilla_8")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_analysis_arguments(parser, "early_exit", quick_help="64 sequences, 5 thresholds")
    parser.add_argument("--quantiles", type=int, default=13,
                        help="thresholds: this many quantiles of the observed A_c")
    parser.add_argument("--thresholds", type=float, nargs="+", default=None,
                        help="explicit thresholds instead of quantiles")
    args = parser.parse_args()
    default_paths(args, "early_exit")
    if args.quick:
        args.samples, args.quantiles = min(args.samples, 64), min(args.quantiles, 5)
    # the baselines trained with the same token budget (bench/variants.py's report)
    baselines_file = args.out.parent / (f"variants_iters{args.train_iters}.json"
                                        if args.train_iters else "variants.json")
    if args.report_only:
        report = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(markdown(report))
        plot(report, args.out.with_suffix(".png"),
             baseline_points(baselines_file))
        return
    init_single_process()

    report = {"command": "python bench/early_exit.py " + " ".join(sys.argv[1:]),
              "threads": torch.get_num_threads(), "variants": {}}
    for name, seed, directory in trained_runs(args):
        print(f"analysing {directory.name}", flush=True)
        report["variants"].setdefault(name, {})[seed] = analyse_run(
            directory, args.samples, args.quantiles, args.batch_size, args.thresholds)
    if not report["variants"]:
        raise SystemExit("no trained ZTT runs found; run bench/variants.py first")
    summary = {}
    for name, runs in report["variants"].items():
        best = [min(r["points"], key=lambda p: p["loss"] - p["random_exit_loss"])
                for r in runs.values()]
        summary[name] = {
            "fixed_depth_loss_mean": np.mean([r["fixed_depth_loss"] for r in runs.values()],
                                             axis=0).tolist(),
            "largest_gain_over_random_exit_mean": statistics.fmean(
                p["random_exit_loss"] - p["loss"] for p in best),
            "max_abs_predicted_minus_measured_loss": max(
                abs(p["predicted_loss"] - p["loss"]) for r in runs.values()
                for p in r["points"]),
        }
    report["summary"] = summary
    write_json(args.out.with_suffix(".json"), report)
    table = markdown(report)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    plot(report, args.out.with_suffix(".png"),
         baseline_points(baselines_file))


if __name__ == "__main__":
    main()
