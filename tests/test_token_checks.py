"""Token values are checked before training: negative ids, labels out of range (other than -100), no label to
predict, an empty split. Each is one error naming the data folder and split, not an IndexError mid-training (or a
device-side assert that kills the process on a GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from _helpers import VOCAB, save_blocks, snapshot, tiny_run_config, token_rows, write_config
from hypothesis import event, given, settings
from hypothesis import strategies as st

from lit_flash.blocks import IGNORE_INDEX, check_token_columns, load_tokenized, max_token_id
from lit_flash.errors import LitFlashError, NonFiniteLossError
from lit_flash.module import FlashGPT2LM

FLAG = "data.tokenized_dataset_load_dir"


def _save(path: Path, train_ids: list[list[int]], train_labels: list[list[int]] | None = None,
          mask: list[list[int]] | None = None, chunks: int = 1) -> Path:
    """A DatasetDict whose train split has these ids (and labels / attention_mask); `chunks` Arrow chunks."""
    import datasets

    def dataset(ids: list[list[int]], labels: list[list[int]] | None, mask: list[list[int]] | None) -> Any:
        data: dict[str, Any] = {"input_ids": ids}
        if labels is not None:
            data["labels"] = labels
        if mask is not None:
            data["attention_mask"] = mask
        return datasets.Dataset.from_dict(data)

    size = -(-len(train_ids) // chunks)
    parts = [
        dataset(train_ids[i : i + size], train_labels and train_labels[i : i + size], mask and mask[i : i + size])
        for i in range(0, len(train_ids), size)
    ]
    train = datasets.concatenate_datasets(parts)
    assert train.data.table.column("input_ids").num_chunks == chunks
    datasets.DatasetDict({"train": train, "test": dataset(token_rows(4, 1), None, None)}).save_to_disk(str(path))
    return path


def _with(rows: list[list[int]], row: int, position: int, value: int) -> list[list[int]]:
    rows = [list(r) for r in rows]
    rows[row][position] = value
    return rows


ROWS = token_rows(8, 0)
IGNORED = [[IGNORE_INDEX] * len(r) for r in ROWS]


@pytest.mark.parametrize(
    ("ids", "labels", "mask", "expected"),
    [
        (_with(ROWS, 6, 5, -3), None, None, "input_ids holds the negative token id -3"),
        (ROWS, _with(ROWS, 7, 9, -5), None, "labels holds -5"),
        (ROWS, _with(IGNORED, 7, 9, -1), None, "labels holds -1"),
        (ROWS, IGNORED, None, "no token to predict: every label"),
        (ROWS, [[r[0]] + [IGNORE_INDEX] * (len(r) - 1) for r in ROWS], None, "no token to predict"),
        (ROWS, None, [[0] * len(r) for r in ROWS], "no token to predict: attention_mask is 0"),
        (ROWS, None, _with([[1] * len(r) for r in ROWS], 7, 3, 2), "attention_mask holds 2: a mask is 1"),
        (ROWS, None, _with([[1] * len(r) for r in ROWS], 5, 0, -1), "attention_mask holds -1: a mask is 1"),
    ],
    ids=["negative input id", "negative label", "negative label among -100",
         "all labels -100", "only first positions labelled", "all padding", "mask of 2", "mask of -1"],
)
@pytest.mark.parametrize("chunks", [1, 2])
def test_bad_token_values_are_one_error_naming_the_split(
    tmp_path: Path, ids: list, labels: list | None, mask: list | None, expected: str, chunks: int
) -> None:
    path = _save(tmp_path / "blocks", ids, labels, mask, chunks)
    with pytest.raises(LitFlashError, match=rf"{FLAG}=.*blocks split 'train': {expected}"):
        load_tokenized(path)


def test_ignored_labels_and_large_labels_are_not_refused_here(tmp_path: Path) -> None:
    labels = _with(_with(ROWS, 0, 0, IGNORE_INDEX), 3, 4, VOCAB + 7)  # -100 is fine; the size is the model's check
    dataset = load_tokenized(_save(tmp_path / "blocks", ROWS, labels, chunks=2))
    # A label past the vocabulary counts as a token id: the model's check (check_data_fits_model) refuses it.
    assert max_token_id(dataset["train"]) == VOCAB + 7


def test_an_empty_split_is_called_empty(tmp_path: Path) -> None:
    path = save_blocks(tmp_path / "data", {"train": [], "test": token_rows(4, 1)})
    with pytest.raises(LitFlashError, match=rf"{FLAG}=.*data split 'train': the split is empty \(0 rows\)"):
        load_tokenized(path)


# --------------------------------------------------------------------------------------------- through the CLI


def _label_past_vocab(tmp: Path) -> Path:
    return _save(tmp / "user_data", ROWS, _with(ROWS, 2, 3, VOCAB + 1))


CLI_CASES = [
    ("negative input id", lambda tmp: _save(tmp / "user_data", _with(ROWS, 1, 1, -7)), "negative token id -7"),
    ("negative label", lambda tmp: _save(tmp / "user_data", ROWS, _with(ROWS, 1, 1, -2)), "labels holds -2"),
    ("label past the vocabulary", _label_past_vocab, f"token id {VOCAB + 1} but the model's vocabulary has {VOCAB}"),
    ("all labels -100", lambda tmp: _save(tmp / "user_data", ROWS, IGNORED), "no token to predict"),
    ("empty train split", lambda tmp: save_blocks(tmp / "user_data", {"train": [], "test": ROWS}), "split is empty"),
    ("one-token rows", lambda tmp: _save(tmp / "user_data", [[5]] * 8), "rows are 1 token long"),
]


@pytest.mark.parametrize(("build", "expected"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_bad_token_values_before_training(build, expected: str, tmp_path: Path, run_cli) -> None:
    data = build(tmp_path)
    config = write_config(tmp_path / "config.yaml", tiny_run_config(tmp_path / "run", data, trainer={"max_steps": 2}))
    before = snapshot(tmp_path)
    code, _, err = run_cli(["fit", "--config", str(config)])
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert expected in errors[0]
    if "vocabulary" in expected:  # the model's size check names the column, split and folder holding the id
        assert f"labels of the 'train' rows in {data}" in errors[0]
    else:  # the data checks name the folder by its flag
        assert f"{FLAG}={data}" in errors[0]
    assert {name: snapshot(tmp_path).get(name) for name in before} == before
    assert not list((tmp_path / "run").rglob("*.ckpt"))


# ----------------------------------------------------------------- a batch with nothing to predict, mid-training


def test_a_batch_with_no_label_to_predict_says_so(tmp_path: Path) -> None:
    """The data as a whole has labels, but one batch has none: its loss is 0/0, not a learning-rate problem."""
    model = FlashGPT2LM(model_name_or_path=None, attn_implementation="sdpa",
                        model_config={"vocab_size": VOCAB, "n_positions": 32, "n_embd": 32, "n_layer": 1, "n_head": 2})
    model.trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    ids = torch.tensor(ROWS[:2])
    with pytest.raises(NonFiniteLossError, match=r"the batch has no token to predict \(every label is -100\)"):
        model.training_step({"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX)}, 0)



# ------------------------------------------------------------------------------- generated cases, against an oracle


def _expected_error(ids: list[list[int]], labels: list[list[int]]) -> str | None:
    """What the checks must say, computed the plain Python way."""
    if any(v < 0 for row in ids for v in row):
        return "negative token id"
    if any(v < 0 and v != IGNORE_INDEX for row in labels for v in row[1:]):
        return "labels holds"
    if all(v == IGNORE_INDEX for row in labels for v in row[1:]):
        return "no token to predict"
    return None


@st.composite
def _token_split(draw: Any) -> tuple[list[list[int]], list[list[int]], int]:
    rows, length = draw(st.integers(1, 5)), draw(st.integers(2, 6))
    token = st.one_of(st.integers(0, VOCAB + 2), st.integers(-2, 3))  # small and negative ids often
    label = st.one_of(st.just(IGNORE_INDEX), st.integers(0, VOCAB + 2), st.integers(-3, 3))
    ids = [[draw(token) for _ in range(length)] for _ in range(rows)]
    labels = [[draw(label) for _ in range(length)] for _ in range(rows)]
    return ids, labels, draw(st.integers(1, rows))


@settings(max_examples=60, deadline=None)
@given(_token_split())
def test_generated_token_values_are_refused_exactly_when_they_must_be(case: tuple) -> None:
    import datasets

    ids, labels, chunks = case
    size = -(-len(ids) // chunks)
    parts = [datasets.Dataset.from_dict({"input_ids": ids[i : i + size], "labels": labels[i : i + size]})
             for i in range(0, len(ids), size)]
    ds = datasets.concatenate_datasets(parts)
    expected = _expected_error(ids, labels)
    event(f"expected: {expected}")
    if expected is None:
        assert check_token_columns(ds, "where") == len(ids[0])
        assert max_token_id(ds) == max(v for rows in (ids, labels) for row in rows for v in row)
    else:
        with pytest.raises(LitFlashError, match=rf"^where: .*{expected}"):
            check_token_columns(ds, "where")
