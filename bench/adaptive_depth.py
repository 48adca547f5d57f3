"""Adaptive depth of trained ZTT models: held-out loss against mean middle-layer applications
per token, for every exit signal with per-token causal exits, against random exits at matched
rates and fixed depth (the depth dial); and loss against the depth dial C' = 1 .. 2C.

    python bench/adaptive_depth.py [--variants ztt_exit ztt] [--seeds 1 2] [--samples 128]

Needs the runs of ``bench/variants.py`` (``--work`` points at its folder). For every run:

1. for each signal (``zero_attention``, ``zero_attention_relative``, ``hidden_change``, ``kl``) one
   pass without exits records the signal of every token after cycles 1 .. C-1 (the engine's
   own ``CycleEngine.exit_signal``); the thresholds are quantiles of what it saw, so that the
   sweep spans "every token leaves after cycle 1" to "no token leaves";
2. for each threshold the model's own forward with per-token exits (``exit_mode="token"``)
   runs on the held-out sequences: loss, mean cycles per token and the share of tokens
   leaving after each cycle;
3. controls: the ``random`` signal with exit probabilities p per cycle chosen so that the
   expected mean cycles, sum_{k<C} (1-p)^k, are evenly spaced from 1 to C (each p averaged
   over ``--random-draws`` seeds of the draw), and fixed depth C' = 1 .. 2C (the depth dial,
   no exits; C' <= C are the fixed-depth control, C' > C reuse cycle C's zero keys and gate).

Per signal the report states the fewest mean middle applications per token at no more than
1 % higher loss than full depth (on the piecewise-linear curve), and the loss difference
against random exits at equal compute (interpolated on the random curve). The goal checked:
at least 30 % fewer middle applications at <= 1 % higher loss, and better than random exits.

Writes docs/results/adaptive_depth.json, .md, .png (loss vs applications) and
adaptive_depth_dial.png (loss vs C'); ``--quick``: 16 sequences, 4 thresholds, inside --work.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from results_common import (REPO, add_analysis_arguments, batches, default_paths,
                            init_single_process, load_model, relative, save_figure, trained_runs,
                            use_run_data, validation_samples, write_json)

SIGNALS = ("zero_attention", "zero_attention_relative", "hidden_change", "kl", "trained")
LOSS_TOLERANCE = 0.01  # the goal: at most 1 % higher loss than full depth ...
GOAL_SAVING = 0.30  # ... with at least 30 % fewer middle applications


# ----------------------------------------------------------------------------- measuring
@torch.no_grad()
def measure(model, samples, batch_size: int, **forward_options) -> dict:
    """Loss, mean cycles per token and the share of tokens leaving after each cycle, of the
    model's own forward (library ``evaluate``) with ``forward_options`` (exit_threshold,
    exit_signal, num_cycles)."""
    from megatron_ztt.training.evaluate import evaluate

    depth = forward_options.get("num_cycles") or model.config.num_cycles
    counts = torch.zeros(depth + 1, dtype=torch.long)
    threshold = forward_options.pop("exit_threshold", None)

    def forward(batch, exit_threshold):
        out = model(batch["tokens"], batch["labels"], loss_mask=batch["loss_mask"],
                    exit_threshold=exit_threshold, exit_mode="token", collect_stats=False,
                    **forward_options)
        counts.add_(torch.bincount(out.cycles_used.flatten(), minlength=depth + 1))
        return out

    count = len(samples) // batch_size
    started = time.perf_counter()
    result = evaluate(forward, batches(samples[:count * batch_size], batch_size), count,
                      threshold)
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["exit_share_by_cycle"] = (counts[1:].float() / counts.sum()).tolist()
    return result


@torch.no_grad()
def observed_signal(model, samples, batch_size: int, signal: str) -> np.ndarray:
    """Every token's ``signal`` after cycles 1 .. C-1 ([cycles - 1, tokens]): the engine's
    ``exit_signal`` is wrapped to record what it computes in a pass where no token leaves."""
    from megatron_ztt.model.cycle_engine import EXIT_SIGNALS

    engine = model.engine
    compute = engine.exit_signal
    seen = {}

    def recording(cycle, state, rule):
        value = compute(cycle, state, rule)
        seen.setdefault(cycle, []).append(value.detach().float().flatten())
        return value

    never = float("-inf") if EXIT_SIGNALS[signal].exits_below else float("inf")
    engine.exit_signal = recording
    try:
        measure(model, samples, batch_size, exit_threshold=never, exit_signal=signal)
    finally:
        del engine.exit_signal  # back to the class's method
    return np.stack([torch.cat(seen[c]).numpy() for c in sorted(seen)])


def sweep_thresholds(values: np.ndarray, count: int) -> list:
    """``count`` quantiles of the pooled values, the ends moved just outside the observed
    range: one end makes every token leave after cycle 1, the other none (whichever way the
    signal exits)."""
    pooled = values.ravel()
    low, high = float(pooled.min()), float(pooled.max())
    margin = 1e-3 * (high - low) + 1e-9
    inner = np.quantile(pooled, np.linspace(0, 1, count))[1:-1]
    return sorted({low - margin, high + margin} | {float(t) for t in inner})


def expected_cycles(probability: float, cycles: int) -> float:
    """Mean cycles per token when each token leaves after every cycle c < C with probability p."""
    return float(sum((1 - probability) ** k for k in range(cycles)))


def random_probabilities(cycles: int, count: int) -> list:
    """Exit probabilities whose expected mean cycles are evenly spaced from 1 to C (bisection:
    the expected cycles fall monotonically with p)."""
    found = []
    for target in np.linspace(cycles, 1, count):
        low, high = 0.0, 1.0
        for _ in range(60):
            middle = (low + high) / 2
            if expected_cycles(middle, cycles) > target:
                low = middle
            else:
                high = middle
        found.append(round((low + high) / 2, 6))
    return found


@contextlib.contextmanager
def exit_seed(model, seed: int):
    """The model with ``exit_seed`` (the random signal's draw) set to ``seed`` for a while."""
    config = model.config
    model.config = dataclasses.replace(config, exit_seed=seed)
    try:
        yield model
    finally:
        model.config = config


def analyse_run(directory: Path, args) -> dict:
    model, config = load_model(directory / "checkpoints")
    model_config = model.config
    if not model_config.zero_token:
        raise SystemExit(f"{directory}: no zero tokens; the zero-attention signals need them")
    use_run_data(config, args.work, REPO / "work" / "adaptive_depth" / "index-cache")
    samples = validation_samples(config, args.samples)
    cycles = model_config.num_cycles
    middle = len(model_config.cycled_layers)

    def point(result: dict, **extra) -> dict:
        return dict(extra, loss=result["loss"], mean_cycles=result["mean_cycles"],
                    middle_applications=middle * result["mean_cycles"],
                    exit_share_by_cycle=result["exit_share_by_cycle"],
                    seconds=result["seconds"])

    depth_dial = []
    for depth in range(1, 2 * cycles + 1):
        result = measure(model, samples, args.batch_size, num_cycles=depth)
        depth_dial.append(point(result, num_cycles=depth))
        print(f"  C'={depth}: loss {result['loss']:.4f} ({result['seconds']} s)", flush=True)
    signals = {}
    for signal in SIGNALS:
        if signal == "trained" and getattr(model, "exit_head", None) is None:
            continue  # only a model trained with model.exit_objective has an exit head
        values = observed_signal(model, samples, args.batch_size, signal)
        points = []
        for threshold in sweep_thresholds(values, args.quantiles):
            result = measure(model, samples, args.batch_size, exit_threshold=threshold,
                             exit_signal=signal)
            points.append(point(result, threshold=threshold))
        signals[signal] = {
            "distribution_by_cycle": {
                "mean": values.mean(axis=1).tolist(),
                "quantiles_5_50_95": np.quantile(values, [0.05, 0.5, 0.95], axis=1).T.tolist()},
            "points": sorted(points, key=lambda p: p["middle_applications"]),
        }
        print(f"  {signal}: {len(points)} thresholds, mean cycles "
              f"{min(p['mean_cycles'] for p in points):.2f} .. "
              f"{max(p['mean_cycles'] for p in points):.2f}", flush=True)
    random_points = []
    for probability in random_probabilities(cycles, args.random_points):
        draws = []
        for draw in range(args.random_draws):
            with exit_seed(model, draw):
                draws.append(measure(model, samples, args.batch_size, exit_threshold=probability,
                                     exit_signal="random"))
        mean = {key: float(np.mean([d[key] for d in draws]))
                for key in ("loss", "mean_cycles", "seconds")}
        mean["exit_share_by_cycle"] = np.mean([d["exit_share_by_cycle"] for d in draws],
                                              axis=0).tolist()
        random_points.append(point(mean, exit_probability=probability,
                                   loss_by_draw=[d["loss"] for d in draws],
                                   expected_mean_cycles=expected_cycles(probability, cycles)))
    print(f"  random: {len(random_points)} exit probabilities x {args.random_draws} draws",
          flush=True)
    run = {
        "run_dir": shown(directory, args.work), "sequences": len(samples),
        "tokens": len(samples) * model_config.seq_length, "num_cycles": cycles,
        "middle_layers_per_cycle": middle, "exit_loss_weights": model_config.exit_loss_weights,
        "depth_dial": depth_dial,
        "signals": signals,
        "random": sorted(random_points, key=lambda p: p["middle_applications"]),
    }
    run["analysis"] = analyse_curves(run)
    return run


def shown(path: Path, work: Path) -> str:
    """A path for the report: relative to this repository, or, for runs analysed in another
    checkout (``--work``), relative to that checkout (the folder above ``work/results``)."""
    path = Path(path).resolve()
    inside = relative(path)
    if inside != str(path):
        return inside
    try:
        return str(path.relative_to(work.parent.parent))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- analysis
def curve(points: list) -> tuple:
    """(x, y) of a loss curve, sorted by middle applications."""
    points = sorted(points, key=lambda p: p["middle_applications"])
    return (np.array([p["middle_applications"] for p in points]),
            np.array([p["loss"] for p in points]))


def fewest_applications_within(points: list, bound: float) -> float | None:
    """The fewest middle applications on the piecewise-linear curve whose loss is <= bound
    (None: no point qualifies)."""
    x, y = curve(points)
    candidates = [x[i] for i in range(len(x)) if y[i] <= bound]
    for i in range(len(x) - 1):
        if y[i] > bound >= y[i + 1] and x[i + 1] > x[i]:  # crossing inside the segment
            candidates.append(x[i] + (x[i + 1] - x[i]) * (y[i] - bound) / (y[i] - y[i + 1]))
    return float(min(candidates)) if candidates else None


def loss_at(points: list, applications: float) -> float | None:
    """Loss interpolated on the curve at ``applications`` (None outside its range)."""
    x, y = curve(points)
    if not x[0] - 1e-9 <= applications <= x[-1] + 1e-9:
        return None
    return float(np.interp(applications, x, y))


def analyse_curves(run: dict) -> dict:
    """Per signal: fewest applications at <= 1 % higher loss, and loss against random exits
    and fixed depth at equal compute."""
    cycles, middle = run["num_cycles"], run["middle_layers_per_cycle"]
    full_applications = cycles * middle
    fixed = run["depth_dial"][:cycles]
    full_loss = fixed[-1]["loss"]
    bound = full_loss * (1 + LOSS_TOLERANCE)
    goal_applications = (1 - GOAL_SAVING) * full_applications
    result = {"full_depth_loss": full_loss, "loss_bound_1_percent": bound,
              "full_middle_applications": full_applications,
              "goal_middle_applications": goal_applications, "controls": {}, "signals": {}}
    curves = dict({s: v["points"] for s, v in run["signals"].items()},
                  random=run["random"], fixed_depth=fixed)
    for name, points in curves.items():
        fewest = fewest_applications_within(points, bound)
        entry = {
            "fewest_middle_applications_within_1_percent": fewest,
            "saving_within_1_percent": None if fewest is None else 1 - fewest / full_applications,
            "loss_at_goal_compute": loss_at(points, goal_applications),
        }
        if name in run["signals"]:
            deltas = []
            for p in points:
                reference = loss_at(run["random"], p["middle_applications"])
                if reference is not None and 0 < p["exit_share_by_cycle"][-1] < 1:
                    deltas.append(p["loss"] - reference)  # points where some tokens left
            at_goal = [entry["loss_at_goal_compute"], loss_at(run["random"], goal_applications)]
            entry.update({
                "loss_minus_random_mean": float(np.mean(deltas)) if deltas else None,
                "loss_minus_random_min": float(np.min(deltas)) if deltas else None,
                "loss_minus_random_max": float(np.max(deltas)) if deltas else None,
                "loss_minus_random_at_goal_compute": (None if None in at_goal
                                                      else at_goal[0] - at_goal[1]),
                "loss_minus_fixed_depth_at_goal_compute": (
                    None if entry["loss_at_goal_compute"] is None
                    else entry["loss_at_goal_compute"] - loss_at(fixed, goal_applications)),
            })
            entry["meets_goal"] = bool(
                entry["saving_within_1_percent"] is not None
                and entry["saving_within_1_percent"] >= GOAL_SAVING
                and entry["loss_minus_random_at_goal_compute"] is not None
                and entry["loss_minus_random_at_goal_compute"] < 0)
            result["signals"][name] = entry
        else:
            result["controls"][name] = entry
    return result


def summarise(report: dict) -> dict:
    """Per variant: the per-run analysis averaged over seeds (with the per-seed values)."""
    summary = {}
    for name, runs in report["variants"].items():
        analyses = [r["analysis"] for r in runs.values()]
        entry = {"seeds": list(runs), "full_depth_loss": [a["full_depth_loss"] for a in analyses],
                 "depth_dial_loss_by_seed": [[p["loss"] for p in r["depth_dial"]]
                                             for r in runs.values()]}
        entry["depth_dial_loss_mean"] = np.mean(entry["depth_dial_loss_by_seed"], axis=0).tolist()
        for group in ("signals", "controls"):
            entry[group] = {}
            for curve_name in analyses[0][group]:
                values = {}
                for key in analyses[0][group][curve_name]:
                    per_seed = [a[group][curve_name][key] for a in analyses]
                    numbers = [v for v in per_seed if isinstance(v, (int, float))
                               and not isinstance(v, bool)]
                    values[key] = {"by_seed": per_seed, "mean": (
                        float(np.mean(numbers)) if len(numbers) == len(per_seed) else None)}
                entry[group][curve_name] = values
        summary[name] = entry
    return summary


# ----------------------------------------------------------------------------- report
def number(value, form: str = "{:.4f}") -> str:
    return "–" if value is None else form.format(value)


def seeds_and_mean(values: dict) -> str:
    """"mean (seed 1 / seed 2 ...)" of a signed loss difference."""
    per_seed = " / ".join(number(v, "{:+.4f}") for v in values["by_seed"])
    return f"{number(values['mean'], '{:+.4f}')} ({per_seed})"


def markdown(report: dict) -> str:
    lines = [f"Held-out sequences per run: {report['samples']} x {report['seq_length']} tokens; "
             f"thresholds: {report['quantiles']} quantiles of each signal; random exits: "
             f"{report['random_points']} exit probabilities x {report['random_draws']} draws; "
             f"{report['threads']} thread(s).\n"]
    lines.append("#### Goal: >= 30 % fewer middle applications at <= 1 % higher loss, and "
                 "better than random exits at equal compute\n")
    lines.append("| variant | curve | fewest middle applications at <= 1 % loss (saving), "
                 "seed mean | per seed | loss at 30 % fewer applications | Δ vs random there "
                 "(per seed) | Δ vs fixed depth there (per seed) | Δ vs random, mean over the "
                 "sweep (min .. max) | goal met (seeds) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, entry in report["summary"].items():
        for group in ("signals", "controls"):
            for curve_name, values in entry[group].items():
                fewest = values["fewest_middle_applications_within_1_percent"]
                saving = values["saving_within_1_percent"]
                per_seed = ", ".join(
                    "none" if f is None else f"{f:.2f} ({100 * s:.0f} %)"
                    for f, s in zip(fewest["by_seed"], saving["by_seed"]))
                mean = ("–" if fewest["mean"] is None
                        else f"{fewest['mean']:.2f} ({100 * saving['mean']:.0f} %)")
                if group == "signals":
                    vs_random = seeds_and_mean(values["loss_minus_random_at_goal_compute"])
                    vs_fixed = seeds_and_mean(values["loss_minus_fixed_depth_at_goal_compute"])
                    low = values["loss_minus_random_min"]["by_seed"]
                    high = values["loss_minus_random_max"]["by_seed"]
                    sweep = number(values["loss_minus_random_mean"]["mean"], "{:+.4f}")
                    if None not in low + high:
                        sweep += f" ({min(low):+.4f} .. {max(high):+.4f})"
                    met, seeds = sum(values["meets_goal"]["by_seed"]), len(entry["seeds"])
                    goal = f"{'yes' if met == seeds else 'no'} ({met}/{seeds})"
                else:
                    vs_random = vs_fixed = sweep = goal = ""
                lines.append(f"| {name} | {curve_name} | {mean} | {per_seed} | "
                             f"{number(values['loss_at_goal_compute']['mean'])} | {vs_random} | "
                             f"{vs_fixed} | {sweep} | {goal} |")
    lines.append("\nFull depth = C middle-layer cycles (6 middle applications per token here); "
                 "the 1 % bound is relative to each seed's full-depth loss. Δ < 0: the signal's "
                 "exits lose less than the control at the same compute.\n")
    lines.append("#### Depth dial: loss at C' cycles, no exits (mean over seeds; per seed)\n")
    depths = len(next(iter(report["summary"].values()))["depth_dial_loss_mean"])
    lines.append("| variant | " + " | ".join(f"C' = {d}" for d in range(1, depths + 1)) + " |")
    lines.append("|---|" + "---|" * depths)
    for name, entry in report["summary"].items():
        cells = []
        for d in range(depths):
            seeds = " / ".join(f"{s[d]:.4f}" for s in entry["depth_dial_loss_by_seed"])
            cells.append(f"**{entry['depth_dial_loss_mean'][d]:.4f}** ({seeds})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, runs in report["variants"].items():
        for seed, run in runs.items():
            lines.append(f"#### {name}, seed {seed}: every point\n")
            lines.append("| curve | threshold / p | mean cycles | middle applications | loss | "
                         "Δ vs full depth | tokens leaving after cycle 1 / 2 / … |")
            lines.append("|---|---|---|---|---|---|---|")
            full = run["analysis"]["full_depth_loss"]
            rows = [(signal, p, "threshold") for signal, v in run["signals"].items()
                    for p in v["points"]]
            rows += [("random", p, "exit_probability") for p in run["random"]]
            rows += [("fixed depth", p, "num_cycles") for p in run["depth_dial"]]
            for curve_name, p, key in rows:
                shares = " / ".join(f"{100 * s:.0f}%" for s in p["exit_share_by_cycle"])
                lines.append(f"| {curve_name} | {p[key]:.5g} | {p['mean_cycles']:.3f} | "
                             f"{p['middle_applications']:.2f} | {p['loss']:.4f} | "
                             f"{100 * (p['loss'] / full - 1):+.2f} % | {shares} |")
            lines.append("")
    return "\n".join(lines)


STYLES = {"zero_attention": ("tab:blue", "o"), "zero_attention_relative": ("tab:green", "^"),
          "hidden_change": ("tab:orange", "v"), "kl": ("tab:purple", "D"),
          "trained": ("tab:red", "P"),
          "random": ("tab:gray", "x"),
          "fixed depth": ("black", "s")}


def mean_curve(curves: list) -> tuple:
    """The seeds' curves averaged on a common grid (where all of them are defined)."""
    low = max(x[0] for x, _ in curves)
    high = min(x[-1] for x, _ in curves)
    grid = np.linspace(low, high, 60)
    return grid, np.mean([np.interp(grid, x, y) for x, y in curves], axis=0)


def plot(report: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    figure, axes_grid = plt.subplots(2, len(names), figsize=(7 * len(names), 9.5),
                                     squeeze=False, gridspec_kw={"height_ratios": [3, 2]})
    for column, name in enumerate(names):
        axes, difference_axes = axes_grid[0][column], axes_grid[1][column]
        runs = report["variants"][name]
        groups = {s: [r["signals"][s]["points"] for r in runs.values()] for s in SIGNALS
                  if all(s in r["signals"] for r in runs.values())}
        groups["random"] = [r["random"] for r in runs.values()]
        groups["fixed depth"] = [r["depth_dial"][:r["num_cycles"]] for r in runs.values()]
        random_curves = [curve(points) for points in groups["random"]]
        for label, point_lists in groups.items():
            color, marker = STYLES[label]
            curves = [curve(points) for points in point_lists]
            for (x, y), (random_x, random_y) in zip(curves, random_curves):
                axes.plot(x, y, linestyle="none", marker=marker, markersize=4, color=color,
                          alpha=0.45)
                inside = (x >= random_x[0]) & (x <= random_x[-1])
                difference_axes.plot(x[inside], y[inside] - np.interp(x[inside], random_x,
                                                                      random_y),
                                     linestyle="none", marker=marker, markersize=4,
                                     color=color, alpha=0.45)
            x, y = mean_curve(curves)
            style = dict(color=color, linestyle="--" if label == "random" else "-",
                         linewidth=2 if label == "fixed depth" else 1.5)
            axes.plot(x, y, label=f"{label} (mean of seeds; points: each seed)", **style)
            random_x, random_y = mean_curve(random_curves)
            difference_axes.plot(x, y - np.interp(x, random_x, random_y), label=label, **style)
        analyses = [r["analysis"] for r in runs.values()]
        bound = np.mean([a["loss_bound_1_percent"] for a in analyses])
        axes.axhline(bound, color="red", linewidth=0.8, linestyle=":",
                     label="full-depth loss + 1 % (seed mean)")
        for panel in (axes, difference_axes):
            panel.axvline(analyses[0]["goal_middle_applications"], color="red", linewidth=0.8,
                          linestyle="-.", label="30 % fewer middle applications")
            panel.set_xlabel("mean middle-layer applications per token")
            panel.grid(True, alpha=0.3)
        axes.set_ylabel("validation LM loss (held-out books)")
        axes.set_title(f"{name}: per-token exits, seeds {', '.join(map(str, runs))}")
        axes.legend(fontsize=7)
        difference_axes.set_ylabel("loss − random exits' loss at equal compute")
        difference_axes.set_title(f"{name}: against random exits (below 0: better)")
        difference_axes.legend(fontsize=7)
    save_figure(figure, output)


def plot_depth_dial(report: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    trained = None
    for index, (name, entry) in enumerate(report["summary"].items()):
        color = colors[index % len(colors)]
        depths = np.arange(1, len(entry["depth_dial_loss_mean"]) + 1)
        for seed, losses in zip(entry["seeds"], entry["depth_dial_loss_by_seed"]):
            axes.plot(depths, losses, linestyle="none", marker="o", markersize=4, color=color,
                      alpha=0.5)
        axes.plot(depths, entry["depth_dial_loss_mean"], color=color, marker="s",
                  label=f"{name} (mean of seeds; points: each seed)")
        trained = next(iter(report["variants"][name].values()))["num_cycles"]
    axes.axvline(trained, color="gray", linestyle=":", label=f"trained depth C = {trained}")
    axes.set_xlabel("cycles run, C' (depth dial; beyond C: cycle C's zero keys and gate)")
    axes.set_ylabel("validation LM loss (held-out books)")
    axes.set_title("loss against the depth dial, no exits")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    save_figure(figure, output)


def write_reports(report: dict, out: Path) -> None:
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out.with_suffix('.md')}", flush=True)
    plot(report, out.with_suffix(".png"))
    plot_depth_dial(report, out.parent / f"{out.name}_dial.png")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_analysis_arguments(parser, "adaptive_depth",
                           quick_help="16 sequences, 4 thresholds, 3 random rates, 1 draw")
    parser.set_defaults(seeds=[1, 2], samples=128, batch_size=16)
    parser.add_argument("--quantiles", type=int, default=11,
                        help="thresholds per signal: this many quantiles of what it observed")
    parser.add_argument("--random-points", type=int, default=7,
                        help="exit probabilities of the random control (evenly spaced mean cycles)")
    parser.add_argument("--random-draws", type=int, default=2,
                        help="seeds of the random draw averaged at each exit probability")
    args = parser.parse_args()
    default_paths(args, "adaptive_depth")
    if args.quick:
        args.samples, args.quantiles = min(args.samples, 16), min(args.quantiles, 4)
        args.random_points, args.random_draws = min(args.random_points, 3), 1
        args.batch_size = min(args.batch_size, 8)
    if args.report_only:
        import json

        write_reports(json.loads(args.out.with_suffix(".json").read_text()), args.out)
        return
    if args.samples < args.batch_size:
        raise SystemExit(f"--samples {args.samples} is below --batch-size {args.batch_size}")
    init_single_process()
    command = [shown(Path(a), args.work) if Path(a).resolve() == args.work else a
               for a in sys.argv[1:]]
    report = {"command": "python bench/adaptive_depth.py " + " ".join(command),
              "threads": torch.get_num_threads(), "samples": args.samples,
              "quantiles": args.quantiles, "random_points": args.random_points,
              "random_draws": args.random_draws, "variants": {}}
    started = time.perf_counter()
    for name, seed, directory in trained_runs(args):
        print(f"analysing {directory.name}", flush=True)
        run = analyse_run(directory, args)
        report["seq_length"] = run["tokens"] // run["sequences"]
        report["variants"].setdefault(name, {})[seed] = run
    if not report["variants"]:
        raise SystemExit("no trained ZTT runs found; run bench/variants.py first")
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["summary"] = summarise(report)
    write_json(args.out.with_suffix(".json"), report)
    write_reports(report, args.out)


if __name__ == "__main__":
    main()
