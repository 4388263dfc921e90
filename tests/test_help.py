"""`fit --help` and `validate --help`: whole section titles, lit_flash's meaning of `--ckpt_path` and
`--weights_only`."""

from __future__ import annotations

import re

import pytest

from lit_flash.parsing import GROUP_TITLES, RESUME_TITLE

# Trainer.validate's own title, over `--verbose`: a whole sentence in Lightning's docstring.
VALIDATE_TITLE = "Perform one evaluation epoch over the validation set"


@pytest.mark.parametrize(("subcommand", "method_titles"), [("fit", set()), ("validate", {VALIDATE_TITLE})])
def test_help_sections_and_resume_options(subcommand: str, method_titles: set[str], run_cli) -> None:
    code, out, _ = run_cli([subcommand, "--help"])
    assert code == 0
    # Section titles are the lines that start at column 0 and end with ':' (argparse's layout).
    titles = [line[:-1] for line in out.splitlines() if re.match(r"^\S.*:$", line) and not line.startswith("usage")]
    assert set(titles) == {"options", "Linked arguments", RESUME_TITLE, *GROUP_TITLES.values(), *method_titles}
    resume = out.split(f"\n{RESUME_TITLE}:\n", 1)[1]
    ckpt_path = " ".join(resume.split("--weights_only")[0].split())
    assert "`auto`: the intact checkpoint with the highest step" in ckpt_path and "`last`:" in ckpt_path
    weights_only = " ".join(resume.split("--weights_only", 1)[1].split())
    assert "Unset (null) or true" in weights_only and "Defaults to ``None``" not in weights_only


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
def test_help_opens_with_a_short_usage_as_typed_and_says_where_ckpt_path_is(subcommand: str, run_cli) -> None:
    code, out, _ = run_cli([subcommand, "--help"])
    assert code == 0
    head = out.splitlines()[:6]
    assert head[0].startswith(f"usage: python -m lit_flash {subcommand} [--config FILE")  # one line, not ~100
    assert not head[1].strip()
    assert RESUME_TITLE in " ".join(head[2:])  # the description points to where --ckpt_path is explained


@pytest.mark.parametrize("subcommand", ["prepare", "generate", "plot"])
def test_tool_help_names_the_program_as_typed(subcommand: str, run_cli) -> None:
    code, out, _ = run_cli([subcommand, "--help"])
    assert code == 0
    assert out.startswith(f"usage: python -m lit_flash {subcommand} ")  # not `__main__.py`


def test_lit_flash_sections_come_before_the_trainers_hundred_options(run_cli) -> None:
    code, out, _ = run_cli(["fit", "--help"])
    assert code == 0
    lines = [line.strip() for line in out.splitlines()]

    def line_of(flag: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(f"{flag} "))

    flags = ["--model.learning_rate", "--data.batch_size", "--checkpoint.every_n_train_steps",
             "--export.dirname", "--throughput.window_size", "--trainer.accelerator"]
    assert [line_of(flag) for flag in flags] == sorted(line_of(flag) for flag in flags)
