"""Hostile input, as a new user would give it: every refused run, flag, file and setting ends
in one line naming it (no traceback), and no run is silently lost or trained on stale data.

Each test runs the commands to their end (``cli_cases``: several ``ztt`` commands in one
fresh process, in order) and reads what they printed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from launch_helpers import assert_one_line_error, cli_cases
from train_helpers import micro_overrides

CONFIG = str(REPO / "launch" / "configs" / "tiny.yaml")


def train_argv(data, run_dir, *overrides):
    return ["train", "--config", CONFIG, *micro_overrides(data, run_dir, *overrides)]


# --------------------------------------------------------------------------- runs and resumes
@pytest.mark.slow
def test_runs_resumes_and_their_outputs(sample_data, tmp_path):
    """1: a fresh start into a run.dir with checkpoints is refused; 5: a resume with other
    model or data settings is refused, naming each with both values (shapes said so), and a
    legitimate resume still works; 3, 7, 9: ztt eval's refused flags and outputs; 3:
    export-hf never writes into the checkpoint."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    meta = ckpt / "iter_0000002" / "ztt_meta.json"
    from megatron_ztt.data.tokenizer import train_tokenizer

    # another SentencePiece model of the same vocabulary size (another corpus)
    train_tokenizer([str(REPO / "data" / "sample")], 512,
                    str(tmp_path / "other"))
    other_tokenizer = tmp_path / "other.model"
    cases = cli_cases(
        train_argv(sample_data, run, "train.train_iters=2"),                       # 0
        train_argv(sample_data, run, "train.train_iters=4"),                       # 1
        train_argv(sample_data, run, "train.load=auto", "model.rotary_base=500",
                   "model.seq_length=64"),                                         # 2
        train_argv(sample_data, run, "train.load=auto", "model.num_cycles=3",
                   "model.exit_loss_weights=[0.3,0.3,1.0]"),                       # 3
        train_argv(sample_data, run, "train.load=auto", "data.split=80,10,10",
                   "train.seed=7"),                                                # 4
        train_argv(sample_data, tmp_path / "elsewhere", f"train.load={ckpt}"),     # 5 (fine)
        ["eval", "--checkpoint", ckpt, "--iters", "0"],                            # 6
        ["eval", "--checkpoint", ckpt, "--num-cycles", "7"],                       # 7
        ["eval", "--checkpoint", ckpt, "--num-cycles", "1000"],                    # 8
        ["eval", "--checkpoint", ckpt, "--output", meta],                          # 9
        ["eval", "--checkpoint", ckpt, "--output", tmp_path],                      # 10
        ["eval", "--checkpoint", ckpt, "--output", sample_data[0] + ".bin"],       # 11
        ["eval", "--checkpoint", ckpt, "--iters", "1", "--output",
         tmp_path / "new" / "folder" / "eval.json"],                               # 12
        ["export-hf", "--checkpoint", ckpt, "--output", ckpt / "iter_0000002" / "hf"],  # 13
        ["eval", "--checkpoint", ckpt, "--exit-threshold", "0.5", "--exit-signal",
         "zero_attention", "model.zero_token=false"],                              # 14
        train_argv(sample_data, run, "train.load=auto", "train.train_iters=3"),    # 15 (fine)
        train_argv(sample_data, run, "train.load=auto",
                   f"data.tokenizer={other_tokenizer}"),                          # 16
    )
    assert cases[0]["code"] == 0 and "saved checkpoint iteration 2" in cases[0]["out"], cases[0]
    before = meta.read_bytes()
    assert_one_line_error(cases[1], f"run.dir={run} already holds checkpoints",
                          "iter_0000002", "train.load=auto", "set run.dir to a new folder")
    line = assert_one_line_error(cases[2], "model.rotary_base: 10000.0 in the checkpoint, "
                                 "500.0 now", "model.seq_length: 32 in the checkpoint, 64 now")
    assert "train.init_from=" in line
    assert_one_line_error(cases[3], "model.num_cycles: 2 in the checkpoint, 3 now (changes the "
                          "weights' shapes)", "model.exit_loss_weights")
    assert_one_line_error(cases[4], "data.split: '90,5,5' in the checkpoint, '80,10,10' now",
                          "train.seed (the data order): 1234 in the checkpoint, 7 now")
    assert cases[5]["code"] == 0 and "resumed from checkpoint iteration 2" in cases[5]["out"]
    assert_one_line_error(cases[6], "--iters must be >= 1", code=2)
    assert_one_line_error(cases[7], "--num-cycles", code=2)
    assert_one_line_error(cases[8], "--num-cycles", code=2)
    assert_one_line_error(cases[9], f"--output {meta}: lands inside the folder {ckpt}",
                          "write it somewhere")
    assert meta.read_bytes() == before  # the checkpoint still loads
    assert_one_line_error(cases[10], f"--output {tmp_path} is a folder")
    assert_one_line_error(cases[11], "lands on the file", ".bin")
    report = json.loads((tmp_path / "new" / "folder" / "eval.json").read_text())
    assert cases[12]["code"] == 0, cases[12]
    # --iters counts global batches (8 samples of 32 tokens), as training validation does
    assert report["tokens"] == 1 * 8 * 32
    assert_one_line_error(cases[13], "lands inside the folder", str(ckpt))
    assert not (ckpt / "iter_0000002" / "hf").exists()
    assert_one_line_error(cases[14], "--exit-signal", code=2)
    assert cases[15]["code"] == 0 and "resumed from checkpoint iteration 2" in cases[15]["out"]
    assert_one_line_error(cases[16], "data.tokenizer:", "in the checkpoint", "now")


def test_a_save_never_reports_success_without_writing(single_process, tmp_path):
    """A complete checkpoint folder at the save's iteration is never taken for this run's
    save."""
    from megatron_ztt.checkpoint import CheckpointError
    from megatron_ztt.config import load_config
    from megatron_ztt.training import checkpoint as ckpt

    config = load_config(None, [f"run.dir={tmp_path}", "data.blend=[x]", "data.tokenizer=t"])
    tag_dir = Path(config.checkpoint_dir) / "iter_0000004"
    tag_dir.mkdir(parents=True)
    (tag_dir / "ztt_meta.json").write_text("{}")
    with pytest.raises(CheckpointError, match="already holds a complete checkpoint"):
        ckpt.save(None, config, ckpt.TrainingState(iteration=4), {}, {})
    assert (tag_dir / "ztt_meta.json").read_text() == "{}"


# --------------------------------------------------------------------------- stale index cache
@pytest.mark.slow
def test_a_changed_corpus_rebuilds_the_sample_index(sample_data, tmp_path):
    """2: re-preprocessing into the same prefix (a smaller corpus) rebuilds the index cache
    and says so, instead of crashing or training on the old corpus's samples."""
    docs = sorted((Path(sample_data[0]).parent / "docs").glob("*.txt"))
    big, small = tmp_path / "big", tmp_path / "small"
    for folder, chosen in ((big, docs), (small, docs[:: 4])):
        folder.mkdir()
        for doc in chosen:
            shutil.copy(doc, folder / doc.name)
    prefix = tmp_path / "corpus"
    data = (str(prefix), sample_data[1])

    def preprocess(folder):
        return ["preprocess", "--input", folder, "--tokenizer", sample_data[1],
                "--output-prefix", prefix, "--append-eod", "--no-progress"]

    cases = cli_cases(preprocess(big), train_argv(data, tmp_path / "r1", "train.train_iters=1"),
                      preprocess(small), train_argv(data, tmp_path / "r2", "train.train_iters=1"))
    assert [case["code"] for case in cases] == [0, 0, 0, 0], cases
    assert "changed since the index cache" not in cases[1]["out"]
    note = f"note: {prefix}.bin/.idx changed since the index cache"
    assert note in cases[3]["out"] and "rebuilding its sample index" in cases[3]["out"]
    assert "Traceback" not in cases[3]["out"] + cases[3]["err"]


# --------------------------------------------------------------------------- settings
BAD_SETTINGS = [
    ("train.lr=inf", "train.lr: must be a finite number, got inf"),
    ("train.lr=nan", "train.lr: must be a finite number, got nan"),
    ("train.min_lr=-1", "train.min_lr: must be between 0"),
    ("train.adam_beta1=1.5", "train.adam_beta1: must be in [0, 1), got 1.5"),
    ("train.adam_beta2=1.0", "train.adam_beta2: must be in [0, 1), got 1.0"),
    ("train.adam_eps=0", "train.adam_eps: must be > 0, got 0.0"),
    ("train.adam_eps=-1e-8", "train.adam_eps: must be > 0"),
    ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0, got -0.1"),
    ("train.clip_grad=nan", "train.clip_grad: must be a finite number"),
    ("train.clip_grad=-1", "train.clip_grad: must be >= 0"),
    ("model.gate_bias_init=nan", "model.gate_bias_init: must be a finite number, got nan"),
    ("model.rotary_base=0", "model.rotary_base: must be a finite number > 0"),
    ("model.norm_epsilon=-1e-5", "model.norm_epsilon: must be a finite number > 0"),
    ("model.init_std=inf", "model.init_std: must be a finite number > 0"),
    ("model.hidden_dropout=1.0", "model.hidden_dropout: must be in [0, 1), got 1.0"),
    ("model.attention_dropout=nan", "model.attention_dropout: must be in [0, 1)"),
    ("model.exit_loss_weights=[nan,1.0]", "model.exit_loss_weights: weights must be >= 0"),
    ("model.seq_length=1000000", "model.seq_length: 1000000 needs"),
    ("eval.exit_thresholds=[nan]", "eval.exit_thresholds: every threshold must be"),
    ("logging.peak_flops_per_device=0", "logging.peak_flops_per_device: must be auto or a finite number"),
    ("data.blend=[a", "override 'data.blend=[a': its value is not valid YAML"),
    ("model.num_cycles=[1", "override 'model.num_cycles=[1': its value is not valid YAML"),
    ("train.lr={", "override 'train.lr={': its value is not valid YAML"),
]


def test_bad_numbers_and_yaml_fail_at_start_in_one_line(sample_data, tmp_path):
    """4, 12: numbers torch or DeepSpeed would reject on every rank, or that break the math,
    and YAML errors in overrides or files, are refused at start, naming the setting."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  hidden_size: [32\n")
    cases = cli_cases(*(train_argv(sample_data, tmp_path / "run", override)
                        for override, _ in BAD_SETTINGS),
                      ["train", "--config", broken])
    for (override, message), case in zip(BAD_SETTINGS, cases):
        assert_one_line_error(case, message, code=2)
    assert_one_line_error(cases[-1], f"{broken}: not valid YAML", "line 3", code=2)
    assert not (tmp_path / "run").exists()


def test_seq_length_memory_refusal_gives_the_numbers(sample_data, tmp_path):
    from megatron_ztt.config import check_attention_memory, load_config
    from megatron_ztt.model.config import ConfigError

    config = load_config(None, micro_overrides(sample_data, tmp_path, "model.seq_length=1000000"))
    with pytest.raises(ConfigError) as error:  # a start check: the config itself is valid
        check_attention_memory(config)
    assert "GiB for the attention scores training keeps (train.micro_batch_size 2 x 4 heads " \
           "x 1000000^2 x 4 bytes x 4 layer applications)" in str(error.value)


# --------------------------------------------------------------------------- text input
@pytest.fixture(scope="module")
def surrogate_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("surrogate")
    (root / "docs.jsonl").write_text('{"text": "a first good document"}\n'
                                     '{"text": "lone \\ud800 surrogate"}\n'
                                     '{"text": "a second good document"}\n')
    return root / "docs.jsonl"


def _hf_tokenizer_dir(root: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(
        "a first good document second lone surrogate".split())}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    root.mkdir()
    tokenizer.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    return root


def test_lone_surrogates_are_one_line_errors_or_skipped_and_counted(sample_data, surrogate_input,
                                                                    tmp_path):
    """10: a lone surrogate escape (valid JSON, not Unicode text) in preprocess (both
    tokenizer kinds, 1 or 2 workers) and tokenizer train."""
    hf = _hf_tokenizer_dir(tmp_path / "hf")
    where = f"{surrogate_input}:2: the text holds a lone surrogate escape (\\ud800 at " \
            f"character 5)"
    argvs = []
    for tokenizer in (sample_data[1], hf):
        for workers in ("1", "2"):
            base = ["preprocess", "--input", surrogate_input, "--tokenizer", tokenizer,
                    "--workers", workers, "--no-progress", "--append-eod"]
            argvs.append(base + ["--output-prefix", tmp_path / f"raise{workers}"])
            argvs.append(base + ["--output-prefix", tmp_path / f"skip-{Path(tokenizer).name}"
                                 f"-{workers}", "--on-error", "skip"])
    argvs.append(["tokenizer", "train", "--input", surrogate_input, "--vocab-size", "300",
                  "--output", tmp_path / "tok"])
    cases = cli_cases(*argvs)
    for raised, skipped in zip(cases[0:8:2], cases[1:8:2]):
        assert_one_line_error(raised, "ztt preprocess: error:", where, code=1)
        assert skipped["code"] == 0, skipped
        assert "2 documents" in skipped["out"] and "1 unreadable" in skipped["out"], skipped
        assert where in skipped["out"] and "Traceback" not in skipped["err"]
    assert_one_line_error(cases[8], "ztt tokenizer train: error:", where, code=1)
    assert not (tmp_path / "raise1.bin").exists() and not (tmp_path / "tok.model").exists()


def test_outputs_never_land_on_inputs(surrogate_input, tmp_path):
    """3: preprocess refuses a sidecar onto its own tokenizer (a tokenizer.json named like
    the sidecar) before reading anything; plot refuses its runs' event folders."""
    hf = _hf_tokenizer_dir(tmp_path / "hf")
    tokenizer = tmp_path / "corpus.tokenizer.json"
    shutil.copy(hf / "tokenizer.json", tokenizer)
    before = tokenizer.read_bytes()
    (tmp_path / "run" / "tensorboard").mkdir(parents=True)
    cases = cli_cases(
        ["preprocess", "--input", surrogate_input, "--tokenizer", tokenizer, "--output-prefix",
         tmp_path / "corpus", "--no-progress", "--on-error", "skip"],
        ["plot", tmp_path / "run", "--output", tmp_path / "run" / "tensorboard" / "x.png"],
        ["plot", tmp_path / "run", "--output", tmp_path],
    )
    assert_one_line_error(cases[0], f"ztt preprocess: error: --output-prefix {tokenizer}: "
                          f"lands on the file", code=1)
    assert tokenizer.read_bytes() == before
    assert not (tmp_path / "corpus.bin").exists()
    assert_one_line_error(cases[1], "lands inside the folder", "tensorboard", code=2)
    assert_one_line_error(cases[2], f"--output {tmp_path} is a folder", code=2)


# --------------------------------------------------------------------------- import-hf
def _import_refused(capsys, *args):
    from test_import_hf import import_cli

    assert import_cli(*args) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ztt import-hf: error:"), err
    assert "Traceback" not in captured.out + captured.err
    return err


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from test_import_hf import hf_model, save_hf

    return Path(save_hf(hf_model("llama", num_layers=3), tmp_path_factory.mktemp("llama")))


def test_import_checks_the_tokenizer_against_the_vocabulary(single_process, llama_dir, tmp_path,
                                                            capsys):
    """6: a tokenizer with more ids than the model's vocabulary is refused, or grown with
    --grow-vocab into a checkpoint that export-hf takes."""
    from megatron_ztt.cli import main
    from test_import_hf import import_cli, write_word_tokenizer

    source = tmp_path / "source"
    shutil.copytree(llama_dir, source)
    write_word_tokenizer(source, 230)  # the model has 200 rows
    err = _import_refused(capsys, "--model", source, "--output", tmp_path / "refused")
    assert "the tokenizer has 230 ids but the model's vocabulary (vocab_size) 200: ids " \
           "200..229 have no embedding row; pass --grow-vocab" in err
    assert not (tmp_path / "refused").exists()
    assert import_cli("--model", source, "--output", tmp_path / "grown", "--grow-vocab") == 0
    assert "grew it by 30 rows (--grow-vocab)" in capsys.readouterr().out
    assert main(["export-hf", "--checkpoint", str(tmp_path / "grown"), "--output",
                 str(tmp_path / "export"), "--dtype", "fp32"]) == 0


def test_bad_gguf_files_and_numbers_are_one_line_errors(llama_dir, tmp_path, capsys):
    """11: a fake or truncated GGUF file; 4: a NaN gate bias."""
    from test_import_hf import hf_model, write_gguf

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file at all")
    err = _import_refused(capsys, "--gguf", fake, "--output", tmp_path / "o1")
    assert f"--gguf {fake}: not a GGUF file (it starts with b'PK\\x03\\x04'" in err
    real = tmp_path / "real.gguf"
    write_gguf(hf_model("llama", num_layers=3, vocab_size=260), real)
    for cut in (12, 200, real.stat().st_size // 2):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(real.read_bytes()[:cut])
        err = _import_refused(capsys, "--gguf", truncated, "--output", tmp_path / "o2")
        assert f"{truncated}" in err and ("truncated or corrupt GGUF" in err or
                                           "cannot load the weights" in err), err
    for bias in ("nan", "inf", "-1"):
        err = _import_refused(capsys, "--model", llama_dir, "--output", tmp_path / "o3",
                              "--gate-bias", bias)
        assert "--gate-bias must be a finite number > 0" in err


# --------------------------------------------------------------------------- generate
def test_generate_encodes_the_prompt_as_the_training_data(single_process, llama_dir, tmp_path,
                                                          capsys):
    """8: no template specials (a tokenizer that appends </s>) unless --add-special-tokens."""
    from tokenizers import Tokenizer, processors

    from megatron_ztt.cli import main
    from megatron_ztt.inference import generate
    from test_import_hf import import_cli, write_word_tokenizer

    source = tmp_path / "source"
    shutil.copytree(llama_dir, source)
    write_word_tokenizer(source, 200)
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.save(str(source / "tokenizer.json"))
    (source / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    assert import_cli("--model", source, "--output", tmp_path / "ckpt") == 0
    assert main(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--output",
                 str(tmp_path / "export"), "--dtype", "fp32"]) == 0
    model, hf_tokenizer = generate.load(tmp_path / "export")
    prompts = []
    real_generate = model.generate

    def spy(**inputs):
        prompts.append(inputs["input_ids"][0].tolist())
        return real_generate(**inputs)

    model.generate = spy
    generate.generate_text(model, hf_tokenizer, "w5 w6", 2)
    generate.generate_text(model, hf_tokenizer, "w5 w6", 2, add_special_tokens=True)
    assert prompts == [[5, 6], [5, 6, 1]]
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "export"), "--prompt", "w5 w6",
                 "--max-new-tokens", "2"]) == 0
    assert "mean cycles used" in capsys.readouterr().err


# --------------------------------------------------------------------------- launchers
@pytest.mark.slow
def test_launchers_check_config_and_layout_once_before_any_rank(sample_data, tmp_path):
    """13: launch/torchrun.sh and train.sbatch's launch step refuse a bad layout, data or
    start with one line, before torchrun or srun start a rank."""
    env = dict(os.environ, NPROC_PER_NODE="3", PYTHON=sys.executable,
               LOG_DIR=str(tmp_path / "logs"), ZTT_DEVICE="cpu", DS_ACCELERATOR="cpu",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    script = REPO / "launch" / "torchrun.sh"
    plan = REPO / "launch" / "slurm" / "launch_plan.py"
    cases = [  # 3 processes
        (["parallel.tensor=2"], "launch_plan: error: parallel layout impossible: 3 processes "
                                "are not divisible by parallel.tensor (2)"),
        ([], "train.global_batch_size (8) must be a multiple of train.micro_batch_size (2) x "
             "data-parallel size (3)"),
        ([f"data.blend=[{tmp_path / 'missing'}]", "train.global_batch_size=6"],
         f"{tmp_path / 'missing'}.idx: missing"),
    ]
    for overrides, message in cases:
        argv = micro_overrides(sample_data, tmp_path / "run", *overrides)
        for command, extra_env in (
                (["bash", str(script), CONFIG, *argv], {}),
                ([sys.executable, str(plan), "launch", "--hosts", "localhost", CONFIG, *argv],
                 {"SLURM_JOB_ID": "7", "SLURM_NTASKS_PER_NODE": "3",
                  "SLURM_JOB_NUM_NODES": "1"})):
            result = subprocess.run(command, env={**env, **extra_env}, capture_output=True,
                                    text=True, timeout=300, cwd=tmp_path)
            text = result.stdout + result.stderr
            assert result.returncode == 2, text
            assert "Traceback" not in text and "ChildFailedError" not in text, text
            errors = [line for line in text.splitlines() if "error:" in line]
            assert len(errors) == 1 and message in errors[0], text
            assert "torch.distributed.run" not in result.stdout  # torchrun never started


# --------------------------------------------------------------------------- twenty more
def test_twenty_more_hostile_cases(sample_data, tmp_path):
    """The closing note's own cases: config, resume, import, the circular pipeline, exit
    signals and the depth dial, each a one-line error naming the setting or flag."""
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    meta = tmp_path / "ztt_meta.json"
    meta.write_text("{}")
    no_tokenizer = tmp_path / "empty"
    no_tokenizer.mkdir()

    def train(*overrides):
        return train_argv(sample_data, tmp_path / "run", *overrides)

    generate = ["generate", "--model", tmp_path / "unread", "--prompt", "hi"]
    cases = [
        (["train", "--config", listing], f"{listing}: the file must map sections", 2),
        (train("eval.iters=-1"), "eval.iters: must be >= 0 (0: no validation), got -1", 2),
        (generate + ["--temperature", "-1"], "--temperature must be a finite number >= 0", 1),
        (generate + ["--temperature", "nan"], "--temperature must be a finite number >= 0", 1),
        (generate + ["--top-p", "2", "--temperature", "1"], "--top-p must be in (0, 1]", 1),
        (generate + ["--top-k", "0", "--temperature", "1"], "--top-k must be >= 1, got 0", 1),
        (train(f"train.init_from={garbage}"), f"{garbage} is not a torch file", 2),
        (train(f"train.init_from={meta}"), f"{meta} is not a torch file", 2),
        (train("model.seq_length=20000", "train.micro_batch_size=8",
               "train.global_batch_size=8"), "attention scores training keeps", 2),
        (["import-hf", "--model", tmp_path, "--output", tmp_path / "o", "--seq-length", "0"],
         "--seq-length must be >= 1, got 0", 1),
        (train("parallel.tensor=0"), "sizes must be >= 1", 2),
        (train("data.blend=[0.5,a,nan,b]"), "data.blend: weight 'nan' (of 'b') must be a "
                                            "positive number", 2),
        (train("model.hiden_size=3"), "Did you mean one of: 'hidden_size'", 2),
        (train("train.load=/nonexistent/ckpt"), "no checkpoint at /nonexistent/ckpt", 2),
        (train("model.num_layers=4", "parallel.pipeline=3"), "more pipeline stages than "
                                                             "cycled layers", 2),
        (train("model=3"), "int is not a subclass of ZTTConfig", 2),
        (train("train.precision=fp16"), "train.precision: must be fp32 or bf16", 2),
        (train("model.exit_threshold=-1"), "model.exit_threshold: must be a number >= 0", 2),
        (train("model.zero_token=false", "model.exit_threshold=0.5"),
         "early exit on exit_signal=zero_attention reads the zero attention", 2),
        (train(f"data.tokenizer={no_tokenizer}"), "the directory holds no tokenizer.json", 2),
        (train("parallel.pipeline=2", "model.num_layers=4", "parallel.zero_stage=2"),
         "supports parallel.zero_stage 0 or 1 only", 2),
    ]
    results = cli_cases(*(argv for argv, _, _ in cases))
    for (argv, message, code), result in zip(cases, results):
        assert_one_line_error(result, message, code=code)
