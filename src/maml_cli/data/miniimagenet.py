"""miniImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle (2017): 64 / 16 / 20 classes
of 600 images, 84x84 RGB (``dataset=miniimagenet``).

Read from ``<root>/miniimagenet/`` in either of the two forms it is shared in:

- ``images/<filename>`` (or an ``images.zip`` / ``images.tar`` holding that folder) with the split's
  ``train.csv``, ``val.csv``, ``test.csv`` (``filename,label``). The three CSVs ship inside maml-cli
  (``maml_cli/splits/miniimagenet``, gzipped, MIT licence); ``dataset.split_dir`` points at others.
- the pickle caches ``mini-imagenet-cache-{train,val,test}.pkl`` (``validation`` for ``val`` also read):
  ``{"image_data": (n, 84, 84, 3) uint8, "class_dict": {class: [rows]}}``, the format learn2learn reads.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maml_cli.data.base import SPLITS
from maml_cli.data.files import TAR_SUFFIXES, load_pickle, safe_extract
from maml_cli.data.registry import register_dataset
from maml_cli.data.store import SplitListsConfig, PACKAGED_SPLITS, ClassListing, Pixels, StoreTasks, prepared_store, rgb_inputs
from maml_cli.errors import DataError

FOLDER = "miniimagenet"
PICKLE_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
WHERE_PUBLISHED = (
    "The images are ImageNet 2012 training images listed in Ravi & Larochelle's CSV files "
    "(https://github.com/twitter-research/meta-learning-lstm/tree/master/data/miniImagenet); the pickle caches are "
    "the ones learn2learn documents (learn2learn.vision.datasets.MiniImagenet). maml-cli downloads nothing."
)


def files_digest(files: list[str]) -> str:
    """A short digest of a class's image files in order."""
    return hashlib.sha1("\n".join(files).encode()).hexdigest()[:16]


def read_split_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """Classes (in order of first appearance) and their image file names from a ``filename,label`` CSV."""
    if not path.is_file():
        raise DataError(f"miniImageNet: the split file {path} does not exist; dataset.split_dir must hold train.csv, val.csv and test.csv.")
    files: dict[str, list[str]] = {}
    with (gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")) as handle:
        for row_no, row in enumerate(csv.reader(handle), start=1):
            if row_no == 1 and row[:2] == ["filename", "label"]:
                continue
            if len(row) != 2:
                raise DataError(f"{path}, line {row_no}: expected 'filename,label', got {','.join(row)!r}.")
            files.setdefault(row[1], []).append(row[0])
    return list(files), list(files.values())


class MiniImageNetTasks(StoreTasks):
    """miniImageNet few-shot classification.

    Args:
        root: the data root; files in ``<root>/miniimagenet/``.
        image_size: side of the square images (84 in the papers).
        split_dir: a folder with other ``train.csv``/``val.csv``/``test.csv`` (default: the packaged Ravi split).
        store_dir: where the decoded images are stored (default ``<root>/miniimagenet/``).
        in_memory: copy the images to the device instead of reading the file per episode (same episodes).
    """

    def __init__(self, root: str, image_size: int = 84, split_dir: str | None = None, store_dir: str | None = None,
                 in_memory: bool = False) -> None:
        folder = Path(root).expanduser() / FOLDER
        parent = Path(store_dir).expanduser() if store_dir else folder
        pickles = {split: next((folder / f"mini-imagenet-cache-{n}.pkl" for n in names if (folder / f"mini-imagenet-cache-{n}.pkl").is_file()), None)
                   for split, names in PICKLE_NAMES.items()}
        splits = {}
        if all(pickles.values()):
            for split, path in pickles.items():
                store = prepared_store(parent, f"miniimagenet-{split}", [path.name, os.stat(path).st_size, os.stat(path).st_mtime_ns],
                                       lambda path=path: _pickle_listing(path), image_size, 3, False, f"miniImageNet ({path.name})")
                splits[split] = (store, store.classes)
            super().__init__(splits, "miniimagenet", "ravi (pickles)", image_size, 3, in_memory)
            return
        images = _images_folder(folder, pickles)
        recorded = {}
        for split in SPLITS:
            # The packaged CSVs are gzipped (a megabyte each otherwise); a split_dir holds plain ones.
            path = Path(split_dir).expanduser() / f"{split}.csv" if split_dir else PACKAGED_SPLITS / "miniimagenet" / f"{split}.csv.gz"
            names, files = read_split_csv(path)
            identity = [str(images), hashlib.sha1(path.read_bytes()).hexdigest()]
            store = prepared_store(parent, f"miniimagenet-{split}", identity,
                                   lambda names=names, files=files: ClassListing(names, [[images / f for f in fs] for fs in files]),
                                   image_size, 3, False, f"miniImageNet ({split}.csv over {images})")
            splits[split] = (store, names)
            # The CSVs choose each class's images, not only its name: a class is recorded with a digest of its files, so that
            # a resume on moved CSVs naming the same classes with other images is caught (maml_cli.data.base.class_split_record).
            recorded[split] = [f"{name} {files_digest(class_files)}" for name, class_files in zip(names, files)]
        super().__init__(splits, "miniimagenet", "ravi", image_size, 3, in_memory, recorded)


def _pickle_listing(path: Path) -> ClassListing:
    data = load_pickle(path)
    if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
        raise DataError(f"{path} is not a miniImageNet pickle cache: expected a dict with 'image_data' and 'class_dict'.")
    pixels = np.asarray(data["image_data"])
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise DataError(f"{path}: 'image_data' should be (n, height, width, 3) uint8, found {pixels.shape} {pixels.dtype}.")
    names = list(data["class_dict"])
    return ClassListing(names, [[Pixels(pixels[i], f"{path}, image {i}") for i in data["class_dict"][name]] for name in names])


def _images_folder(folder: Path, pickles: dict[str, Path | None]) -> Path:
    """``<folder>/images``, extracted from ``images.zip`` or ``images.tar*`` when only the archive is there."""
    images = folder / "images"
    if images.is_dir():
        return images
    archives = [folder / f"images{suffix}" for suffix in (".zip", *TAR_SUFFIXES)]
    archive = next((a for a in archives if a.is_file()), None)
    if archive is not None:
        safe_extract(archive, folder)
        if images.is_dir():
            return images
        raise DataError(f"{archive} did not hold a top-level images/ folder; miniImageNet's images belong in {images}/<filename>.jpg.")
    present = [str(p) for p in pickles.values() if p is not None]
    raise DataError(
        f"miniImageNet is not under {folder}. Looked for {images}/ (the images named in the split's CSV files, "
        f"e.g. {images}/n0153282900000005.jpg), for {' or '.join(a.name for a in archives[:2])} holding it, and for "
        f"the three pickle caches {folder}/mini-imagenet-cache-{{train,val,test}}.pkl"
        f"{' (found only ' + ', '.join(present) + ')' if present else ''}. {WHERE_PUBLISHED} "
        f"Point data_root (or MAML_CLI_DATA) at the folder that holds miniimagenet/."
    )


@dataclass
class MiniImageNetConfig(SplitListsConfig):
    _target_: str = "maml_cli.data.miniimagenet.MiniImageNetTasks"


register_dataset("miniimagenet", MiniImageNetConfig, MiniImageNetTasks, rgb_inputs)
