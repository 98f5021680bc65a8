"""One image store under every image dataset: decoded once into a uint8 array file, memory-mapped after.

Decoding JPEGs is the slow part of reading an image dataset (minutes for miniImageNet's 60,000,
longer for tieredImageNet's 780,000), and tieredImageNet's pixels at 84x84 (about 16 GB) do not
fit in the memory of many machines. So a dataset is decoded once, at its image size, into
``images.npy`` (``(n_images, channels, size, size)`` uint8, the classes one after another) with
``index.json`` beside it (class names and image counts); later runs map that file into memory
and an episode reads only the rows of the images it draws (nanoGPT's ``prepare.py`` does the same
for text). The store's folder name carries a key of what it was decoded from and how, so a
changed listing or image size decodes afresh instead of reading stale pixels.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from omegaconf import MISSING, DictConfig
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from maml_cli.algorithms.registry import at_least
from maml_cli.data.base import SPLITS, ImageInputs
from maml_cli.data.episodes import arrange_episode, check_episode_size
from maml_cli.data.lock import exclusive
from maml_cli.errors import DataError
from maml_cli.tasks import CLASSIFICATION, Episode

log = logging.getLogger(__name__)

STORE_VERSION = 1


@dataclass(frozen=True)
class Encoded:
    """An image file's bytes held in memory (tieredImageNet's pickled PNGs); ``where`` names it in errors."""

    data: bytes
    where: str


@dataclass(frozen=True)
class Pixels:
    """Decoded pixels ``(H, W)`` or ``(H, W, 3)`` uint8 (CIFAR-100's arrays, the miniImageNet pickles)."""

    array: np.ndarray
    where: str


ImageSource = Union[Path, Encoded, Pixels]


def decode_image(source: ImageSource | Image.Image, image_size: int, channels: int, invert: bool = False) -> np.ndarray:
    """One image as ``(channels, image_size, image_size)`` uint8: converted to grayscale (1) or RGB (3),
    resized (bilinear, antialiased) to a square, and inverted (``255 - pixels``) if asked.

    This is the preprocessing every image dataset of maml-cli applies before training, so a trained
    model sees new images the same way when they go through it.

    Raises:
        DataError: the image cannot be read, naming the file (or the item of the file it came from).
    """
    where = source.where if isinstance(source, (Encoded, Pixels)) else str(source) if isinstance(source, Path) else "the image"
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, Pixels):
            image = Image.fromarray(source.array)
        elif isinstance(source, Encoded):
            image = Image.open(io.BytesIO(source.data))
        else:
            image = Image.open(source)
        with image:
            converted = image.convert("L" if channels == 1 else "RGB")
            # Pillow's bilinear resize antialiases when it shrinks: what torchvision's resize does with a PIL image,
            # without importing torchvision (seconds of start-up, for every command).
            pixels = np.asarray(converted.resize((image_size, image_size), Image.Resampling.BILINEAR))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{where} is not a readable image ({err}). Replace it, or the dataset copy it came from, with a good one.") from err
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(255 - pixels if invert else pixels)


@dataclass
class ClassListing:
    """The classes of a dataset in store order, with the images of each (classes may differ in size)."""

    names: list[str]
    sources: list[Sequence[ImageSource]]


class ImageStore:
    """A decoded store, memory-mapped: ``images`` is ``(n_images, C, H, W)`` uint8, class ``c`` at rows
    ``offsets[c]:offsets[c + 1]``. Opening it reads ``index.json`` only; pixels are read when indexed."""

    def __init__(self, folder: Path) -> None:
        index = json.loads((folder / "index.json").read_text())
        if index.get("version") != STORE_VERSION:
            raise ValueError(f"store version {index.get('version')}, this program writes {STORE_VERSION}")
        self.folder = folder
        # Copy-on-write: torch can wrap the array without a warning, and nothing is ever written back to the file.
        self.images: np.ndarray = np.load(folder / "images.npy", mmap_mode="c")
        self.classes: list[str] = index["classes"]
        self.counts = np.asarray(index["counts"], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self._file: io.RawIOBase | None = None
        self._lock = threading.Lock()
        if len(self.classes) != len(self.counts) or self.offsets[-1] != len(self.images):
            raise ValueError(f"index.json lists {self.offsets[-1]} images in {len(self.classes)} classes, images.npy holds {len(self.images)}")

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """The images at ``rows``, read from the file in row order with plain reads: unlike indexing the
        memory map, this maps no pages into the process, so its resident memory does not grow with the store."""
        out = np.empty((len(rows), *self.images.shape[1:]), dtype=np.uint8)
        row_bytes = out[0].nbytes if len(rows) else 0
        with self._lock:
            if self._file is None:
                self._file = open(self.folder / "images.npy", "rb", buffering=0)
            for i in np.argsort(rows, kind="stable"):
                self._file.seek(self.images.offset + int(rows[i]) * row_bytes)
                if self._file.readinto(memoryview(out[i]).cast("B")) != row_bytes:
                    raise DataError(f"{self.folder / 'images.npy'} is shorter than its index says; delete {self.folder} to decode again.")
        return out

    def index_of(self, names: Sequence[str]) -> np.ndarray:
        positions = {name: i for i, name in enumerate(self.classes)}
        return np.asarray([positions[name] for name in names], dtype=np.int64)

    def dense(self) -> torch.Tensor:
        """All images as ``(n_classes, images_per_class, C, H, W)``, still memory-mapped; every class must have as many images."""
        return torch.from_numpy(self.images).view(len(self.classes), int(self.counts[0]), *self.images.shape[1:])


def store_key(*parts: object) -> str:
    return hashlib.sha1(json.dumps([STORE_VERSION, *parts], default=str).encode()).hexdigest()[:12]


def prepared_store(parent: Path, name: str, identity: object, list_classes: Callable[[], ClassListing],
                   image_size: int, channels: int, invert: bool, what: str) -> ImageStore:
    """The store of a dataset in ``parent``: opened if it was decoded before, else decoded now.

    Args:
        parent: the folder that holds the dataset's stores (next to its files, or ``dataset.store_dir``).
        name: the dataset's name, the start of the store's folder name.
        identity: what the dataset was read from, cheap to compute without decoding (file names and sizes);
            with the image size, channels and inversion it keys the store, so a different copy decodes afresh.
        list_classes: lists the classes and their images; called only when the store must be decoded.
        what: the dataset, for the log and errors (``"miniImageNet (ravi split)"``).

    Runs that start together take turns (a lock file in ``parent``): the first decodes, the others open its store.
    """
    key = store_key(name, identity, image_size, channels, invert)
    folder = parent / f"maml-cli-store-{name}-{image_size}px-{'gray' if channels == 1 else 'rgb'}-{key}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create {parent} to hold the decoded images of {what} ({err}); set dataset.store_dir=<a writable folder>.") from err
    with exclusive(parent / ".maml-cli-store.lock", f"the decoded images of {what}"):
        if (folder / "index.json").is_file():
            try:
                return ImageStore(folder)
            except (OSError, ValueError, KeyError) as err:  # a damaged store is decoded again, never trusted
                log.warning("decoding again: the store %s is unreadable (%s)", folder, err)
                shutil.rmtree(folder, ignore_errors=True)
        write_store(folder, list_classes(), image_size, channels, invert, what)
        return ImageStore(folder)


def write_store(folder: Path, listing: ClassListing, image_size: int, channels: int, invert: bool, what: str) -> None:
    """Decode every image of ``listing`` into a new store at ``folder``, a class at a time (memory stays flat
    whatever the dataset's size), with a progress bar."""
    counts = [len(images) for images in listing.sources]
    log.info("decoding %d images of %s in %d classes to %dx%d (once; stored in %s)", sum(counts), what, len(counts), image_size, image_size, folder)
    with tqdm(total=sum(counts), desc=f"decoding {what}", unit="image", disable=None, mininterval=1.0) as bar:
        def decoded(sources: Sequence[ImageSource]) -> np.ndarray:
            pixels = np.empty((len(sources), channels, image_size, image_size), dtype=np.uint8)
            for i, source in enumerate(sources):
                pixels[i] = decode_image(source, image_size, channels, invert)
                bar.update()
            return pixels

        write_store_rows(folder, listing.names, counts, (decoded(sources) for sources in listing.sources),
                         {"what": what, "image_size": image_size, "channels": channels, "invert": invert})


def write_store_rows(folder: Path, names: Sequence[str], counts: Sequence[int], class_pixels: Iterable[np.ndarray],
                     about: dict | None = None) -> None:
    """Write a store at ``folder`` from each class's pixels ``(count, C, H, W)`` uint8, in the order of ``names``.

    Written beside ``folder`` and renamed into place, so a store is complete or absent; ``about`` is kept in its index.
    """
    scratch = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        images = None
        row = 0
        for count, pixels in zip(counts, class_pixels):
            if images is None:
                images = np.lib.format.open_memmap(scratch / "images.npy", mode="w+", dtype=np.uint8, shape=(sum(counts), *pixels.shape[1:]))
            images[row:row + count] = pixels
            row += count
        if images is None:
            raise DataError(f"no images to store in {folder}.")
        images.flush()
        del images
        index = {"version": STORE_VERSION, "classes": list(names), "counts": list(counts), **(about or {})}
        (scratch / "index.json").write_text(json.dumps(index))
        os.replace(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class StoreSampler:
    """N-way K-shot Q-query episodes from classes that may differ in size.

    Draws like :class:`~maml_cli.data.episodes.ClassImageSampler` (distinct classes, distinct images in
    a class, labels permuted afresh, support and query shuffled; every choice from the given generator).
    The images come from a store's file, of which only the drawn rows are read, or from a tensor already
    on the sampling device; both draw the same episodes for the same generator.

    Args:
        images: a decoded store, or its rows ``(n_images, C, H, W)`` uint8 as a tensor on ``device``.
        starts, counts: the first row and the number of images of each class of the split.
    """

    def __init__(self, images: ImageStore | torch.Tensor, starts: np.ndarray, counts: np.ndarray, way: int, shot: int,
                 query: int, where: str, device: torch.device | str = "cpu") -> None:
        check_episode_size(way, shot, query, len(counts), int(counts.min()) if len(counts) else 0, where,
                           smallest=len(set(counts.tolist())) > 1)
        self.images, self.starts, self.counts = images, starts, counts
        self.way, self.shot, self.query = way, shot, query
        self.device = torch.device(device)

    def sample(self, generator: torch.Generator) -> Episode:
        k = self.shot + self.query
        chosen = torch.randperm(len(self.counts), generator=generator)[: self.way].numpy()
        rows = np.concatenate([self.starts[c] + torch.randperm(int(self.counts[c]), generator=generator)[:k].numpy() for c in chosen])
        if isinstance(self.images, torch.Tensor):
            pixels = self.images[torch.from_numpy(rows).to(self.images.device)]
        else:
            pixels = torch.from_numpy(self.images.read_rows(rows))
        images = pixels.to(self.device).float().div_(255).view(self.way, k, *pixels.shape[1:])
        return arrange_episode(images, self.shot, generator)


SPLIT_NAMES = {"train": "meta-train", "val": "meta-validation", "test": "meta-test"}
PACKAGED_SPLITS = Path(__file__).resolve().parents[1] / "splits"  # the class lists the papers published (README there)


class StoreTasks:
    """An image task family over decoded stores and a class split: what an image dataset module builds on.

    Args:
        splits: ``{"train"|"val"|"test": (store, [class names in it])}``; the splits may share one store
            (a seeded split of one folder) or have one each (a dataset published as one file per split).
        dataset: the dataset's name for messages (``miniimagenet``); split_name: the split's (``ravi``).
        image_size, in_channels: the images' shape.
        in_memory: copy each split's images to the sampling device (for datasets that fit in its memory)
            instead of reading the memory-mapped file per episode; the episodes drawn are the same.
        recorded: per split, what :meth:`class_names` reports in place of the names, where a name alone does not say
            which images a class has (miniImageNet's CSVs choose them).
    """

    kind = CLASSIFICATION

    def __init__(self, splits: dict[str, tuple[ImageStore, list[str]]], dataset: str, split_name: str,
                 image_size: int, in_channels: int, in_memory: bool = False, recorded: dict[str, list[str]] | None = None) -> None:
        self.dataset, self.split_name = dataset, split_name
        self.image_size, self.in_channels, self.in_memory = image_size, in_channels, in_memory
        self.splits = {split: (store, store.index_of(names)) for split, (store, names) in splits.items()}
        self.class_lists = {split: list(recorded[split] if recorded else names) for split, (_, names) in splits.items()}

    def describe(self) -> dict[str, int]:
        return {f"{split}_classes": len(self.splits[split][1]) for split in SPLITS}

    def class_names(self) -> dict[str, list[str]]:
        """The names each split was built from, in the order of its classes."""
        return self.class_lists

    def where(self, split: str) -> str:
        return f"{SPLIT_NAMES[split]} split of {self.dataset} ({self.split_name})"

    def sampler(self, split: str, way: int, shot: int, query: int, device: torch.device | str = "cpu") -> StoreSampler:
        """An episode sampler over the classes of ``split``; with ``in_memory``, its images are first copied to ``device``."""
        store, class_ids = self.splits[split]
        counts = store.counts[class_ids]
        if not self.in_memory:
            return StoreSampler(store, store.offsets[class_ids], counts, way, shot, query, self.where(split), device)
        rows = np.concatenate([np.arange(store.offsets[c], store.offsets[c + 1]) for c in class_ids])
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        images = torch.from_numpy(store.images[rows]).to(device)
        return StoreSampler(images, starts, counts, way, shot, query, self.where(split), device)


def rgb_inputs(node: DictConfig) -> ImageInputs:
    """The inputs of a dataset of colour photographs, from its config node: RGB at ``image_size``, not inverted."""
    return ImageInputs(3, node.image_size)


def read_class_lists(split_dir: Path, known: Sequence[str], what: str, suffix: str = ".txt") -> dict[str, list[str]]:
    """``train``/``val``/``test`` class lists from ``split_dir`` (one class a line), checked against the classes present.

    Raises:
        DataError: a file is missing, names classes that are not present, or shares classes with another.
    """
    present = set(known)
    lists: dict[str, list[str]] = {}
    for split in SPLITS:
        path = split_dir / f"{split}{suffix}"
        if not path.is_file():
            raise DataError(f"{what}: the class list {path} does not exist. A split folder holds train{suffix}, val{suffix} "
                            f"and test{suffix}, one class a line.")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        missing = [n for n in names if n not in present]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise DataError(f"{what}: {path} names {len(missing)} class(es) that are not in the dataset copy: {shown}.")
        lists[split] = names
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sorted(set(lists[a]) & set(lists[b]))
        if shared:
            raise DataError(f"{what}: the {a} and {b} class lists in {split_dir} share {len(shared)} class(es), e.g. {shared[0]!r}.")
    return lists


@dataclass
class ImageDatasetConfig:
    """The schema fields every image dataset on the store has; a dataset's schema adds its ``_target_`` and its own."""

    root: str = MISSING
    image_size: int = at_least(8, 84)
    store_dir: Optional[str] = None
    in_memory: bool = False


@dataclass
class SplitListsConfig(ImageDatasetConfig):
    """An image dataset whose class split comes from packaged lists that ``split_dir`` may replace."""

    split_dir: Optional[str] = None
