"""`ztt preprocess`: text -> Megatron .bin/.idx, checked against SentencePiece and megatron-core."""

import gzip
import json

import numpy as np
import pytest
import sentencepiece as spm
from conftest import SAMPLE_CORPUS
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ztt.cli import main
from megatron_ztt.data import preprocess as pp
from megatron_ztt.data.tokenizer import file_sha256, train_tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok") / "tok"
    return train_tokenizer([str(SAMPLE_CORPUS)], 2000, str(prefix)).model_path


@pytest.fixture(scope="module")
def paragraphs():
    """~4000 documents of varied length: the sample books cut at blank lines."""
    texts = []
    for path in sorted(SAMPLE_CORPUS.glob("*.txt")):
        texts += [p for p in path.read_text(encoding="utf-8-sig").split("\n\n") if p.strip()]
    return texts


def _write_jsonl(path, records, key="text"):
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as stream:
        for record in records:
            stream.write(json.dumps({key: record, "id": 0} if isinstance(record, str) else record)
                         + "\n")


def _read_back(prefix):
    dataset = IndexedDataset(str(prefix))
    return dataset, [dataset[i].tolist() for i in range(len(dataset))]


def test_txt_round_trip_equals_sentencepiece_per_document(model, tmp_path, capsys):
    out = tmp_path / "out" / "books"
    rc = main(["preprocess", "--input", str(SAMPLE_CORPUS), "--tokenizer", model,
               "--output-prefix", str(out), "--append-eod", "--no-progress"])
    summary = capsys.readouterr().out
    assert rc == 0
    sp = spm.SentencePieceProcessor(model_file=model)
    books = sorted(SAMPLE_CORPUS.glob("*.txt"))
    expected = [sp.encode(p.read_text(encoding="utf-8-sig")) + [sp.eos_id()] for p in books]

    dataset, documents = _read_back(out)
    assert documents == expected
    assert dataset.index.dtype == np.uint16  # smallest that holds a 2000-piece vocab
    assert len(dataset.document_indices) == len(books) + 1
    tokens = sum(map(len, expected))
    assert f"{len(books):,} documents, {tokens:,} tokens, skipped 0" in summary

    sidecar = json.loads((tmp_path / "out" / "books.tokenizer.json").read_text())
    assert sidecar["tokenizer_sha256"] == file_sha256(model)
    assert sidecar["vocab_size"] == sp.get_piece_size()
    assert sidecar["documents"] == len(books) and sidecar["tokens"] == tokens
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "books.bin", "books.idx", "books.tokenizer.json"]


def test_long_documents_with_awkward_line_starts_match_whole_document_encoding(model, tmp_path):
    # Long documents are encoded piecewise (cut after newlines); the result must not differ
    # from encoding the whole text, whatever follows the cuts.
    line_starts = ["", " ", "  ", "\t", "\r\n", "\n", "😀", "é", "—", "1234", "▁", " \n"]
    lines = [f"{line_starts[i % len(line_starts)]}line {i} of a long document, ünïcödé 😀"
             for i in range(3000)]
    text = "\n".join(lines) + "\n\n  trailing spaces  "
    assert len(text) > 20 * pp.PIECE_CHARS
    (tmp_path / "long.txt").write_text(text, encoding="utf-8")
    assert pp.continuation_model(open(model, "rb").read()) is not None  # piecewise path taken
    pp.preprocess([str(tmp_path / "long.txt")], model, str(tmp_path / "long"), progress=False)
    sp = spm.SentencePieceProcessor(model_file=model)
    assert _read_back(tmp_path / "long")[1] == [sp.encode(text)]


def test_very_long_lines_are_cut_at_spaces_and_match_whole_document_encoding(model, tmp_path):
    # A document that is one huge line is encoded in pieces cut before single spaces (bounded
    # memory); the ids must equal SentencePiece's for the whole text.
    words = ["word", "  double", "\ttab", "1234", "😀", "é", "—dash", "▁", " \u3000wide", "x.",
             "ünï", "(paren)", "   ", "a"]
    text = " ".join(f"{words[i % len(words)]}{i}" for i in range(40_000)) + " end"
    assert "\n" not in text and len(text) > 5 * pp.LONG_LINE_CHARS
    pieces = list(pp._pieces(text))
    assert len(pieces) > 50 and "".join(pieces) == text
    assert max(map(len, pieces)) <= pp.PIECE_CHARS + pp.LONG_LINE_CHARS
    (tmp_path / "line.txt").write_text(text, encoding="utf-8")
    pp.preprocess([str(tmp_path / "line.txt")], model, str(tmp_path / "line"), progress=False)
    sp = spm.SentencePieceProcessor(model_file=model)
    assert _read_back(tmp_path / "line")[1] == [sp.encode(text)]


def test_unigram_models_are_encoded_whole_and_round_trip(tmp_path):
    unigram = train_tokenizer([str(SAMPLE_CORPUS)], 1500, str(tmp_path / "uni"),
                              model_type="unigram", input_sentence_size=4000).model_path
    assert pp.continuation_model(open(unigram, "rb").read()) is None
    pp.preprocess([str(SAMPLE_CORPUS)], unigram, str(tmp_path / "books"), progress=False)
    sp = spm.SentencePieceProcessor(model_file=unigram)
    books = sorted(SAMPLE_CORPUS.glob("*.txt"))
    assert _read_back(tmp_path / "books")[1] == [
        sp.encode(p.read_text(encoding="utf-8-sig")) for p in books]


def test_jsonl_and_gz_round_trip_with_json_key_and_empty_documents(model, paragraphs, tmp_path,
                                                                   capsys):
    first, second = paragraphs[:300], paragraphs[300:600]
    records = [{"body": t} for t in first[:100]] + [{"body": "   "}] + \
        [{"body": t} for t in first[100:]]
    _write_jsonl(tmp_path / "a.jsonl", records)
    _write_jsonl(tmp_path / "b.jsonl.gz", [{"body": t} for t in second] + [{"body": ""}])
    out = tmp_path / "docs"
    rc = main(["preprocess", "--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz"),
               "--tokenizer", model, "--output-prefix", str(out), "--json-key", "body",
               "--no-progress"])
    summary = capsys.readouterr().out
    assert rc == 0
    sp = spm.SentencePieceProcessor(model_file=model)
    _, documents = _read_back(out)
    assert documents == [sp.encode(t) for t in first + second]  # no eod without --append-eod
    assert "600 documents" in summary and "skipped 2 (2 empty, 0 unreadable)" in summary


def test_two_workers_write_byte_identical_files(model, paragraphs, tmp_path):
    _write_jsonl(tmp_path / "corpus.jsonl", paragraphs)
    outputs = {}
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        report = pp.preprocess([str(tmp_path / "corpus.jsonl")], model, str(prefix),
                               workers=workers, append_eod=True, progress=False)
        assert report.documents == len(paragraphs)
        # the input spans many batches, so the order across workers is really exercised
        assert report.documents > 4 * pp.BATCH_DOCUMENTS
        outputs[workers] = [prefix.with_name(prefix.name + s).read_bytes()
                            for s in (".bin", ".idx", ".tokenizer.json")]
    assert outputs[1] == outputs[2]


def test_progress_bar_shows_documents_and_tokens_per_second(model, tmp_path, capsys):
    pp.preprocess([str(SAMPLE_CORPUS)], model, str(tmp_path / "p"), progress=True)
    err = capsys.readouterr().err
    assert "doc/s" in err and "tok/s" in err


def _bad_inputs(tmp_path):
    good = [json.dumps({"text": f"good document {i}"}) for i in range(3)]
    cases = {}
    path = tmp_path / "missing.jsonl"
    cases["nonexistent"] = (path, f"{path}: no such file or directory")

    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\nsecond line\nna\u00efve".encode("latin-1"))
    cases["invalid utf-8 txt"] = (path, f"{path}:3: invalid UTF-8")

    path = tmp_path / "bad_utf8.jsonl"
    path.write_bytes(("\n".join(good) + "\n").encode() + b'{"text": "caf\xe9"}\n')
    cases["invalid utf-8 jsonl"] = (path, f"{path}:4: invalid UTF-8")

    path = tmp_path / "malformed.jsonl"
    path.write_text("\n".join(good[:2] + ['{"text": "unterminated'] + good[2:]) + "\n")
    cases["malformed json"] = (path, f"{path}:3: malformed JSON")

    path = tmp_path / "missing_key.jsonl"
    path.write_text("\n".join(good[:1] + [json.dumps({"content": "x"})] + good[1:]) + "\n")
    cases["missing key"] = (path, f"{path}:2: no key 'text'")

    path = tmp_path / "not_object.jsonl"
    path.write_text("\n".join(good + ['["a", "list"]']) + "\n")
    cases["not an object"] = (path, f"{path}:4: expected a JSON object")

    path = tmp_path / "truncated.jsonl.gz"
    blob = gzip.compress(("\n".join(good * 200) + "\n").encode())
    path.write_bytes(blob[: len(blob) // 2])
    cases["truncated gzip"] = (path, f"{path}:")
    return cases


@pytest.mark.parametrize("case", ["nonexistent", "invalid utf-8 txt", "invalid utf-8 jsonl",
                                  "malformed json", "missing key", "not an object",
                                  "truncated gzip"])
def test_bad_input_names_file_and_line_and_leaves_no_output(case, model, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = inputs / "good.txt"
    good.write_text("a good document that is written before the bad one is read\n")
    bad, message = _bad_inputs(inputs)[case]
    out_dir = tmp_path / "out"
    rc = main(["preprocess", "--input", str(good), str(bad), "--tokenizer", model,
               "--output-prefix", str(out_dir / "data"), "--no-progress", "--workers", "2"])
    err = capsys.readouterr().err
    assert rc == 1
    assert message in err
    assert not out_dir.exists() or not list(out_dir.iterdir())  # not even temporary files


def test_failed_run_keeps_previous_output_intact(model, tmp_path, capsys):
    out = tmp_path / "out" / "data"
    pp.preprocess([str(SAMPLE_CORPUS)], model, str(out), progress=False)
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops}\n')
    assert main(["preprocess", "--input", str(SAMPLE_CORPUS), str(bad), "--tokenizer", model,
                 "--output-prefix", str(out), "--no-progress"]) == 1
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before


def test_on_error_skip_counts_and_skips(model, tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    bad_files = [str(cases[name][0]) for name in
                 ("invalid utf-8 txt", "malformed json", "missing key", "not an object")]
    rc = main(["preprocess", "--input", *bad_files, "--tokenizer", model, "--output-prefix",
               str(tmp_path / "out" / "data"), "--on-error", "skip", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    # latin1.txt is one unreadable document; each .jsonl has one bad line among good ones
    assert "skipped 4 (0 empty, 4 unreadable)" in out
    assert "malformed.jsonl:3: malformed JSON" in out  # the skipped problems are listed
    sp = spm.SentencePieceProcessor(model_file=model)
    _, documents = _read_back(tmp_path / "out" / "data")
    good = [f"good document {i}" for i in range(3)]
    assert documents == [sp.encode(t) for t in good * 3]


def test_only_empty_documents_is_an_error_without_output(model, tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("\n  \n")
    _write_jsonl(tmp_path / "blank.jsonl", ["", " "])
    rc = main(["preprocess", "--input", str(tmp_path / "blank.txt"), str(tmp_path / "blank.jsonl"),
               "--tokenizer", model, "--output-prefix", str(tmp_path / "out" / "d"),
               "--no-progress"])
    assert rc == 1
    assert "no documents to write" in capsys.readouterr().err
    assert not list((tmp_path / "out").iterdir())


def test_unreadable_tokenizer_is_an_error(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("text")
    rc = main(["preprocess", "--input", str(tmp_path / "a.txt"), "--tokenizer",
               str(tmp_path / "nope.model"), "--output-prefix", str(tmp_path / "d"),
               "--no-progress"])
    assert rc == 1
    assert "nope.model" in capsys.readouterr().err


def test_full_disk_is_one_error_and_leaves_nothing(model, tmp_path):
    from disk_helpers import ztt_on_full_disk

    out = tmp_path / "out"
    result = ztt_on_full_disk(100_000, "preprocess", "--input", str(SAMPLE_CORPUS),
                              "--tokenizer", model, "--output-prefix", str(out / "data"),
                              "--no-progress")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"cannot write {out / 'data'}.bin/.idx: File too large" in result.stderr
    assert list(out.iterdir()) == []  # no temporary files either


def test_sigterm_stops_cleanly_and_leaves_no_temporary_files(model, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    big = tmp_path / "big.txt"
    text = "".join(p.read_text(encoding="utf-8-sig") for p in sorted(SAMPLE_CORPUS.glob("*.txt")))
    big.write_text(text * 8, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "megatron_ztt.cli", "preprocess", "--input",
                             str(big), "--tokenizer", model, "--output-prefix",
                             str(out / "data"), "--no-progress"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while not list(out.glob("*.tmp-*")):  # the run has started writing
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err, err
    assert list(out.iterdir()) == []
