"""`ztt import-hf`: tiny random Llama and Qwen2 models (built here, saved with save_pretrained,
nothing downloaded) -> ZTT checkpoints. C=1 without zero token and gate computes the source's
logits, under TP=2 as under TP=1, and after `ztt export-hf`; `train.init_from` +
`train.trainable=new` leaves every pretrained weight bit-identical; bad inputs get a one-line
error and nothing is written."""

import json
import os
import shutil

import pytest
import torch

from distributed import run_distributed
from train_helpers import micro_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = dict(hidden_size=32, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)


def hf_model(kind="llama", num_layers=4, vocab_size=200, tied=None, **config):
    """A random HF model; Qwen2 gets non-zero q/k/v biases so that their mapping shows."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(0)
    settings = dict(SIZES, num_hidden_layers=num_layers, vocab_size=vocab_size,
                    rope_theta=500.0, **config)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=tied is not False, **settings))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **settings))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=bool(tied), **settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # away from their trivial init
                param.add_(torch.randn_like(param) * 0.3)
    return model.eval()


def save_hf(model, directory):
    model.save_pretrained(directory)
    return str(directory)


def write_word_tokenizer(directory, size):
    """A Hugging Face tokenizer.json of ``size`` ids (a word-level model, eos </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))


def import_cli(*args):
    from megatron_ztt.cli import main

    return main(["import-hf", *map(str, args)])


def ztt_logits(state, config, ids):
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel.sharding import load_full_state_dict

    model = ZTTModel(config).eval()
    load_full_state_dict(model, state)
    with torch.no_grad():
        return model(ids).logits


def token_ids(vocab_size, length=12):
    return torch.arange(2 * length).mul(7).remainder(vocab_size).view(2, length)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    models = {"llama": hf_model("llama"), "qwen2": hf_model("qwen2", tied=False),
              "mistral": hf_model("mistral")}
    return {kind: (model, save_hf(model, root / kind)) for kind, model in models.items()}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_c1_without_zero_token_gives_the_source_logits(single_process, sources, tmp_path, kind):
    from megatron_ztt.checkpoint import load_trained

    model, path = sources[kind]
    assert import_cli("--model", path, "--output", tmp_path / "ckpt", "--no-zero-token",
                      "--no-gate") == 0
    trained = load_trained(str(tmp_path / "ckpt"))
    config = trained.model_config
    assert (config.num_layers, config.num_cycles, config.qkv_bias) == (4, 1, kind == "qwen2")
    assert config.rotary_base == 500.0 and config.norm_epsilon == 1e-6
    assert config.tie_embeddings == model.config.tie_word_embeddings
    ids = token_ids(config.vocab_size)
    with torch.no_grad():
        expected = model(ids).logits
    got = ztt_logits(trained.state, config, ids)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()


def test_checkpoint_layout_and_zero_key_and_gate_init(sources, tmp_path):
    """The import is a complete format-3 checkpoint with the new parameters as asked."""
    from megatron_ztt.checkpoint import load_trained

    _, path = sources["llama"]
    out = tmp_path / "ckpt"
    assert import_cli("--model", path, "--output", out, "--num-cycles", 3, "--middle-layers",
                      "1:2", "--zero-key-init", "normal", "--gate-init",
                      "closed-after-first") == 0
    assert (out / "latest").read_text() == "iter_0000000"
    meta = json.loads((out / "iter_0000000" / "ztt_meta.json").read_text())
    assert meta["format_version"] == 3 and meta["imported_from"]["dropped_hf_layers"] == [2]
    assert meta["imported_from"]["hf_layers"] == [0, 1, 3]
    trained = load_trained(str(out))
    config, state = trained.model_config, trained.state
    assert (config.num_layers, config.num_cycles, config.num_applications) == (3, 3, 5)
    # ZTT layer 2 (the tail) is HF layer 3
    assert torch.equal(state["layers.2.mlp.linear_fc2.weight"],
                       sources["llama"][0].model.layers[3].mlp.down_proj.weight)
    keys = [v for k, v in state.items() if k.startswith("zero_token_pool.keys.")]
    assert len(keys) == 5 and all(k.abs().sum() > 0 for k in keys)
    assert [state[f"gates.{c}.bias"].item() for c in range(3)] == [8.0, -8.0, -8.0]


def test_export_of_an_import_gives_the_source_logits(sources, tmp_path):
    """import (Qwen2: q/k/v biases, untied) -> `ztt export-hf` -> transformers: same logits."""
    from megatron_ztt.cli import main
    from export_helpers import load_export

    model, path = sources["qwen2"]
    assert import_cli("--model", path, "--output", tmp_path / "ckpt", "--no-zero-token",
                      "--no-gate") == 0
    assert main(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--output",
                 str(tmp_path / "export"), "--dtype", "fp32"]) == 0
    exported = load_export(tmp_path / "export")
    assert exported.config.qkv_bias
    ids = token_ids(model.config.vocab_size)
    with torch.no_grad():
        expected, got = model(ids).logits, exported(ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()


def test_tokenizer_files_are_copied_unchanged(sources, tmp_path):
    _, path = sources["llama"]
    source = tmp_path / "with_tokenizer"
    shutil.copytree(path, source)
    write_word_tokenizer(source, 150)
    (source / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    assert import_cli("--model", source, "--output", tmp_path / "ckpt") == 0
    tag = tmp_path / "ckpt" / "iter_0000000"
    meta = json.loads((tag / "ztt_meta.json").read_text())
    assert (meta["tokenizer"], meta["tokenizer_kind"]) == ("tokenizer", "huggingface")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tag / "tokenizer" / name).read_bytes() == (source / name).read_bytes()
    assert meta["config"]["data"]["tokenizer"] == str(tag / "tokenizer")


def write_gguf(model, path):
    """``model`` (a Llama) as a GGUF file, as llama.cpp's converter writes one: llama.* keys,
    llama.cpp tensor names, Q/K rows permuted to its rotary layout, and a byte-level BPE
    tokenizer of 256 bytes + 4 specials."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    config, state = model.config, model.state_dict()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    byte_chars = bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)] + ["<s>", "</s>", "<unk>", "<pad>"]
    assert len(tokens) == config.vocab_size
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * 4)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)

    def permuted(weight, heads):  # llama.cpp's rotary layout of Q and K rows
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(
            weight.shape)

    def add(name, tensor):
        writer.add_tensor(name, tensor.detach().float().numpy())

    add("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        src = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", state[src + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", permuted(state[src + "self_attn.q_proj.weight"],
                                               config.num_attention_heads))
        add(f"blk.{i}.attn_k.weight", permuted(state[src + "self_attn.k_proj.weight"],
                                               config.num_key_value_heads))
        add(f"blk.{i}.attn_v.weight", state[src + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", state[src + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", state[src + "post_attention_layernorm.weight"])
        for part in ("gate", "up", "down"):
            add(f"blk.{i}.ffn_{part}.weight", state[src + f"mlp.{part}_proj.weight"])
    add("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_import_gives_the_source_logits_and_its_tokenizer(single_process, tmp_path):
    from megatron_ztt.checkpoint import load_trained

    model = hf_model("llama", num_layers=3, vocab_size=260)
    write_gguf(model, tmp_path / "tiny.gguf")
    # transformers' tokenizer of the file gains <|endoftext|> at id 260: one row more
    assert import_cli("--gguf", tmp_path / "tiny.gguf", "--output", tmp_path / "ckpt",
                      "--no-zero-token", "--no-gate", "--grow-vocab") == 0
    trained = load_trained(str(tmp_path / "ckpt"))
    assert trained.model_config.vocab_size == 261
    ids = token_ids(260)
    with torch.no_grad():
        expected = model(ids).logits
    got = ztt_logits(trained.state, trained.model_config, ids)[..., :260]
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()
    assert trained.meta["tokenizer_kind"] == "huggingface"
    assert (tmp_path / "ckpt" / "iter_0000000" / "tokenizer" / "tokenizer.json").is_file()


# --------------------------------------------------------------------------- bad inputs
def _refused(capsys, out, *args):
    """The CLI fails with one line naming the problem and leaves nothing behind."""
    parent_before = sorted(os.listdir(out.parent))
    assert import_cli(*args, "--output", out) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ztt import-hf: error:"), err
    assert sorted(os.listdir(out.parent)) == parent_before  # no partial folder either
    return err


def _config_only(directory, config):
    """A model directory holding the config and an (unread) weights file."""
    config.save_pretrained(directory)
    (directory / "model.safetensors").write_bytes(b"")
    return directory


@pytest.mark.parametrize("change, named", [
    (dict(model_type="gpt2"), "model_type 'gpt2'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "rope_type='linear'"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(mlp_bias=True), "mlp_bias=true"),
    (dict(mistral_sliding_window=16), "sliding_window=16"),
    (dict(qwen2_use_sliding_window=True), "use_sliding_window=true"),
    (dict(num_hidden_layers=2), "num_hidden_layers=2"),
])
def test_unsupported_settings_are_refused(tmp_path, capsys, change, named):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    change = dict(change)
    if change.pop("model_type", None):
        config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100)
    elif "mistral_sliding_window" in change:
        config = MistralConfig(**SIZES, num_hidden_layers=4, vocab_size=100,
                               sliding_window=change.pop("mistral_sliding_window"))
    elif "qwen2_use_sliding_window" in change:
        config = Qwen2Config(**SIZES, num_hidden_layers=4, vocab_size=100,
                             use_sliding_window=True, sliding_window=16)
    else:
        config = LlamaConfig(**{**SIZES, "num_hidden_layers": 4, "vocab_size": 100, **change})
    model_dir = _config_only(tmp_path / "model", config)
    err = _refused(capsys, tmp_path / "out", "--model", model_dir)
    assert named in err


def test_a_middle_block_outside_head_and_tail_is_refused(tmp_path, capsys):
    from transformers import LlamaConfig

    model_dir = _config_only(tmp_path / "model", LlamaConfig(**SIZES, num_hidden_layers=4,
                                                             vocab_size=100))
    err = _refused(capsys, tmp_path / "out", "--model", model_dir, "--middle-layers", "0:2")
    assert "--middle-layers 0:2" in err


def test_missing_weights_and_nonempty_output_are_refused(sources, tmp_path, capsys):
    from transformers import LlamaConfig

    empty = tmp_path / "no_weights"
    LlamaConfig(**SIZES, num_hidden_layers=4, vocab_size=100).save_pretrained(empty)
    assert "no weights file" in _refused(capsys, tmp_path / "out", "--model", empty)
    (tmp_path / "not_a_model").mkdir()
    assert "no config.json" in _refused(capsys, tmp_path / "out", "--model",
                                        tmp_path / "not_a_model")
    # a weights file without some of the tensors the config asks for (a 5th layer)
    model, path = sources["llama"]
    short = tmp_path / "short"
    shutil.copytree(path, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    err = _refused(capsys, tmp_path / "out", "--model", short)
    assert "lacks" in err and "layers.4" in err
    # never into a folder that holds something
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    err = _refused(capsys, taken, "--model", path)
    assert "not an empty directory" in err and (taken / "mine.txt").read_text() == "keep"
    assert os.listdir(taken) == ["mine.txt"]


def test_gguf_without_the_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    from megatron_ztt.pretrained import import_hf as module

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(module.ImportRefused, match="pip install gguf"):
        module.import_hf(str(tmp_path / "out"), gguf=str(gguf))
    assert not (tmp_path / "out").exists()


def test_gguf_without_accelerate_says_how_to_install(tmp_path, monkeypatch):
    """transformers loads a GGUF file with a device_map, which needs accelerate."""
    import importlib.util

    from megatron_ztt.pretrained import import_hf as module

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(module.ImportRefused, match="needs the accelerate package: pip install "
                                                   "gguf accelerate"):
        module.import_hf(str(tmp_path / "out"), gguf=str(gguf))
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- init_from
@pytest.fixture(scope="module")
def training_import(tmp_path_factory):
    """A 4-layer Llama of the micro training config's sizes, imported with C=2."""
    root = tmp_path_factory.mktemp("train_import")
    path = save_hf(hf_model("llama", num_layers=4, vocab_size=512), root / "llama")
    assert import_cli("--model", path, "--output", root / "ckpt", "--num-cycles", 2) == 0
    return str(root / "ckpt")


def test_run_config_takes_the_model_section_from_init_from(training_import, tmp_path):
    from megatron_ztt.checkpoint import load_run_config, load_trained

    config_file = tmp_path / "finetune.yaml"
    config_file.write_text("train:\n  trainable: new\nmodel:\n  seq_length: 32\n")
    config = load_run_config(str(config_file), [f"train.init_from={training_import}",
                                                "data.blend=[x]", "data.tokenizer=t"])
    saved = load_trained(training_import).model_config
    assert config.model.seq_length == 32  # the file wins
    assert (config.model.hidden_size, config.model.num_cycles, config.model.vocab_size) == (
        saved.hidden_size, saved.num_cycles, saved.vocab_size)


@pytest.mark.parametrize("setting, named", [("model.vocab_size=1024", "model.vocab_size"),
                                            ("model.hidden_size=64", "model.hidden_size"),
                                            ("model.num_cycles=3", "model.num_cycles")])
def test_init_from_refuses_a_model_of_other_shapes(training_import, tmp_path, setting, named):
    from megatron_ztt.checkpoint import CheckpointError, load_initial_weights, load_run_config

    config = load_run_config(None, [f"train.init_from={training_import}", "data.blend=[x]",
                                    "data.tokenizer=t", setting])
    with pytest.raises(CheckpointError, match=named) as error:
        load_initial_weights(config.train.init_from, config.model)
    assert "\n" not in str(error.value)


def test_init_weights_is_the_earlier_name_of_init_from():
    from megatron_ztt.config import load_config

    config = load_config(None, ["train.init_weights=w.pt", "data.blend=[x]", "data.tokenizer=t"])
    assert (config.train.init_from, config.train.init_weights) == ("w.pt", None)


def _two_rank_checks(rank, data, root, tp_checkpoint, ids, train_checkpoint, runs):
    """One spawn of two processes for both checks (the spawn is the slow part): the TP=2
    logits of an import, then short trainings from another import with trainable=new."""
    from megatron_ztt.checkpoint import load_trained
    from megatron_ztt.training.train import train

    trained = load_trained(tp_checkpoint)  # run_distributed started TP=2
    out = {"tp2 logits": ztt_logits(trained.state, trained.model_config, ids)}
    for name, overrides in runs:
        result = train(micro_config(data, f"{root}/{name}", "model.num_layers=4",
                                    f"train.init_from={train_checkpoint}", "train.trainable=new",
                                    "train.train_iters=2", *overrides))
        out[name] = load_trained(result.last_checkpoint).state
    return out


TRAINABLE_NEW_RUNS = [("zero0", ["parallel.zero_stage=0", "train.nonfinite_loss=stop"]),
                      ("zero2", ["parallel.zero_stage=2"]),
                      ("pp2", ["parallel.pipeline=2", "parallel.zero_stage=1"])]


@pytest.fixture(scope="module")
def two_ranks(single_process, sources, training_import, sample_data, tmp_path_factory):
    from megatron_ztt.checkpoint import load_trained

    root = tmp_path_factory.mktemp("two_ranks")
    _, path = sources["qwen2"]  # q/k/v biases, zero keys and gates split over the ranks
    assert import_cli("--model", path, "--output", root / "qwen2", "--num-cycles", 2,
                      "--zero-key-init", "normal") == 0
    trained = load_trained(str(root / "qwen2"))
    ids = token_ids(trained.model_config.vocab_size)
    expected = ztt_logits(trained.state, trained.model_config, ids)
    ranks = run_distributed(_two_rank_checks, world_size=2, tensor_parallel=2, args=(
        sample_data, str(root), str(root / "qwen2"), ids, training_import, TRAINABLE_NEW_RUNS))
    return expected, ranks


@pytest.mark.slow
def test_tensor_parallel_import_equals_single_process(two_ranks):
    """A TP=2 model loaded from the (TP=1) import gives the TP=1 logits."""
    expected, ranks = two_ranks
    for out in ranks:
        got = out["tp2 logits"]
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


@pytest.mark.slow
def test_trainable_new_leaves_the_pretrained_weights_identical(training_import, two_ranks):
    """DP=2 with ZeRO 0 and 2, and the circular pipeline (PP=2, ZeRO-1): two steps change the
    zero keys and gates and not one bit of anything else."""
    from megatron_ztt.checkpoint import load_trained

    initial = load_trained(training_import).state
    _, ranks = two_ranks
    for name, _ in TRAINABLE_NEW_RUNS:
        state = ranks[0][name]
        assert sorted(state) == sorted(initial), name
        new = [n for n in state if n.startswith(("zero_token_pool.", "gates."))]
        assert new and all(not torch.equal(state[n], initial[n]) for n in new), name
        frozen = [n for n in state if n not in new]
        changed = [n for n in frozen if not torch.equal(state[n], initial[n])]
        assert not changed, (name, changed)
