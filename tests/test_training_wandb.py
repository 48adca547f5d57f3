"""Weights & Biases logging, offline (WANDB_MODE=offline, no network): the same scalars as
TensorBoard at the same steps, the run config, and one W&B run across a resume."""

import json
import math
import os
import struct
from pathlib import Path

import pytest
from distributed import run_distributed
from train_helpers import micro_config

from megatron_ztt.model.config import ConfigError


def _train_worker(rank, data, run_dir, wandb_dir):
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=wandb_dir, WANDB_SILENT="true")
    from megatron_ztt.training.train import train

    wandb = ["logging.wandb_project=ztt-test", "logging.wandb_run_name=micro",
             "logging.interval=1", "eval.interval=2"]
    first = train(micro_config(data, run_dir, *wandb)).losses
    resumed = train(micro_config(data, run_dir, *wandb, "train.train_iters=6",
                                     "train.load=auto")).losses
    fresh = train(micro_config(data, f"{run_dir}_fresh", *wandb)).losses
    return first, resumed, fresh


def _wandb_records(path):
    """The records of a .wandb transaction log (LevelDB log format: 32 KiB blocks of chunks
    with a 7-byte header each, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # a block's tail too short for a chunk header is padding
            position += room
            continue
        _, length, kind = struct.unpack_from("<IHB", data, position)
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_run(path):
    """(run record, {(key, step): value}) of one offline run."""
    run, history = None, {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run" and run is None:
            run = record.run
        elif kind == "history":
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):  # wandb's own: _step, _runtime, _timestamp
                    history[key, step] = json.loads(item.value_json)
    return run, history


def _tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {(tag, event.step): event.value for tag in accumulator.Tags()["scalars"]
            for event in accumulator.Scalars(tag)}


@pytest.mark.slow
def test_wandb_logs_the_tensorboard_scalars_and_config_and_resumes_the_same_run(sample_data,
                                                                              tmp_path):
    wandb_dir, run_dir = tmp_path / "wandb", tmp_path / "run"
    wandb_dir.mkdir()
    ((first, resumed, _),) = run_distributed(_train_worker, world_size=1,
                                          args=(sample_data, str(run_dir), str(wandb_dir)))
    assert sorted(first) == [1, 2, 3, 4] and sorted(resumed) == [5, 6]
    logs = list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 3  # one per training start
    # in the order of the starts: W&B names a run's folder by the second it started and the
    # run id, and two starts can fall in one second, so the folders' names do not order them
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    runs = sorted(map(_wandb_run, logs), key=lambda r: (r[0].run_id != run_id,
                                                       min(step for _, step in r[1])))
    (run, history), (resumed_run, resumed_history), (fresh_run, _) = runs

    scalars = _tensorboard_scalars(run_dir / "tensorboard")
    assert {"lm loss", "grad-norm", "mfu", "lm loss validation"} <= {k for k, _ in scalars}
    assert set(history) | set(resumed_history) == set(scalars)
    for key, value in {**history, **resumed_history}.items():
        assert math.isclose(value, scalars[key], rel_tol=1e-6, abs_tol=1e-9), key  # TB: fp32
    assert {step for _, step in history} == {1, 2, 3, 4}
    assert {step for _, step in resumed_history} == {5, 6}
    assert [history[("lm loss", i)] for i in (1, 2, 3, 4)] == [first[i] for i in (1, 2, 3, 4)]

    # one W&B run: the id kept in the run directory, used again on resume
    assert run.run_id == resumed_run.run_id == run_id
    assert fresh_run.run_id != run_id  # a fresh start is a new W&B run
    assert (run.project, run.display_name) == ("ztt-test", "micro")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model"]["hidden_size"] == 32 and config["train"]["train_iters"] == 4
    assert config["logging"]["wandb_project"] == "ztt-test"
    assert not (run_dir / "wandb").exists()  # WANDB_DIR, when set, holds all of W&B's files


def test_wandb_settings_are_checked_at_start(sample_data, tmp_path):
    assert micro_config(sample_data, tmp_path).logging.wandb_project is None  # off by default
    with pytest.raises(ConfigError, match=r"^logging.wandb_project: is empty"):
        micro_config(sample_data, tmp_path, "logging.wandb_project=' '")
