"""The task-family contract: what the build, the loops and the entry points may rely on in a dataset.

A task family is built from the ``dataset`` config node and hands out one episode sampler per
split. Adding a dataset is one module under ``maml_cli/data/`` that ends with
``register_dataset("<name>", <Schema>, <Class>, <inputs>)`` (:mod:`maml_cli.data.registry`), one
``conf/dataset/<name>.yaml``, and its tests; an image dataset builds on
:class:`maml_cli.data.store.StoreTasks` and needs only to list its classes and their images.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, Union, runtime_checkable

import torch

from maml_cli.tasks import CLASSIFICATION, REGRESSION, EpisodeSampler, TaskKind

SPLITS = ("train", "val", "test")


@runtime_checkable
class ImageShaped(Protocol):
    """What a network over a family's images is built for: square images of ``in_channels`` x ``image_size`` x
    ``image_size``, scored by ``kind``."""

    kind: TaskKind
    in_channels: int
    image_size: int


@runtime_checkable
class VectorShaped(Protocol):
    """What a network over a family's feature vectors is built for: ``in_features`` values, scored by ``kind``."""

    kind: TaskKind
    in_features: int


@dataclass(frozen=True)
class ImageInputs:
    """The images a dataset's networks are trained on, and how a file becomes one (what a trained model needs to
    see new images as it saw its training images, without the dataset): grayscale (1 channel) or RGB (3),
    resized to ``image_size``, inverted (``255 - pixels``) or not, then scaled to [0, 1]."""

    in_channels: int
    image_size: int
    invert: bool = False
    kind: TaskKind = CLASSIFICATION


@dataclass(frozen=True)
class VectorInputs:
    """The feature vectors a dataset's networks take (sinusoid's x)."""

    in_features: int
    kind: TaskKind = REGRESSION


Inputs = Union[ImageInputs, VectorInputs]


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

    def class_names(self) -> dict[str, list[str]]:
        """The classes of each split (``train``, ``val``, ``test``) by name, in the order its episodes draw on them (with
        what identifies their images where the split's lists choose them, as miniImageNet's CSVs do): what a resumed run
        checks against the split it trained on (:func:`class_split_record`); empty when it has none."""
        ...


@runtime_checkable
class ImageTaskFamily(_TaskFamilyCommon, ImageShaped, Protocol):
    """Few-shot classification of square images: ``in_channels`` x ``image_size`` x ``image_size``."""

    in_channels: int
    image_size: int


@runtime_checkable
class VectorTaskFamily(_TaskFamilyCommon, VectorShaped, Protocol):
    """Tasks over feature vectors of ``in_features`` values (sinusoid regression)."""

    in_features: int


TaskFamily = Union[ImageTaskFamily, VectorTaskFamily]


def class_split_record(tasks: TaskFamily) -> dict[str, dict[str, int | str]]:
    """Per split, how many classes and a SHA-256 of their names in order: kept in checkpoints, so that a resume finds
    out when the class lists it builds (a moved ``dataset.split_dir``, another data root) are not the run's."""
    return {split: {"classes": len(names), "sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()}
            for split, names in tasks.class_names().items()}


def class_split_changes(recorded: dict[str, dict[str, int | str]], current: dict[str, dict[str, int | str]]) -> list[str]:
    """How ``current`` differs from a checkpoint's :func:`class_split_record`, one phrase per split that differs."""
    changes = []
    for split in sorted(set(recorded) | set(current), key=SPLITS.index):
        before, now = recorded.get(split), current.get(split)
        if before == now:
            continue
        if before is None or now is None:
            changes.append(f"the {split} split {'is new' if before is None else 'is gone'}")
        elif before["classes"] != now["classes"]:
            changes.append(f"the {split} split has {now['classes']:,} classes where the run's had {before['classes']:,}")
        else:
            changes.append(f"the {split} split's {now['classes']:,} classes are other classes, in another order, or (lists that name images) other images")
    return changes
