"""Preprocessing throughput and peak memory for 1 and N tokeniser workers, and input formats.

    python bench/preprocess_throughput.py [INPUT_DIR] [--workers 1 2] [--tokenizer M.model]
                                          [--formats jsonl parquet jsonl.zst] [--repeat 3]

INPUT_DIR defaults to ../shared/data/gutenberg relative to the repository root. Without
--tokenizer, a BPE tokenizer (--vocab-size, default 32000) is first trained on a sample of the
input. Each run is a fresh process running `preprocess()`; its whole process tree (main +
workers) is sampled for resident memory every 20 ms. Reported per worker count: documents,
tokens, the preprocessing time measured inside the run (excluding interpreter start-up and
imports), tokens/s, the wall time of the whole command, the CPU time of all its processes,
the peak summed RSS of the tree and the peak RSS of the main process. Before each run, N busy
processes probe how many CPUs they actually get (the machine may be shared). The runs must
produce byte-identical files.

--formats first writes the input's documents (read by megatron_ztt.data.sources, one per .txt
file) as each format: `jsonl` (one line per document), `jsonl.zst` (the same bytes, zstd level
3), `parquet` (one row per document, 10 rows per row group, snappy); `txt` is the input itself.
The variants (format x workers) run interleaved, --repeat rounds; each reports its median run,
and its preprocess-time ratio to jsonl with the same workers (median over median)."""

from __future__ import annotations

import argparse
import hashlib
import statistics
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil  # a DeepSpeed dependency

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_INPUT = REPO.parent / "shared" / "data" / "gutenberg"


def _child(args: argparse.Namespace) -> None:
    from megatron_ztt.data.preprocess import preprocess

    report = preprocess([args.input], args.tokenizer, args.output_prefix, workers=args.workers,
                        append_eod=True, progress=False)
    print(json.dumps({"documents": report.documents, "tokens": report.tokens,
                      "seconds": report.seconds}))


def _rss(process: psutil.Process) -> tuple[int, int]:
    """(RSS of the process, RSS of it and all its descendants)."""
    try:
        main = process.memory_info().rss
    except psutil.Error:  # just exited
        return 0, 0
    total = main
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # a worker that just exited
            pass
    return main, total


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _spin(seconds: float) -> float:
    """Busy-loop for ``seconds`` of wall time; return the CPU time it got."""
    cpu_start, end = time.process_time(), time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return time.process_time() - cpu_start


def available_cpus(processes: int, seconds: float = 2.0) -> float:
    """How many CPUs ``processes`` busy processes get right now (other jobs may share them)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_spin, [0.05] * processes, chunksize=1)  # workers started before measuring
        return sum(pool.map(_spin, [seconds] * processes, chunksize=1)) / seconds


def _measure(input_dir: str, tokenizer: str, prefix: str, workers: int) -> dict:
    command = [sys.executable, __file__, "--child", input_dir, "--tokenizer",
               tokenizer, "--output-prefix", prefix, "--workers", str(workers)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cpu_before, start = _cpu_seconds(), time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env=env, text=True)
    watched, main_peak, tree_peak = psutil.Process(process.pid), 0, 0
    while process.poll() is None:
        main, tree = _rss(watched)
        main_peak, tree_peak = max(main_peak, main), max(tree_peak, tree)
        time.sleep(0.02)
    wall = time.perf_counter() - start
    # all processes of the run (workers are waited for by the child, so they count too)
    cpu = _cpu_seconds() - cpu_before
    if process.returncode:
        raise SystemExit(f"preprocess with {workers} worker(s) failed ({process.returncode})")
    result = json.loads(process.stdout.read().strip().splitlines()[-1])
    digest = hashlib.sha256()
    for suffix in (".bin", ".idx"):
        digest.update(Path(prefix + suffix).read_bytes())
    return {**result, "workers": workers, "wall": wall, "cpu": cpu, "tree_peak_rss": tree_peak,
            "main_peak_rss": main_peak,
            "tokens_per_s": result["tokens"] / result["seconds"], "sha256": digest.hexdigest()}


def _verify(input_dir: str, tokenizer: str, prefix: str) -> None:
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ztt.data import sources

    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    dataset = IndexedDataset(prefix)
    documents = sources.iter_documents(sources.expand_inputs([input_dir]))
    count = 0
    for index, document in enumerate(documents):
        if dataset[index].tolist() != sp.encode(document.text) + [sp.eos_id()]:
            raise SystemExit(f"document {index} ({document.source}) differs from SentencePiece")
        count += 1
    if count != len(dataset):
        raise SystemExit(f"{count} documents read but {len(dataset)} written")
    print(f"verified: all {count} documents equal SentencePiece's whole-text encoding")


FORMATS = ("txt", "jsonl", "jsonl.zst", "parquet")


def write_formats(input_dir: Path, formats, scratch: str) -> dict[str, str]:
    """The input's documents as each format: {format: path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from megatron_ztt.data import sources

    texts = [d.text for d in sources.iter_documents(sources.expand_inputs([input_dir]))]
    jsonl = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n"
                    for text in texts).encode()
    paths = {}
    for kind in formats:
        path = Path(scratch) / f"corpus.{kind}"
        if kind == "txt":
            path = input_dir
        elif kind == "jsonl":
            path.write_bytes(jsonl)
        elif kind == "jsonl.zst":
            path.write_bytes(zstandard.ZstdCompressor(level=3).compress(jsonl))
        elif kind == "parquet":
            pq.write_table(pa.table({"text": texts}), path, row_group_size=10)
        size = sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() \
            else path.stat().st_size
        print(f"format {kind}: {path.name} ({size / 2**20:.1f} MiB)")
        paths[kind] = str(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", nargs="?", default=str(DEFAULT_INPUT))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizer", help="existing .model (default: train one)")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--train-lines", type=int, default=200_000,
                        help="lines sampled to train the tokenizer")
    parser.add_argument("--repeat", type=int, default=1,
                        help="interleaved rounds of every variant; the median is reported")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=["txt"],
                        help="input formats to compare (default: the .txt input as it is)")
    parser.add_argument("--verify", action="store_true",
                        help="also check every document against SentencePiece's encoding of "
                             "the whole text (slow)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output-prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(argparse.Namespace(input=args.input, tokenizer=args.tokenizer,
                                         output_prefix=args.output_prefix,
                                         workers=args.workers[0]))

    input_dir = Path(args.input)
    if not input_dir.exists():
        raise SystemExit(f"{input_dir}: no such input (give the corpus directory as argument)")
    size = sum(p.stat().st_size for p in input_dir.rglob("*") if p.is_file())
    print(f"input: {input_dir} ({size / 2**20:.1f} MiB), {os.cpu_count()} CPU(s)")
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = args.tokenizer
        if tokenizer is None:
            from megatron_ztt.data.tokenizer import train_tokenizer

            report = train_tokenizer([str(input_dir)], args.vocab_size, f"{scratch}/tok",
                                     input_sentence_size=args.train_lines)
            tokenizer = report.model_path
            print(f"tokenizer: bpe vocab {args.vocab_size}, trained on {report.sampled:,} of "
                  f"{report.lines:,} lines in {report.seconds:.1f} s")
        inputs = write_formats(input_dir, args.formats, scratch)
        variants = [(kind, workers) for kind in args.formats for workers in args.workers]
        runs: dict = {variant: [] for variant in variants}
        for _ in range(args.repeat):  # interleaved, so that a change of load hits every variant
            for kind, workers in variants:
                free = available_cpus(workers)
                prefix = f"{scratch}/out-{kind}-{workers}"
                run = _measure(inputs[kind], tokenizer, prefix, workers)
                runs[kind, workers].append({**run, "cpus_free_before": free, "format": kind})
                print(f"round {len(runs[kind, workers])}: {kind}, {workers} worker(s): "
                      f"{run['seconds']:.1f} s ({free:.2f} CPUs free before; load "
                      f"{os.getloadavg()[0]:.1f})", flush=True)
        results = []
        for variant in variants:
            ordered = sorted(runs[variant], key=lambda r: r["seconds"])
            results.append({**ordered[(len(ordered) - 1) // 2],  # the median run (lower middle)
                            "median_seconds": statistics.median(r["seconds"]
                                                                for r in ordered)})
        medians = {(r["format"], r["workers"]): r["median_seconds"] for r in results}
        for r in results:
            base = medians.get(("jsonl", r["workers"]))
            r["vs_jsonl"] = r["median_seconds"] / base if base else None
        if args.verify:
            _verify(str(input_dir), tokenizer,
                    f"{scratch}/out-{args.formats[0]}-{args.workers[0]}")

    print(f"\nload average at the end: {os.getloadavg()}")
    print("\n| format | workers | CPUs free before | documents | tokens | preprocess s | "
          "vs jsonl | tokens/s | wall s (with start-up) | CPU s (all processes) | peak RSS, "
          "all processes | peak RSS, main process |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = "" if r["vs_jsonl"] is None else f"{r['vs_jsonl']:.2f}"
        print(f"| {r['format']} | {r['workers']} | {r['cpus_free_before']:.2f} of "
              f"{r['workers']} | {r['documents']:,} | {r['tokens']:,} | "
              f"{r['median_seconds']:.1f} | {ratio} | "
              f"{r['tokens'] / r['median_seconds']:,.0f} | {r['wall']:.1f} | {r['cpu']:.1f} | "
              f"{r['tree_peak_rss'] / 2**20:,.0f} MiB | {r['main_peak_rss'] / 2**20:,.0f} MiB |")
    identical = len({r["sha256"] for r in results}) == 1
    print(f"\noutputs byte-identical across formats and worker counts: {identical}")
    print(json.dumps({"input_mib": size / 2**20, "results": results}))
    if not identical:
        raise SystemExit("outputs differ between formats or worker counts")


if __name__ == "__main__":
    main()
