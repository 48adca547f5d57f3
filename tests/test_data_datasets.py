"""Train/valid/test datasets through megatron-core, and the checks made before building them."""

import hashlib
import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import SAMPLE_CORPUS
from distributed import run_distributed

from megatron_ztt.data import datasets as D
from megatron_ztt.data.loader import build_loader
from megatron_ztt.data.preprocess import preprocess
from megatron_ztt.data.tokenizer import ZTTTokenizer, train_tokenizer

SEQ = 64


@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory):
    """megatron-core's builder needs a process group, even for one process."""
    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer and two prefixes (A: four books, B: the other four), one paragraph a doc."""
    root = tmp_path_factory.mktemp("corpus")
    model = train_tokenizer([str(SAMPLE_CORPUS)], 1000, str(root / "tok")).model_path
    books = sorted(SAMPLE_CORPUS.glob("*.txt"))
    prefixes = {}
    for name, group in (("A", books[:4]), ("B", books[4:])):
        lines = []
        for book in group:
            paragraphs = book.read_text(encoding="utf-8-sig").split("\n\n")
            lines += [json.dumps({"text": p}) for p in paragraphs if p.strip()]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        preprocess([str(root / f"{name}.jsonl")], model, str(root / name), append_eod=True,
                   progress=False)
        prefixes[name] = str(root / name)
    return {"root": root, "model": model, "tokenizer": ZTTTokenizer(model), **prefixes}


def _copy_prefix(prefix, destination):
    for suffix in (".bin", ".idx", ".tokenizer.json"):
        shutil.copy(prefix + suffix, str(destination) + suffix)
    return str(destination)


def _tokens(dataset, count):
    return [dataset[i]["tokens"].tolist() for i in range(count)]


def test_samples_are_shifted_token_windows_without_attention_mask(corpus, tmp_path):
    cfg = D.DataConfig(blend=[corpus["A"]], split="90,5,5", cache_dir=str(tmp_path / "cache"))
    train, valid, test = D.build_datasets(cfg, corpus["tokenizer"], SEQ, 1234, (200, 20, 20))
    assert len(train) >= 200 and len(valid) >= 20 and len(test) >= 20
    sample = train[0]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert sample["tokens"].shape == (SEQ,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert torch.equal(sample["position_ids"], torch.arange(SEQ))
    assert bool((sample["loss_mask"] == 1).all())

    eod = corpus["tokenizer"].eod
    masked = D.DataConfig(blend=[corpus["A"]], split="90,5,5", eod_mask_loss=True,
                          cache_dir=str(tmp_path / "cache"))
    train_masked = D.build_datasets(masked, corpus["tokenizer"], SEQ, 1234, (200, 20, 20))[0]
    samples = [train_masked[i] for i in range(50)]
    assert any((s["tokens"] == eod).any() for s in samples)  # paragraphs are short
    for s in samples:
        assert torch.equal(s["loss_mask"] == 0, s["tokens"] == eod)


def test_same_seed_same_order_other_seed_other_order(corpus, tmp_path):
    def first_samples(seed, cache):
        cfg = D.DataConfig(blend=[corpus["A"]], split="90,5,5", cache_dir=str(tmp_path / cache))
        return _tokens(D.build_datasets(cfg, corpus["tokenizer"], SEQ, seed, (300, 10, 10))[0],
                       40)

    reference = first_samples(1234, "c1")
    assert first_samples(1234, "c2") == reference  # rebuilt from scratch, not read from cache
    assert first_samples(1234, "c1") == reference  # read from cache
    assert first_samples(99, "c3") != reference


def test_index_cache_directory_is_configurable_with_a_default(corpus, tmp_path):
    prefix = _copy_prefix(corpus["A"], tmp_path / "data")
    D.build_datasets(D.DataConfig(blend=[prefix]), corpus["tokenizer"], SEQ, 1, (100, 5, 5))
    assert list((tmp_path / "index-cache").glob("*shuffle_index.npy"))
    elsewhere = tmp_path / "elsewhere"
    D.build_datasets(D.DataConfig(blend=[prefix], cache_dir=str(elsewhere)),
                     corpus["tokenizer"], SEQ, 2, (100, 5, 5))
    assert list(elsewhere.glob("*shuffle_index.npy"))


@pytest.mark.parametrize("weights", [(0.7, 0.3), ("0.2", "0.8")])
def test_blend_weights_give_the_asked_proportions(corpus, tmp_path, weights):
    blend = [weights[0], corpus["A"], weights[1], corpus["B"]]
    cfg = D.DataConfig(blend=blend, split="90,5,5", cache_dir=str(tmp_path / "cache"))
    sizes = (3000, 400, 400)
    train, valid, _ = D.build_datasets(cfg, corpus["tokenizer"], SEQ, 1234, sizes)
    share_a = float(weights[0]) / (float(weights[0]) + float(weights[1]))
    for dataset, size in ((train, sizes[0]), (valid, sizes[1])):
        ids = np.array([int(dataset[i]["dataset_id"]) for i in range(size)])
        sd = np.sqrt(share_a * (1 - share_a) / size)
        assert abs((ids == 0).mean() - share_a) < 3 * sd
    # and the samples really come from the prefix named by dataset_id: a window inside one
    # document (no eod in it) is a substring of that prefix's token stream
    streams = {i: np.fromfile(p + ".bin", dtype=np.uint16).tobytes()
               for i, p in enumerate((corpus["A"], corpus["B"]))}
    checked = 0
    for i in range(60):
        sample = train[i]
        window = sample["tokens"][:12]
        if (window == corpus["tokenizer"].eod).any():
            continue
        checked += 1
        assert window.numpy().astype(np.uint16).tobytes() in streams[int(sample["dataset_id"])]
    assert checked >= 20


def _windows_inside(dataset, prefix, eod, count=60, width=12):
    """(windows checked, windows found in ``prefix``'s token stream) among the first
    ``count`` samples; windows that cross a document end are not checked."""
    stream = np.fromfile(prefix + ".bin", dtype=np.uint16).tobytes()
    checked = found = 0
    for i in range(count):
        window = dataset[i]["tokens"][:width]
        if (window == eod).any():
            continue
        checked += 1
        found += window.numpy().astype(np.uint16).tobytes() in stream
    return checked, found


def test_per_split_blends_read_held_out_data_and_ignore_split(corpus, tmp_path):
    eod = corpus["tokenizer"].eod
    # split="100,0,0" would give no validation data at all: per-split blends override it
    cfg = D.DataConfig(blend=[corpus["A"]], valid_blend=[corpus["B"]], split="100,0,0",
                       cache_dir=str(tmp_path / "cache"))
    train, valid, test = D.build_datasets(cfg, corpus["tokenizer"], SEQ, 1234, (300, 50, 20))
    assert test is None  # no test_blend: no test split
    assert len(train) >= 300 and len(valid) >= 50
    checked, in_a = _windows_inside(train, corpus["A"], eod)
    assert checked >= 20 and in_a == checked
    assert _windows_inside(train, corpus["B"], eod)[1] < checked / 4  # not B's text
    checked, in_b = _windows_inside(valid, corpus["B"], eod)
    assert checked >= 20 and in_b == checked
    assert _windows_inside(valid, corpus["A"], eod)[1] < checked / 4

    # train reads all of A: as many distinct documents as the split-free build sees
    whole = D.build_datasets(D.DataConfig(blend=[corpus["A"]], split="100,0,0",
                                          cache_dir=str(tmp_path / "cache")),
                             corpus["tokenizer"], SEQ, 1234, (300, 0, 0))[0]
    assert _tokens(train, 40) == _tokens(whole, 40)

    # a test blend (weighted, two prefixes) and no valid blend
    cfg = D.DataConfig(blend=[corpus["B"]], test_blend=[0.5, corpus["A"], 0.5, corpus["B"]],
                       cache_dir=str(tmp_path / "cache"))
    train, valid, test = D.build_datasets(cfg, corpus["tokenizer"], SEQ, 1234, (100, 10, 400))
    assert valid is None and len(test) >= 400
    ids = np.array([int(test[i]["dataset_id"]) for i in range(400)])
    assert 0.35 < (ids == 0).mean() < 0.65


def test_per_split_blend_errors_name_the_setting(corpus, tmp_path):
    cfg = D.DataConfig(blend=[corpus["A"]], valid_blend=[0.5, corpus["B"], 0.5])
    with pytest.raises(D.DataError, match="data.valid_blend"):
        D.build_datasets(cfg, corpus["tokenizer"], SEQ, 1, (10, 10, 0))
    cfg = D.DataConfig(blend=[corpus["A"]], test_blend=[str(tmp_path / "missing")])
    with pytest.raises(D.DataError, match="missing.idx: missing"):
        D.build_datasets(cfg, corpus["tokenizer"], SEQ, 1, (10, 0, 10))


def test_per_split_blends_in_the_run_config(corpus):
    from megatron_ztt.config import load_config

    config = load_config(None, ["data.blend=[a]", "data.tokenizer=t.model",
                                "data.valid_blend=[0.3,b,0.7,c]"])
    assert config.data.valid_blend == [0.3, "b", 0.7, "c"] and config.data.test_blend is None


def test_a_split_without_tokens_is_a_clear_error_not_a_hang(corpus, tmp_path):
    books = tmp_path / "books"
    preprocess([str(SAMPLE_CORPUS)], corpus["model"], str(books), progress=False)  # 8 documents
    cfg = D.DataConfig(blend=[str(books)], split="98,1,1", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(D.DataError, match=r"the valid split .* holds no tokens"):
        D.build_datasets(cfg, corpus["tokenizer"], SEQ, 1, (100, 10, 10))
    # asking nothing of the empty splits is fine: they are left out
    train, valid, test = D.build_datasets(cfg, corpus["tokenizer"], SEQ, 1, (100, 0, 0))
    assert len(train) >= 100 and valid is None and test is None


def test_needs_a_process_group(corpus, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(D.DataError, match="torch.distributed"):
        D.build_datasets(D.DataConfig(blend=[corpus["A"]]), corpus["tokenizer"], SEQ, 1,
                         (10, 1, 1))


def test_parse_blend_and_split():
    assert D.parse_blend(["a"]) == (["a"], None)
    assert D.parse_blend(["a", "b"]) == (["a", "b"], None)
    assert D.parse_blend([0.7, "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    assert D.parse_blend("0.7 a 0.3 b") == (["a", "b"], [0.7, 0.3])
    for bad, message in (([], "empty"), ([0.7, "a", 0.3], "pairs"), ([0, "a"], "positive"),
                         (["-1", "a"], "positive"), ([0.5, "a", "x", "b"], "positive"),
                         ([0.5, 0.5], "not a prefix"), (["a", 0.5], "not a prefix")):
        with pytest.raises(D.DataError, match=message):
            D.parse_blend(bad)
    assert D.parse_split("98,1,1") == pytest.approx([0.98, 0.01, 0.01])
    for bad in ("98;1;1", "a,b,c", "0,0,0", "1,2,3,4", "-1,1,1"):
        with pytest.raises(D.DataError, match="data.split"):
            D.parse_split(bad)


# ------------------------------------------------------------------------------- integrity


def _corrupt(prefix, case):
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    data = bytearray(open(idx, "rb").read())
    sequences = struct.unpack_from("<Q", data, 18)[0]
    if case == "bin truncated":
        open(bin_, "r+b").truncate(len(open(bin_, "rb").read()) - 3)
        return bin_, "truncated"
    if case == "bin too long":
        open(bin_, "ab").write(b"\0\0")
        return bin_, "longer than its index"
    if case == "bin missing":
        os.remove(bin_)
        return bin_, "missing"
    if case == "idx truncated":
        data = data[:-8]
    elif case == "idx shorter than header":
        data = data[:20]
    elif case == "bad magic":
        data[0:4] = b"XXXX"
    elif case == "bad version":
        struct.pack_into("<Q", data, 9, 7)
    elif case == "bad dtype":
        data[17] = 99
    elif case == "bad pointer":
        struct.pack_into("<q", data, 34 + 4 * sequences + 8 * 5, 12345)
    elif case == "bad length":
        struct.pack_into("<i", data, 34 + 4 * 7, -5)
    elif case == "bad document index":
        struct.pack_into("<q", data, 34 + 12 * sequences + 8 * 3, 10**9)
    open(idx, "wb").write(bytes(data))
    return idx, {"idx truncated": "which take", "idx shorter than header": "header",
                 "bad magic": "magic", "bad version": "version 7", "bad dtype": "dtype code 99",
                 "bad pointer": "offsets disagree", "bad length": "negative sequence length",
                 "bad document index": "document boundaries"}[case]


@pytest.mark.parametrize("case", ["bin truncated", "bin too long", "bin missing",
                                  "idx truncated", "idx shorter than header", "bad magic",
                                  "bad version", "bad dtype", "bad pointer", "bad length",
                                  "bad document index"])
def test_damaged_files_are_detected_naming_the_file(corpus, tmp_path, case):
    prefix = _copy_prefix(corpus["A"], tmp_path / "data")
    info = D.validate_indexed_dataset(prefix)
    assert info.documents > 100 and info.tokens > 0
    damaged_file, reason = _corrupt(prefix, case)
    with pytest.raises(D.DataError, match=reason) as caught:
        D.validate_indexed_dataset(prefix)
    assert str(caught.value).startswith(damaged_file)
    with pytest.raises(D.DataError, match=reason):  # checked before megatron-core sees it
        D.build_datasets(D.DataConfig(blend=[prefix]), corpus["tokenizer"], SEQ, 1, (10, 1, 1))


def test_same_size_corruption_is_found_by_checksum_or_token_range(corpus, tmp_path):
    prefix = _copy_prefix(corpus["A"], tmp_path / "data")
    D.verify_bin_checksum(prefix)  # intact
    with open(prefix + ".bin", "r+b") as stream:
        stream.seek(1000)
        stream.write(b"\xff\xff\xff\xff")
    D.validate_indexed_dataset(prefix)  # sizes still agree
    with pytest.raises(D.DataError, match=r"data\.bin: corrupted"):
        D.verify_bin_checksum(prefix)
    cfg = D.DataConfig(blend=[prefix], split="90,5,5", verify_checksums=True)
    with pytest.raises(D.DataError, match="corrupted"):
        D.build_datasets(cfg, corpus["tokenizer"], SEQ, 1, (10, 1, 1))
    os.remove(prefix + ".tokenizer.json")  # without the sidecar the ids are range-checked
    with pytest.raises(D.DataError, match="token id 65535 is outside the vocabulary"):
        D.verify_tokenizer_matches([prefix], corpus["tokenizer"])


def test_ids_beyond_the_vocabulary_are_refused_without_the_checksum(corpus, tmp_path):
    """A .bin changed at the same size, sidecar intact, checksums off (the default): training
    must not start (it would crash later with IndexError in the embedding)."""
    prefix = _copy_prefix(corpus["A"], tmp_path / "data")
    with open(prefix + ".bin", "r+b") as stream:
        stream.seek(2000)
        stream.write(np.array([4000], dtype=np.uint16).tobytes())
    cfg = D.DataConfig(blend=[prefix], split="90,5,5", cache_dir=str(tmp_path / "cache"))
    assert not cfg.verify_checksums
    with pytest.raises(D.DataError, match=r"data\.bin: token id 4000 is outside the "
                                          r"vocabulary .*changed or corrupted"):
        D.build_datasets(cfg, corpus["tokenizer"], SEQ, 1, (10, 1, 1))


# ---------------------------------------------------------------------- tokenizer mismatch


def test_a_different_tokenizer_is_refused(corpus, tmp_path):
    smaller = ZTTTokenizer(train_tokenizer([str(SAMPLE_CORPUS)], 500,
                                           str(tmp_path / "small")).model_path)
    same_size = ZTTTokenizer(train_tokenizer([str(SAMPLE_CORPUS / "pg55.txt")], 1000,
                                             str(tmp_path / "other")).model_path)
    D.verify_tokenizer_matches([corpus["A"], corpus["B"]], corpus["tokenizer"])
    for wrong in (smaller, same_size):
        with pytest.raises(D.DataError, match="tokenizer mismatch") as caught:
            D.verify_tokenizer_matches([corpus["A"]], wrong)
        assert corpus["A"] in str(caught.value) and wrong.path in str(caught.value)
        with pytest.raises(D.DataError, match="tokenizer mismatch"):
            D.build_datasets(D.DataConfig(blend=[corpus["A"]]), wrong, SEQ, 1, (10, 1, 1))

    # files without a sidecar (made elsewhere): the token ids must fit the vocabulary
    bare = _copy_prefix(corpus["A"], tmp_path / "bare")
    os.remove(bare + ".tokenizer.json")
    D.verify_tokenizer_matches([bare], corpus["tokenizer"])
    largest = int(np.fromfile(bare + ".bin", dtype=np.uint16).max())
    assert largest >= smaller.vocab_size
    with pytest.raises(D.DataError, match=f"token id {largest} is outside the vocabulary"):
        D.verify_tokenizer_matches([bare], smaller)


# -------------------------------------------------------------------- loader and ranks


def test_loader_workers_give_the_same_batches(corpus, tmp_path):
    cfg = D.DataConfig(blend=[0.5, corpus["A"], 0.5, corpus["B"]], split="90,5,5",
                       cache_dir=str(tmp_path / "cache"))
    train = D.build_datasets(cfg, corpus["tokenizer"], SEQ, 7, (64, 8, 8))[0]
    batches = {}
    for workers in (0, 2):
        loader = build_loader(train, micro_batch_size=4, dp_rank=0, dp_size=1,
                              consumed_samples=0, num_workers=workers)
        batches[workers] = [b["tokens"] for b in loader]
    assert len(batches[0]) == len(train) // 4
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))
    assert batches[0][0].dtype == torch.int64


def _rank_samples(rank, blend, model, cache_dir):
    train = D.build_datasets(D.DataConfig(blend=blend, split="90,5,5", cache_dir=cache_dir),
                             ZTTTokenizer(model), SEQ, 1234, (500, 20, 20))[0]
    return hashlib.sha256(np.stack([train[i]["tokens"].numpy() for i in range(100)])
                          .tobytes()).hexdigest()


@pytest.mark.slow
def test_every_rank_sees_the_same_order_with_a_shared_cache(corpus, tmp_path):
    blend = [0.6, corpus["A"], 0.4, corpus["B"]]
    cache = str(tmp_path / "shared-cache")
    per_rank = run_distributed(_rank_samples, world_size=2, args=(blend, corpus["model"], cache))
    assert per_rank[0] == per_rank[1]
    assert _rank_samples(0, blend, corpus["model"], str(tmp_path / "local")) == per_rank[0]
