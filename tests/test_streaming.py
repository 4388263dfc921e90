"""`data.streaming=true` on local text files (a shard per file): the code path of a hub stream, offline."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lit_flash.datamodule import WikitextDataModule
from lit_flash.errors import LitFlashError
from lit_flash.text import load_raw_text, tokenize_and_group

BLOCK = 4


def word_level_tokenizer(tmp_path, words: list[str]) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<eos>", *words])}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)
    return str(path)


@pytest.fixture()
def corpus(tmp_path):
    """5 files of unique words, each a whole number of blocks (so grouping per shard or across files agree),
    with lines of uneven length that straddle block boundaries, and blank lines that must be dropped."""
    words, files = [], []
    for f in range(5):
        lines, n = [], 0
        for i, length in enumerate([3, 5, 0, 2, 6, 1, 3]):  # 20 words = 5 blocks per file
            line = [f"f{f}l{i}w{j}" for j in range(length)]
            words += line
            lines.append(" ".join(line))
            n += length
        assert n % BLOCK == 0
        path = tmp_path / f"part{f}.txt"
        path.write_text("\n".join(lines) + "\n")
        files.append(str(path))
    return files, word_level_tokenizer(tmp_path, words)


def streamed_blocks(files, tokenizer, world_size: int, workers: int, **kwargs) -> list[list[tuple[int, ...]]]:
    """The training blocks each simulated rank reads through its DataLoader."""
    per_rank = []
    for rank in range(world_size):
        dm = WikitextDataModule(text_files={"train": files}, tokenizer_name=tokenizer, block_size=BLOCK,
                                batch_size=3, num_workers=workers, streaming=True, **kwargs)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, max_steps=10)
        dm.prepare_data()
        dm.setup("fit")
        assert dm.val_dataloader() == []  # no validation split in the source: no validation
        batches = dm.train_dataloader()
        per_rank.append([tuple(row.tolist()) for batch in batches for row in batch["input_ids"]])
    return per_rank


def reference_blocks(files, tokenizer) -> list[tuple[int, ...]]:
    from transformers import AutoTokenizer

    raw = load_raw_text(None, None, {"train": files})
    blocks = tokenize_and_group(raw, AutoTokenizer.from_pretrained(tokenizer), BLOCK)["train"]["input_ids"]
    return [tuple(b) for b in blocks]


@pytest.mark.slow
@pytest.mark.parametrize("n_files", [4, 5])  # 4: whole files per rank; 5: every other block per rank
def test_two_ranks_two_workers_read_each_block_once(corpus, n_files):
    files, tokenizer = corpus
    files = files[:n_files]
    per_rank = streamed_blocks(files, tokenizer, world_size=2, workers=2)
    everything = [block for blocks in per_rank for block in blocks]
    assert all(blocks for blocks in per_rank)
    assert len(everything) == len(set(everything)), "a block was read twice"
    assert sorted(everything) == sorted(reference_blocks(files, tokenizer))


def test_max_train_samples_limits_the_stream(corpus):
    files, tokenizer = corpus
    (blocks,) = streamed_blocks(files, tokenizer, world_size=1, workers=0, max_train_samples=7)
    assert len(blocks) == 7 and set(blocks) <= set(reference_blocks(files, tokenizer))


def test_streaming_needs_max_steps_and_a_raw_text_source(corpus):
    files, tokenizer = corpus
    dm = WikitextDataModule(text_files={"train": files}, tokenizer_name=tokenizer, block_size=BLOCK,
                            streaming=True)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, max_steps=-1)
    with pytest.raises(LitFlashError, match="trainer.max_steps"):
        dm.setup("fit")
    with pytest.raises(LitFlashError, match="tokenized_dataset_load_dir"):
        WikitextDataModule(tokenized_dataset_load_dir="somewhere", streaming=True)



# With 2 workers the refused loader's worker processes are shut down when it is garbage-collected, in whichever later
# test that happens: torch then waits up to 5 s a worker for them (20 s seen), so that case runs in the full suite only.
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_stream_too_short_for_one_block_is_refused_not_looped_over(corpus, tmp_path, workers):
    """Less text than one block: every pass was empty, so the fit started pass after pass until killed."""
    _, tokenizer = corpus
    short = tmp_path / "short.txt"
    short.write_text("f0l0w0 f0l0w1\n")
    with pytest.raises(LitFlashError, match="no block of data.block_size tokens"):
        streamed_blocks([str(short)], tokenizer, world_size=1, workers=workers)
