"""Zero-token attention and gate values of trained ZTT models, per cycle and per layer, on the
held-out validation books (this project's analogue of the paper's Figure 2b).

    python bench/zero_attention.py [--variants ztt_exit ztt] [--seeds 1 2 3] [--samples 512]

Needs the runs of ``bench/variants.py``. Every model runs at full depth (no early exit) over the
same held-out sequences; the forward statistics give the mean zero attention of every layer
application (mean over heads, tokens and sequences; ``ZTTOutput.zero_attention``, keyed
``head``, ``cycle<c>_layer<l>``, ``tail``) and the mean gate value of every cycle
(``ZTTOutput.gate``). Writes docs/results/zero_attention.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

from results_common import (add_analysis_arguments, batches, default_paths, init_single_process,
                            load_model, relative, save_figure, trained_runs, validation_samples,
                            write_json)


@torch.no_grad()
def statistics_of_run(directory: Path, samples_count: int, batch_size: int) -> dict:
    model, config = load_model(directory / "checkpoints")
    model_config = model.config
    if not model_config.zero_token:
        raise SystemExit(f"{directory}: the model has no zero tokens")
    samples = validation_samples(config, samples_count)
    sums, gates, cycle_means, loss, count = defaultdict(float), defaultdict(float), \
        defaultdict(float), 0.0, 0
    for batch in batches(samples, batch_size):
        out = model(batch["tokens"], batch["labels"], loss_mask=batch["loss_mask"],
                    collect_stats=True)
        rows = batch["tokens"].shape[0]  # weight by sequences: batches may differ in size
        for name, value in out.zero_attention.items():
            sums[name] += value.item() * rows
        for cycle, value in out.zero_attention_by_cycle(model.plan).items():
            cycle_means[cycle] += value.item() * rows
        for cycle, value in out.gate.items():
            gates[cycle] += value.item() * rows
        loss += out.lm_loss.item() * rows
        count += rows
    order = [app.name for app in model.plan]
    return {
        "run_dir": relative(directory),
        "sequences": count, "tokens": count * model_config.seq_length,
        "validation_loss": loss / count,
        "applications": order,
        "zero_attention": {name: sums[name] / count for name in order},
        # cycles as strings, the keys JSON gives back
        "zero_attention_by_cycle": {str(c): v / count for c, v in sorted(cycle_means.items())},
        "gate_by_cycle": {str(c): v / count for c, v in sorted(gates.items())},
        "layers": model_config.num_layers, "num_cycles": model_config.num_cycles,
        "gate": model_config.gate, "exit_loss_weights": model_config.exit_loss_weights,
    }


def across_seeds(runs: dict) -> dict:
    """Mean and standard deviation over seeds of every statistic."""

    def spread(values):
        values = list(values)
        return {"mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    first = next(iter(runs.values()))
    return {
        "seeds": sorted(runs),
        "layers": first["layers"],
        "zero_attention": {name: spread(r["zero_attention"][name] for r in runs.values())
                           for name in first["applications"]},
        "zero_attention_by_cycle": {c: spread(r["zero_attention_by_cycle"][c]
                                              for r in runs.values())
                                    for c in first["zero_attention_by_cycle"]},
        "gate_by_cycle": {c: spread(r["gate_by_cycle"][c] for r in runs.values())
                          for c in first["gate_by_cycle"]},
    }


def markdown(report: dict) -> str:
    lines = []
    for name, summary in report["summary"].items():
        runs = report["variants"][name]
        first = next(iter(runs.values()))
        cycles = first["num_cycles"]
        several = len(summary["seeds"]) > 1

        def show(stat):
            return f"{stat['mean']:.4f} ± {stat['std']:.4f}" if several else f"{stat['mean']:.4f}"

        middle = sorted({int(a.split("layer")[1]) for a in first["applications"]
                         if a.startswith("cycle")})
        seeds = ", ".join(map(str, summary["seeds"]))
        what = f"mean ± sd over seeds {seeds}" if several else f"seed {seeds}"
        lines.append(f"#### {name} ({what}; {first['sequences']} held-out sequences, "
                     f"{first['tokens']:,} tokens each)\n")
        lines.append("| | " + " | ".join(f"cycle {c}" for c in range(1, cycles + 1)) + " |")
        lines.append("|---|" + "---|" * cycles)
        for layer in middle:
            cells = [show(summary["zero_attention"][f"cycle{c}_layer{layer}"])
                     for c in range(1, cycles + 1)]
            lines.append(f"| zero attention, layer {layer} | " + " | ".join(cells) + " |")
        cells = [show(summary["zero_attention_by_cycle"][str(c)]) for c in range(1, cycles + 1)]
        lines.append("| zero attention, cycle mean A_c | " + " | ".join(cells) + " |")
        if summary["gate_by_cycle"]:
            cells = [show(summary["gate_by_cycle"][str(c)]) for c in range(1, cycles + 1)]
            lines.append("| gate g_c (mean over tokens) | " + " | ".join(cells) + " |")
        lines.append(f"\nHead layer (runs once): zero attention "
                     f"{show(summary['zero_attention']['head'])}; tail layer: "
                     f"{show(summary['zero_attention']['tail'])}.\n")
    return "\n".join(lines)


def plot(report: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8),
                                         gridspec_kw={"width_ratios": [2, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = ["o", "s", "^", "v", "D", "P"]
    for index, (name, summary) in enumerate(report["summary"].items()):
        color = colors[index % len(colors)]
        cycles = len(summary["zero_attention_by_cycle"])
        layers = sorted({int(a.split("layer")[1]) for a in summary["zero_attention"]
                         if a.startswith("cycle")})
        x = list(range(1, cycles + 1))
        for marker, layer in zip(markers, layers):
            stats = [summary["zero_attention"][f"cycle{c}_layer{layer}"] for c in x]
            left.errorbar(x, [s["mean"] for s in stats], yerr=[s["std"] for s in stats],
                          color=color, marker=marker, capsize=3,
                          label=f"{name}: layer {layer}")
        stats = [summary["zero_attention_by_cycle"][str(c)] for c in x]
        left.errorbar(x, [s["mean"] for s in stats], yerr=[s["std"] for s in stats],
                      color=color, linestyle="--", capsize=3, label=f"{name}: cycle mean A_c")
        for position, key in ((0, "head"), (cycles + 1, "tail")):
            left.errorbar([position], [summary["zero_attention"][key]["mean"]],
                          yerr=[summary["zero_attention"][key]["std"]], color=color,
                          marker="*", markersize=10, capsize=3, linestyle="none")
        left.set_xticks(range(cycles + 2), ["head\n(layer 1)"] + [f"cycle {c}" for c in x]
                        + [f"tail\n(layer {summary['layers']})"])
        if summary["gate_by_cycle"]:
            right.errorbar(x, [summary["gate_by_cycle"][str(c)]["mean"] for c in x],
                           yerr=[summary["gate_by_cycle"][str(c)]["std"] for c in x],
                           color=color, marker="o", capsize=3, label=name)
            right.set_xticks(x)
    left.set_xlabel("where in the forward pass (head and tail: stars)")
    left.set_ylabel("mean zero attention (share of attention on the zero token)")
    left.set_title("zero-token attention per cycle and layer, held-out books")
    right.set_xlabel("cycle")
    right.set_ylabel("mean gate value g_c")
    right.set_title("cycle gate")
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    save_figure(figure, output)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_analysis_arguments(parser, "zero_attention", quick_help="64 sequences")
    args = parser.parse_args()
    default_paths(args, "zero_attention")
    if args.quick:
        args.samples = min(args.samples, 64)
    if args.report_only:
        report = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(markdown(report))
        plot(report, args.out.with_suffix(".png"))
        return
    init_single_process()

    report = {"command": "python bench/zero_attention.py " + " ".join(sys.argv[1:]),
              "variants": {}, "summary": {}}
    for name, seed, directory in trained_runs(args):
        print(f"measuring {directory.name}", flush=True)
        report["variants"].setdefault(name, {})[seed] = statistics_of_run(
            directory, args.samples, args.batch_size)
    for name, runs in report["variants"].items():
        report["summary"][name] = across_seeds(runs)
    if not report["variants"]:
        raise SystemExit("no trained ZTT runs found; run bench/variants.py first")
    write_json(args.out.with_suffix(".json"), report)
    table = markdown(report)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    plot(report, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
