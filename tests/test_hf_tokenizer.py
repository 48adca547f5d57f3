"""Hugging Face tokenizers (a pretrained model's own): preprocess, train, checkpoint, export,
generate and eval with one, and the errors for a bad one."""

import hashlib
import json
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_CORPUS
from distributed import run_distributed
from train_helpers import micro_config

EOS, PAD = "<|endoftext|>", "<|pad|>"
VOCAB = 512  # the tokenizer's
MODEL_VOCAB = 576  # the trained model's


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE trained here with `tokenizers` on part of one sample book, saved by
    transformers as tokenizer.json + tokenizer_config.json (eos and pad named there)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (SAMPLE_CORPUS / "pg55.txt").read_text(encoding="utf-8")[:200_000]
    backend.train_from_iterator(text.splitlines(), trainer)
    directory = tmp_path_factory.mktemp("hf_tokenizer") / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD) \
        .save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    """Two sample books cut into 40-line documents, so that every split gets some."""
    docs = tmp_path_factory.mktemp("hf_docs")
    for book in sorted(SAMPLE_CORPUS.glob("*.txt"))[:2]:
        lines = book.read_text(encoding="utf-8").splitlines(keepends=True)
        for i in range(0, len(lines), 40):
            (docs / f"{book.stem}_{i:05d}.txt").write_text("".join(lines[i:i + 40]),
                                                          encoding="utf-8")
    return docs


@pytest.fixture(scope="module")
def hf_data(hf_tokenizer, documents, tmp_path_factory) -> str:
    from megatron_ztt.data.preprocess import preprocess

    prefix = tmp_path_factory.mktemp("hf_data") / "sample"
    preprocess([str(documents)], str(hf_tokenizer), str(prefix), append_eod=True, progress=False)
    return str(prefix)


def test_tokenizer_reads_the_special_tokens_transformers_reads(hf_tokenizer):
    from transformers import AutoTokenizer

    from megatron_ztt.data.tokenizer import HFTokenizer, load_tokenizer

    tokenizer = load_tokenizer(hf_tokenizer)
    auto = AutoTokenizer.from_pretrained(hf_tokenizer)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.kind == "huggingface"
    assert tokenizer.special_ids() == {"unk": auto.unk_token_id, "bos": auto.bos_token_id,
                                       "eos": auto.eos_token_id, "pad": auto.pad_token_id}
    assert tokenizer.eod == auto.eos_token_id == auto.convert_tokens_to_ids(EOS)
    assert tokenizer.vocab_size == len(auto) == VOCAB
    text = "Dorothy lived in the midst of the great Kansas prairies.\n\n  Twice  "
    assert tokenizer.tokenize(text) == auto(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
    assert tokenizer.fingerprint == _sha(hf_tokenizer / "tokenizer.json")


def test_preprocess_gives_the_ids_of_tokenizers(hf_tokenizer, documents, hf_data, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer

    from megatron_ztt.data.preprocess import preprocess

    reference = Tokenizer.from_file(str(hf_tokenizer / "tokenizer.json"))
    eos = reference.token_to_id(EOS)
    dataset = IndexedDataset(hf_data)
    # as ztt preprocess reads a .txt file: bytes as they are, a leading byte-order mark dropped
    texts = [path.read_bytes().decode("utf-8").removeprefix("\ufeff")
             for path in sorted(documents.glob("*.txt"))]
    assert len(dataset) == len(texts) > 10
    for index, text in enumerate(texts):
        expected = reference.encode(text, add_special_tokens=False).ids + [eos]
        assert dataset[index].tolist() == expected
    sidecar = json.loads(Path(hf_data + ".tokenizer.json").read_text())
    assert sidecar["tokenizer_kind"] == "huggingface"
    assert sidecar["tokenizer_sha256"] == _sha(hf_tokenizer / "tokenizer.json")
    assert sidecar["tokenizer_files"] == {name: _sha(hf_tokenizer / name) for name in
                                          ("tokenizer.json", "tokenizer_config.json")}
    assert (sidecar["vocab_size"], sidecar["eod"]) == (VOCAB, eos)
    # worker processes encode with the same tokenizer: the same bytes
    preprocess([str(documents)], str(hf_tokenizer), str(tmp_path / "two"), workers=2,
               append_eod=True, progress=False)
    assert (tmp_path / "two.bin").read_bytes() == Path(hf_data + ".bin").read_bytes()


def test_training_refuses_data_of_another_tokenizer_kind(hf_data, sample_data):
    from megatron_ztt.data.datasets import DataError, verify_tokenizer_matches
    from megatron_ztt.data.tokenizer import load_tokenizer

    sentencepiece = load_tokenizer(sample_data[1])
    assert sentencepiece.kind == "sentencepiece"
    with pytest.raises(DataError, match="made with tokenizer \\(huggingface"):
        verify_tokenizer_matches([hf_data], sentencepiece)


def test_lone_tokenizer_json_has_no_eos_to_end_documents_with(hf_tokenizer, documents,
                                                              tmp_path):
    from megatron_ztt.data.preprocess import PreprocessError, preprocess
    from megatron_ztt.data.tokenizer import load_tokenizer

    lone = tmp_path / "lone.json"
    shutil.copyfile(hf_tokenizer / "tokenizer.json", lone)
    tokenizer = load_tokenizer(lone)
    assert tokenizer.kind == "huggingface" and tokenizer.special_ids()["eos"] is None
    with pytest.raises(PreprocessError, match="names no end-of-text \\(eos\\) token"):
        preprocess([str(documents)], str(lone), str(tmp_path / "out"), append_eod=True,
                   progress=False)
    assert not list(tmp_path.glob("out*"))


def test_malformed_tokenizer_is_a_one_line_error_naming_the_file(hf_tokenizer, documents,
                                                                 tmp_path, capsys):
    from megatron_ztt.cli import main
    from megatron_ztt.config import load_config
    from megatron_ztt.data.tokenizer import TokenizerError, load_tokenizer
    from megatron_ztt.model.config import ConfigError
    from megatron_ztt.training.batches import build_tokenizer_and_data

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", ')
    with pytest.raises(TokenizerError) as error:
        load_tokenizer(broken)
    assert str(broken / "tokenizer.json") in str(error.value)
    assert "\n" not in str(error.value)

    code = main(["preprocess", "--input", str(documents), "--tokenizer", str(broken),
                 "--output-prefix", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and str(broken / "tokenizer.json") in err

    config_file = tmp_path / "bad_config"
    config_file.mkdir()
    (config_file / "tokenizer_config.json").write_text("{")
    shutil.copyfile(hf_tokenizer / "tokenizer.json", config_file / "tokenizer.json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: unreadable"):
        load_tokenizer(config_file)

    # a run config: the setting is named, at start
    with pytest.raises(ConfigError, match="^data.tokenizer: .*holds no tokenizer.json"):
        load_config(None, ["data.blend=[x]", f"data.tokenizer={tmp_path}"])
    config = load_config(None, ["data.blend=[x]", f"data.tokenizer={broken}"])
    with pytest.raises(ConfigError, match="^data.tokenizer: .*not a Hugging Face tokenizer"):
        build_tokenizer_and_data(config)


# ------------------------------------------------------------- train -> checkpoint -> export


def _train_and_eval_worker(rank, data, run_dir):
    from megatron_ztt.training import evaluate
    from megatron_ztt.training.train import train

    # an embedding with more rows than the tokenizer has ids, as pretrained models may have
    train(micro_config(data, run_dir, "train.train_iters=2", "eval.interval=2",
                       f"model.vocab_size={MODEL_VOCAB}"))
    report = Path(run_dir) / "eval.json"
    code = evaluate.run(Namespace(checkpoint=f"{run_dir}/checkpoints", exit_threshold=[],
                                  exit_signal=None, num_cycles=[], iters=1, split="valid",
                                  output=str(report), overrides=[]))
    return {"eval_code": code, "eval": json.loads(report.read_text()) if code == 0 else None}


@pytest.fixture(scope="module")
def trained(hf_tokenizer, hf_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hf_run") / "run"
    (out,) = run_distributed(_train_and_eval_worker, world_size=1,
                             args=((hf_data, str(hf_tokenizer)), str(run_dir)))
    return out, run_dir / "checkpoints"


@pytest.mark.slow
def test_checkpoint_export_generate_and_eval_with_the_hf_tokenizer(hf_tokenizer, trained,
                                                                   tmp_path, capsys):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from megatron_ztt.checkpoint import load_trained
    from megatron_ztt.cli import main

    out, checkpoints = trained
    assert out["eval_code"] == 0 and np.isfinite(out["eval"]["results"][0]["loss"])

    loaded = load_trained(str(checkpoints))
    assert loaded.tokenizer_kind == "huggingface"
    assert Path(loaded.tokenizer) == Path(loaded.path) / "tokenizer"
    assert (loaded.meta["tokenizer"], loaded.meta["tokenizer_kind"]) == ("tokenizer",
                                                                         "huggingface")
    originals = sorted(path.name for path in hf_tokenizer.iterdir())
    assert sorted(path.name for path in Path(loaded.tokenizer).iterdir()) == originals

    export = tmp_path / "export"
    assert main(["export-hf", "--checkpoint", str(checkpoints), "--output", str(export)]) == 0
    for name in originals:  # written back byte for byte, not converted
        assert (export / name).read_bytes() == (hf_tokenizer / name).read_bytes()
    assert not (export / "tokenizer.model").exists()
    config = json.loads((export / "config.json").read_text())
    assert config["vocab_size"] == MODEL_VOCAB
    auto = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    assert (config["eos_token_id"], config["pad_token_id"]) == (auto.eos_token_id,
                                                                auto.pad_token_id)
    text = "The Wizard of Oz"
    reference = Tokenizer.from_file(str(hf_tokenizer / "tokenizer.json"))
    assert auto(text)["input_ids"] == reference.encode(text).ids
    capsys.readouterr()

    for model in (export, checkpoints):  # an export, and a checkpoint exported on the fly
        code = main(["generate", "--model", str(model), "--prompt", text,
                     "--max-new-tokens", "4"])
        printed, err = capsys.readouterr()
        assert code == 0, err
        assert printed.strip() and "mean cycles used" in err


def test_copy_tokenizer_keeps_the_files_as_a_checkpoint_holds_them(hf_tokenizer, sample_data,
                                                                   tmp_path):
    from megatron_ztt.data.tokenizer import copy_tokenizer

    model = tmp_path / "model"  # a model folder: the tokenizer's files next to the weights
    shutil.copytree(hf_tokenizer, model)
    (model / "model.safetensors").write_bytes(b"weights")
    copy = tmp_path / "checkpoint"
    assert copy_tokenizer(model, copy) == ("tokenizer", "huggingface")
    assert sorted(p.name for p in (copy / "tokenizer").iterdir()) == \
        sorted(p.name for p in hf_tokenizer.iterdir())
    for path in hf_tokenizer.iterdir():
        assert (copy / "tokenizer" / path.name).read_bytes() == path.read_bytes()
    assert copy_tokenizer(sample_data[1], copy) == ("tokenizer.model", "sentencepiece")
    assert (copy / "tokenizer.model").read_bytes() == Path(sample_data[1]).read_bytes()
