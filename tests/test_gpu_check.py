"""``bash bench/gpu_check.sh --cpu``: the GPU check's every part runs on the CPU (the `cuda`
tests under ZTT_CHECK_DEVICE=cpu, the bf16 throughput benchmark at tiny widths) and its JSON
report says what ran (checked by ``check_cpu_report`` on the suite's one full run, in
tests/test_gpu_wheels.py), and its refusals."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def _env():
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                     "ZTT_CHECK_DEVICE"):
        env.pop(variable, None)
    return env


def check_cpu_report(report, stdout, parts):
    """What a `bash bench/gpu_check.sh --cpu` run must have done: every part, the `cuda` tests
    really run (not skipped), each benchmarked config at its own depth. Called by the one full
    run of the check in the suite, tests/test_gpu_wheels.py (its --wheels rehearsal runs all of
    --cpu's parts, and running the check twice cost the suite 80 s)."""
    assert report["ok"] and report["mode"] == "cpu" and report["problems"] == []
    assert report["device_name"].startswith("cpu")
    assert {name: part["rc"] for name, part in report["parts"].items()} == dict.fromkeys(parts, 0)
    tests = report["tests"]
    assert tests["skipped"] == 0 and tests["failures"] == 0 and tests["errors"] == 0
    assert set(tests["cases"]) >= {"test_fp32_forward_and_gradients_match_the_cpu",
                                   "test_bf16_deepspeed_steps_lower_the_loss",
                                   "test_export_gives_the_training_logits_on_the_device",
                                   "test_generation_on_the_device"}
    assert set(tests["cases"].values()) == {"passed"}
    expected_applications = {"125m": 32, "1b": 56}
    assert set(report["throughput"]) == set(expected_applications)
    for size, result in report["throughput"].items():
        assert result["device"] == "cpu" and result["dtype"] == "bf16" and result["cpu_sizes"]
        models = result["models"]
        assert len(models) == 2
        for name, m in models.items():
            assert m["layer_applications"] == expected_applications[size], (size, name)
            assert m["tokens_per_second"] > 0 and 0 < m["mfu"] < 1
            assert m["peak_memory_bytes"] > 0
        assert result["ztt_over_megatron_step_time"] > 0
    assert "ztt_L12_C3" in stdout and "megatron_56_layers" in stdout


def test_gpu_check_rejects_an_unknown_argument():
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--gpu"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument '--gpu'" in proc.stderr


def test_report_fails_on_a_failed_or_timed_out_part(tmp_path):
    (tmp_path / "parts.tsv").write_text("device\t0\t1.0\t45\ntests\t1\t20.0\t165\n"
                                        "throughput_125m\t124\t90.0\t90\n")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "report",
                           str(tmp_path)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not report["ok"]
    assert report["problems"] == [
        "tests: exit status 1", "throughput_125m: over its time limit of 90 s",
        "throughput_1b: did not run"]
    assert "FAILED" in proc.stdout and str(tmp_path / "gpu_check.json") in proc.stdout


def test_without_a_gpu_the_check_fails_at_the_device_part(tmp_path):
    from megatron_ztt.parallel import runtime

    if runtime.cuda_visible():
        pytest.skip("a CUDA device is visible: the check would run")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--out",
                           str(tmp_path)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "no CUDA device is visible" in proc.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cuda" and not report["ok"]
    assert list(report["parts"]) == ["device"]
    assert report["problems"][0] == "device: exit status 1"
