"""`ztt tokenizer train` and the runtime ZTTTokenizer."""

import gzip
import json
import pickle

import pytest
import sentencepiece as spm
from conftest import SAMPLE_CORPUS
from sentencepiece import sentencepiece_model_pb2

from megatron_ztt.cli import main
from megatron_ztt.data import sources
from megatron_ztt.data.tokenizer import (
    TokenizerError,
    ZTTTokenizer,
    file_sha256,
    sample_lines,
    train_tokenizer,
)

VOCAB = 1000


def _sample_lines():
    lines = []
    for path in sorted(SAMPLE_CORPUS.glob("*.txt")):
        text = path.read_text(encoding="utf-8-sig")
        lines += [line for line in text.splitlines() if line.strip()]
    return lines


def _model_spec(model_path):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    return proto


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok") / "bpe"
    assert main(["tokenizer", "train", "--input", str(SAMPLE_CORPUS), "--vocab-size", str(VOCAB),
                 "--output", str(prefix)]) == 0
    return prefix.with_suffix(".model")


def test_cli_trains_bpe_with_fixed_special_ids_and_reports(tmp_path, capsys):
    prefix = tmp_path / "out" / "tok"
    rc = main(["tokenizer", "train", "--input", str(SAMPLE_CORPUS), "--vocab-size", str(VOCAB),
               "--output", str(prefix)])
    out = capsys.readouterr().out
    assert rc == 0
    assert prefix.with_suffix(".model").is_file() and prefix.with_suffix(".vocab").is_file()
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["tok.model", "tok.vocab"]
    expected_lines = len(_sample_lines())
    assert f"{expected_lines:,} lines" in out
    assert f"{len(list(SAMPLE_CORPUS.glob('*.txt')))} file(s)" in out

    tok = ZTTTokenizer(prefix.with_suffix(".model"))
    assert (tok.unk, tok.bos, tok.eos, tok.pad) == (0, 1, 2, 3)
    assert tok.eod == tok.eos
    assert tok.vocab_size == VOCAB
    assert [tok.inv_vocab[i] for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    spec = _model_spec(prefix.with_suffix(".model"))
    assert spec.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert spec.trainer_spec.byte_fallback


def test_lossless_round_trip_with_byte_fallback(bpe_model):
    tok = ZTTTokenizer(bpe_model)
    text = "  Héllo,\twörld!\n\n日本語 😀 — «quotes»  double  spaces \r\n end"
    ids = tok.tokenize(text)
    assert tok.unk not in ids  # byte fallback: nothing becomes <unk>
    assert tok.detokenize(ids) == text
    assert any(tok.inv_vocab[i].startswith("<0x") for i in ids)  # emoji went to bytes
    assert tok.tokenize(text) == spm.SentencePieceProcessor(model_file=str(bpe_model)).encode(text)


def test_unigram_option(tmp_path):
    report = train_tokenizer([str(SAMPLE_CORPUS)], VOCAB, str(tmp_path / "uni"),
                             model_type="unigram", input_sentence_size=4000)
    spec = _model_spec(tmp_path / "uni.model")
    assert spec.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    tok = ZTTTokenizer(report.model_path)
    assert (tok.unk, tok.bos, tok.eos, tok.pad) == (0, 1, 2, 3)
    text = "Unigram ümlaut 😀"
    assert tok.detokenize(tok.tokenize(text)) == text


def test_reads_jsonl_and_jsonl_gz_with_json_key(tmp_path):
    records = [{"body": f"record number {i} says hello to the tokenizer\nsecond line {i}"}
               for i in range(300)]
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "a.jsonl", "w") as stream:
        for record in records[:150]:
            stream.write(json.dumps(record) + "\n")
    with gzip.open(tmp_path / "data" / "b.jsonl.gz", "wt") as stream:
        for record in records[150:]:
            stream.write(json.dumps(record) + "\n")
    report = train_tokenizer([str(tmp_path / "data")], 300, str(tmp_path / "tok"),
                             json_key="body")
    assert report.files == 2
    assert report.documents == 300
    assert report.lines == 600
    tok = ZTTTokenizer(report.model_path)
    assert tok.detokenize(tok.tokenize("record number 7")) == "record number 7"


def test_large_input_is_sampled(tmp_path, capfd):
    report = train_tokenizer([str(SAMPLE_CORPUS)], 500, str(tmp_path / "tok"),
                             input_sentence_size=700, verbose=True)
    log = capfd.readouterr().err
    assert report.lines == len(_sample_lines()) > 700
    assert report.sampled == 700
    # SentencePiece's own log confirms it was given only the sample.
    assert "Loaded all 700 sentences" in log


def test_line_sample_is_uniform_and_bounded():
    population = [f"line {i}" for i in range(20000)]
    seen, sample = sample_lines(iter(population), 2000, seed=3)
    assert seen == 20000 and len(sample) == 2000 and len(set(sample)) == 2000
    # every tenth of the stream is represented in proportion (binomial sd ~ 13 of 200)
    counts = [0] * 10
    for line in sample:
        counts[int(line.split()[1]) * 10 // 20000] += 1
    assert all(abs(count - 200) < 60 for count in counts), counts
    assert sample_lines(iter(population), 2000, seed=3)[1] == sample
    assert sample_lines(iter(population), 2000, seed=4)[1] != sample
    assert sample_lines(iter(population), 0, seed=3)[1] == population


def test_same_seed_same_model_different_seed_different_sample(tmp_path):
    kwargs = dict(vocab_size=500, input_sentence_size=2000)
    first = train_tokenizer([str(SAMPLE_CORPUS)], output_prefix=str(tmp_path / "a"), seed=1,
                            **kwargs)
    again = train_tokenizer([str(SAMPLE_CORPUS)], output_prefix=str(tmp_path / "b"), seed=1,
                            **kwargs)
    other = train_tokenizer([str(SAMPLE_CORPUS)], output_prefix=str(tmp_path / "c"), seed=2,
                            **kwargs)
    assert file_sha256(first.model_path) == file_sha256(again.model_path)
    assert file_sha256(first.model_path) != file_sha256(other.model_path)


def test_missing_input_is_an_error_naming_it(tmp_path, capsys):
    missing = tmp_path / "no_such_dir"
    rc = main(["tokenizer", "train", "--input", str(SAMPLE_CORPUS), str(missing),
               "--vocab-size", "500", "--output", str(tmp_path / "tok")])
    err = capsys.readouterr().err
    assert rc == 1
    assert str(missing) in err and "no such file" in err
    assert not list(tmp_path.glob("tok*"))


def test_invalid_utf8_names_file_and_line_or_is_skipped(tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text("\n".join(f"a perfectly fine line number {i}" for i in range(400)))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"line one\nline two\nthird \xff\xfe line\n")
    args = ["tokenizer", "train", "--input", str(good), str(bad), "--vocab-size", "300",
            "--output", str(tmp_path / "tok")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{bad}:3: invalid UTF-8" in err
    assert not list(tmp_path.glob("*tok*"))

    assert main(args + ["--on-error", "skip"]) == 0
    out = capsys.readouterr().out
    assert "1 unreadable" in out
    assert (tmp_path / "tok.model").is_file()


def test_vocab_too_large_for_data_is_a_clear_error(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words here\nand a few more there\n")
    with pytest.raises(TokenizerError, match="Vocabulary size too high"):
        train_tokenizer([str(tiny)], 5000, str(tmp_path / "tok"))
    assert not list(tmp_path.glob("*tok*"))
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer([str(tiny)], 100, str(tmp_path / "tok"))


def test_only_empty_input_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n \t\n")
    with pytest.raises(TokenizerError, match="no text to train on"):
        train_tokenizer([str(empty)], 300, str(tmp_path / "tok"))


def test_runtime_tokenizer_pickles_and_identifies_itself(bpe_model, tmp_path):
    tok = ZTTTokenizer(bpe_model)
    assert tok.fingerprint == file_sha256(bpe_model)
    assert tok.unique_identifiers["sha256"] == tok.fingerprint
    clone = pickle.loads(pickle.dumps(tok))
    text = "The pickled tokenizer encodes the same way."
    assert clone.tokenize(text) == tok.tokenize(text)
    assert clone.fingerprint == tok.fingerprint

    not_a_model = tmp_path / "x.model"
    not_a_model.write_text("hello")
    with pytest.raises(TokenizerError, match=str(not_a_model)):
        ZTTTokenizer(not_a_model)
    with pytest.raises(TokenizerError, match="cannot read"):
        ZTTTokenizer(tmp_path / "absent.model")


def test_expand_inputs_rejects_unsupported_and_empty_directories(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(sources.InputError, match="unsupported file type"):
        sources.expand_inputs([tmp_path / "notes.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(sources.InputError, match="holds no"):
        sources.expand_inputs([tmp_path / "empty"])


def test_full_disk_is_one_error_and_leaves_nothing(tmp_path):
    from disk_helpers import ztt_on_full_disk

    out = tmp_path / "out"
    result = ztt_on_full_disk(1000, "tokenizer", "train", "--input", str(SAMPLE_CORPUS / "pg55.txt"),
                              "--vocab-size", "400", "--output", str(out / "tok"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"cannot write {out / 'tok'}.model/.vocab: File too large" in result.stderr
    assert list(out.iterdir()) == []


def test_lines_all_longer_than_the_sentence_limit_are_a_clear_error(tmp_path):
    long_lines = tmp_path / "long.txt"
    words = (SAMPLE_CORPUS / "pg55.txt").read_text(encoding="utf-8-sig").split()
    long_lines.write_text("".join(" ".join(words[i * 2000:(i + 1) * 2000]) + "\n"
                                  for i in range(5)))
    longest = max(len(line.encode()) for line in long_lines.read_text().splitlines())
    with pytest.raises(TokenizerError, match=r"every one of the 5 sampled lines is longer than "
                                             r"--max-sentence-length \(8,192 bytes; the longest "
                                             rf"has {longest:,}\)"):
        train_tokenizer([str(long_lines)], 400, str(tmp_path / "tok"))
    assert not list(tmp_path.glob("tok*"))
    # raising the limit as the message says works
    train_tokenizer([str(long_lines)], 400, str(tmp_path / "tok"), max_sentence_length=longest)


def test_empty_model_file_is_not_a_sentencepiece_model(tmp_path):
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError, match="empty.model: not a SentencePiece model"):
        ZTTTokenizer(empty)
