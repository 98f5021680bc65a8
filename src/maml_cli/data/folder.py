"""Any folder of images as a few-shot dataset: ``<root>/<class>/<image>`` (``dataset=folder``).

Every file Pillow can open (PNG, JPEG, BMP, GIF, TIFF, WebP, ...) of any size is resized to
``image_size``. Classes may hold different numbers of images. The class split comes from
``train.txt``, ``val.txt`` and ``test.txt`` in ``split_dir`` (one class folder a line), or is drawn
with ``split_seed`` in the given sizes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import MISSING
from PIL import Image

from maml_cli.algorithms.registry import at_least
from maml_cli.data.base import SPLITS
from maml_cli.data.base import ImageInputs
from maml_cli.data.registry import register_dataset
from maml_cli.data.store import ClassListing, StoreTasks, prepared_store, read_class_lists
from maml_cli.errors import DataError

# The split of miniImageNet and CIFAR-FS (64 / 16 / 20 of 100 classes), for a folder given no sizes.
DEFAULT_FRACTIONS = {"val": 0.16, "test": 0.20}


def image_suffixes() -> set[str]:
    """File endings of the image formats this Pillow can open."""
    return {suffix for suffix, name in Image.registered_extensions().items() if name in Image.OPEN}


def list_class_folders(root: Path, class_depth: int = 1) -> ClassListing:
    """The classes under ``root``: the folders ``class_depth`` levels down (named by their path under ``root``,
    ``Alphabet/character01`` at depth 2), each with its image files, sorted. Hidden files and folders are skipped.

    Raises:
        DataError: ``root`` is missing or holds no class folder with images.
    """
    if not root.is_dir():
        raise DataError(f"dataset.root={root} is not a folder. dataset=folder reads <root>/<class>/<image> "
                        f"(one folder of images per class).")
    suffixes = image_suffixes()
    folders = [root]
    for _ in range(class_depth):
        folders = sorted(child for folder in folders for child in folder.iterdir() if child.is_dir() and not child.name.startswith("."))
    names, sources = [], []
    for folder in folders:
        images = sorted(f for f in folder.iterdir() if f.suffix.lower() in suffixes and not f.name.startswith(".") and f.is_file())
        if images:
            names.append(folder.relative_to(root).as_posix())
            sources.append(images)
    if not names:
        raise DataError(f"no class folders with images {class_depth} level(s) under {root}: dataset=folder reads "
                        f"<root>/<class>/<image>{' (with dataset.class_depth folders per class name)' if class_depth > 1 else ''}, "
                        f"images in the formats Pillow reads ({', '.join(sorted(s for s in suffixes if s in ('.png', '.jpg', '.jpeg', '.bmp', '.webp')))}, ...).")
    return ClassListing(names, sources)


def seeded_split(names: list[str], sizes: dict[str, Optional[int]], seed: int, what: str) -> dict[str, list[str]]:
    """A random class split of ``names`` with the given sizes (None: 16% validation, 20% test, the rest training)."""
    n = len(names)
    counts = {split: sizes[split] if sizes[split] is not None else round(DEFAULT_FRACTIONS[split] * n) for split in ("val", "test")}
    counts["train"] = sizes["train"] if sizes["train"] is not None else n - counts["val"] - counts["test"]
    if sum(counts.values()) > n or min(counts.values()) < 1:
        raise DataError(f"{what}: a split of {counts['train']} / {counts['val']} / {counts['test']} classes (train / val / test) "
                        f"does not fit the {n} classes found; set dataset.train_classes, val_classes and test_classes "
                        f"(at least 1 each, {n} in all at most).")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    chosen, start = {}, 0
    for split in SPLITS:
        chosen[split] = sorted(names[i] for i in order[start:start + counts[split]])
        start += counts[split]
    return chosen


class FolderTasks(StoreTasks):
    """N-way K-shot classification over a folder of class folders.

    Args:
        root: the folder holding one folder of images per class.
        image_size: side of the square the images are resized to.
        channels: 1 (grayscale) or 3 (RGB).
        invert: store ``255 - pixels`` (dark strokes on white paper become bright on black, as for Omniglot).
        class_depth: folder levels that make a class name (2 for ``<alphabet>/<character>/<image>``).
        split_dir: a folder with ``train.txt``, ``val.txt``, ``test.txt`` (one class a line); if None, a random
            split with ``split_seed`` and the sizes ``train_classes`` / ``val_classes`` / ``test_classes``.
        store_dir: where the decoded images are stored (default ``<root>/.maml-cli-store``).
        in_memory: copy the images to the device instead of reading the file per episode (same episodes).
    """

    def __init__(self, root: str, image_size: int = 84, channels: int = 3, invert: bool = False, class_depth: int = 1,
                 split_dir: str | None = None, train_classes: int | None = None, val_classes: int | None = None,
                 test_classes: int | None = None, split_seed: int = 0, store_dir: str | None = None, in_memory: bool = False) -> None:
        if channels not in (1, 3):
            raise DataError(f"dataset.channels={channels}: images are read as grayscale (1) or RGB (3).")
        folder = Path(root).expanduser()
        listing = list_class_folders(folder, class_depth)
        what = f"the image folder {folder}"
        identity = [str(folder), class_depth] + [[name, [(p.name, os.stat(p).st_size) for p in files]] for name, files in zip(listing.names, listing.sources)]
        store = prepared_store(Path(store_dir).expanduser() if store_dir else folder / ".maml-cli-store", "folder", identity,
                               lambda: listing, image_size, channels, invert, what)
        if split_dir:
            lists, split_name = read_class_lists(Path(split_dir).expanduser(), listing.names, what), "lists"
        else:
            sizes = {"train": train_classes, "val": val_classes, "test": test_classes}
            lists, split_name = seeded_split(listing.names, sizes, split_seed, what), "random"
        super().__init__({split: (store, names) for split, names in lists.items()}, "folder", split_name, image_size, channels, in_memory)


@dataclass
class FolderConfig:
    _target_: str = "maml_cli.data.folder.FolderTasks"
    root: str = MISSING
    image_size: int = at_least(8, 84)
    channels: int = 3
    invert: bool = False
    class_depth: int = at_least(1, 1)
    split_dir: Optional[str] = None
    train_classes: Optional[int] = None
    val_classes: Optional[int] = None
    test_classes: Optional[int] = None
    split_seed: int = 0
    store_dir: Optional[str] = None
    in_memory: bool = False


register_dataset("folder", FolderConfig, FolderTasks,
                 lambda node: ImageInputs(node.channels, node.image_size, node.invert))
