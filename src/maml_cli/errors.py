"""Errors a user can fix, reported as one paragraph without a traceback."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class UserError(Exception):
    """Something about the command, the config or the files on disk is wrong.

    The message says what was wrong and how to fix it; the command-line entry
    points print it and exit with status 2 instead of showing a traceback.
    """


class DataError(UserError):
    """A dataset is missing, incomplete or corrupt."""


class EpisodeError(UserError, ValueError):
    """A way/shot/query that a split cannot supply."""


@contextmanager
def out_of_memory_explained(batch_tasks_key: str) -> Iterator[None]:
    """A GPU's out-of-memory error inside, as a :class:`UserError` that says what holds memory and what to change
    (``batch_tasks_key``: how the command sets ``algo.batch_tasks``)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else "out of memory"
        raise UserError(f"the GPU ran out of memory ({first_line}). With algo.batch_tasks (on by default on CUDA for MAML, "
                        f"ANIL and Meta-SGD) every task of a meta-batch, and of an evaluation stack of meta_batch_size "
                        f"episodes, is held at once: {batch_tasks_key}=false computes one task at a time; a smaller "
                        f"meta_batch_size, model or image size also needs less.") from err
