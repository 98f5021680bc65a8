"""tieredImageNet (Ren et al. 2018): 608 ImageNet classes in 34 categories, split by category so that
the 351 / 97 / 160 classes of training, validation and test are far apart; 84x84 RGB
(``dataset=tieredimagenet``).

Read from Ren et al.'s release files in ``<root>/tiered-imagenet/``: ``{split}_images_png.pkl`` (a list of
PNG-encoded images) and ``{split}_labels.pkl`` (``label_specific``: each image's class index,
``label_specific_str``: the classes' WordNet ids, and the categories' ``label_general``). Its 448,695 /
124,261 / 206,209 images decode once, one split at a time, into memory-mapped stores of 9.5 / 2.6 / 4.4 GB
at 84x84 (21,168 bytes an image); training then reads only the images an episode draws. The class lists of the split ship
inside maml-cli (``maml_cli/splits/tieredimagenet``) and are checked against the files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maml_cli.data.base import SPLITS
from maml_cli.data.files import load_pickle
from maml_cli.data.registry import register_dataset
from maml_cli.data.store import ImageDatasetConfig, PACKAGED_SPLITS, ClassListing, Encoded, StoreTasks, prepared_store, rgb_inputs
from maml_cli.errors import DataError

FOLDER = "tiered-imagenet"
WHERE_PUBLISHED = ("Ren et al. publish the release (tiered-imagenet.tar) through https://github.com/renmengye/few-shot-ssl-public; "
                   "maml-cli downloads nothing.")


def published_classes(split: str) -> list[str]:
    """The WordNet ids of ``split``'s classes in Ren et al.'s split (packaged ``<split>.txt``: ``specific,general``)."""
    return [line.split(",")[0] for line in (PACKAGED_SPLITS / "tieredimagenet" / f"{split}.txt").read_text().split()]


def _labels(path: Path) -> tuple[np.ndarray, list[str]]:
    labels = load_pickle(path)
    labels = {k.decode() if isinstance(k, bytes) else k: v for k, v in labels.items()} if isinstance(labels, dict) else labels
    if not isinstance(labels, dict) or "label_specific" not in labels or "label_specific_str" not in labels:
        raise DataError(f"{path} is not a tieredImageNet labels file: expected a dict with 'label_specific' and 'label_specific_str'.")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in labels["label_specific_str"]]
    return np.asarray(labels["label_specific"], dtype=np.int64), names


def _split_listing(images_path: Path, labels_path: Path) -> ClassListing:
    label_of, names = _labels(labels_path)
    encoded = load_pickle(images_path)
    if len(encoded) != len(label_of):
        raise DataError(f"{images_path} holds {len(encoded)} images but {labels_path} labels {len(label_of)}; the two files do not belong together.")
    members: list[list[Encoded]] = [[] for _ in names]
    for i, (item, label) in enumerate(zip(encoded, label_of)):
        members[label].append(Encoded(bytes(np.asarray(item, dtype=np.uint8)) if not isinstance(item, bytes) else item,
                                      f"{images_path}, image {i}"))
    return ClassListing(names, members)


class TieredImageNetTasks(StoreTasks):
    """tieredImageNet few-shot classification.

    Args:
        root: the data root holding ``tiered-imagenet/``.
        image_size: side of the images (84, the release's own).
        store_dir: where the decoded images are stored (default ``<root>/tiered-imagenet/``; they need 16.5 GB).
        in_memory: copy a split's images to the device instead of reading the file per episode (same episodes).
    """

    def __init__(self, root: str, image_size: int = 84, store_dir: str | None = None, in_memory: bool = False) -> None:
        folder = Path(root).expanduser() / FOLDER
        files = {split: (folder / f"{split}_images_png.pkl", folder / f"{split}_labels.pkl") for split in SPLITS}
        missing = [str(p) for pair in files.values() for p in pair if not p.is_file()]
        if missing:
            raise DataError(f"tieredImageNet is not complete under {folder}: missing {', '.join(missing)}. The release's six files "
                            f"{{train,val,test}}_images_png.pkl and {{train,val,test}}_labels.pkl belong there. {WHERE_PUBLISHED} "
                            f"Point data_root (or MAML_CLI_DATA) at the folder that holds tiered-imagenet/.")
        parent = Path(store_dir).expanduser() if store_dir else folder
        splits = {}
        for split, (images_path, labels_path) in files.items():
            identity = [[p.name, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in (images_path, labels_path)]
            store = prepared_store(parent, f"tieredimagenet-{split}", identity, lambda i=images_path, l=labels_path: _split_listing(i, l),
                                   image_size, 3, False, f"tieredImageNet ({split})")
            expected = published_classes(split)
            if sorted(store.classes) != sorted(expected):
                raise DataError(f"{labels_path} lists {len(store.classes)} classes that are not the {len(expected)} {split} classes of "
                                f"Ren et al.'s split (maml_cli/splits/tieredimagenet/{split}.txt); the files are from another split.")
            splits[split] = (store, store.classes)
        super().__init__(splits, "tieredimagenet", "ren", image_size, 3, in_memory)


@dataclass
class TieredImageNetConfig(ImageDatasetConfig):
    _target_: str = "maml_cli.data.tieredimagenet.TieredImageNetTasks"


register_dataset("tieredimagenet", TieredImageNetConfig, TieredImageNetTasks, rgb_inputs)
