"""Miniature copies of every on-disk format the image datasets read, written in their real layouts: a few
classes of generated images, so that a class's images resemble each other (learnable) and differ between classes."""
from __future__ import annotations

import csv
import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from maml_cli.data.store import PACKAGED_SPLITS
from maml_cli.data.tieredimagenet import published_classes


def class_pattern(rng: np.random.Generator, height: int, width: int, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels == 3 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_folder(root: Path, classes: int = 8, sizes=(4, 5, 6), seed: int = 0) -> Path:
    """``<root>/<class>/<image>``: classes of unequal size, PNG and JPEG of different sizes."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(sizes[c % len(sizes)]):
            Image.fromarray(class_pattern(rng, 20 + i, 24)).save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


def write_miniimagenet_images(root: Path, classes=(4, 3, 3), per_class: int = 4, seed: int = 0) -> Path:
    """``<root>/miniimagenet/images/<filename>`` and a split folder of Ravi-format CSVs (``filename,label``)."""
    rng = np.random.default_rng(seed)
    images = root / "miniimagenet" / "images"
    images.mkdir(parents=True)
    splits = root / "mini_splits"
    splits.mkdir()
    wnid = 1530000
    for split, n in zip(("train", "val", "test"), classes):
        with open(splits / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "label"])
            for _ in range(n):
                wnid += 1
                for i in range(per_class):
                    name = f"n{wnid:08d}{i + 1:08d}.jpg"
                    Image.fromarray(class_pattern(rng, 100, 90)).save(images / name)
                    writer.writerow([name, f"n{wnid:08d}"])
    return splits


def write_miniimagenet_pickles(root: Path, classes=(4, 3, 3), per_class: int = 4, seed: int = 0) -> None:
    """``mini-imagenet-cache-{train,validation,test}.pkl``: ``image_data`` (n, 84, 84, 3) uint8 and ``class_dict``."""
    rng = np.random.default_rng(seed)
    folder = root / "miniimagenet"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "validation", "test"), classes):
        data = rng.integers(0, 256, (n * per_class, 84, 84, 3), dtype=np.uint8)
        class_dict = {f"n{split[:2]}{c:06d}": list(range(c * per_class, (c + 1) * per_class)) for c in range(n)}
        with open(folder / f"mini-imagenet-cache-{split}.pkl", "wb") as handle:
            pickle.dump({"image_data": data, "class_dict": class_dict}, handle, protocol=4)


def write_cifar100(root: Path, train_per_class: int = 2, test_per_class: int = 1, seed: int = 0) -> Path:
    """``<root>/cifar-100-python/{train,test,meta}`` as CIFAR-100's python version holds them (rows of R, G, B planes)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    lines = [line.split() for line in (PACKAGED_SPLITS / "cifar100_labels.txt").read_text().splitlines()]
    fine = [f for _, f, _ in lines]
    coarse_names = sorted({c for _, _, c in lines})
    coarse_of = [coarse_names.index(c) for _, _, c in lines]
    for part, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = [label for label in range(100) for _ in range(per_class)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / part, "wb") as handle:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [coarse_of[label] for label in labels],
                         "filenames": [f"{i}.png" for i in range(len(labels))]}, handle, protocol=2)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": fine, "coarse_label_names": coarse_names}, handle, protocol=2)
    return folder


def write_cub_archive(root: Path, per_class=(2, 3, 4), seed: int = 0) -> Path:
    """``CUB_200_2011.tgz`` holding ``CUB_200_2011/images/<class>/*.jpg`` for the 200 classes of the packaged split."""
    rng = np.random.default_rng(seed)
    classes = sorted(name for split in ("train", "val", "test") for name in (PACKAGED_SPLITS / "cub" / f"{split}.txt").read_text().split())
    tree = root / "cub_src"
    for c, name in enumerate(classes):
        folder = tree / "CUB_200_2011" / "images" / name
        folder.mkdir(parents=True)
        for i in range(per_class[c % len(per_class)]):
            Image.fromarray(class_pattern(rng, 30, 40)).save(folder / f"{name.split('.')[1]}_{i:04d}.jpg")
    with tarfile.open(root / "CUB_200_2011.tgz", "w:gz") as archive:
        archive.add(tree / "CUB_200_2011", arcname="CUB_200_2011")
    shutil.rmtree(tree)
    return root / "CUB_200_2011.tgz"


def write_tieredimagenet(root: Path, per_class: int = 2, seed: int = 0) -> None:
    """Ren et al.'s release: ``{split}_images_png.pkl`` (a list of PNG bytes as uint8 arrays) and ``{split}_labels.pkl``."""
    rng = np.random.default_rng(seed)
    folder = root / "tiered-imagenet"
    folder.mkdir(parents=True)
    for split in ("train", "val", "test"):
        wnids = published_classes(split)
        labels = np.repeat(np.arange(len(wnids)), per_class)
        images = [np.frombuffer(png_bytes(class_pattern(rng, 84, 84)), dtype=np.uint8) for _ in labels]
        with open(folder / f"{split}_images_png.pkl", "wb") as handle:
            pickle.dump(images, handle, protocol=2)
        with open(folder / f"{split}_labels.pkl", "wb") as handle:
            pickle.dump({"label_specific": labels, "label_general": np.zeros_like(labels), "label_specific_str": wnids,
                         "label_general_str": ["n00000000"]}, handle, protocol=2)
