"""Hugging Face export: logits equal the training model's, the directory is complete and
loadable, the tokenizer keeps SentencePiece's ids, and bad input or an interruption leaves no
half-written output."""

import json
from pathlib import Path

import pytest
import torch

from export_helpers import (CORPUS, VARIANTS, build_and_export, load_export,
                            safetensors_tensors, train_sentencepiece, variant_config)
from megatron_ztt.export import hf as hf_export
from megatron_ztt.export.hf import ExportError, export_hf
from model_helpers import batch

MAX_ABS_DIFF = 1e-4


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sentencepiece"))


def test_exported_plan_matches_training_plan():
    from megatron_ztt.export.hf_template.modeling_ztt import application_plan as exported_plan
    from megatron_ztt.export.hf import hf_config
    from megatron_ztt.model.cycle_engine import application_plan

    for name in VARIANTS:
        config = variant_config(name)
        exported = exported_plan(hf_config(config, {}, torch.float32))
        training = application_plan(config)
        assert [(a.index, a.layer, a.cycle, a.starts_cycle, a.ends_cycle, a.name)
                for a in exported] == [(a.index, a.layer, a.cycle, a.starts_cycle, a.ends_cycle,
                                        a.name) for a in training], name


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_exported_logits_match_training_model(seeded, tmp_path, name):
    model, config, path = build_and_export(name, tmp_path / "export")
    exported = load_export(path)
    ids, _ = batch(config, size=3)
    with torch.no_grad():
        expected = model(ids).logits
        without_cache = exported(ids, use_cache=False).logits
        with_cache = exported(ids, use_cache=True).logits  # prefill through the cache layers
    assert without_cache.shape == (3, config.seq_length, config.vocab_size)
    for got in (without_cache, with_cache):
        diff = (got - expected).abs().max().item()
        assert diff <= MAX_ABS_DIFF, f"{name}: max abs diff {diff}"


@pytest.mark.parametrize("mode", ["token", "sequence"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_exported_early_exit_matches_training_model(seeded, tmp_path, use_cache, mode):
    """The same per-token (or per-row) exit decisions and logits: both run cycle_engine."""
    model, config, path = build_and_export("ztt-gqa", tmp_path / "export")
    exported = load_export(path)
    ids, _ = batch(config, size=4)
    with torch.no_grad():
        first_cycle = model(ids).zero_attention_by_cycle(model.plan)[1].item()
        # the batch mean: some tokens (rows) stop after cycle 1, others go on
        expected = model(ids, exit_threshold=first_cycle, exit_mode=mode)
        got = exported(ids, exit_threshold=first_cycle, exit_mode=mode, use_cache=use_cache)
    assert expected.cycles_used.min() == 1 and expected.cycles_used.max() > 1
    assert torch.equal(got.cycles_used, expected.cycles_used)
    assert (got.logits - expected.logits).abs().max().item() <= MAX_ABS_DIFF


def test_export_directory_is_complete(seeded, tmp_path, tokenizer_model):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    model, config, path = build_and_export("ztt-gqa", tmp_path / "export", tokenizer_model)
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "configuration_ztt.py", "modeling_ztt.py", "model.safetensors",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging leftovers

    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "ztt"
    assert raw["auto_map"] == {"AutoConfig": "configuration_ztt.ZTTConfig",
                               "AutoModel": "modeling_ztt.ZTTModel",
                               "AutoModelForCausalLM": "modeling_ztt.ZTTForCausalLM"}
    # the shipped code is the library's own files, byte for byte: one implementation of the
    # loop and the exit policy (and nothing else is shipped that could drift)
    from megatron_ztt.export import hf_template
    from megatron_ztt.model import cycle_engine, exit_policy

    template = Path(hf_template.__file__).parent
    library = {"cycle_engine.py": Path(cycle_engine.__file__),
               "exit_policy.py": Path(exit_policy.__file__),
               "modeling_ztt.py": template / "modeling_ztt.py",
               "configuration_ztt.py": template / "configuration_ztt.py"}
    assert sorted(p.name for p in path.glob("*.py")) == sorted(library)
    for name, source in library.items():
        assert (path / name).read_bytes() == source.read_bytes(), name
    loaded = AutoConfig.from_pretrained(path, trust_remote_code=True)
    assert loaded.num_hidden_layers == config.num_applications  # one cache layer each
    generation = GenerationConfig.from_pretrained(path)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 3)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.pad_token_id) == (0, 1, 2, 3)

    tensors = safetensors_tensors(path)
    # the vocabulary padding rows are gone, the tied output layer is not duplicated
    assert config.padded_vocab_size > config.vocab_size
    assert tensors["model.embed_tokens.weight"].shape == (config.vocab_size, config.hidden_size)
    assert "lm_head.weight" not in tensors
    # one copy of each distinct layer, one zero key per application
    assert {k.split(".")[2] for k in tensors if k.startswith("model.layers.")} == {
        str(i) for i in range(config.num_layers)}
    assert len([k for k in tensors if k.startswith("model.zero_keys.")]) == config.num_applications


@pytest.mark.parametrize("model_type,lossless", [("bpe", True), ("unigram", True), ("bpe", False),
                                                 ("unigram", False)])
def test_tokenizer_round_trips_with_sentencepiece_ids(seeded, tmp_path, model_type, lossless):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tokenizer_model = train_sentencepiece(tmp_path, model_type, lossless=lossless)
    _, _, path = build_and_export("ztt-gqa", tmp_path / "export", tokenizer_model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_model))

    texts = list(hf_export.TOKENIZER_PROBES) + [
        "Ωμέγα ₿ 𝄞 ꙮ — ǅ ﬁ ½ ①",  # rare characters: byte fallback in a 1000-piece vocabulary
        " ", "", "\n\n\n", "a  b   c    d", "    indented\n        code", "x  \n  y",
        "digits 1234567890 and 3.14159", "a\u00a0non-breaking space",
    ]
    for file in sorted(CORPUS.glob("*.txt")):
        paragraphs = [p for p in file.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        texts += paragraphs[5:45]
    byte_pieces = {processor.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
    used_byte_fallback = False
    for text in texts:
        expected = processor.encode(text)
        got = tokenizer(text)["input_ids"]
        assert got == expected, f"{model_type}: {text[:60]!r}"
        assert tokenizer.decode(got) == processor.decode(expected), f"{model_type}: {text[:60]!r}"
        used_byte_fallback |= bool(byte_pieces & set(expected))
    assert used_byte_fallback


def test_bf16_export_loads_in_bf16(seeded, tmp_path):
    model, config, path = build_and_export("ztt-gqa", tmp_path / "export", dtype="bf16")
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in safetensors_tensors(path).values()} == {torch.bfloat16}
    exported = load_export(path, dtype="auto")
    assert exported.dtype == torch.bfloat16
    ids, _ = batch(config, size=2)
    with torch.no_grad():
        expected = model(ids).logits
        got = exported(ids).logits.float()
    assert (got - expected).abs().max().item() < 0.1 * expected.abs().max().item()


def test_large_export_is_sharded(seeded, tmp_path):
    model, config, whole = build_and_export("ztt-gqa", tmp_path / "whole")
    from megatron_ztt.parallel.sharding import gather_full_state_dict

    sharded = export_hf(config, gather_full_state_dict(model), None, tmp_path / "sharded", "fp32",
                        max_shard_size="60KB")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    assert all(torch.equal(t, safetensors_tensors(whole)[n])
               for n, t in safetensors_tensors(sharded).items())
    ids, _ = batch(config, size=2)
    with torch.no_grad():
        assert torch.equal(load_export(sharded)(ids).logits, load_export(whole)(ids).logits)


def _file_bytes(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_interrupted_export_leaves_no_output(seeded, tmp_path, monkeypatch):
    model, config, first = build_and_export("ztt-gqa", tmp_path / "first")
    from megatron_ztt.parallel.sharding import gather_full_state_dict

    state = gather_full_state_dict(model)
    real_write = hf_export._write_weights

    def write_then_die(hf_state, directory, max_shard_size):
        real_write(hf_state, directory, max_shard_size)
        raise KeyboardInterrupt  # e.g. Ctrl-C or a killed job after some files are written

    monkeypatch.setattr(hf_export, "_write_weights", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        export_hf(config, state, None, tmp_path / "second", "fp32")
    assert not (tmp_path / "second").exists()

    before = _file_bytes(first)
    with pytest.raises(KeyboardInterrupt):
        export_hf(config, state, None, first, "bf16", overwrite=True)
    assert _file_bytes(first) == before  # the old export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first"]


def test_existing_output_is_replaced_only_when_asked(seeded, tmp_path):
    model, config, path = build_and_export("ztt-gqa", tmp_path / "export")
    from megatron_ztt.parallel.sharding import gather_full_state_dict

    state = gather_full_state_dict(model)
    with pytest.raises(ExportError, match="already exists"):
        export_hf(config, state, None, path, "bf16")
    export_hf(config, state, None, path, "bf16", overwrite=True)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_incomplete_or_unmerged_state_is_rejected(seeded, tmp_path):
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel.sharding import gather_full_state_dict

    config = variant_config("ztt-gqa")
    state = gather_full_state_dict(ZTTModel(config))
    partial = {k: v for k, v in state.items() if k != "zero_token_pool.keys.cycle2_layer3"}
    with pytest.raises(ExportError, match="cycle2_layer3"):
        export_hf(config, partial, None, tmp_path / "out", "fp32")
    one_shard = dict(state)
    name = "layers.1.mlp.linear_fc1.weight"
    one_shard[name] = state[name].chunk(2)[0]  # what one of two tensor-parallel ranks holds
    with pytest.raises(ExportError, match=name):
        export_hf(config, one_shard, None, tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists()


def test_tokenizer_must_match_the_vocabulary(seeded, tmp_path, tokenizer_model):
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel.sharding import gather_full_state_dict

    config = variant_config("ztt-gqa", vocab_size=900)
    with pytest.raises(ExportError, match="1000 pieces"):
        export_hf(config, gather_full_state_dict(ZTTModel(config)), tokenizer_model,
                  tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    from megatron_ztt.cli import main

    code = main(["export-hf", "--checkpoint", str(tmp_path / "nowhere"),
                 "--output", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


SELF_CONTAINED_CHECK = r"""
import site
import sys

site.addsitedir(sys.argv[2])  # the installed packages, less this project, megatron and DeepSpeed
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = tokenizer("Once upon a time", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=3, do_sample=False, exit_threshold=0.0)
print("cycles", model.mean_cycles_used, out.shape[1] - ids["input_ids"].shape[1])
print("loaded", sorted({name.split(".")[0] for name in sys.modules}))
"""

# What the export must run without. A view of site-packages without them proves it even where
# other packages probe for them (accelerate asks whether DeepSpeed is installed).
NOT_NEEDED_BY_THE_EXPORT = ("megatron", "deepspeed", "__editable__")


def site_packages_without(names, folder: Path) -> Path:
    import sysconfig

    folder.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not any(entry.name.lower().startswith(n) for n in names):
            (folder / entry.name).symlink_to(entry)
    return folder


def test_export_runs_with_only_torch_and_transformers(seeded, tmp_path, tokenizer_model):
    import os
    import subprocess
    import sys

    _, _, path = build_and_export("ztt-gqa", tmp_path / "export", tokenizer_model)
    view = site_packages_without(NOT_NEEDED_BY_THE_EXPORT, tmp_path / "site")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-S", "-c", SELF_CONTAINED_CHECK, str(path),
                             str(view)], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cycles 1.0 3" in result.stdout
    loaded = result.stdout.split("loaded", 1)[1]
    assert not any(name in loaded for name in ("megatron", "deepspeed")), loaded


def test_export_works_with_the_transformers_training_stack(seeded, tmp_path):
    """What transformers' Trainer, PEFT and evaluation harnesses call on a model: AutoModel,
    hidden states, tuple outputs, gradient checkpointing, a loss normalised by
    ``num_items_in_batch`` (gradient accumulation), and a clear refusal of attention maps."""
    from transformers import AutoModel

    _, config, path = build_and_export("ztt-gqa", tmp_path / "export")
    model = load_export(path)
    ids, labels = batch(config, size=2)

    base = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        full = model(ids, output_hidden_states=True)
        hidden = base(ids).last_hidden_state
        assert torch.allclose(model.lm_head(hidden), full.logits, atol=1e-5)
        assert len(full.hidden_states) == 1 + config.num_applications
        assert torch.allclose(model.model.norm(full.hidden_states[-1]), hidden, atol=1e-6)
        as_tuple = model(ids, labels=ids, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.allclose(as_tuple[1], full.logits)

    with pytest.raises(NotImplementedError, match="attention weights"):
        model(ids, output_attentions=True)

    # num_items_in_batch: sum of token losses / that count, as Trainer expects under
    # gradient accumulation (the mean over this micro batch otherwise)
    with torch.no_grad():
        mean_loss = model(ids, labels=ids).loss
        summed = model(ids, labels=ids, num_items_in_batch=torch.tensor(1000)).loss
    tokens = ids.numel() - ids.shape[0]  # the last position of each row predicts nothing
    assert torch.allclose(summed, mean_loss * tokens / 1000, rtol=1e-5)

    model.train()

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, atol=1e-6), name


def test_overwrite_replaces_only_a_previous_export(seeded, tmp_path, capsys):
    """--overwrite on a run directory, a checkpoint folder or an export holding a user's own
    file refuses, touching nothing."""
    from megatron_ztt.cli import main

    model, config, export = build_and_export("ztt-gqa", tmp_path / "export")
    from megatron_ztt.parallel.sharding import gather_full_state_dict

    state = gather_full_state_dict(model)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "iter_0000010").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("iter_0000010")
    (run_dir / "config.json").write_text('{"model": {}}')
    (run_dir / "tensorboard").mkdir()
    (export / "my_eval_results.json").write_text("{}")
    for target in (run_dir, run_dir / "checkpoints", run_dir / "config.json", export):
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        with pytest.raises(ExportError, match="not a ZTT export|my_eval_results.json"):
            export_hf(config, state, None, target, "fp32", overwrite=True)
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    code = main(["export-hf", "--checkpoint", str(ckpt_dir), "--output", str(run_dir),
                 "--overwrite"])
    assert code == 1 and (run_dir / "tensorboard").is_dir()
    err = capsys.readouterr().err  # refused by whichever check comes first, in one line
    assert err.count("\n") == 1 and ("is not a ZTT export" in err or "no checkpoint at" in err)


def _fake_run(tmp_path, iteration=4, consumed=40, seq_length=16):
    """A checkpoint folder with metadata only, and the run's TensorBoard log."""
    from torch.utils.tensorboard import SummaryWriter

    from megatron_ztt import checkpoint as ckpt

    run = tmp_path / "run"
    tag_dir = run / "checkpoints" / ckpt.tag_for(iteration)
    tag_dir.mkdir(parents=True)
    (tag_dir / ckpt.META).write_text(json.dumps({
        "format_version": ckpt.FORMAT_VERSION, "iteration": iteration,
        "consumed_train_samples": consumed,
        "config": {"run": {"name": "tiny"}, "model": {"seq_length": seq_length},
                   "data": {"blend": ["data/books"]}}}))
    writer = SummaryWriter(str(run / "tensorboard"))
    for step, loss in ((2, 5.5), (4, 5.25), (6, 5.0)):  # step 6: after the checkpoint
        writer.add_scalar("lm loss validation", loss, step)
    writer.close()
    return run / "checkpoints"


def test_export_has_a_model_card_left_padding_context_and_normal_permissions(
        seeded, tmp_path, tokenizer_model):
    import os
    import stat

    from transformers import AutoTokenizer

    summary = hf_export.training_summary(_fake_run(tmp_path))
    assert summary["iteration"] == 4 and summary["training_tokens"] == 40 * 16
    assert (summary["validation_loss"], summary["validation_iteration"]) == (5.25, 4)

    old_umask = os.umask(0o022)
    try:
        model, config, path = build_and_export("ztt-gqa", tmp_path / "export", tokenizer_model,
                                               exit_threshold=0.3)
        _, _, path2 = build_and_export("ztt-gqa", tmp_path / "export2", None)
        os.umask(0o077)
        _, _, private = build_and_export("ztt-gqa", tmp_path / "private", None)
    finally:
        os.umask(old_umask)
    for directory, dir_mode, file_mode in ((path, 0o755, 0o644), (private, 0o700, 0o600)):
        assert stat.S_IMODE(directory.stat().st_mode) == dir_mode
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
        assert set(modes.values()) == {file_mode}, modes

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    assert tokenizer.padding_side == "left"
    assert tokenizer.model_max_length == config.seq_length

    card = (path / "README.md").read_text()
    assert "trust_remote_code=True" in card and "library_name: transformers" in card
    assert f"| distinct layers (L) / cycles (C) | {config.num_layers} / {config.num_cycles} |" in card
    assert "| default exit threshold | 0.3 " in card
    assert "training | not recorded" in (path2 / "README.md").read_text()

    card = hf_export.model_card(config, torch.float32, safetensors_tensors(path), summary, "m")
    assert "| trained for | 4 iterations, 640 tokens (checkpoint iter_0000004) |" in card
    assert "| final validation loss | 5.2500 (iteration 4) |" in card
