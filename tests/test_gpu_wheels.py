"""The offline GPU install, rehearsed on the CPU: ``bench/gpu_wheels.sh`` builds the wheel folder
for this machine's Python against an "image" (a fresh virtual environment that holds only torch
and transformers, as a GPU image holds its own), and ``bench/gpu_check.sh --cpu --wheels DIR``
installs the folder with pip --no-index and runs every part of the check with that environment's
python3 (docs/GPU.md)."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO
from test_gpu_check import check_cpu_report

# Fixed paths (recreated at each run): DeepSpeed's CPU op, compiled on first use, is cached by the
# paths of torch and DeepSpeed, so a second run does not compile it again.
REHEARSAL = REPO / "work" / "gpu_wheels_rehearsal"
IMAGE_TRANSFORMERS = "5.17.0"  # the GPU image's (docs/GPU.md); the lock has a newer one


def _closure(name: str) -> dict:
    """{name: distribution} of an installed distribution and of everything it requires."""
    found, todo = {}, [name]
    while todo:
        key = canonicalize_name(todo.pop())
        if key in found:
            continue
        found[key] = importlib.metadata.distribution(key)
        for line in found[key].requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def _image_environment(root):
    """A fresh virtual environment with transformers (pip) and this process's torch.

    torch is linked, not installed: ``pip install torch`` would take a multi-GB CUDA build from
    PyPI on a machine without a CPU wheel at hand. The links sit outside the environment (a .pth
    names them), so that no pip run in it can remove or change the originals."""
    venv, links = root / "image", root / "torch_links"
    for path in (venv, links):
        shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # --no-compile: byte-compiling all of transformers' models would take most of this test's time
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--no-compile", f"transformers=={IMAGE_TRANSFORMERS}"], check=True)
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze",
                             "--disable-pip-version-check"], capture_output=True, text=True,
                            check=True).stdout
    present = {canonicalize_name(line.split("==")[0]) for line in listed.splitlines()}
    links.mkdir()
    for key, dist in _closure("torch").items():
        if key in present:
            continue
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            target = dist.locate_file(top)
            if not (links / top).exists() and os.path.exists(target):
                (links / top).symlink_to(target)
    site = subprocess.run([str(python), "-c",
                           "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "image_torch.pth"), "w") as pth:
        pth.write(f"{links}\n")
    return venv


@pytest.mark.slow
def test_wheel_folder_installs_and_runs_the_gpu_check_in_an_image_without_internet():
    REHEARSAL.mkdir(parents=True, exist_ok=True)
    venv = _image_environment(REHEARSAL)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for variable in ("PYTHON", "PYTHONPATH", "VIRTUAL_ENV", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                     "MASTER_ADDR", "MASTER_PORT", "ZTT_CHECK_DEVICE", "TORCH_EXTENSIONS_DIR"):
        env.pop(variable, None)
    freeze = REHEARSAL / "image_freeze.txt"
    freeze.write_text(subprocess.run(["python3", "-m", "pip", "list", "--format=freeze",
                                      "--disable-pip-version-check"], env=env, capture_output=True,
                                     text=True, check=True).stdout)
    image = {canonicalize_name(line.split("==")[0]): line.split("==")[1]
             for line in freeze.read_text().splitlines() if "==" in line}
    assert image["torch"] == importlib.metadata.version("torch")
    assert image["transformers"] == IMAGE_TRANSFORMERS and "megatron-core" not in image

    # the folder: built with this process's Python and pip (which reach PyPI)
    wheels = REHEARSAL / "wheels"
    python_version = "%d.%d" % sys.version_info[:2]
    built = subprocess.run(["bash", str(REPO / "bench" / "gpu_wheels.sh"), "--python-version",
                            python_version, "--image-freeze", str(freeze), "--out", str(wheels),
                            "--max-mib", "0"], cwd=REPO, env=dict(env, PYTHON=sys.executable),
                           capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-3000:]
    assert "MiB  in all" in built.stdout
    folder = {canonicalize_name(line.split("==")[0]): line.split("==")[1]
              for line in (wheels / "wheels.txt").read_text().splitlines()}
    assert folder["megatron-core"] == "0.16.1" and folder["deepspeed"] == "0.19.8"
    assert "megatron-ztt" in folder and "omegaconf" in folder and "pytest" in folder
    assert not set(folder) & set(image), "the folder must not replace the image's packages"
    assert len(list(wheels.glob("*.whl"))) == len(folder)
    assert json.loads((wheels / "target.json").read_text())["python_version"] == python_version

    # the check, with the image's python3 (first on PATH) and only the folder added
    out = REHEARSAL / "check"
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", "--wheels",
                           str(wheels), "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["wheels"]
    check_cpu_report(report, proc.stdout,
                     ("install", "device", "tests", "throughput_125m", "throughput_1b"))
    # it ran with the image's python, torch and transformers, and the folder's libraries
    versions = report["versions"]
    assert versions["python_executable"].startswith(str(venv))
    packages = versions["packages"]
    assert packages["torch"]["source"] == "image" and packages["torch"]["version"] == image["torch"]
    assert packages["transformers"]["source"] == "image"
    assert packages["transformers"]["version"] == IMAGE_TRANSFORMERS
    for name in ("megatron-core", "deepspeed", "omegaconf", "pytest"):
        assert packages[name]["source"] == "wheels", (name, packages[name])
        assert packages[name]["version"] == folder[name]
    assert versions["tools"]["ninja"].startswith(versions["wheels_site"])
    assert f"transformers {IMAGE_TRANSFORMERS} (image)" in proc.stdout
    # the big directories (the report, the folder and DeepSpeed's compiled op stay)
    for path in (venv, REHEARSAL / "torch_links", versions["wheels_site"]):
        shutil.rmtree(path)


def test_wheels_for_another_python_are_refused(tmp_path):
    (tmp_path / "target.json").write_text(json.dumps({"python_version": "3.99"}))
    (tmp_path / "x-1-py3-none-any.whl").write_bytes(b"")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--wheels",
                           str(tmp_path)], cwd=REPO, env=dict(os.environ, PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert (f"holds wheels for Python 3.99, but {sys.executable} is Python "
            f"{sys.version_info[0]}.{sys.version_info[1]}: rebuild it with bench/gpu_wheels.sh "
            f"--python-version") in proc.stderr


def test_a_folder_without_wheels_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--wheels",
                           str(tmp_path)], cwd=REPO, env=dict(os.environ), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "not a folder made by bench/gpu_wheels.sh" in proc.stderr
