"""The Python half of ``bench/gpu_check.sh``: a bf16 throughput benchmark of ZTT against
megatron-core at the sizes of ``launch/configs/ztt_125m.yaml`` and ``ztt_1b.yaml``, and the
report that gathers every part of the check into one table and one JSON file, and the
versions the check runs with (from the image, or from the wheel folder that
``gpu_check.sh --wheels`` installed).

    python bench/gpu_check.py throughput --size 125m [--cpu] [--out FILE]
    python bench/gpu_check.py report OUT_DIR          # after bench/gpu_check.sh's parts
    python bench/gpu_check.py versions [--wheels-site DIR] [--out FILE]

Throughput: one process on the device that ``megatron_ztt.parallel.runtime`` picks. The
baseline is megatron-core's ``TransformerBlock`` with as many layers as ZTT has layer
applications (2 + C(L-2): 32 for the 125M config, 56 for the 1B one), between the same
embedding and output layer (``bench/model_step_time.py``'s ``PlainMegatronTransformer``).
ZTT runs as configured, including its per-cycle exit losses. Both are cast to bf16 (as
DeepSpeed's bf16 mode runs the forward and backward) and timed for forward + backward at the
config's micro batch and sequence length, without activation checkpointing (one device, no
tensor or pipeline parallelism). MFU = model FLOPs (``model_flops_per_token``) / step time /
the measured bf16 matmul peak (``bench/matmul_peak.py``); on CUDA also against the config's
``logging.peak_flops_per_device``. Peak memory: the CUDA allocator's peak per model; on the
CPU the process's max RSS (cumulative, not per model). ``--cpu`` keeps each config's depth
(layers, cycles) but shrinks the width, vocabulary and sequence, to exercise the code.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import shutil
import statistics
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

from matmul_peak import measure_peak_flops  # noqa: E402
from model_step_time import PlainMegatronTransformer, time_steps  # noqa: E402
from megatron_ztt.parallel import runtime  # noqa: E402

SIZES = {"125m": "launch/configs/ztt_125m.yaml", "1b": "launch/configs/ztt_1b.yaml"}
# --cpu: the configs' depth (layers, cycles, exit losses), a tiny width
CPU_MODEL = dict(hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 seq_length=32, vocab_size=256, make_vocab_size_divisible_by=64)
CPU_MICRO_BATCH = 2
PARTS = ["device", "tests", "throughput_125m", "throughput_1b"]
# the packages whose versions the check prints, and where each comes from
VERSIONED = ["torch", "transformers", "tokenizers", "safetensors", "sentencepiece", "numpy",
             "megatron-core", "deepspeed", "pydantic", "omegaconf", "pytest"]
TOOLS = ["ninja", "nvcc"]  # DeepSpeed's op builds on first use (nvcc: CUDA only)


def load_size(size: str, cpu: bool):
    """(model config, micro batch, the config's peak FLOP/s per device) of a launch config."""
    from omegaconf import OmegaConf

    from megatron_ztt.model.config import ZTTConfig

    raw = OmegaConf.to_container(OmegaConf.load(REPO / SIZES[size]))
    model = dict(raw["model"], activation_checkpointing=False, **(CPU_MODEL if cpu else {}))
    micro_batch = CPU_MICRO_BATCH if cpu else raw["train"]["micro_batch_size"]
    return ZTTConfig(**model), micro_batch, raw.get("logging", {}).get("peak_flops_per_device")


def throughput(args) -> dict:
    from megatron_ztt.model.config import ZTTConfig
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.training.metrics import model_flops_per_token

    config, batch, config_peak = load_size(args.size, args.cpu)
    seq = config.seq_length
    applications = config.num_applications
    plain = ZTTConfig(**{**config.__dict__, "num_layers": applications, "num_cycles": 1,
                         "cycle_mode": "vanilla", "zero_token": False, "gate": False,
                         "exit_loss_weights": None})
    ztt_name = f"ztt_L{config.num_layers}_C{config.num_cycles}"
    base_name = f"megatron_{applications}_layers"
    builders = {
        base_name: (plain, lambda: PlainMegatronTransformer(plain), lambda m, x, y: m(x, y)),
        ztt_name: (config, lambda: ZTTModel(config),
                   lambda m, x, y: m(x, y, collect_stats=False).loss),
    }

    runtime.init_distributed(seed=0)
    device = runtime.current_device()
    use_cuda = device.type == "cuda"
    steps, warmup = (args.steps or (10 if use_cuda else 1)), (args.warmup or (3 if use_cuda else 1))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator).to(device)
    labels = torch.randint(0, config.vocab_size, (batch, seq), generator=generator).to(device)
    peak = measure_peak_flops(8192 if use_cuda else 256, "bf16", repeats=3 if use_cuda else 1)
    nominal = float(config_peak) if use_cuda and config_peak else None
    tokens = batch * seq
    models = {}
    for name, (model_config, build, step) in builders.items():
        started = time.perf_counter()
        model = build().to(device).to(torch.bfloat16)  # weights are drawn on the CPU
        build_seconds = time.perf_counter() - started
        runtime.synchronize()
        runtime.reset_peak_memory()
        times = time_steps(model, step, ids, labels, steps, warmup)[0]  # wall seconds
        median = statistics.median(times)
        flops = model_flops_per_token(model_config, seq) * tokens
        models[name] = {
            "layer_applications": model_config.num_applications,
            "parameters": sum(p.numel() for p in model.parameters()),
            "build_seconds": round(build_seconds, 2),
            "median_step_seconds": median,
            "step_seconds": times,
            "tokens_per_second": tokens / median,
            "model_flops_per_step": flops,
            "mfu": flops / median / peak,
            "mfu_vs_nominal_peak": flops / median / nominal if nominal else None,
            "peak_memory_bytes": runtime.peak_memory_bytes(),
        }
        del model
        runtime.empty_cache()
    report = {
        "size": args.size,
        "config_file": SIZES[args.size],
        "cpu_sizes": args.cpu,
        "device": str(device),
        "device_name": runtime.device_name(device),
        "dtype": "bf16",
        "torch_threads": torch.get_num_threads(),
        "batch": batch, "seq": seq, "tokens_per_step": tokens,
        "hidden_size": config.hidden_size, "num_layers": config.num_layers,
        "num_cycles": config.num_cycles, "vocab_size": config.vocab_size,
        "steps": steps, "warmup": warmup,
        "matmul_peak_flops_bf16": peak,
        "nominal_peak_flops": nominal,
        "peak_memory_kind": "cuda allocator peak per model" if use_cuda
        else "process max RSS (cumulative)",
        "models": models,
        "ztt_over_megatron_step_time": (models[ztt_name]["median_step_seconds"]
                                        / models[base_name]["median_step_seconds"]),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    runtime.shutdown_distributed()
    return report


# --------------------------------------------------------------------------- versions
def versions(wheels_site: str | None) -> dict:
    """Python, the packages of VERSIONED (version; ``wheels`` if installed from the wheel folder
    at ``wheels_site``, else ``image``; ``environment`` without a folder), torch's CUDA, the
    code's checkout and the build tools."""
    site = Path(wheels_site).resolve() if wheels_site else None
    packages = {}
    for name in VERSIONED:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
            continue
        location = Path(dist.locate_file("")).resolve()
        packages[name] = {"version": dist.version, "location": str(location),
                          "source": ("wheels" if location == site else "image") if site
                          else "environment"}
    import megatron_ztt

    return {"python": platform.python_version(), "python_executable": sys.executable,
            "torch_cuda": torch.version.cuda, "packages": packages,
            "megatron_ztt": str(Path(megatron_ztt.__file__).resolve().parent),
            "wheels_site": str(site) if site else None,
            "tools": {tool: shutil.which(tool) for tool in TOOLS}}


def print_versions(found: dict):
    print(f"[gpu_check] Python {found['python']} ({found['python_executable']}), torch CUDA "
          f"{found['torch_cuda'] or '-'}, megatron_ztt from {found['megatron_ztt']}")
    for name, package in found["packages"].items():
        if package is None:
            print(f"  {name:<14} missing")
        else:
            print(f"  {name:<14} {package['version']:<12} {package['source']:<7} "
                  f"{package['location']}")
    for tool, path in found["tools"].items():
        print(f"  {tool:<14} {path or 'not on PATH'}")


# --------------------------------------------------------------------------- report
def read_parts(directory: Path) -> dict:
    """parts.tsv (written by gpu_check.sh): name, exit status, seconds, time limit."""
    parts = {}
    path = directory / "parts.tsv"
    if path.is_file():
        for line in path.read_text().splitlines():
            name, rc, seconds, limit = line.split("\t")
            parts[name] = {"rc": int(rc), "seconds": float(seconds), "limit_seconds": int(limit),
                           "timed_out": int(rc) in (124, 137),
                           "log": str(directory / f"{name}.log")}
    return parts


def read_junit(path: Path) -> dict | None:
    if not path.is_file():
        return None
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites)
              for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["cases"] = {}
    for case in root.iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
        counts["cases"][case.get("name")] = outcome
    return counts


def _gib(value) -> str:
    return f"{value / 2**30:.2f}" if value else "-"


def report(directory: Path, mode: str, wheels: bool = False) -> int:
    parts = read_parts(directory)
    expected_parts = (["install"] if wheels else []) + PARTS
    tests = read_junit(directory / "tests.xml")
    throughputs = {}
    for size in SIZES:
        path = directory / f"throughput_{size}.json"
        if path.is_file():
            throughputs[size] = json.loads(path.read_text())
    problems = []
    for name in expected_parts:
        part = parts.get(name)
        if part is None:
            problems.append(f"{name}: did not run")
        elif part["timed_out"]:
            problems.append(f"{name}: over its time limit of {part['limit_seconds']} s")
        elif part["rc"]:
            problems.append(f"{name}: exit status {part['rc']}")
    def passed(name):
        return name in parts and parts[name]["rc"] == 0

    if tests is None:
        if passed("tests"):
            problems.append("tests: no results (tests.xml)")
    elif tests["passed"] == 0 or tests["failures"] or tests["errors"] or tests["skipped"]:
        problems.append(f"tests: {tests['passed']} passed, {tests['failures']} failed, "
                        f"{tests['errors']} errors, {tests['skipped']} skipped")
    for size in SIZES:
        if size not in throughputs and passed(f"throughput_{size}"):
            problems.append(f"throughput_{size}: no results")
    device = directory / "device.txt"
    found = directory / "versions.json"
    summary = {
        "mode": mode,
        "wheels": wheels,
        "ok": not problems,
        "problems": problems,
        "device_name": device.read_text().strip() if device.is_file() else None,
        "parts": parts,
        "versions": json.loads(found.read_text()) if found.is_file() else None,
        "tests": tests,
        "throughput": throughputs,
        "output_dir": str(directory),
    }
    (directory / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(f"\nGPU check ({mode}) on {summary['device_name'] or 'no device'}")
    if summary["versions"]:
        v = summary["versions"]
        print("  " + ", ".join(
            [f"Python {v['python']}"] + [f"{name} {p['version']} ({p['source']})" for name, p in
                                         v["packages"].items() if p and name in
                                         ("torch", "transformers", "megatron-core", "deepspeed")]))
    for name in expected_parts:
        part = parts.get(name)
        if part:
            print(f"  {name:<16} exit {part['rc']:<4} {part['seconds']:7.1f} s "
                  f"(limit {part['limit_seconds']} s)")
    if tests:
        print(f"  cuda-marked tests: {tests['passed']} passed, {tests['failures']} failed, "
              f"{tests['errors']} errors, {tests['skipped']} skipped")
    if throughputs:
        header = (f"  {'size':<5} {'model':<22} {'apps':>4} {'params':>8} {'batch x seq':>11} "
                  f"{'step s':>8} {'tokens/s':>10} {'MFU':>6} {'MFU nom':>7} {'peak GiB':>8}")
        print("\n  bf16 forward + backward, one device")
        print(header)
        for size, result in throughputs.items():
            for name, m in result["models"].items():
                nominal = m["mfu_vs_nominal_peak"]
                print(f"  {size:<5} {name:<22} {m['layer_applications']:>4} "
                      f"{m['parameters'] / 1e6:>7.1f}M {result['batch']:>4} x {result['seq']:<4} "
                      f"{m['median_step_seconds']:>8.4f} {m['tokens_per_second']:>10.0f} "
                      f"{100 * m['mfu']:>5.1f}% "
                      f"{'-' if nominal is None else f'{100 * nominal:.1f}%':>7} "
                      f"{_gib(m['peak_memory_bytes']):>8}")
            print(f"  {size:<5} ZTT / megatron step time: "
                  f"{result['ztt_over_megatron_step_time']:.3f}; MFU against the measured bf16 "
                  f"matmul peak {result['matmul_peak_flops_bf16'] / 1e12:.2f} TFLOP/s")
    print(f"\n  {'OK' if summary['ok'] else 'FAILED: ' + '; '.join(problems)}")
    print(f"  results: {directory / 'gpu_check.json'} (logs and per-part files beside it)")
    return 0 if summary["ok"] else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("throughput", help="bf16 ZTT vs megatron-core at a config's size")
    bench.add_argument("--size", choices=sorted(SIZES), required=True)
    bench.add_argument("--cpu", action="store_true", help="tiny widths for a CPU run")
    bench.add_argument("--steps", type=int, default=None, help="timed steps (CUDA 10, CPU 1)")
    bench.add_argument("--warmup", type=int, default=None, help="untimed steps (CUDA 3, CPU 1)")
    bench.add_argument("--out", help="write the JSON report here too")
    summary = sub.add_parser("report", help="gather a gpu_check.sh output directory")
    summary.add_argument("directory")
    summary.add_argument("--mode", choices=["cuda", "cpu"], default="cuda")
    summary.add_argument("--wheels", action="store_true", help="the check installed a wheel folder")
    listing = sub.add_parser("versions", help="the versions the check runs with")
    listing.add_argument("--wheels-site", help="where gpu_check.sh --wheels installed the folder")
    listing.add_argument("--out", help="write them as JSON here too")
    args = parser.parse_args()
    if args.command == "throughput":
        throughput(args)
        return 0
    if args.command == "versions":
        found = versions(args.wheels_site)
        print_versions(found)
        if args.out:
            Path(args.out).write_text(json.dumps(found, indent=2) + "\n")
        return 0
    return report(Path(args.directory), args.mode, args.wheels)


if __name__ == "__main__":
    sys.exit(main())
