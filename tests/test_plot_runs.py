"""``ztt plot``: TensorBoard scalars of several runs on one PNG (synthetic event files)."""

import json

import pytest
from torch.utils.tensorboard import SummaryWriter

from megatron_ztt import cli
from megatron_ztt.tools import plot_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(directory, losses, validation=None, global_batch=4, seq=8, first_step=10,
              subdir="tensorboard"):
    """A run directory as training leaves it: tensorboard/ events and config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(directory / subdir) if subdir else str(directory))
    for i, value in enumerate(losses):
        writer.add_scalar("lm loss", value, first_step * (i + 1))
    for step, value in (validation or {}).items():
        writer.add_scalar("lm loss validation", value, step)
    writer.close()
    (directory / "config.json").write_text(json.dumps(
        {"train": {"global_batch_size": global_batch}, "model": {"seq_length": seq}}))
    return directory


def test_reads_scalars_in_step_order_and_later_values_win(tmp_path):
    run = write_run(tmp_path / "a", [5.0, 4.0, 3.5])
    # a resumed run appends a second event file that logs step 30 again
    writer = SummaryWriter(log_dir=str(run / "tensorboard"), filename_suffix=".resumed")
    writer.add_scalar("lm loss", 3.0, 30)
    writer.add_scalar("lm loss", 2.5, 40)
    writer.close()
    steps, values = plot_runs.read_scalars(str(run), "lm loss")
    assert steps == [10, 20, 30, 40]
    assert values == pytest.approx([5.0, 4.0, 3.0, 2.5])


def test_plot_command_writes_a_png_with_labelled_axes_and_legend(tmp_path, monkeypatch):
    a = write_run(tmp_path / "ztt", [5.0, 4.5, 4.0], {20: 4.8, 30: 4.4})
    b = write_run(tmp_path / "vanilla", [5.5, 5.0, 4.8], {20: 5.1, 30: 4.9}, global_batch=8)
    drawn = {}
    original = plot_runs.draw

    def spy(series, ylabel, output, **kwargs):
        drawn["series"], drawn["figure"] = series, original(series, ylabel, output, **kwargs)
        return drawn["figure"]

    monkeypatch.setattr(plot_runs, "draw", spy)
    output = tmp_path / "out" / "validation.png"
    code = cli.main(["plot", str(a), str(b), "--validation", "--x", "tokens",
                     "--labels", "ZTT", "vanilla", "--output", str(output)])
    assert code == 0
    assert output.read_bytes()[:8] == PNG_MAGIC
    axes = drawn["figure"].axes[0]
    assert axes.get_xlabel() == "tokens"
    assert axes.get_ylabel() == "lm loss validation"
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["ZTT", "vanilla"]
    # tokens = step x global batch x sequence length, per run
    assert [s.steps for s in drawn["series"]] == [[20 * 32, 30 * 32], [20 * 64, 30 * 64]]
    assert [s.values for s in drawn["series"]] == [pytest.approx([4.8, 4.4]),
                                                   pytest.approx([5.1, 4.9])]


def test_event_folder_smoothing_and_default_tag(tmp_path):
    run = write_run(tmp_path / "events_only", [4.0, 2.0, 2.0], subdir=None)
    output = tmp_path / "train.png"
    assert cli.main(["plot", str(run), "--smooth", "0.5", "--output", str(output)]) == 0
    assert output.read_bytes()[:8] == PNG_MAGIC
    series = plot_runs.collect([str(run)], "lm loss", smoothing=0.5)[0]
    # debiased EMA: a_i = 0.5 a_(i-1) + 0.5 x_i (a_0 = 0), shown as a_i / (1 - 0.5^i)
    assert series.values == pytest.approx([2.0 / 0.5, 2.0 / 0.75, 2.0 / 0.875])
    assert series.label == "events_only"


def test_errors_name_the_run_and_the_problem(tmp_path, capsys):
    run = write_run(tmp_path / "a", [1.0])
    assert cli.main(["plot", str(run), "--tag", "no such tag", "-o",
                     str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err
    assert "no scalar 'no such tag'" in error and "lm loss" in error and str(run) in error
    assert not (tmp_path / "x.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["plot", str(empty), "-o", str(tmp_path / "y.png")]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err
    assert cli.main(["plot", str(run), "--labels", "a", "b", "-o",
                     str(tmp_path / "z.png")]) == 2
    assert "2 labels for 1 runs" in capsys.readouterr().err
