"""Checkpoints: plain tensors, numbers and strings, written atomically, loaded safely."""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from maml_cli.errors import UserError

FORMAT = "maml-cli-checkpoint"
VERSION = 1


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` so that a crash at any moment leaves the old or the new file, never half of one.

    The bytes go to a temporary file in the same directory, are fsync'ed, and the
    file is renamed over ``path``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": FORMAT, "version": VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Uses ``torch.load(weights_only=True)``, so a file cannot run code when loaded.

    Raises:
        UserError: the file is missing, truncated, not a maml-cli checkpoint, or
            holds objects other than tensors, numbers, strings and containers.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist.")
    unreadable = f"checkpoint {path} cannot be read; it may be truncated or not a checkpoint"
    if not zipfile.is_zipfile(path):  # every file torch.save writes is a zip archive
        raise UserError(f"{unreadable} (not a zip archive).")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _first_line(err)
        if "Unsupported global" in str(err) or "not an allowed global" in str(err):
            raise UserError(f"checkpoint {path} was refused: it holds objects other than tensors, numbers and strings "
                            f"(only such files are loaded, so a file cannot run code). Detail: {detail}") from err
        raise UserError(f"{unreadable} ({detail}).") from err
    except Exception as err:  # a damaged archive surfaces as many exception types
        raise UserError(f"{unreadable} ({_first_line(err)}).") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a maml-cli checkpoint.")
    if state.get("version") != VERSION:
        raise UserError(f"checkpoint {path} has format version {state.get('version')}; this maml-cli reads version {VERSION}.")
    return state
