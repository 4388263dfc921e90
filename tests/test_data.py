"""lit_flash.text, blocks and datamodule: the pure helpers, the DataModule on local text / the hub (faked) / a
reference-format DatasetDict, and `prepare` -> `tokenized_dataset_load_dir`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from transformers import AutoTokenizer

import lit_flash.datamodule as data_mod
from lit_flash.blocks import collate_blocks, load_tokenized
from lit_flash.datamodule import WikitextDataModule
from lit_flash.errors import LitFlashError
from lit_flash.metrics import perplexity
from lit_flash.prepare import prepare_dataset
from lit_flash.text import group_texts, resolve_text_files, tokenize_texts, train_bpe_tokenizer

BLOCK = 16


def _joined(lines: list[str], linebreaks: bool = False) -> str:
    # Grouping concatenates the non-empty lines with no separator, as the reference recipe does; lines read from
    # text files keep their "\n" (as wikitext's rows on the hub carry theirs).
    return "".join(line + "\n" * linebreaks for line in lines if line.strip())


def _ids(dataset) -> list[list[int]]:
    return list(dataset.with_format(None)["input_ids"])


def _decode_all(dataset, tokenizer) -> str:
    return tokenizer.decode([t for row in _ids(dataset) for t in row])


def _datamodule(**kwargs) -> WikitextDataModule:
    dm = WikitextDataModule(**{"dataset_name": None, "tokenizer_name": None, "block_size": BLOCK, **kwargs})
    dm.prepare_data()
    return dm


# ------------------------------------------------------------------------------------------------ pure helpers


def test_tokenize_texts_round_trips_each_line(tokenizer, corpus):
    lines = corpus["train"][:8]
    ids = tokenize_texts(lines, tokenizer)["input_ids"]
    assert len(ids) == len(lines)
    assert [tokenizer.decode(row) for row in ids] == lines
    assert ids[3] == []  # an empty line has no tokens (and no special token: GPT-2 adds none)


def test_trained_bpe_tokenizer_tokenizes_as_returned(corpus, tokenizer, tmp_path):
    # The returned object is used at once (the demo tokenizes with it): truncation must work on it, and it must
    # match what loads from the folder.
    trained = train_bpe_tokenizer({"train": {"text": corpus["train"]}}, vocab_size=300, save_dir=tmp_path)
    lines = corpus["train"][:6]
    ids = tokenize_texts(lines, trained)["input_ids"]
    assert [trained.decode(row) for row in ids] == lines
    assert ids == tokenize_texts(lines, AutoTokenizer.from_pretrained(str(tmp_path)))["input_ids"]


def test_group_texts_cuts_blocks_and_drops_the_tail():
    out = group_texts({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]]}, block_size=4)
    assert out["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]  # 9 is the dropped tail
    assert out["labels"] == out["input_ids"] and out["labels"][0] is not out["input_ids"][0]
    assert out["attention_mask"] == [[1] * 4, [1] * 4]
    assert group_texts({"input_ids": [[1, 2]]}, block_size=4)["input_ids"] == []
    with pytest.raises(LitFlashError, match="block_size"):
        group_texts({"input_ids": [[1]]}, block_size=0)


def test_perplexity_is_exp_of_the_mean_loss():
    assert perplexity(math.log(7.0)).item() == pytest.approx(7.0, rel=1e-6)
    assert perplexity(torch.tensor(0.0)).item() == 1.0
    assert perplexity(torch.tensor(2.5, dtype=torch.float16)).dtype == torch.float32


def test_resolve_text_files_expands_globs_and_stdlib(tmp_path):
    for name in ("b.txt", "a.txt", "c.md"):
        (tmp_path / name).write_text("x\n")
    out = resolve_text_files({"train": str(tmp_path / "*.txt"), "test": [str(tmp_path / "c.md")]})
    assert out == {"train": [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], "test": [str(tmp_path / "c.md")]}
    assert any(f.endswith("os.py") for f in resolve_text_files({"train": "{stdlib}/o*.py"})["train"])
    with pytest.raises(LitFlashError, match=r"data.text_files\['test'\].*nothing\.txt"):
        resolve_text_files({"test": str(tmp_path / "nothing.txt")})
    with pytest.raises(LitFlashError, match=r"data.text_files\['train'\]"):
        resolve_text_files({"train": str(tmp_path / "*.json")})


def test_collate_blocks_derives_labels_and_drops_an_all_ones_mask():
    rows = [{"input_ids": torch.tensor([1, 2, 3]), "attention_mask": torch.ones(3, dtype=torch.long)} for _ in range(2)]
    batch = collate_blocks(rows)
    assert batch["input_ids"].shape == (2, 3)
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["labels"] is not batch["input_ids"]
    assert "attention_mask" not in batch  # dense attention: the kernels' fast path
    rows[1]["attention_mask"] = torch.tensor([1, 1, 0])
    # Derived labels ignore the padding (there is nothing to predict there); given labels are kept as they are.
    assert collate_blocks(rows)["labels"].tolist() == [[1, 2, 3], [1, 2, -100]]
    rows[0]["labels"] = rows[1]["labels"] = torch.tensor([-100, 5, 6])
    batch = collate_blocks(rows)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6]] * 2
    # A short batch filled up to 4 rows: copies of the first row that predict nothing.
    batch = collate_blocks(rows, pad_rows_to=4)
    assert batch["input_ids"].tolist() == [[1, 2, 3]] * 4
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 5, 6]] * 2 + [[-100, -100, -100]] * 2
    assert collate_blocks(rows, pad_rows_to=2)["input_ids"].shape == (2, 3)  # a full batch stays as it is


# -------------------------------------------------------------------------------------------- the DataModule


def test_datamodule_on_text_files(text_files, tokenizer_dir, tokenizer, corpus, tmp_path):
    dm = _datamodule(
        text_files=text_files, tokenizer_name=str(tokenizer_dir), batch_size=3, eval_batch_size=5,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    # Blocks are the non-empty lines' tokens, in order, cut into BLOCK-token rows (the tail dropped).
    for split, dataset in (("train", dm.train_dataset), ("validation", dm.val_dataset)):
        text = _decode_all(dataset, tokenizer)
        assert len(text) > 100 and _joined(corpus[split], linebreaks=True).startswith(text)
    assert dm.seq_len == BLOCK and dm.max_token_id < len(tokenizer)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (3, BLOCK) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert next(iter(dm.val_dataloader()))["input_ids"].shape == (5, BLOCK)
    dm.setup("test")
    assert _joined(corpus["test"], linebreaks=True).startswith(_decode_all(dm.test_dataset, tokenizer))


def test_a_missing_text_column_is_named(text_files):
    with pytest.raises(LitFlashError, match=r"data.text_column='content' is not a column of the data \(\['text'\]\)"):
        data_mod.load_raw_text(None, None, text_files, text_column="content")


def test_datamodule_sample_limits(text_files, tokenizer_dir, tmp_path):
    dm = _datamodule(
        text_files=text_files, tokenizer_name=str(tokenizer_dir), max_train_samples=5, max_eval_samples=2,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (5, 2, 2)
    assert len(dm.train_dataloader()) == 1  # 5 rows, batch_size 8


def test_datamodule_reuses_its_cache(text_files, tokenizer_dir, tmp_path, monkeypatch):
    kwargs = {"text_files": text_files, "tokenizer_name": str(tokenizer_dir), "cache_dir": str(tmp_path / "cache")}
    first = _datamodule(**kwargs)
    first.setup("fit")

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds the blocks")

    monkeypatch.setattr(data_mod, "tokenize_and_group", no_tokenizing)
    second = _datamodule(**kwargs)
    second.setup("fit")
    assert second.cache_path == first.cache_path
    assert _ids(second.train_dataset) == _ids(first.train_dataset)
    # Another block size is another cache entry (so it would tokenize).
    assert WikitextDataModule(**kwargs, dataset_name=None, block_size=BLOCK * 2).cache_path != first.cache_path


def test_datamodule_hub_path_without_the_hub(corpus, tokenizer_dir, tokenizer, tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        return datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": lines}) for s, lines in corpus.items()})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    kwargs = {
        "dataset_name": "wikitext", "dataset_config_name": "wikitext-2-raw-v1", "tokenizer_name": str(tokenizer_dir),
        "block_size": BLOCK, "cache_dir": str(tmp_path / "cache"),
    }
    first = WikitextDataModule(**kwargs)
    first.prepare_data()
    first.setup("fit")
    assert calls == [("wikitext", "wikitext-2-raw-v1")]
    # Empty lines dropped: every token of every non-empty line is there, up to the dropped tail.
    non_empty = [t for t in corpus["train"] if t.strip()]
    n_tokens = sum(len(ids) for ids in tokenize_texts(non_empty, tokenizer)["input_ids"])
    assert len(first.train_dataset) == n_tokens // BLOCK
    assert _joined(corpus["train"]).startswith(_decode_all(first.train_dataset, tokenizer))
    assert _joined(corpus["validation"]).startswith(_decode_all(first.val_dataset, tokenizer))

    second = WikitextDataModule(**kwargs)
    second.prepare_data()
    second.setup("fit")
    assert calls == [("wikitext", "wikitext-2-raw-v1")]  # neither downloaded nor tokenized again
    assert _ids(second.train_dataset) == _ids(first.train_dataset)


@pytest.mark.parametrize("splits", [("train", "test"), ("train", "validation", "test")])
def test_datamodule_on_a_reference_format_dataset(make_token_dataset, splits):
    path = make_token_dataset(splits=splits, n_rows=10, seq_len=24)
    dm = _datamodule(tokenized_dataset_load_dir=str(path), batch_size=4, max_eval_samples=6)
    dm.setup("fit")
    saved = datasets.load_from_disk(str(path))
    eval_split = "validation" if "validation" in splits else "test"
    assert _ids(dm.train_dataset) == _ids(saved["train"])
    assert _ids(dm.val_dataset) == _ids(saved[eval_split])[:6]
    assert dm.seq_len == 24 and dm.tokenizer is None
    batch = next(iter(dm.val_dataloader()))
    assert torch.equal(batch["labels"], batch["input_ids"]) and "attention_mask" not in batch
    dm.setup("test")
    assert _ids(dm.test_dataset) == _ids(saved["test"])[:6]


def test_datamodule_derives_missing_mask_and_labels(make_token_dataset):
    path = make_token_dataset(columns=("input_ids",), seq_len=8)
    dm = _datamodule(tokenized_dataset_load_dir=str(path), batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"} and torch.equal(batch["labels"], batch["input_ids"])


def test_datamodule_keeps_labels_that_differ(make_token_dataset):
    path = make_token_dataset(seq_len=8)
    ds = datasets.load_from_disk(str(path))
    ds = ds.map(lambda ex: {"labels": [-100] + ex["labels"][1:]})  # e.g. a masked first token
    ds.save_to_disk(str(path.with_name("masked")))
    dm = _datamodule(tokenized_dataset_load_dir=str(path.with_name("masked")), batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert (batch["labels"][:, 0] == -100).all() and torch.equal(batch["labels"][:, 1:], batch["input_ids"][:, 1:])


# ------------------------------------------------------------------------------------ prepare -> load_dir


def test_prepare_then_load_round_trip(text_files, tokenizer_dir, tokenizer, corpus, tmp_path):
    out = tmp_path / "prepared"
    prepare_dataset(save_dir=str(out), text_files=text_files, tokenizer_name=str(tokenizer_dir), block_size=BLOCK)
    # The reference's layout: a DatasetDict with train and test (validation dropped), the three columns.
    assert json.loads((out / "dataset_dict.json").read_text())["splits"] == ["train", "test"]
    saved = load_tokenized(out)
    assert saved["train"].column_names == ["input_ids", "attention_mask", "labels"]

    dm = _datamodule(tokenized_dataset_load_dir=str(out), tokenizer_name=str(tokenizer_dir))
    dm.setup("fit")
    # test stands in for val
    assert _joined(corpus["test"], linebreaks=True).startswith(_decode_all(dm.val_dataset, tokenizer))
    # The same blocks as the DataModule's own tokenization of the same files.
    own = _datamodule(text_files=text_files, tokenizer_name=str(tokenizer_dir), cache_dir=str(tmp_path / "cache"))
    own.setup("fit")
    assert _ids(dm.train_dataset) == _ids(own.train_dataset)


def test_prepare_refuses_a_non_empty_save_dir(text_files, tokenizer_dir, tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LitFlashError, match="prepared"):
        prepare_dataset(save_dir=str(out), text_files=text_files, tokenizer_name=str(tokenizer_dir))
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_prepare_caps_block_size_at_the_tokenizer_context(text_files, tokenizer_dir, tmp_path):
    # The reference caps --dataset_block_size at model_max_length (1024 for GPT-2's and our tokenizer).
    text = {"train": text_files["train"], "test": text_files["train"]}
    prepare_dataset(save_dir=str(tmp_path / "p"), text_files=text, tokenizer_name=str(tokenizer_dir), block_size=4096)
    assert len(load_tokenized(tmp_path / "p")["train"][0]["input_ids"]) == 1024


def _folder_without_tokenizer(tmp_path, kind: str):
    """An empty folder, or a saved model's folder (config.json, no tokenizer files): a tokenizer_name mistake."""
    from transformers import GPT2Config

    folder = tmp_path / kind
    folder.mkdir()
    if kind == "model":
        GPT2Config(n_embd=8, n_layer=1, n_head=2).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("kind", ["empty", "model"])
def test_a_tokenizer_folder_without_a_tokenizer_is_named(text_files, make_token_dataset, tmp_path, kind):
    """A model folder's config.json made transformers build a one-token tokenizer: every line tokenized to nothing
    and fit stopped with 'the split is empty'; an empty folder got transformers' 'Couldn't instantiate the backend
    tokenizer from one of: '."""
    folder = _folder_without_tokenizer(tmp_path, kind)
    said = rf"^data.tokenizer_name={folder} has no tokenizer \(none of tokenizer.json, .*\): give"
    with pytest.raises(LitFlashError, match=said):
        _datamodule(text_files=text_files, tokenizer_name=str(folder), cache_dir=str(tmp_path / "cache"))
    assert not any((tmp_path / "cache").glob("*/blocks"))  # nothing tokenized with it
    with pytest.raises(LitFlashError, match=said):  # a load dir with a tokenizer to export beside the model
        _datamodule(tokenized_dataset_load_dir=str(make_token_dataset()), tokenizer_name=str(folder))
    with pytest.raises(LitFlashError, match=rf"^--tokenizer_name {folder} has no tokenizer"):
        prepare_dataset(save_dir=str(tmp_path / "p"), text_files=text_files, tokenizer_name=str(folder))
    assert not (tmp_path / "p").exists()


def test_load_tokenized_missing_is_one_error_naming_the_path(tmp_path):
    with pytest.raises(LitFlashError, match=str(tmp_path / "nope")):
        load_tokenized(tmp_path / "nope")


def test_block_rows_match_the_dataset_across_arrow_chunks_and_subsets():
    import numpy as np

    from lit_flash.blocks import BlockRows

    ids = np.arange(40 * 6).reshape(40, 6)
    whole = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": (-ids).tolist()})
    two_chunks = datasets.concatenate_datasets([whole.select(range(13)), whole.select(range(13, 40))])
    assert len(two_chunks.data.table.to_batches()) == 2
    for ds in (whole, two_chunks, two_chunks.select(range(20))):
        rows = BlockRows(ds, ["input_ids", "labels"])
        assert len(rows) == len(ds)
        order = list(range(len(ds)))[::-3] + [0, 12, 13]
        for i, row in zip(order, rows.__getitems__(order), strict=True):
            assert row["input_ids"].tolist() == ds[i]["input_ids"] and row["labels"].tolist() == ds[i]["labels"]
            assert row["input_ids"].dtype == torch.int64
        assert rows[5]["input_ids"].tolist() == ds[5]["input_ids"]


# -------------------------------------------------------- errors name what the user set, not the cache folder


def _text_module(text_files: dict, tokenizer_dir: Path, tmp_path: Path, **kwargs: Any) -> WikitextDataModule:
    kwargs = {"tokenizer_name": str(tokenizer_dir), "block_size": 16, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return WikitextDataModule(text_files=text_files, **kwargs)


def test_a_block_of_one_token_is_refused_naming_block_size(text_files, tokenizer_dir, tmp_path):
    with pytest.raises(LitFlashError, match=r"data.block_size=1: must be >= 2"):
        _text_module(text_files, tokenizer_dir, tmp_path, block_size=1)


def test_text_shorter_than_a_block_names_the_text_and_block_size(text_files, tokenizer_dir, tmp_path):
    dm = _text_module(text_files, tokenizer_dir, tmp_path, block_size=1_000_000)
    with pytest.raises(LitFlashError, match=r"^data.text_files: split '\w+' holds fewer than data.block_size=1000000"):
        dm.prepare_data()
    assert not list((tmp_path / "cache").rglob("dataset_dict.json")), "an unusable cache was saved"


def test_text_without_an_evaluation_split_names_the_text_files(text_files, tokenizer_dir, tmp_path):
    dm = _text_module({"train": text_files["train"]}, tokenizer_dir, tmp_path)
    dm.prepare_data()
    with pytest.raises(LitFlashError, match=r"^data.text_files: no 'validation' or 'test' split .*limit_val_batches=0"):
        dm.setup("fit")


def test_a_trained_tokenizer_larger_than_the_model_names_its_vocab_size(text_files, tmp_path):
    from transformers import GPT2Config

    from lit_flash.guards import check_data_fits_model

    dm = WikitextDataModule(text_files=text_files, tokenizer_name=None, train_tokenizer_vocab_size=300, block_size=16,
                            cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    facts = dm.data_facts()
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    with pytest.raises(LitFlashError, match=r"^data.train_tokenizer_vocab_size: the tokenizer has \d+ tokens but the "
                                            r"model only 256: set it to at most 256"):
        check_data_fits_model(config, tokenizer_size=facts.tokenizer_size, tokenizer_trained=facts.tokenizer_trained)


# Words of `datasets`' bars while it reads local text: files "downloaded", splits generated.
LOADING_BARS = ("Downloading data", "Generating train split")


def _many_text_files(folder: Path, corpus: dict[str, list[str]], n: int = 24) -> dict[str, str]:
    """Local text as the demo gives it (a glob of many files): `datasets` shows its "Downloading data" bar from
    more than 16 files."""
    folder.mkdir()
    for i in range(n):
        (folder / f"part{i}.txt").write_text("\n".join(corpus["train"][i::n]) + "\n")
    (folder / "test.txt").write_text("\n".join(corpus["test"]) + "\n")
    return {"train": str(folder / "part*.txt"), "test": str(folder / "test.txt")}


@pytest.mark.parametrize("step", ["fit", "prepare"])
@pytest.mark.parametrize("user_choice", [None, "0"], ids=["default", "bars_asked_for"])
def test_reading_local_text_prints_no_datasets_loading_bar(
    tmp_path, corpus, tokenizer_dir, capfd, monkeypatch, step, user_choice
) -> None:
    if user_choice is None:
        monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)
    else:  # HF_DATASETS_DISABLE_PROGRESS_BARS=0 is the user's own choice: the bars are shown (and the check can fail)
        monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", user_choice)
    assert not datasets.are_progress_bars_disabled()
    files = _many_text_files(tmp_path / "text", corpus)
    capfd.readouterr()
    if step == "fit":
        WikitextDataModule(text_files=files, tokenizer_name=str(tokenizer_dir), block_size=BLOCK,
                           cache_dir=str(tmp_path / "cache")).prepare_data()
    else:
        prepare_dataset(save_dir=str(tmp_path / "out"), text_files=files, tokenizer_name=str(tokenizer_dir),
                        block_size=BLOCK)
    out, err = capfd.readouterr()
    shown = [bar for bar in LOADING_BARS if bar in out + err]
    assert shown == ([] if user_choice is None else list(LOADING_BARS)), out + err
    assert "Map" in out + err  # the tokenization's progress stays: minutes on a large dataset
    assert not datasets.are_progress_bars_disabled()  # only during lit_flash's own preparation
