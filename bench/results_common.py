"""Shared parts of the result benchmarks (``bench/variants.py``, ``bench/early_exit.py``,
``bench/zero_attention.py``): the held-out-book corpus, the run names, checkpoint loading and
validation batches. Not a script of its own.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, Iterator, List

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "gutenberg"
DEFAULT_WORK = REPO / "work" / "results"
BASE_CONFIG = REPO / "launch" / "configs" / "results" / "base.yaml"
VARIANT_CONFIGS = REPO / "launch" / "configs" / "results"


# ----------------------------------------------------------------------------- corpus
def split_books(corpus: Path, valid_books: int) -> Dict[str, List[Path]]:
    """Every k-th book (in sorted file-name order) is held out for validation.

    Spreading the held-out books over the sorted list, rather than taking the last few, keeps
    the choice independent of how the files happen to be named (ids, titles)."""
    books = sorted(p for p in corpus.iterdir() if p.suffix == ".txt")
    if len(books) < valid_books + 1:
        raise SystemExit(f"{corpus}: {len(books)} books, need more than {valid_books}")
    step = len(books) / valid_books
    held_out = {int(step * i + step / 2) for i in range(valid_books)}
    return {"train": [b for i, b in enumerate(books) if i not in held_out],
            "valid": [b for i, b in enumerate(books) if i in held_out]}


def prepare_corpus(corpus: Path, work: Path, vocab_size: int, valid_books: int,
                   workers: int = 2) -> Dict[str, object]:
    """Tokenizer (trained on the training books only) and one .bin/.idx prefix per split.

    Cached: a second call with the same settings reuses the files (``corpus.json`` records
    the settings and the book lists)."""
    from megatron_ztt.data.preprocess import preprocess
    from megatron_ztt.data.tokenizer import train_tokenizer

    data_dir = work / "data"
    record_path = data_dir / "corpus.json"
    books = split_books(corpus, valid_books)
    wanted = {"corpus": str(corpus), "vocab_size": vocab_size,
              "books": {k: [b.name for b in v] for k, v in books.items()}}
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if {k: record.get(k) for k in wanted} == wanted:
            return record
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"training a BPE tokenizer (vocab {vocab_size}) on {len(books['train'])} books",
          flush=True)
    tokenizer_prefix = data_dir / f"tokenizer{vocab_size}"
    train_tokenizer([str(b) for b in books["train"]], vocab_size, str(tokenizer_prefix))
    record = dict(wanted, tokenizer=f"{tokenizer_prefix}.model", prefixes={}, tokens={})
    for split, files in books.items():
        prefix = data_dir / f"gutenberg_{split}"
        report = preprocess([str(b) for b in files], record["tokenizer"], str(prefix),
                            workers=workers, append_eod=True, progress=False)
        print(report.summary(), flush=True)
        record["prefixes"][split] = str(prefix)
        record["tokens"][split] = report.tokens
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


# ----------------------------------------------------------------------------- runs
def run_dir(work: Path, variant: str, seed: int, train_iters: int | None = None) -> Path:
    """A run's folder; runs with a train_iters other than base.yaml's carry it in the name."""
    suffix = f"_iters{train_iters}" if train_iters else ""
    return work / "runs" / f"{variant}_seed{seed}{suffix}"


def add_train_iters_argument(parser) -> None:
    parser.add_argument("--train-iters", type=int, default=None,
                        help="a token budget other than base.yaml's: steps of 2,048 tokens "
                        "(runs are kept apart: <variant>_seed<s>_iters<N>)")


def add_analysis_arguments(parser, report_name: str, quick_help: str) -> None:
    """The arguments of the scripts that analyse trained runs (bench/early_exit.py,
    bench/zero_attention.py): which runs, how many held-out sequences, where the report goes."""
    parser.add_argument("--work", type=Path, default=None,
                        help="bench/variants.py's folder (default: work/results)")
    parser.add_argument("--variants", nargs="+", default=["ztt_exit", "ztt"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--samples", type=int, default=512,
                        help="held-out sequences (512 = what bench/variants.py's ztt eval reads)")
    parser.add_argument("--batch-size", type=int, default=8)
    add_train_iters_argument(parser)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--report-only", action="store_true",
                        help="no evaluation: redraw the table and plot from the JSON report")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"report prefix (default: docs/results/{report_name})")


def default_paths(args, report_name: str) -> None:
    """Fill in ``args.work`` (work/results, or work/results/quick with --quick; made absolute)
    and ``args.out``, the report prefix: docs/results/<report_name>, with _iters<N> for another
    token budget; inside --work for a --quick smoke test."""
    if args.work is None:
        args.work = DEFAULT_WORK / "quick" if args.quick else DEFAULT_WORK
    args.work = args.work.resolve()
    if args.out is None:
        name = f"{report_name}_iters{args.train_iters}" if args.train_iters else report_name
        args.out = args.work / name if args.quick else REPO / "docs/results" / name


def trained_runs(args) -> Iterator[tuple]:
    """(variant, seed, run folder) of each asked run that has checkpoints; says which have none."""
    for name in args.variants:
        for seed in args.seeds:
            directory = run_dir(args.work, name, seed, args.train_iters)
            if not (directory / "checkpoints").is_dir():
                print(f"skipping {directory.name}: not trained", flush=True)
                continue
            yield name, seed, directory


def is_completed(directory: Path) -> bool:
    status = directory / "status.json"
    return status.is_file() and json.loads(status.read_text()).get("state") == "completed"


# ----------------------------------------------------------------------------- evaluation
def init_single_process(seed: int = 1234) -> None:
    os.environ.setdefault("ZTT_DEVICE", "cpu")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    from megatron_ztt.parallel import runtime

    if not dist.is_initialized():
        runtime.init_distributed(seed=seed)


def load_model(checkpoint: Path):
    """(model in eval mode, run config) from a training checkpoint folder (any layout)."""
    from megatron_ztt.checkpoint import load_trained
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel.sharding import load_full_state_dict

    trained = load_trained(str(checkpoint))
    model = ZTTModel(trained.model_config).eval()
    load_full_state_dict(model, trained.state)
    return model, trained.run_config


def validation_samples(config, count: int) -> List[dict]:
    """The first ``count`` samples of the run's validation split (the held-out books): the
    samples ``ztt eval --iters count/8`` reads, in the same order (same dataset build)."""
    from megatron_ztt.training.batches import build_tokenizer_and_data

    config.train.micro_batch_size = min(config.train.micro_batch_size, 8)  # as ztt eval
    config.train.global_batch_size = config.train.micro_batch_size
    config.eval.iters = -(-count // config.train.micro_batch_size)
    _, (_, valid_set, _) = build_tokenizer_and_data(config)
    if valid_set is None:
        raise SystemExit("the run's data has no validation split")
    return [valid_set[i] for i in range(count)]


def batches(samples: List[dict], size: int) -> Iterator[dict]:
    import torch

    for start in range(0, len(samples), size):
        chunk = samples[start:start + size]
        yield {key: torch.stack([torch.as_tensor(s[key]) for s in chunk])
               for key in ("tokens", "labels", "loss_mask")}


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


def relative(path: Path) -> str:
    """A path for reports: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def use_run_data(config, work: Path, cache_dir: Path) -> None:
    """Point a trained run's config at ``work``'s data when its recorded paths (relative to the
    folder training ran in) do not resolve from here, and keep the dataset index cache in
    ``cache_dir`` so that analysing someone else's runs writes nothing into their folder."""
    data = config.data

    def moved(path: str) -> str:
        try:  # a blend weight, not a path
            float(path)
            return path
        except ValueError:
            pass
        return path if Path(path).exists() or Path(path + ".bin").exists() \
            else str(work / "data" / Path(path).name)

    for split in ("blend", "valid_blend", "test_blend"):
        prefixes = getattr(data, split)
        if prefixes:
            setattr(data, split, [moved(p) for p in prefixes])
    data.tokenizer = moved(data.tokenizer)
    data.cache_dir = str(cache_dir)


def save_figure(figure, output, dpi: int = 110) -> None:
    """Lay out, write and close a matplotlib figure; say where it went."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(output, dpi=dpi)
    plt.close(figure)
    print(f"wrote {output}", flush=True)


def printable(command: list) -> str:
    """A command as the reports and logs show it (``python`` for the interpreter's path)."""
    return "python " + " ".join(str(c) for c in command[1:])


def run_logged(command: list, log_path: Path, env: dict) -> float:
    """Run ``command`` in the repository (output appended to ``log_path``); its wall time in
    seconds. A failure stops the script, naming the log."""
    import subprocess
    import time

    print(f"$ {printable(command)}", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {printable(command)}\n")
        log.flush()
        result = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"command failed (exit {result.returncode}); see {log_path}")
    return time.time() - start
