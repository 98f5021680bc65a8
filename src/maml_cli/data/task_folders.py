"""Few-shot tasks given as files, for ``maml-eval episodes=<folder>``: one folder per task.

    <folder>/<task>/support/<class>/<images>     the labelled support set (a folder per class)
    <folder>/<task>/query/<class>/<images>       labelled queries: scored
    <folder>/<task>/query/<images>               unlabelled queries: predicted

``<folder>`` may also be a single task (it then holds ``support/`` and ``query/`` itself). Classes,
tasks and images are taken in name order, so the same folder always gives the same episodes.
Hidden files and folders (``.name``) are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from maml_cli.data.folder import image_suffixes
from maml_cli.errors import DataError

LAYOUT = ("<folder>/<task>/support/<class>/<images> with <folder>/<task>/query/<class>/<images> (labelled queries) "
          "or <folder>/<task>/query/<images> (unlabelled); or one task's support/ and query/ directly in <folder>")


@dataclass(frozen=True)
class TaskFiles:
    """One task's files.

    Attributes:
        name: the task's folder, relative to the folder given (``.`` for a single task).
        support: ``(image, class)`` pairs, by class then file name.
        query: ``(image, class)`` pairs, the class ``None`` for unlabelled queries.
    """

    name: str
    support: list[tuple[Path, str]]
    query: list[tuple[Path, Optional[str]]]

    @property
    def labelled(self) -> bool:
        return all(label is not None for _, label in self.query)


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    suffixes = image_suffixes()
    return [p for p in _visible(folder) if p.is_file() and p.suffix.lower() in suffixes]


def read_task(folder: Path, name: str) -> TaskFiles:
    """The task in ``folder`` (its ``support/`` and ``query/``).

    Raises:
        DataError: a part is missing or empty, the queries mix class folders and loose images, or a query class
            has no support images; each message names the folder.
    """
    support_dir, query_dir = folder / "support", folder / "query"
    for part in (support_dir, query_dir):
        if not part.is_dir():
            raise DataError(f"task {folder} has no {part.name}/ folder. A task folder holds support/<class>/<images> and "
                            f"query/<class>/<images> or query/<images>.")
    support_classes = [cls for cls in _visible(support_dir) if cls.is_dir()]
    empty = [cls.name for cls in support_classes if not _images(cls)]
    if empty:
        raise DataError(f"{support_dir} has class folders without images ({', '.join(empty)}): every support class needs at least one image.")
    support = [(image, cls.name) for cls in support_classes for image in _images(cls)]
    if not support:
        raise DataError(f"{support_dir} holds no class folders with images: a support set is support/<class>/<images>.")
    classes = {label for _, label in support}
    loose = _images(query_dir)
    class_dirs = [cls for cls in _visible(query_dir) if cls.is_dir()]
    if loose and class_dirs:
        raise DataError(f"{query_dir} holds both images and class folders ({class_dirs[0].name}/): give either labelled queries "
                        f"(query/<class>/<images>) or unlabelled ones (query/<images>), not both.")
    query: list[tuple[Path, Optional[str]]] = [(image, None) for image in loose]
    for cls in class_dirs:
        if cls.name not in classes:
            raise DataError(f"query class {cls} has no support images: the support classes of this task are "
                            f"{', '.join(sorted(classes))}.")
        query += [(image, cls.name) for image in _images(cls)]
    if not query:
        raise DataError(f"{query_dir} holds no images.")
    return TaskFiles(name, support, query)


def read_task_folders(folder: Path) -> list[TaskFiles]:
    """The tasks under ``folder``: its task folders in name order, or ``folder`` itself when it is one task.

    Raises:
        DataError: ``folder`` is missing or holds no task folder (see :data:`LAYOUT`), or a task is malformed.
    """
    if not folder.is_dir():
        raise DataError(f"episodes={folder} is not a folder. It holds {LAYOUT}.")
    if (folder / "support").is_dir():
        return [read_task(folder, ".")]
    tasks = [read_task(child, child.name) for child in _visible(folder) if child.is_dir()]
    if not tasks:
        raise DataError(f"episodes={folder} holds no task folders. It holds {LAYOUT}.")
    return tasks
