"""The task-family contract: what the build, the loops and the entry points may rely on in a dataset.

A task family is built from the ``dataset`` config node and hands out one episode sampler per
split. Adding a dataset is one module under ``maml_cli/data/`` that ends with
``register_dataset("<name>", <Schema>, <Class>)`` (:mod:`maml_cli.data.registry`), one
``conf/dataset/<name>.yaml``, and its tests; an image dataset builds on
:class:`maml_cli.data.store.StoreTasks` and needs only to list its classes and their images.
"""
from __future__ import annotations

from typing import Protocol, Union, runtime_checkable

import torch

from maml_cli.tasks import EpisodeSampler, TaskKind

SPLITS = ("train", "val", "test")


class _TaskFamilyCommon(Protocol):
    """What every task family provides.

    Attributes:
        kind: what its tasks are scored by (classification: accuracy; regression: MSE).
        split_name: which class split it uses (``vinyals``, ``ravi``, ``random``, ...), for logs and results.
    """

    kind: TaskKind
    split_name: str

    def sampler(self, split: str, way: int, shot: int, query: int, device: torch.device | str = "cpu") -> EpisodeSampler:
        """An episode sampler over ``split`` (``train``, ``val`` or ``test``).

        Raises:
            EpisodeError: the split cannot supply ``way`` classes of ``shot + query`` images (or ``way`` is
                not 1 for a regression family), with the numbers in the message.
        """
        ...

    def describe(self) -> dict[str, int]:
        """Sizes of the splits for the run's log, e.g. ``{"train_classes": 64, ...}``; empty when it has none."""
        ...


@runtime_checkable
class ImageTaskFamily(_TaskFamilyCommon, Protocol):
    """Few-shot classification of square images: ``in_channels`` x ``image_size`` x ``image_size``."""

    in_channels: int
    image_size: int


@runtime_checkable
class VectorTaskFamily(_TaskFamilyCommon, Protocol):
    """Tasks over feature vectors of ``in_features`` values (sinusoid regression)."""

    in_features: int


TaskFamily = Union[ImageTaskFamily, VectorTaskFamily]
