"""Loss and perplexity curves from a run's CSV log: `python -m lit_flash plot runs/demo`, or `plot_metrics()`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lit_flash.errors import LitFlashError, not_a_file

DEFAULT_METRICS = ("train_loss", "val_ppl")


def _require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise LitFlashError("plotting needs matplotlib: pip install 'lit-flash[plot]'") from err
    return matplotlib


def metrics_csvs(path: str | Path) -> list[Path]:
    """`metrics.csv` itself, or every one under a run folder (`<root>/logs/version_N/metrics.csv`: one per start
    of the run, resumes included), oldest first."""
    path = Path(path)
    if path.is_file():
        return [path]
    found = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime) if path.is_dir() else []
    odd = [p for p in found if not p.is_file()]
    if odd:  # a folder named metrics.csv: open() raised IsADirectoryError
        raise LitFlashError(f"{odd[0]} is {not_a_file(odd[0])}: give a run folder or the metrics.csv file to plot")
    if not found:
        raise LitFlashError(f"{path}: no metrics.csv there (give a run folder, log folder or csv)")
    return found


def find_metrics_csv(path: str | Path) -> Path:
    """The newest `metrics.csv` of `metrics_csvs`."""
    return metrics_csvs(path)[-1]


def _read_csv(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    try:
        return _read_csv_rows(path)
    except (UnicodeDecodeError, ValueError, csv.Error) as err:  # not text, a cell not a number, a broken row
        reason = type(err).__name__ if isinstance(err, UnicodeDecodeError) else str(err).splitlines()[0][:120]
        raise LitFlashError(
            f"{path}: not a Lightning metrics.csv ({reason}): give a run folder or the metrics.csv its CSVLogger wrote"
        ) from None


def _read_csv_rows(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            for name, value in row.items():
                if name in ("step", "epoch") or value in (None, "") or step in (None, ""):
                    continue
                steps, values = series.setdefault(name, ([], []))
                steps.append(int(float(step)))
                values.append(float(value))
    return series


def read_metrics(path: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """Each metric of Lightning `CSVLogger` files as (steps, values), empty cells (other metrics) skipped. A run
    folder's logs are joined oldest first: a resumed run's log replaces the earlier one from its first step on."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for csv_path in metrics_csvs(path):
        for name, (steps, values) in _read_csv(csv_path).items():
            old_steps, old_values = series.get(name, ([], []))
            kept = [i for i, s in enumerate(old_steps) if s < steps[0]]
            series[name] = ([old_steps[i] for i in kept] + steps, [old_values[i] for i in kept] + values)
    return series


def plot_metrics(path: str | Path, metrics: tuple[str, ...] | list[str] = DEFAULT_METRICS) -> Any:
    """A matplotlib figure with one panel per metric against the training step."""
    _require_matplotlib()
    import matplotlib.pyplot as plt

    series = read_metrics(path)
    missing = [m for m in metrics if m not in series]
    if missing:
        raise LitFlashError(f"{find_metrics_csv(path)}: no {missing} logged yet (it has {sorted(series)})")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
    for ax, name in zip(axes[0], metrics, strict=True):
        steps, values = series[name]
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None)
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_main(path: str, output: str | None = None, metrics: list[str] | None = None) -> None:
    """Draw training loss and validation perplexity of a run into a PNG.

    Args:
        path: A run's `default_root_dir` (its logs joined across resumes), a log folder, or a `metrics.csv`.
        output: Image file to write (must not exist); default `plot.png` beside the csv, rewritten each time.
        metrics: Logged metrics to draw, default `[train_loss, val_ppl]`.
    """
    _require_matplotlib().use("Agg")  # files only: no display needed
    if metrics is not None and not metrics:  # [] drew the default metrics, unsaid
        raise LitFlashError("--metrics is empty: name the metrics to draw, e.g. '[train_loss, val_ppl]', or omit it")
    if output is not None:
        check_image_output(output)
    target = Path(output) if output is not None else find_metrics_csv(path).with_name("plot.png")
    if target.exists() and not target.is_file():  # savefig raised IsADirectoryError after drawing
        raise LitFlashError(f"{target} is {not_a_file(target)}: give --output a new image file")
    fig = plot_metrics(path, tuple(metrics or DEFAULT_METRICS))
    target.parent.mkdir(parents=True, exist_ok=True)  # as generate --output does
    fig.savefig(target, dpi=100)
    print(f"wrote {target}")


def check_image_output(output: str) -> None:
    """Before drawing: `--output` must be a new file in a format matplotlib writes (it raised a ValueError for
    `.txt`, after reading the logs)."""
    from matplotlib.figure import Figure

    if Path(output).exists():
        raise LitFlashError(f"--output {output} exists: choose another file or remove it yourself")
    formats = Figure().canvas.get_supported_filetypes()
    suffix = Path(output).suffix.lstrip(".").lower()
    if suffix not in formats:
        raise LitFlashError(
            f"--output {output}: {'.' + suffix if suffix else 'no'} image format; end the name with one of "
            + ", ".join("." + f for f in sorted(formats))
        )
