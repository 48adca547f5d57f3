"""Corpora as users keep them: parquet, zstd JSON lines and `datasets` folders read as the same
documents as JSONL, by `ztt preprocess` and `ztt tokenizer train`, and their bad input."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import SAMPLE_CORPUS

from megatron_ztt.cli import main
from megatron_ztt.data import preprocess as pp
from megatron_ztt.data import sources
from megatron_ztt.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def texts():
    """~1000 documents (paragraphs of two sample books) with an empty and a blank one."""
    paragraphs = []
    for path in sorted(SAMPLE_CORPUS.glob("*.txt"))[:2]:
        paragraphs += [p for p in path.read_text(encoding="utf-8-sig").split("\n\n") if p.strip()]
    return (paragraphs[:500] + ["", "  \n "] + paragraphs[500:1000]
            + ["ünïcödé 😀 — the end"])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok") / "tok"
    return train_tokenizer([str(SAMPLE_CORPUS)], 1000, str(prefix)).model_path


def _jsonl_bytes(texts, key="text"):
    return "".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


def write_jsonl(path, texts):
    path.write_bytes(_jsonl_bytes(texts))


def write_zst(path, texts):
    """Two zstd frames, as concatenated shards are: the reader must go on past the first."""
    half = len(texts) // 2
    compressor = zstandard.ZstdCompressor(level=3)
    path.write_bytes(compressor.compress(_jsonl_bytes(texts[:half]))
                     + compressor.compress(_jsonl_bytes(texts[half:])))


def write_parquet(path, texts, row_group_size=128, **columns):
    table = pa.table({"id": list(range(len(texts))), "text": texts, **columns})
    pq.write_table(table, path, row_group_size=row_group_size)


def write_datasets_folder(path, texts):
    """``save_to_disk`` in 2 shards, then a ``map`` whose cache file lands beside them (and
    must not be read as data)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(path), num_shards=2)
    datasets.load_from_disk(str(path)).map(lambda row: {"text": row["text"].upper()})
    assert any(p.name.startswith("cache-") for p in path.iterdir())


WRITERS = {"jsonl": ("corpus.jsonl", write_jsonl), "jsonl.zst": ("corpus.jsonl.zst", write_zst),
           "json.zst": ("corpus.json.zst", write_zst),
           "parquet": ("corpus.parquet", write_parquet),
           "datasets": ("corpus_hf", write_datasets_folder)}


@pytest.fixture(scope="module")
def corpora(texts, tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    paths = {}
    for kind, (name, writer) in WRITERS.items():
        (root / kind).mkdir()
        paths[kind] = root / kind / name
        writer(paths[kind], texts)
    return paths


def _outputs(prefix):
    return [prefix.with_name(prefix.name + s).read_bytes() for s in (".bin", ".idx")]


def test_every_format_preprocesses_to_byte_identical_files(model, texts, corpora, tmp_path):
    outputs = {}
    for kind, path in corpora.items():
        prefix = tmp_path / kind
        # parquet and the datasets folder go through the worker pool, the others inline
        workers = 2 if kind in ("parquet", "datasets") else 1
        report = pp.preprocess([str(path)], model, str(prefix), workers=workers,
                               append_eod=True, progress=False)
        assert (report.documents, report.skipped_empty) == (len(texts) - 2, 2), kind
        outputs[kind] = _outputs(prefix)
    assert all(outputs[kind] == outputs["jsonl"] for kind in outputs), [
        kind for kind in outputs if outputs[kind] != outputs["jsonl"]]


def test_every_format_trains_the_same_tokenizer(corpora, tmp_path):
    models = {}
    for kind, path in corpora.items():
        report = train_tokenizer([str(path)], 400, str(tmp_path / kind))
        models[kind] = open(report.model_path, "rb").read()
    assert all(models[kind] == models["jsonl"] for kind in models), [
        kind for kind in models if models[kind] != models["jsonl"]]


def test_a_directory_mixing_formats_reads_each_file_in_order(texts, corpora, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    parts = [texts[:300], texts[300:600], texts[600:800], texts[800:]]
    write_jsonl(mixed / "a.jsonl", parts[0])
    write_parquet(mixed / "b.parquet", parts[1], row_group_size=50)
    write_zst(mixed / "c.jsonl.zst", parts[2])
    write_datasets_folder(mixed / "d_hf", parts[3])
    (mixed / "notes.md").write_text("not a corpus file: ignored in a directory")
    files = sources.expand_inputs([mixed])
    assert [p.relative_to(mixed).as_posix() for p in files] == [
        "a.jsonl", "b.parquet", "c.jsonl.zst",
        "d_hf/data-00000-of-00002.arrow", "d_hf/data-00001-of-00002.arrow"]
    stats = sources.ReadStats()
    read = [(d.text, d.line) for d in sources.iter_documents(files, stats=stats)]
    assert [text for text, _ in read] == [t for t in texts if t.strip()]
    assert read[300][1] == 1  # rows are numbered per file, from 1
    assert (stats.files, stats.empty, stats.invalid) == (5, 2, 0)


def test_parquet_is_read_by_row_group_in_bounded_batches(monkeypatch, texts, tmp_path):
    path = tmp_path / "small_groups.parquet"
    write_parquet(path, texts, row_group_size=100)
    monkeypatch.setattr(sources, "BATCH_ROWS", 16)
    seen = []
    real = pq.ParquetFile.iter_batches

    def spy(self, batch_size, row_groups, columns):
        seen.append((batch_size, tuple(row_groups), tuple(columns)))
        return real(self, batch_size, row_groups=row_groups, columns=columns)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    documents = list(sources.iter_documents([path]))
    assert [d.text for d in documents] == [t for t in texts if t.strip()]
    groups = pq.ParquetFile(path).num_row_groups
    assert groups > 5 and seen == [(16, (g,), ("text",)) for g in range(groups)]


def test_text_key_names_the_parquet_column(model, texts, tmp_path, capsys):
    path = tmp_path / "body.parquet"
    pq.write_table(pa.table({"body": texts[:50], "text": [str(i) for i in range(50)]}), path)
    assert main(["preprocess", "--input", str(path), "--tokenizer", model, "--output-prefix",
                 str(tmp_path / "out"), "--text-key", "body", "--no-progress"]) == 0
    assert f"{sum(1 for t in texts[:50] if t.strip())} documents" in capsys.readouterr().out


def _bad_inputs(tmp_path, texts):
    cases = {}
    path = tmp_path / "no_column.parquet"
    pq.write_table(pa.table({"id": [1, 2], "content": ["a", "b"]}), path)
    cases["missing column"] = (path, f"{path}: no column 'text' (columns: id, content); "
                                     "choose the text column with --json-key")

    path = tmp_path / "int_column.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    cases["non-string column"] = (path, f"{path}: column 'text' holds int64, not strings")

    path = tmp_path / "null.parquet"
    write_parquet(path, texts[:150] + [None] + texts[150:200], row_group_size=64)
    cases["null text"] = (path, f"{path}:151: null text in column 'text'")

    path = tmp_path / "truncated.jsonl.zst"
    blob = zstandard.ZstdCompressor().compress(_jsonl_bytes(texts * 4))
    path.write_bytes(blob[: len(blob) // 2])  # cut after a few complete blocks
    cases["truncated zstd"] = (path, f"{path}:")

    path = tmp_path / "garbage.json.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(texts[:5]))[:-40]
                     + b"\x00" * 40)
    cases["corrupt zstd"] = (path, f"{path}:1: corrupt zstd stream")

    path = tmp_path / "footer.parquet"
    write_parquet(path, texts[:100])
    blob = path.read_bytes()
    path.write_bytes(blob[:-12] + b"\x00" * 12)  # the footer length and magic bytes
    cases["corrupt parquet footer"] = (path, f"{path}: not a readable parquet file")
    return cases


BAD_CASES = ["missing column", "non-string column", "null text", "truncated zstd",
             "corrupt zstd", "corrupt parquet footer"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_naming_file_and_row_and_writes_nothing(case, model, texts,
                                                                      tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = inputs / "good.jsonl"
    write_jsonl(good, texts[:20])
    bad, message = _bad_inputs(inputs, texts)[case]
    out_dir = tmp_path / "out"
    rc = main(["preprocess", "--input", str(good), str(bad), "--tokenizer", model,
               "--output-prefix", str(out_dir / "data"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"ztt preprocess: error: {message}") and err.count("\n") == 1, err
    assert not out_dir.exists() or not list(out_dir.iterdir())  # not even temporary files

    assert main(["tokenizer", "train", "--input", str(good), str(bad), "--vocab-size", "300",
                 "--output", str(out_dir / "tok")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out_dir.exists() or not list(out_dir.iterdir())


def test_on_error_skip_counts_null_text_and_bad_streams_but_not_a_wrong_column(model, texts,
                                                                            tmp_path, capsys):
    cases = _bad_inputs(tmp_path, texts)
    out = tmp_path / "out" / "data"
    skippable = [str(cases[name][0]) for name in ("null text", "truncated zstd")]
    assert main(["preprocess", "--input", *skippable, "--tokenizer", model, "--output-prefix",
                 str(out), "--on-error", "skip", "--no-progress"]) == 0
    summary = capsys.readouterr().out
    # the null row is skipped; the truncated stream keeps the documents before the cut
    documents, unreadable = re.search(r"([\d,]+) documents, .* ([\d,]+) unreadable",
                                      summary).groups()
    assert int(unreadable) == 2
    assert int(documents.replace(",", "")) > 200 + 100  # the null file has 200 documents
    assert cases["null text"][1] in summary  # each skipped problem is listed where it was
    cut = re.search(rf"{re.escape(cases['truncated zstd'][1])}(\d+): corrupt zstd stream",
                    summary)
    assert cut and int(cut.group(1)) > 100
    for wrong_key in ("missing column", "non-string column"):
        assert main(["preprocess", "--input", str(cases[wrong_key][0]), "--tokenizer", model,
                     "--output-prefix", str(out), "--on-error", "skip", "--no-progress"]) == 1
        assert cases[wrong_key][1] in capsys.readouterr().err
