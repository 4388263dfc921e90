"""data.packing: documents packed into blocks with position ids restarting at each document, labels ignored at
each document's first token, `cu_seq_lens` of one length per loader, and a model that attends within documents."""

from __future__ import annotations

from pathlib import Path

import datasets
import lightning as L
import numpy as np
import pytest
import torch
from _helpers import logged, tiny_module

import lit_flash
from lit_flash import WikitextDataModule
from lit_flash.errors import LitFlashError
from lit_flash.packing import (
    collate_packed,
    cu_seq_lens,
    is_article_heading,
    pack_blocks,
    pack_documents,
    packed_attention_kwargs,
    packed_collate,
    positions_from_eos,
    resolve_documents,
)

EOS = 0  # the tiny tokenizer's <|endoftext|>


def test_only_top_level_wikitext_headings_open_an_article():
    assert is_article_heading(" = Valkyria Chronicles III = \n")
    assert is_article_heading(" = A = ")
    assert not is_article_heading(" = = Gameplay = = \n")
    assert not is_article_heading(" = = = Notes = = = \n")
    assert not is_article_heading(" The score was 2 = 2 . \n")
    assert not is_article_heading("")


def test_auto_documents_follow_the_source():
    assert resolve_documents("auto", {"train": "a.txt"}, "wikitext") == "file"
    assert resolve_documents("auto", None, "wikitext") == "headings"
    assert resolve_documents("auto", None, "HuggingFaceFW/fineweb") == "row"
    assert resolve_documents("paragraph", {"train": "a.txt"}, None) == "paragraph"


def test_blocks_restart_positions_at_documents_and_blocks_and_ignore_first_labels():
    # Rows of 3, 4, 2, 5 tokens; documents start in rows 0 and 2 (after a separator at index 0 of row 2).
    rows = [[1, 2, 3], [4, 5, 6, 7], [EOS, 8], [9, 10, 11, 12, 13]]
    out = pack_blocks({"input_ids": rows, "doc_start": [0, -1, 1, -1]}, block_size=5)
    assert out["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, EOS, 8, 9]]  # the tail (4 tokens) is dropped
    assert out["position_ids"] == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]  # block start, then the document after EOS
    assert out["labels"] == [[-100, 2, 3, 4, 5], [-100, 7, EOS, -100, 9]]  # nothing predicted across the boundary


def test_wikitext_articles_end_with_eos_and_start_at_zero(tokenizer):
    lines = [" = First = \n", " one two . \n", " = = Section = = \n", " three . \n", "", " = Second = \n",
             " four five six . \n"] * 6
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": lines})})
    blocks = pack_documents(raw, tokenizer, block_size=16, documents="headings")["train"]
    ids, positions = np.array(blocks["input_ids"]), np.array(blocks["position_ids"])
    flat_ids, flat_pos = ids.reshape(-1), positions.reshape(-1)
    # Every document but the first starts right after an end-of-text token; sections do not start one.
    starts = np.nonzero(flat_pos == 0)[0]
    inner = [s for s in starts if s % 16]  # starts that are not block starts
    assert len(inner) >= 4 and all(flat_ids[s - 1] == EOS for s in inner)
    at_block_starts = sum(1 for s in starts if s % 16 == 0 and s and flat_ids[s - 1] == EOS)
    assert (flat_ids == EOS).sum() == len(inner) + at_block_starts  # one EOS per document end, nowhere else
    head = tokenizer(" = Second = \n")["input_ids"]
    assert any(flat_ids[s : s + len(head)].tolist() == head for s in inner)


def test_heading_documents_in_text_without_headings_are_refused(tokenizer):
    """Plain text packed by wikitext headings held no document start: packing silently did nothing."""
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [" one two three . \n"] * 40})})
    with pytest.raises(LitFlashError, match="packing_documents=headings: the 'train' text has no"):
        pack_documents(raw, tokenizer, block_size=16, documents="headings")
    assert len(pack_documents(raw, tokenizer, block_size=16, documents="row")["train"]) > 0


@pytest.mark.parametrize(
    ("positions", "bad_row"),
    [([[0, 1, 2, 0], [0, 1, 0, 1]], None), ([[0, 1, 2, 0], [1, 2, 3, 4]], 1),
     ([[0, 5001, 5002, 5003], [0, 1, 0, 1]], 0), ([[0, 1, 1, 2], [0, 1, 2, 3]], 0)],
    ids=["well formed", "not starting at 0", "past any context", "not counting up"],
)
def test_a_position_ids_column_is_checked_before_packing(positions, bad_row):
    """Positions past the model's context reached the embedding (an IndexError mid-step); rows not starting at 0
    failed inside a loader worker."""
    from lit_flash.packing import check_packable

    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 2, "position_ids": positions})
    if bad_row is None:
        check_packable(ds, eos_id=None, where="data")
        return
    with pytest.raises(LitFlashError, match=rf"data, row {bad_row}: position_ids must start at 0 and count up"):
        check_packable(ds, eos_id=None, where="data")


def test_cu_seq_lens_have_one_length_whatever_the_document_count():
    few = torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]])
    many = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 1]])
    assert cu_seq_lens(few, 8).tolist() == [0, 4, 6, 8, 8, 8, 8, 8]  # padding: empty sequences at the end
    assert cu_seq_lens(many, 8).tolist() == [0, 1, 3, 4, 5, 6, 8, 8]
    assert cu_seq_lens(many, 8).dtype == torch.int32
    assert len(cu_seq_lens(many, 3)) == 7  # more documents than the bound: longer, still right


def test_collate_finds_documents_after_eos_and_fills_short_batches():
    rows = [{"input_ids": torch.tensor([5, 6, EOS, 7, 8, EOS])}, {"input_ids": torch.tensor([EOS, 9, 9, 9, 9, 9])}]
    batch = collate_packed(rows, eos_id=EOS, cu_length=6, pad_rows_to=3)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [
        [-100, 6, EOS, -100, 8, EOS], [-100, -100, 9, 9, 9, 9], [-100] * 6  # the filler row predicts nothing
    ]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 6, 7, 12, 18]
    assert "attention_mask" not in batch


def test_positions_from_eos_matches_the_packed_column():
    ids = torch.tensor([[3, EOS, 4, 4, EOS, EOS, 2]])
    assert positions_from_eos(ids, EOS).tolist() == [[0, 1, 0, 1, 2, 0, 0]]


def test_padding_rows_cannot_be_packed():
    rows = [{"input_ids": torch.tensor([1, 2, 3]), "attention_mask": torch.tensor([1, 1, 0])}]
    with pytest.raises(LitFlashError, match="data.packing"):
        collate_packed(rows, eos_id=EOS, cu_length=4)


def test_the_bound_covers_the_batch_with_the_most_documents():
    class Rows:  # BlockRows' shape: memory-mapped chunks of arrays
        chunks = [{"position_ids": np.array([[0, 1, 2, 3], [0, 0, 0, 0]])}, {"position_ids": np.array([[0, 0, 1, 2]])}]

    collate = packed_collate(Rows(), batch_size=2, eos_id=None)
    assert collate.keywords["cu_length"] == 4 + 2 + 1  # the two rows with most documents, plus the total
    assert packed_collate(Rows(), batch_size=5, eos_id=None).keywords["cu_length"] == 4 + 2 + 1 + 2 + 1


def _packed_row(docs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    return ids, positions


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_row_gives_each_documents_logits_as_if_alone(tiny_model_config, attn):
    torch.manual_seed(0)
    module = tiny_module(tiny_model_config, attn_implementation=attn, dropout=0.0).eval()
    docs = [torch.randint(1, 300, (n,)) for n in (7, 20, 3, 2)]
    ids, positions = _packed_row(docs)
    with torch.no_grad():
        kwargs = packed_attention_kwargs(positions, cu_seq_lens(positions, 8), module.attn_implementation)
        packed = module(ids, None, **kwargs).logits[0]
        alone = torch.cat([module(d[None]).logits[0] for d in docs])
        plain = module(ids).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain[7:], alone[7:], atol=1e-3)  # without boundaries, documents see each other


def test_the_packed_loss_is_each_documents_loss_without_its_first_token(tiny_model_config):
    torch.manual_seed(1)
    module = tiny_module(tiny_model_config, dropout=0.0).eval()
    docs = [torch.randint(1, 300, (n,)) for n in (9, 14, 9)]
    ids, positions = _packed_row(docs)
    batch = collate_packed([{"input_ids": ids[0], "position_ids": positions[0]}], eos_id=None, cu_length=5)
    with torch.no_grad():
        loss, n_tokens = module._loss(batch, training=False)
        sums = [module.model(input_ids=d[None], labels=d[None]).loss * (len(d) - 1) for d in docs]
    assert int(n_tokens) == sum(len(d) - 1 for d in docs)
    torch.testing.assert_close(loss, sum(sums) / n_tokens)


def test_flash_gets_the_boundaries_explicitly(tiny_model_config):
    module = tiny_module(tiny_model_config)
    module.attn_implementation = "flash_attention_2"  # what a GPU run resolves to; the model call is captured here
    seen = {}

    class Capture(torch.nn.Module):
        config = module.model.config

        def forward(self, **kwargs):
            seen.update(kwargs)
            return type("Out", (), {"loss": torch.tensor(0.0)})()

    module.model = Capture()
    positions = torch.tensor([[0, 1, 2, 0], [0, 0, 1, 2]])
    cu = cu_seq_lens(positions, 6)
    module._loss_impl(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), None, positions, cu)
    assert seen["cu_seq_lens_q"] is cu and seen["cu_seq_lens_k"] is cu
    assert seen["max_length_q"] == seen["max_length_k"] == 4 and isinstance(seen["max_length_q"], int)
    assert seen["position_ids"] is positions and seen["use_cache"] is False and seen["attention_mask"] is None
    # A batch from another collate function (position_ids alone): the boundaries are found here instead.
    module._loss_impl(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), None, positions)
    assert seen["cu_seq_lens_q"].tolist() == [0, 3, 4, 5, 8]


def test_without_packing_nothing_changes(tiny_model_config):
    module = tiny_module(tiny_model_config)
    assert packed_attention_kwargs(None, None, module.attn_implementation) == {}


# ------------------------------------------------------------------------------------------ the DataModule
def _datamodule(tmp_path: Path, text_files: dict, tokenizer_dir: Path, **kwargs) -> WikitextDataModule:
    args = dict(text_files=text_files, tokenizer_name=str(tokenizer_dir), block_size=32, batch_size=4,
                eval_batch_size=4, cache_dir=str(tmp_path / "cache"), packing=True, packing_documents="paragraph")
    return WikitextDataModule(**{**args, **kwargs})


def test_packed_text_files_give_batches_of_one_shape(tmp_path, text_files, tokenizer_dir):
    dm = _datamodule(tmp_path, text_files, tokenizer_dir, pad_last_batch=True)
    assert dm.cache_path != _datamodule(tmp_path, text_files, tokenizer_dir, packing=False).cache_path
    assert dm.cache_path != _datamodule(tmp_path, text_files, tokenizer_dir, packing_documents="file").cache_path
    dm.prepare_data()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) > 3
    assert {b["cu_seq_lens"].shape for b in batches} == {batches[0]["cu_seq_lens"].shape}
    documents = {int((b["position_ids"] == 0).sum()) for b in batches}
    assert len(documents) > 1  # batches hold different numbers of documents, yet one shape
    for b in batches:
        assert b["labels"][b["position_ids"] == 0].eq(-100).all()
        assert b["input_ids"].shape == (4, 32) and "attention_mask" not in b
    val = next(iter(dm.val_dataloader()))
    assert "cu_seq_lens" in val


def test_a_load_dir_packs_by_eos_and_refuses_without_one(tmp_path, make_token_dataset, tokenizer_dir):
    rng = np.random.default_rng(0)
    rows = rng.integers(1, 300, (8, 32))
    rows[:, 10] = EOS
    with_eos = make_token_dataset("eos", rows={"train": rows.tolist(), "test": rows.tolist()})
    dm = WikitextDataModule(tokenized_dataset_load_dir=str(with_eos), tokenizer_name=str(tokenizer_dir),
                            batch_size=4, eval_batch_size=4, packing=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert (batch["position_ids"][:, 11] == 0).all() and (batch["labels"][:, 11] == -100).all()
    assert "attention_mask" not in batch
    plain = rng.integers(1, 300, (8, 32)).tolist()
    without = make_token_dataset("plain", rows={"train": plain, "test": plain})
    dm = WikitextDataModule(tokenized_dataset_load_dir=str(without), tokenizer_name=str(tokenizer_dir), packing=True)
    with pytest.raises(LitFlashError, match=r"data.packing=true: .* no end-of-text token \(id 0\)"):
        dm.setup("fit")
    dm = WikitextDataModule(tokenized_dataset_load_dir=str(with_eos), tokenizer_name=None, packing=True)
    with pytest.raises(LitFlashError, match="data.tokenizer_name"):
        dm.setup("fit")


def _eos_rows_datamodule(make_token_dataset, tokenizer_dir, packing: bool) -> WikitextDataModule:
    """A load dir whose rows hold an end-of-text token: readable packed (documents end there) or not."""
    rows = np.random.default_rng(0).integers(1, 300, (8, 32))
    rows[:, 10] = EOS
    path = make_token_dataset("eos", rows={"train": rows.tolist(), "test": rows.tolist()})
    return WikitextDataModule(tokenized_dataset_load_dir=str(path), tokenizer_name=str(tokenizer_dir), batch_size=2,
                              eval_batch_size=4, packing=packing)


@pytest.mark.parametrize("saved", [False, True], ids=["saved unpacked", "saved packed"])
def test_a_resume_that_flips_data_packing_is_refused(tmp_path, make_token_dataset, tokenizer_dir, tiny_model_config,
                                                     saved):
    """The sampler's position counts packed rows or plain blocks: after a flip it points at other data, and the
    resume went on silently. Evaluating a checkpoint either way is not a resume, and stays allowed."""
    from _helpers import cpu_trainer

    def fit(packing: bool, steps: int, ckpt_path: Path | None = None) -> L.Trainer:
        trainer = cpu_trainer(max_steps=steps, limit_val_batches=0)
        trainer.fit(tiny_module(tiny_model_config), _eos_rows_datamodule(make_token_dataset, tokenizer_dir, packing),
                    ckpt_path=ckpt_path)
        return trainer

    checkpoint = tmp_path / "saved.ckpt"
    fit(saved, 1).save_checkpoint(checkpoint)
    now, then = str(not saved).lower(), str(saved).lower()
    said = (rf"^data.packing={now}, but the checkpoint was saved with data.packing={then}: "
            rf".*resume with data.packing={then}")
    with pytest.raises(LitFlashError, match=said):
        fit(not saved, 2, checkpoint)
    assert fit(saved, 2, checkpoint).global_step == 2  # the same setting resumes
    flipped_dm = _eos_rows_datamodule(make_token_dataset, tokenizer_dir, not saved)
    cpu_trainer().validate(tiny_module(tiny_model_config), flipped_dm, ckpt_path=checkpoint, verbose=False)
    # A checkpoint from before lit_flash recorded data.packing resumes as it did.
    old = torch.load(checkpoint, weights_only=True)
    del old[WikitextDataModule.__qualname__]["packing"]
    torch.save(old, tmp_path / "old.ckpt")
    assert fit(not saved, 2, tmp_path / "old.ckpt").global_step == 2


def test_prepare_packing_writes_position_ids_that_fit_loads(tmp_path, text_files, tokenizer_dir):
    from lit_flash.prepare import prepare_dataset

    out = tmp_path / "prepared"
    prepare_dataset(str(out), text_files=text_files, tokenizer_name=str(tokenizer_dir), block_size=32,
                    packing=True, packing_documents="paragraph")
    saved = datasets.load_from_disk(str(out))["train"]
    assert "position_ids" in saved.column_names and saved[0]["position_ids"][0] == 0
    dm = WikitextDataModule(tokenized_dataset_load_dir=str(out), tokenizer_name=None, batch_size=2, packing=True)
    dm.setup("fit")
    assert "cu_seq_lens" in next(iter(dm.train_dataloader()))
    plain = WikitextDataModule(tokenized_dataset_load_dir=str(out), tokenizer_name=None, batch_size=2)
    plain.setup("fit")
    assert "position_ids" not in next(iter(plain.train_dataloader()))  # read unpacked, the column is left out


def test_two_ranks_share_packed_rows_without_overlap_and_with_one_shape(tmp_path, text_files, tokenizer_dir):
    from types import SimpleNamespace

    dm = _datamodule(tmp_path, text_files, tokenizer_dir, batch_size=3)
    dm.prepare_data()
    dm.setup("fit")
    seen, shapes = [], set()
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank,
                                     distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        rows = []
        for loader in (dm.train_dataloader(), dm.val_dataloader()):
            for b in loader:
                shapes.add((loader.batch_size, tuple(b["cu_seq_lens"].shape)))
                rows += [tuple(r.tolist()) for r in b["input_ids"]]
        seen.append(rows)
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])  # each rank its own rows
    assert len({shape for size, shape in shapes if size == 3}) == 1  # one cu_seq_lens shape on every rank


def test_packing_with_streaming_is_one_clear_error():
    with pytest.raises(LitFlashError, match="data.packing=true does not work with data.streaming"):
        WikitextDataModule(streaming=True, packing=True)


@pytest.mark.slow
def test_packing_is_in_fit_help_and_bad_use_exits_2_with_one_line(run_cli, tiny_config):
    code, out, _ = run_cli(["fit", "--help"])
    assert code == 0 and "--data.packing" in out and "--data.packing_documents" in out
    code, _, err = run_cli(["fit", "--config", str(tiny_config), "--data.packing", "true", "--data.streaming", "true",
                            "--trainer.max_steps", "2"])
    assert code == 2 and "data.packing=true does not work with data.streaming" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------- compile, resume
@pytest.mark.slow  # torch.compile
def test_a_compiled_step_compiles_once_over_batches_with_different_document_counts(tiny_model_config):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    module = tiny_module(tiny_model_config, dropout=0.0)
    counter = CompileCounter()
    module._compute_loss = torch.compile(module._loss_impl, dynamic=False, backend=counter)
    rng = np.random.default_rng(0)
    frames = []
    for n_docs in (1, 3, 6, 2):
        cuts = sorted(rng.choice(np.arange(1, 32), n_docs - 1, replace=False).tolist())
        positions = torch.cat([torch.arange(b - a) for a, b in zip([0, *cuts], [*cuts, 32], strict=True)])
        rows = [{"input_ids": torch.randint(1, 300, (32,)), "position_ids": positions} for _ in range(2)]
        batch = collate_packed(rows, eos_id=None, cu_length=2 * 6 + 1)
        loss, _ = module._loss(batch, training=True)
        loss.backward()
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames == [frames[0]] * 4, frames  # compiled for the first batch only


@pytest.mark.slow
def test_a_packed_run_resumes_mid_epoch_with_bit_identical_losses(tmp_path, text_files, tokenizer_dir,
                                                                   tiny_model_config):
    def fit(root: Path, ckpt_path: str | None = None) -> None:
        L.seed_everything(42)
        module = tiny_module(tiny_model_config, dropout=0.1, learning_rate=1e-2)
        dm = _datamodule(tmp_path, text_files, tokenizer_dir, batch_size=2)
        trainer = L.Trainer(accelerator="cpu", precision="32-true", max_steps=10, val_check_interval=4,
                            check_val_every_n_epoch=None, log_every_n_steps=1, enable_model_summary=False,
                            **lit_flash.trainer_kwargs(root, every_n_train_steps=4, enable_progress_bar=False))
        trainer.fit(module, dm, ckpt_path=ckpt_path)

    fit(tmp_path / "whole")
    checkpoint = next((tmp_path / "whole" / "checkpoints").glob("*step=4.ckpt"))
    fit(tmp_path / "resumed", str(checkpoint))
    for key in ("train_loss", "val_loss"):
        expected = {s: v for s, v in logged(tmp_path / "whole", key).items() if s >= 4}
        assert expected and logged(tmp_path / "resumed", key) == expected, key


@pytest.mark.parametrize(("attn", "boundaries"), [("flash_attention_2", True), ("flash_attention_3", True),
                                                  ("sdpa", False), ("eager", False)])
def test_each_flash_attention_gets_the_documents_boundaries(attn, boundaries):
    """Both FlashAttention versions run packed rows through their variable-length kernel: each needs the
    boundaries handed over (else transformers finds them from position_ids with a host sync in every layer)."""
    positions = torch.cat([torch.arange(3), torch.arange(5)])[None]
    kwargs = packed_attention_kwargs(positions, None, attn)
    assert kwargs["position_ids"] is positions and kwargs["use_cache"] is False
    assert ("cu_seq_lens_q" in kwargs) == boundaries
    if boundaries:
        assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 8] and kwargs["max_length_q"] == 8

