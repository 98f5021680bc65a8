"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): few-shot splits of CIFAR-100, 32x32 RGB.

Both read CIFAR-100's python-version files as torchvision downloads them, ``<root>/cifar-100-python/``
(``train``, ``test``, ``meta``; or the archive ``cifar-100-python.tar.gz`` beside it), and use all 600
images of each fine class (its 500 training and 100 test images). CIFAR-FS splits the 100 fine classes
64 / 16 / 20 (``dataset=cifar_fs``); FC100 splits the 20 superclasses 12 / 4 / 4 so that the 60 / 20 / 20
fine classes of the three splits are far apart (``dataset=fc100``). The class lists ship inside
maml-cli (``maml_cli/splits``). Both datasets share one decoded store.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maml_cli.algorithms.registry import at_least
from maml_cli.data.base import SPLITS
from maml_cli.data.files import load_pickle, safe_extract
from maml_cli.data.registry import register_dataset
from maml_cli.data.store import SplitListsConfig, PACKAGED_SPLITS, ClassListing, Pixels, StoreTasks, prepared_store, read_class_lists, rgb_inputs
from maml_cli.errors import DataError

FOLDER = "cifar-100-python"
ARCHIVE = "cifar-100-python.tar.gz"
FILES = ("train", "test", "meta")


def cifar100_superclasses() -> dict[str, list[str]]:
    """Superclass -> its five fine classes, from the packaged ``cifar100_labels.txt``."""
    members: dict[str, list[str]] = {}
    for line in (PACKAGED_SPLITS / "cifar100_labels.txt").read_text().splitlines():
        _, fine, coarse = line.split()
        members.setdefault(coarse, []).append(fine)
    return members


def _cifar_listing(folder: Path) -> ClassListing:
    meta = load_pickle(folder / "meta")
    names = list(meta["fine_label_names"])
    per_class: list[list[Pixels]] = [[] for _ in names]
    for part in ("train", "test"):
        data = load_pickle(folder / part)
        pixels = np.asarray(data["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for i, label in enumerate(data["fine_labels"]):
            per_class[label].append(Pixels(pixels[i], f"{folder / part}, image {i}"))
    return ClassListing(names, per_class)


def cifar100_store(root: str, image_size: int, store_dir: str | None, what: str):
    """The decoded store of CIFAR-100's 100 fine classes (600 images each), extracting the archive if needed."""
    base = Path(root).expanduser()
    folder = base / FOLDER
    missing = [folder / name for name in FILES if not (folder / name).is_file()]
    if missing and (base / ARCHIVE).is_file():
        safe_extract(base / ARCHIVE, base)
        missing = [folder / name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{what} needs CIFAR-100's python-version files, and {', '.join(str(m) for m in missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing (also looked for {base / ARCHIVE}). Put the files of "
            f"cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html (what torchvision.datasets.CIFAR100 "
            f"downloads) in {folder}/, or point data_root (or MAML_CLI_DATA) at the folder that holds cifar-100-python/. "
            f"maml-cli downloads nothing.")
    identity = [[name, os.stat(folder / name).st_size, os.stat(folder / name).st_mtime_ns] for name in FILES]
    parent = Path(store_dir).expanduser() if store_dir else folder
    return prepared_store(parent, "cifar100", identity, lambda: _cifar_listing(folder), image_size, 3, False, "CIFAR-100")


class CifarFSTasks(StoreTasks):
    """CIFAR-FS: CIFAR-100's fine classes split 64 / 16 / 20 (Bertinetto et al. 2019).

    Args:
        root: the data root holding ``cifar-100-python/``.
        image_size: side of the images (32, CIFAR's own).
        split_dir: other class lists (``train.txt`` ... of fine class names); default the packaged split.
        store_dir: where the decoded images are stored (default ``<root>/cifar-100-python/``).
        in_memory: copy the images to the device instead of reading the file per episode (same episodes).
    """

    def __init__(self, root: str, image_size: int = 32, split_dir: str | None = None, store_dir: str | None = None,
                 in_memory: bool = False) -> None:
        store = cifar100_store(root, image_size, store_dir, "CIFAR-FS")
        lists = read_class_lists(Path(split_dir).expanduser() if split_dir else PACKAGED_SPLITS / "cifar_fs", store.classes, "CIFAR-FS")
        super().__init__({split: (store, names) for split, names in lists.items()}, "cifar_fs", "bertinetto" if not split_dir else "lists",
                         image_size, 3, in_memory)


class FC100Tasks(StoreTasks):
    """FC100: CIFAR-100's superclasses split 12 / 4 / 4, the fine classes of each superclass going to its split
    (Oreshkin et al. 2018), so that test classes are far from training classes.

    Args: as :class:`CifarFSTasks`, with ``split_dir``'s lists naming superclasses.
    """

    def __init__(self, root: str, image_size: int = 32, split_dir: str | None = None, store_dir: str | None = None,
                 in_memory: bool = False) -> None:
        store = cifar100_store(root, image_size, store_dir, "FC100")
        members = cifar100_superclasses()
        superclasses = read_class_lists(Path(split_dir).expanduser() if split_dir else PACKAGED_SPLITS / "fc100", list(members), "FC100")
        lists = {split: [fine for coarse in superclasses[split] for fine in members[coarse]] for split in SPLITS}
        super().__init__({split: (store, names) for split, names in lists.items()}, "fc100", "oreshkin" if not split_dir else "lists",
                         image_size, 3, in_memory)


@dataclass
class CifarConfig(SplitListsConfig):
    _target_: str = "maml_cli.data.cifar.CifarFSTasks"
    image_size: int = at_least(8, 32)


@dataclass
class FC100Config(CifarConfig):
    _target_: str = "maml_cli.data.cifar.FC100Tasks"


register_dataset("cifar_fs", CifarConfig, CifarFSTasks, rgb_inputs)
register_dataset("fc100", FC100Config, FC100Tasks, rgb_inputs)
