"""Checkpoints after a crash: `latest` left one save behind, stale temporary files, truncated
or corrupt checkpoints, and the commands that read them (resume, ztt eval)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from distributed import run_distributed
from train_helpers import micro_config

from megatron_ztt import checkpoint as ckpt
from megatron_ztt.training.checkpoint import _prune


def _fake_checkpoint(root, iteration, complete=True):
    tag_dir = root / ckpt.tag_for(iteration)
    tag_dir.mkdir(parents=True)
    if complete:
        (tag_dir / ckpt.META).write_text(json.dumps({"format_version": ckpt.FORMAT_VERSION,
                                                     "iteration": iteration}))
    return tag_dir


def test_newest_complete_checkpoint_wins_over_a_stale_latest(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    for iteration in (5, 10):
        _fake_checkpoint(root, iteration)
    _fake_checkpoint(root, 15, complete=False)  # a save cut short
    (root / "latest").write_text("iter_0000005")  # killed before `latest` moved to 10
    (root / "latest.tmp4242").write_text("iter_0000010")
    assert ckpt.resolve(str(root)) == (str(root), "iter_0000010")
    assert "iter_0000010 is the newest complete checkpoint" in capsys.readouterr().err
    assert ckpt.repair_latest(str(root)) == "iter_0000010"
    assert (root / "latest").read_text() == "iter_0000010"
    assert sorted(os.listdir(root)) == ["iter_0000005", "iter_0000010", "iter_0000015", "latest"]
    # iteration order, not string order, and renamed folders are not checkpoints
    _fake_checkpoint(root, 100_000_000)
    (root / "iter_0000010").rename(root / "iter_0000010.corrupt")
    assert ckpt.complete_tags(str(root)) == ["iter_0000005", "iter_100000000"]
    ckpt.repair_latest(str(root))
    _prune(str(root), keep_last=1)
    assert sorted(os.listdir(root)) == ["iter_0000010.corrupt", "iter_100000000", "latest"]


def test_corrupt_meta_is_a_checkpoint_error(tmp_path):
    tag_dir = _fake_checkpoint(tmp_path, 3)
    (tag_dir / ckpt.META).write_text('{"format_version": 1, "iter')
    with pytest.raises(ckpt.CheckpointError, match="ztt_meta.json is unreadable or corrupt"):
        ckpt.read_meta(str(tag_dir))


def _crash_worker(rank, data, run_dir):
    from megatron_ztt.training.train import train

    out = {}
    train(micro_config(data, run_dir, "train.train_iters=4", "checkpoint.interval=2"))
    root = f"{run_dir}/checkpoints"
    # kill -9 after iter_0000004 was complete but before `latest` moved to it
    with open(f"{root}/latest", "w") as f:
        f.write("iter_0000002")
    with open(f"{root}/latest.tmp999", "w") as f:
        f.write("iter_0000004")
    result = train(micro_config(data, run_dir, "train.train_iters=6", "checkpoint.interval=2",
                                "train.load=auto"))
    out["resumed_losses"] = sorted(result.losses)
    out["listing"] = sorted(n for n in os.listdir(root) if n.startswith(("iter_", "latest")))
    with open(f"{root}/latest") as f:
        out["latest"] = f.read()
    # a truncated newest checkpoint: the error names the file and the way back
    model_file = f"{root}/iter_0000006/{ckpt.model_file(0, 0)}"
    with open(model_file, "r+b") as f:
        f.truncate(os.path.getsize(model_file) // 2)
    try:
        train(micro_config(data, run_dir, "train.train_iters=8", "train.load=auto"))
        out["truncated_error"] = None
    except ckpt.CheckpointError as error:
        out["truncated_error"] = str(error)
    # resuming from an older checkpoint of the same folder would save over the newer ones
    try:
        train(micro_config(data, run_dir, "train.train_iters=8",
                           f"train.load={root}/iter_0000004"))
        out["older_error"] = None
    except ckpt.CheckpointError as error:
        out["older_error"] = str(error)
    return out


@pytest.fixture(scope="module")
def crashed_run(sample_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("crash") / "run"
    (out,) = run_distributed(_crash_worker, world_size=1, args=(sample_data, str(run_dir)))
    return out, run_dir


def test_resume_after_a_kill_before_latest_moved_uses_the_newest_checkpoint(crashed_run):
    out, _ = crashed_run
    assert out["resumed_losses"] == [5, 6]  # from iteration 4, not 2
    assert out["latest"] == "iter_0000006"
    assert out["listing"] == ["iter_0000002", "iter_0000004", "iter_0000006", "latest"]


def test_truncated_newest_checkpoint_names_the_file_and_the_previous_one(crashed_run):
    out, run_dir = crashed_run
    error = out["truncated_error"]
    assert error and f"iter_0000006/{ckpt.model_file(0, 0)} is truncated" in error, error
    assert f"previous complete checkpoint is {run_dir}/checkpoints/iter_0000004" in error
    assert "train.load=auto" in error
    assert "newer checkpoints (iter_0000006)" in out["older_error"]


def _ztt_eval(*args):
    env = dict(os.environ, ZTT_DEVICE="cpu", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "megatron_ztt.cli", "eval", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_eval_reports_truncated_incomplete_and_corrupt_checkpoints_in_one_line(crashed_run,
                                                                               tmp_path, capsys):
    from megatron_ztt.cli import main

    partial = _fake_checkpoint(tmp_path, 7, complete=False)
    assert main(["eval", "--checkpoint", str(partial)]) == 2
    assert "is not a complete checkpoint" in capsys.readouterr().err
    corrupt = _fake_checkpoint(tmp_path, 8)
    (corrupt / ckpt.META).write_text("{not json")
    assert main(["eval", "--checkpoint", str(corrupt)]) == 2
    assert "unreadable or corrupt" in capsys.readouterr().err

    _, run_dir = crashed_run
    result = _ztt_eval("--checkpoint", f"{run_dir}/checkpoints/iter_0000006")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"iter_0000006/{ckpt.model_file(0, 0)}" in result.stderr, result.stderr[-2000:]


def _async_worker(rank, data, root):
    from megatron_ztt.training import checkpoint as train_ckpt
    from megatron_ztt.training.train import train

    def run(name, *overrides):
        return train(micro_config(data, f"{root}/{name}", "checkpoint.interval=2",
                                  "train.lr_decay_iters=6", *overrides))

    out = {"sync": run("sync", "train.train_iters=6").losses}
    first = run("async", "train.train_iters=4", "checkpoint.async_save=true")
    out["stalls"] = first.checkpoint_stalls
    resumed = run("async", "train.train_iters=6", "checkpoint.async_save=true",
                  "train.load=auto")
    out["async_resumed"] = resumed.losses
    out["async_listing"] = sorted(os.listdir(f"{root}/async/checkpoints/iter_0000006"))
    # a write that fails in the background thread, half way through iteration 4's files
    original = train_ckpt.save_torch_atomic
    written = []

    def crash_mid_write(obj, path):
        if "iter_0000004" in str(path) and written:
            raise OSError("simulated crash during the background write")
        written.append(path)
        original(obj, path)

    train_ckpt.save_torch_atomic = crash_mid_write
    try:
        run("crash", "train.train_iters=4", "checkpoint.async_save=true")
        out["crash_error"] = None
    except OSError as error:
        out["crash_error"] = str(error)
    finally:
        train_ckpt.save_torch_atomic = original
    tag_dir = f"{root}/crash/checkpoints/iter_0000004"
    out["crash_listing"] = sorted(os.listdir(tag_dir))
    with open(f"{root}/crash/checkpoints/latest") as f:
        out["crash_latest"] = f.read()
    out["crash_resumed"] = run("crash", "train.train_iters=4", "train.load=auto").losses

    # SIGTERM while iteration 4's write is still running in the background (its first file
    # sends it, then takes a second): the final save must wait for that write
    events = []

    def slow_write(obj, path):
        tag = os.path.basename(os.path.dirname(path))
        if tag == "iter_0000004" and not any(t == tag for _, t in events):
            events.append(("latest while writing", _read(f"{root}/sigterm/checkpoints/latest")))
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)
        original(obj, path)
        events.append(("written", tag))

    train_ckpt.save_torch_atomic = slow_write
    try:
        stopped = run("sigterm", "train.train_iters=8", "checkpoint.async_save=true")
    finally:
        train_ckpt.save_torch_atomic = original
    out["sigterm"] = {"events": events, "state": stopped.state, "signal": stopped.signal,
                      "iteration": stopped.iteration,
                      "latest": _read(f"{root}/sigterm/checkpoints/latest"),
                      "complete": ckpt.complete_tags(f"{root}/sigterm/checkpoints")}
    return out


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


@pytest.fixture(scope="module")
def async_runs(sample_data, tmp_path_factory):
    (out,) = run_distributed(_async_worker, world_size=1,
                             args=(sample_data, str(tmp_path_factory.mktemp("async"))))
    return out


def test_async_saves_resume_exactly_and_a_failed_write_leaves_no_complete_checkpoint(
        async_runs):
    out = async_runs
    assert len(out["stalls"]) == 2
    assert sorted(out["async_resumed"]) == [5, 6]
    for it in (5, 6):
        assert out["async_resumed"][it] == pytest.approx(out["sync"][it], rel=1e-6, abs=1e-7)
    assert ckpt.META in out["async_listing"]
    assert not [n for n in out["async_listing"] if n.startswith(".")]  # no markers left
    assert out["crash_error"] == "simulated crash during the background write"
    assert ckpt.META not in out["crash_listing"], out["crash_listing"]
    assert out["crash_latest"] == "iter_0000002"
    assert sorted(out["crash_resumed"]) == [3, 4]


def test_sigterm_during_an_async_write_waits_for_it_before_the_final_save(async_runs):
    out = async_runs["sigterm"]
    assert out["state"] == "interrupted" and out["signal"] == "SIGTERM", out
    final = ckpt.tag_for(out["iteration"])
    assert 4 < out["iteration"] < 8, out  # stopped after the step the signal came in
    # `latest` did not move while iteration 4 was being written; then it moved to each
    # checkpoint once written, and both are complete
    assert ("latest while writing", "iter_0000002") in out["events"], out["events"]
    assert out["complete"][-2:] == ["iter_0000004", final] and out["latest"] == final, out
    # every file of iteration 4 was written before the first of the final checkpoint
    order = [tag for kind, tag in out["events"] if kind == "written"]
    last_of_4 = max(i for i, tag in enumerate(order) if tag == "iter_0000004")
    assert order.index(final) > last_of_4, order


def test_a_format_2_checkpoint_gives_its_weights_but_is_refused_for_resume(tmp_path):
    from megatron_ztt.training import checkpoint as train_ckpt

    tag_dir = _fake_checkpoint(tmp_path, 9)
    (tag_dir / ckpt.META).write_text(json.dumps({"format_version": 2, "iteration": 9}))
    assert ckpt.read_meta(str(tag_dir))["iteration"] == 9  # eval, export, init_from read it
    with pytest.raises(ckpt.CheckpointError) as error:
        train_ckpt.load(None, str(tmp_path), tag_dir.name, layout={})
    message = str(error.value)
    assert "format 2" in message and f"train.init_from={tag_dir}" in message, message
