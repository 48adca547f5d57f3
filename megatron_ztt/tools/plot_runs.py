"""``ztt plot``: one TensorBoard scalar of several runs on one figure, saved as a PNG.

    ztt plot runs/a runs/b --output loss.png                     # training loss ("lm loss")
    ztt plot runs/a runs/b --validation --x tokens --output val.png
    ztt plot runs/a --tag "zero-attention/cycle 2" --labels ztt

Each RUN is a run directory (``run.dir``, holding ``tensorboard/``) or a folder of TensorBoard
event files. A resumed run's several event files are read together; where a step was logged
twice, the later value counts.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

VALIDATION_TAG = "lm loss validation"


class PlotError(ValueError):
    """A run or tag that cannot be plotted; the message names it."""


@dataclass
class Series:
    label: str
    steps: List[int]
    values: List[float]


def event_dir(run: str) -> str:
    """The folder with the event files of ``run`` (a run directory or that folder itself)."""
    for candidate in (os.path.join(run, "tensorboard"), run):
        if glob.glob(os.path.join(candidate, "events.out.tfevents.*")):
            return candidate
    raise PlotError(f"{run}: no TensorBoard event files here or in {run}/tensorboard")


def read_scalars(run: str, tag: str) -> tuple[List[int], List[float]]:
    """(steps, values) of one scalar tag, sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = event_dir(run)
    accumulator = EventAccumulator(folder, size_guidance={"scalars": 0})  # 0: keep every point
    accumulator.Reload()
    tags = accumulator.Tags().get("scalars", [])
    if tag not in tags:
        raise PlotError(f"{run}: no scalar {tag!r}; it has: {', '.join(sorted(tags)) or 'none'}")
    by_step = {}
    for event in accumulator.Scalars(tag):  # file order: a resumed run's later value wins
        by_step[event.step] = event.value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def tokens_per_step(run: str) -> int:
    """global batch x sequence length, from the ``config.json`` training writes to run.dir."""
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        raise PlotError(f"{run}: --x tokens needs {path} (written by training to run.dir)")
    with open(path) as f:
        config = json.load(f)
    return int(config["train"]["global_batch_size"]) * int(config["model"]["seq_length"])


def smooth(values: Sequence[float], weight: float) -> List[float]:
    """TensorBoard's exponential moving average (debiased); weight 0 leaves values as they are."""
    if not weight:
        return list(values)
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def draw(series: Sequence[Series], ylabel: str, output: str, xlabel: str = "iteration",
         title: Optional[str] = None, log_y: bool = False):
    """One line per series, labelled axes and a legend; written to ``output`` (PNG).
    Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for item in series:
        marker = "o" if len(item.steps) <= 30 else None
        axes.plot(item.steps, item.values, label=item.label, marker=marker, markersize=3)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if log_y:
        axes.set_yscale("log")
    if title:
        axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    figure.savefig(output, dpi=120, format="png")
    plt.close(figure)
    return figure


def collect(runs: Sequence[str], tag: str, labels: Optional[Sequence[str]] = None,
            x: str = "iteration", smoothing: float = 0.0) -> List[Series]:
    if labels and len(labels) != len(runs):
        raise PlotError(f"--labels: {len(labels)} labels for {len(runs)} runs")
    series = []
    for index, run in enumerate(runs):
        steps, values = read_scalars(run, tag)
        if x == "tokens":
            per_step = tokens_per_step(run)
            steps = [s * per_step for s in steps]
        label = labels[index] if labels else os.path.basename(os.path.normpath(run))
        values = [v if math.isfinite(v) else float("nan") for v in values]
        series.append(Series(label, steps, smooth(values, smoothing)))
    return series


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run directories (with tensorboard/) or event-file folders")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--tag", default="lm loss", help="scalar to plot (default: 'lm loss')")
    which.add_argument("--validation", action="store_true",
                       help=f"plot the validation loss ('{VALIDATION_TAG}')")
    parser.add_argument("--labels", nargs="+", help="legend entries (default: folder names)")
    parser.add_argument("--x", choices=["iteration", "tokens"], default="iteration",
                        help="x axis: optimizer steps, or training tokens (needs config.json)")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="exponential moving average weight in [0, 1) (TensorBoard's)")
    parser.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--output", "-o", default="runs.png", help="PNG file to write")


def run(args: argparse.Namespace) -> int:
    tag = VALIDATION_TAG if args.validation else args.tag
    try:
        if not 0 <= args.smooth < 1:
            raise PlotError(f"--smooth must be in [0, 1), got {args.smooth}")
        from megatron_ztt.files import OutputPathError, check_output_path

        # before reading the runs: never among the event files it reads (a run's tensorboard/)
        event_folders = [os.path.join(run, "tensorboard")
                         if os.path.isdir(os.path.join(run, "tensorboard")) else run
                         for run in args.runs]
        try:
            check_output_path(args.output, "--output", event_folders)
        except OutputPathError as error:
            raise PlotError(str(error)) from None
        series = collect(args.runs, tag, args.labels, args.x, args.smooth)
        draw(series, tag, args.output, xlabel=args.x, title=args.title, log_y=args.log_y)
    except PlotError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {args.output}: {tag!r} of {len(series)} run(s)")
    return 0
