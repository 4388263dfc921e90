"""Where a Hugging Face export may go, and writing it so that a failure never leaves half a model behind.

The rule: an export target may be written when it does not exist, is an empty folder, or is an export lit_flash
wrote for the same run (it holds `MARKER`, naming that run's folder, or it lies inside this run's folder) and
holding only the files that export wrote (listed in `MARKER`: a new export replaces the whole folder). Anything
else (a file, a folder holding someone's model or notes, another run's export) is refused, before training when
the `HFExport` callback is set up, and again just before writing.

The export is written into a temporary sibling folder, then moved onto the target with one rename; a previous
export of the run is renamed aside first and deleted only once the new one is in place. On any failure the
temporary folder is removed and the previous export put back.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lit_flash.errors import LitFlashError, check_can_create

MARKER = "lit_flash_export.json"  # written into every export: says which run may replace it
_TMP_TAG = ".lit_flash-tmp-"  # temporary siblings: `.<name>.lit_flash-tmp-<pid>-<random>[.old]`


def _inside(path: Path, folder: str | os.PathLike) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def _marker(path: Path) -> dict | None:
    """The marker of an earlier lit_flash export at `path`; None when there is none (or it is unreadable)."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "run_dir" in marker else None


def _run_id(run_dir: str | os.PathLike | None) -> str | None:
    return os.path.realpath(run_dir) if run_dir is not None else None


def check_export_target(path: Path, run_dir: str | os.PathLike | None, flag: str) -> None:
    """Refuse a target this run must not write (see the module's rule), or whose parent cannot be written.

    `run_dir`: the run's `default_root_dir`; None for an export outside a run (`export_hf` called directly), which
    may replace only an earlier such export. `flag`: how the message names the setting, e.g. `export.dirname=model`.
    """
    path = Path(os.path.abspath(path))  # `x/..` resolved as the rename will: `x` need not exist yet
    fix = f"choose another {flag.split('=')[0]} (null: no export), or move {path} away yourself"
    if run_dir is not None:
        root = Path(os.path.abspath(run_dir))
        reserved = {root: "the run folder itself", root / "checkpoints": "its checkpoints folder",
                    root / "logs": "its logs folder"}
        if path in reserved or root / "checkpoints" in path.parents or root / "logs" in path.parents:
            what = reserved.get(path, "inside the run's checkpoints or logs")
            raise LitFlashError(f"{flag}: {path} is {what}: choose another {flag.split('=')[0]} (e.g. model)")
    if path.is_symlink():  # renaming a folder onto a link fails; following it would replace the link's target
        raise LitFlashError(f"{flag}: {path} is a symbolic link: {fix}")
    if path.exists() and not path.is_dir():
        raise LitFlashError(f"{flag}: {path} exists and is a file, not a folder: {fix}")
    if path.is_dir() and any(path.iterdir()):
        marker = _marker(path)
        if marker is None:
            raise LitFlashError(f"{flag}: {path} already holds files lit_flash did not export (no {MARKER}): {fix}")
        ours = marker["run_dir"] == _run_id(run_dir) or (run_dir is not None and _inside(path, run_dir))
        if not ours:
            raise LitFlashError(f"{flag}: {path} holds the export of another run ({marker['run_dir']}): {fix}")
        added = foreign_files(path, marker)
        if added:  # replacing the export replaces the whole folder: what the user put there would be lost
            raise LitFlashError(
                f"{flag}: {path / added[0]} was not written by the export ({len(added)} such file(s)), and a new "
                f"export replaces the whole folder: move it out of {path}, or choose another {flag.split('=')[0]}"
            )
    _check_writable(path.parent, flag)


# What save_pretrained and a tokenizer's save_pretrained write: an export recorded before the marker listed its
# files ("files") is judged by these names.
_EXPORT_NAMES = (
    "config.json", "generation_config.json", "adapter_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", MARKER,
)


def _listing(folder: Path) -> list[str]:
    """The files under `folder`, as sorted relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def foreign_files(path: Path, marker: dict) -> list[str]:
    """Files in this run's export folder `path` the export did not write (the user's notes, a tokenizer copied in),
    by the marker's list of the files written; by the names exports write, for a marker without one."""
    written = marker.get("files")
    if isinstance(written, list):
        return [f for f in _listing(path) if f not in written and f != MARKER]
    return [f for f in _listing(path) if not any(fnmatch.fnmatch(f, name) for name in _EXPORT_NAMES)]


def exported_step(path: Path) -> int | None:
    """The global step an export at `path` was written at (None: unknown, or no export there)."""
    marker = _marker(Path(path))
    step = marker.get("global_step") if marker else None
    return step if isinstance(step, int) else None


def record_exported_step(path: Path, step: int) -> None:
    """Add the global step to the marker of the export just written at `path` (replaced in one rename): a fit
    resumed with nothing left to train then keeps that export instead of writing it again."""
    marker = _marker(Path(path))
    if marker is None:
        return
    tmp = Path(path) / f".{MARKER}.partial"
    tmp.write_text(json.dumps({**marker, "global_step": int(step)}) + "\n", encoding="utf-8")
    os.replace(tmp, Path(path) / MARKER)


def _check_writable(folder: Path, flag: str) -> None:
    """`folder` writable, or creatable in its nearest existing parent."""
    check_can_create(folder, flag)


def write_export(
    path: str | os.PathLike, write: Callable[[Path], None], run_dir: str | os.PathLike | None, flag: str
) -> Path:
    """Call `write(folder)` on a fresh temporary folder beside `path`, then move it onto `path` in one rename.

    A disk full or a folder turned read-only is one `LitFlashError` naming `flag`; other errors propagate. Either
    way the temporary folder is gone and an earlier export at `path` is as it was.
    """
    path = Path(os.path.abspath(path))  # the same `..`-free path check_export_target judged
    check_export_target(path, run_dir, flag)  # again: training took a while, someone may have written there since
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{_TMP_TAG}{os.getpid()}-", dir=path.parent))
    except OSError as err:
        raise _write_error(flag, path, err) from err
    aside = tmp.with_name(tmp.name + ".old")
    try:
        write(tmp)
        weights = [p for p in tmp.iterdir() if p.suffix == ".safetensors"]
        configs = ("config.json", "adapter_config.json")  # a model, or a LoRA adapter alone (lit_flash.lora)
        if not any((tmp / name).is_file() for name in configs) or not weights:
            raise LitFlashError(
                f"{flag}: the model was saved without config.json or weights (transformers logged why above); "
                "nothing was exported"
            )
        marker = {"run_dir": _run_id(run_dir), "written_by": "lit_flash", "files": _listing(tmp)}
        (tmp / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        if path.exists():  # an earlier export of this run (checked above): aside now, deleted once replaced
            os.replace(path, aside)
        os.replace(tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.exists() and not path.exists():
            os.replace(aside, path)  # the rename in failed: the earlier export goes back where it was
        if _is_io_error(err):
            raise _write_error(flag, path, err) from err
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return path

def export_causal_lm(
    model: Any,
    vocab_size: int,
    path: str | Path,
    tokenizer: Any = None,
    state_dict: dict | None = None,
    run_dir: str | Path | None = None,
    flag: str | None = None,
) -> Path:
    """Save a transformers causal LM (safetensors), its vocabulary sliced back to `vocab_size`, and `tokenizer`,
    by `write_export`'s rule; `FlashGPT2LM.export_hf` says what the arguments mean."""
    import copy

    from transformers import AutoModelForCausalLM

    path = Path(path)
    if state_dict is not None:
        config = model.config
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        model.load_state_dict(state_dict)
    if model.config.vocab_size != vocab_size:  # slice the padding back off
        model = copy.deepcopy(model).cpu()
        model.resize_token_embeddings(vocab_size)

    def write(folder: Path) -> None:
        model.save_pretrained(str(folder), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))

    return write_export(path, write, run_dir, flag or f"path={path}")


def _write_error(flag: str, path: Path, err: BaseException) -> LitFlashError:
    return LitFlashError(
        f"{flag}: writing the export to {path} failed ({_reason(err)}); nothing was exported and an earlier export "
        "there is unchanged. Free space or choose a writable folder, then rerun the same command with "
        "--ckpt_path last to export the trained weights"
    )


def _is_io_error(err: BaseException) -> bool:
    # safetensors reports a full disk as its own SafetensorError ("I/O error: No space left on device (os error 28)").
    return isinstance(err, OSError) or (type(err).__name__ == "SafetensorError" and "os error" in str(err))


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary folders left beside `path` by an export that was killed (its process is gone)."""
    for stale in path.parent.glob(f".{path.name}{_TMP_TAG}*"):
        pid = stale.name[len(f".{path.name}{_TMP_TAG}") :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier export in this process: not in use any more
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, but another user's
    return True
