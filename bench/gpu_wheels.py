"""The Python half of ``bench/gpu_wheels.sh``: a folder of every wheel the project needs that a
GPU image lacks, for a GPU node without internet (docs/GPU.md).

    python bench/gpu_wheels.py [--python-version 3.12] [--out DIR]
                               [--image FILE | --image-freeze FILE] [--max-mib 48]

Run where PyPI is reachable. The image is described either by requirement lines
(``--image``, default ``bench/gpu_image.txt``), which pip resolves for the target Python to the
full set of packages they pull in, or by the image's exact package list (``--image-freeze``:
``python3 -m pip list --format=freeze`` run in the image). Then pip resolves our own wheel (with
its ``dev`` and ``import`` extras, at ``requirements.lock``'s versions where the image has no
version of its own) against an environment that holds exactly the image's packages: metadata-only
stand-ins of them, so the resolver keeps every one of them and asks only for what is missing
(``pip install --dry-run --report``; nothing of the image is downloaded). DeepSpeed has no wheel
on PyPI: it is built here from its sdist without compiled ops (``DS_BUILD_OPS=0``; its ops are
compiled on first use on the node). The folder then holds those wheels and ours; its total size
must stay under ``--max-mib``. Nothing in the folder replaces torch; a package that replaces
another of the image's (the image's version is too old for us) is named.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from results_common import REPO, run_logged  # noqa: E402

DEFAULT_IMAGE = BENCH / "gpu_image.txt"
LOCK = REPO / "requirements.lock"
EXTRAS = "dev,import"  # pytest for the GPU check; gguf for `ztt import-hf --gguf`
# nvidia-ml-py: what DeepSpeed adds to its requirements when it is built next to a CUDA torch
# (its memory reports use it); our build runs without torch.
EXTRA_REQUIREMENTS = ["nvidia-ml-py"]
# Written into the folder; bench/gpu_check.sh --wheels reads target.json.
RECORDS = ("target.json", "image.txt", "wheels.txt", "build.log")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def target_environment(python_version: str, glibc: str) -> dict:
    """pip's options (as its environment variables, which keep the printed commands short) for
    wheels of CPython ``python_version`` on manylinux x86-64 with a glibc of at least ``glibc``
    (pip takes the platforms literally: every older manylinux tag is listed too)."""
    major, minor = (int(part) for part in glibc.split("."))
    if major != 2:
        raise SystemExit(f"--glibc {glibc}: expected 2.N")
    platforms = [f"manylinux_2_{m}_x86_64" for m in range(minor, 4, -1)]
    platforms += [legacy for legacy, m in (("manylinux2014_x86_64", 17),
                                           ("manylinux2010_x86_64", 12),
                                           ("manylinux1_x86_64", 5)) if minor >= m]
    return {"PIP_ONLY_BINARY": ":all:", "PIP_PYTHON_VERSION": python_version,
            "PIP_IMPLEMENTATION": "cp", "PIP_PLATFORM": " ".join(platforms)}


def read_pins(path: Path) -> dict:
    """``name==version`` lines (a freeze or the lock file): {normalized name: (name, version)}.
    Other lines (comments, editable or URL installs) are left out."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)", line)
        if match:
            pins[normalize(match.group(1))] = (match.group(1), match.group(2))
    return pins


def report_installs(report: Path) -> list:
    """(name, version, url) of each package a ``pip install --dry-run --report`` would install."""
    return [(item["metadata"]["name"], item["metadata"]["version"], item["download_info"]["url"])
            for item in json.loads(report.read_text())["install"]]


def resolve_image(python: str, image: Path, target: dict, work: Path, log: Path) -> dict:
    """Everything the image's requirement lines pull in for the target Python (metadata only)."""
    report = work / "image_report.json"
    run_logged([python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                "--report", str(report), "-r", str(image)], log, dict(os.environ, **target))
    return {normalize(name): (name, version) for name, version, _ in report_installs(report)}


def stand_in_environment(image: dict, python: str, work: Path, target: dict) -> dict:
    """An environment that holds the image's packages as metadata only, and pip.

    Returns the environment variables under which ``python -S -m pip`` sees exactly that: no
    site-packages (``-S``), PYTHONPATH = pip alone + the stand-ins."""
    stand_ins = work / "image"
    for name, version in image.values():
        info = stand_ins / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    pip_only = work / "pip_only"
    pip_only.mkdir()
    pip_dir = subprocess.run([python, "-c", "import os, pip; print(os.path.dirname(pip.__file__))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (pip_only / "pip").symlink_to(pip_dir, target_is_directory=True)
    return dict(os.environ, **target, PYTHONPATH=f"{pip_only}{os.pathsep}{stand_ins}")


def build_wheels(python: str, lock: dict, image: dict, build: Path, log: Path) -> str:
    """Our wheel and, unless the image has DeepSpeed, DeepSpeed's without compiled ops, into
    ``build``. Returns our version."""
    env = dict(os.environ)
    run_logged([python, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(build), str(REPO)],
               log, env)
    if "deepspeed" not in image:
        _, version = lock["deepspeed"]
        run_logged([python, "-m", "pip", "wheel", "--no-deps", "--quiet", "--no-binary",
                    "deepspeed", "-w", str(build), f"deepspeed=={version}"], log,
                   dict(env, DS_BUILD_OPS="0"))
        built = list(build.glob("deepspeed-*.whl"))
        if len(built) != 1 or not built[0].name.endswith("-py3-none-any.whl"):
            raise SystemExit(f"deepspeed: expected one pure-Python wheel without compiled ops, got "
                             f"{[p.name for p in built]} (a cached build with DS_BUILD_OPS=1? "
                             "run with PIP_NO_CACHE_DIR=1)")
    ours = list(build.glob("megatron_ztt-*.whl"))
    return ours[0].name.split("-")[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.12", help="the image's Python (3.12)")
    parser.add_argument("--out", default=str(REPO / "work" / "gpu_wheels"),
                        help="the wheel folder (default work/gpu_wheels; out of commits)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image", default=str(DEFAULT_IMAGE),
                        help="requirement lines of what the image has (bench/gpu_image.txt)")
    source.add_argument("--image-freeze",
                        help="the image's exact list: `python3 -m pip list --format=freeze` in it")
    parser.add_argument("--glibc", default="2.28", help="the oldest glibc of the nodes (2.28)")
    parser.add_argument("--max-mib", type=float, default=48.0,
                        help="fail if the folder is larger (48 MiB; 0: no limit)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        parser.error(f"--python-version {args.python_version}: expected 3.N, e.g. 3.12")
    image_file = args.image_freeze or args.image
    if not Path(image_file).is_file():
        parser.error(f"{'--image-freeze' if args.image_freeze else '--image'} {image_file}: "
                     "no such file")
    python = sys.executable
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.whl"), *(out / name for name in RECORDS)]:
        old.unlink(missing_ok=True)
    log = out / "build.log"
    target = target_environment(args.python_version, args.glibc)
    with open(log, "w") as record:  # the target, as the commands below get it
        record.writelines(f"{key}={value}\n" for key, value in target.items())
    print(f"[gpu_wheels] CPython {args.python_version}, manylinux x86-64 (glibc >= {args.glibc}): "
          f"the pip commands below get {', '.join(target)} (in {log})", flush=True)
    lock = read_pins(LOCK)

    with tempfile.TemporaryDirectory(prefix="gpu_wheels_") as tmp:
        work = Path(tmp)
        if args.image_freeze:
            image_source = f"--image-freeze {args.image_freeze}"
            image = read_pins(Path(args.image_freeze))
            if "torch" not in image:
                raise SystemExit(f"--image-freeze {args.image_freeze}: no torch==VERSION line; "
                                 "expected the output of `python3 -m pip list --format=freeze`")
        else:
            image_source = f"--image {args.image}"
            print(f"[gpu_wheels] the image ({args.image}) for Python {args.python_version}",
                  flush=True)
            image = resolve_image(python, Path(args.image), target, work, log)
        (out / "image.txt").write_text(f"# the image, from {image_source}\n" + "".join(
            f"{image[key][0]}=={image[key][1]}\n" for key in sorted(image)))

        build = work / "build"
        version = build_wheels(python, lock, image, build, log)

        # requirements.lock's versions for what the image lacks; the image's own stay
        constraints = work / "constraints.txt"
        constraints.write_text("".join(f"{name}=={pin}\n" for key, (name, pin) in lock.items()
                                       if key not in image))
        report = work / "report.json"
        print(f"[gpu_wheels] resolving megatron_ztt[{EXTRAS}] against the image", flush=True)
        run_logged([python, "-S", "-m", "pip", "install", "--dry-run", "--quiet", "--report",
                    str(report), "--find-links", str(build), "-c", str(constraints),
                    f"megatron_ztt[{EXTRAS}]=={version}", *EXTRA_REQUIREMENTS], log,
                   stand_in_environment(image, python, work, target))
        installs = report_installs(report)

        names = {normalize(name) for name, _, _ in installs}
        if "torch" in names:
            raise SystemExit(f"the image's torch {image['torch'][1]} does not satisfy what the "
                             f"project needs (see {log}); the folder must not replace torch")
        replaced = sorted(f"{image[normalize(name)][0]} {image[normalize(name)][1]} -> {version_}"
                          for name, version_, _ in installs if normalize(name) in image)
        built = {p.name: p for p in build.glob("*.whl")}
        to_download = []
        for name, version_, url in installs:
            filename = url.rsplit("/", 1)[-1]
            if url.startswith("file:") and filename in built:
                shutil.copy2(built[filename], out / filename)
            else:
                to_download.append(f"{name}=={version_}")
        if to_download:
            print(f"[gpu_wheels] downloading {len(to_download)} wheels", flush=True)
            run_logged([python, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(out),
                        *to_download], log, dict(os.environ, **target))

    (out / "wheels.txt").write_text("".join(
        f"{name}=={v}\n" for name, v, _ in sorted(installs, key=lambda i: normalize(i[0]))))
    (out / "target.json").write_text(json.dumps({
        "python_version": args.python_version, "implementation": "cp",
        "glibc": args.glibc, "image": image_source, "replaces_image_packages": replaced,
        "max_mib": args.max_mib}, indent=2) + "\n")
    wheels = sorted(out.glob("*.whl"), key=lambda p: (-p.stat().st_size, p.name))
    total = sum(p.stat().st_size for p in wheels)
    print(f"\n[gpu_wheels] {out}: {len(wheels)} wheels for CPython {args.python_version} "
          f"manylinux x86-64 (glibc >= {args.glibc}), beside the image of {image_source}")
    for wheel in wheels:
        print(f"  {wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"  {total / 2**20:7.2f} MiB  in all")
    for line in replaced:
        print(f"  replaces the image's {line} (the image's version is too old for the project)")
    if args.max_mib and total > args.max_mib * 2**20:
        print(f"[gpu_wheels] error: {total / 2**20:.2f} MiB is over --max-mib {args.max_mib:g}",
              file=sys.stderr)
        return 1
    print(f"[gpu_wheels] on the GPU node: bash bench/gpu_check.sh --wheels {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
