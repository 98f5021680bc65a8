"""Omniglot (Lake et al. 2015): files, verification, splits and the decoded tensor cache.

Files live where torchvision puts them, ``<root>/omniglot-py/images_background``
and ``images_evaluation``. They are downloaded when missing, from where torchvision's
:class:`~torchvision.datasets.Omniglot` fetches them (:func:`download_set`); a copy placed by hand (the extracted
folders or the two zips) is accepted when its alphabets, characters and images
are all there, whatever the zip's md5 (rebuilt copies of the zips differ from
the originals byte-wise but not pixel-wise).

Each character rotated by 0, 90, 180 and 270 degrees gives four classes
(Santoro et al. 2016, Finn et al. 2017). A class is a pair (character index,
number of quarter turns).
"""
from __future__ import annotations

import contextlib
import enum
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import MISSING
from torch import Tensor

from maml_cli.data.episodes import ClassImageSampler, check_episode_size
from maml_cli.data.files import safe_extract
from maml_cli.data.lock import exclusive
from maml_cli.data.base import ImageInputs
from maml_cli.data.registry import register_dataset
from maml_cli.data.store import ClassListing, prepared_store
from maml_cli.errors import DataError
from maml_cli.tasks import CLASSIFICATION

log = logging.getLogger(__name__)

FOLDER = "omniglot-py"  # torchvision's Omniglot.folder: where its download puts the two sets
SETS = ("images_background", "images_evaluation")
IMAGES_PER_CHARACTER = 20
ROTATIONS = (0, 90, 180, 270)
# Grayscale, and inverted: strokes are dark on white, so inverted the background is 0 and strokes are bright.
CHANNELS, INVERT = 1, True

# Characters per alphabet of the original release; 30 / 964 / 19,280 and
# 20 / 659 / 13,180 alphabets / characters / images.
ALPHABETS = {
    "images_background": {
        "Alphabet_of_the_Magi": 20, "Anglo-Saxon_Futhorc": 29, "Arcadian": 26, "Armenian": 41,
        "Asomtavruli_(Georgian)": 40, "Balinese": 24, "Bengali": 46, "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14,
        "Braille": 26, "Burmese_(Myanmar)": 34, "Cyrillic": 33, "Early_Aramaic": 22, "Futurama": 26, "Grantha": 43,
        "Greek": 24, "Gujarati": 48, "Hebrew": 22, "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16,
        "Japanese_(hiragana)": 52, "Japanese_(katakana)": 47, "Korean": 40, "Latin": 26, "Malay_(Jawi_-_Arabic)": 40,
        "Mkhedruli_(Georgian)": 41, "N_Ko": 33, "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14, "Sanskrit": 42,
        "Syriac_(Estrangelo)": 23, "Tagalog": 17, "Tifinagh": 55,
    },
    "images_evaluation": {
        "Angelic": 20, "Atemayar_Qelisayer": 26, "Atlantean": 26, "Aurek-Besh": 26, "Avesta": 26, "Ge_ez": 26,
        "Glagolitic": 45, "Gurmukhi": 45, "Kannada": 41, "Keble": 26, "Malayalam": 47, "Manipuri": 40,
        "Mongolian": 30, "Old_Church_Slavonic_(Cyrillic)": 45, "Oriya": 46, "Sylheti": 28, "Syriac_(Serto)": 23,
        "Tengwar": 25, "Tibetan": 42, "ULOG": 26,
    },
}


@dataclass
class Listing:
    """The character folders found on disk, in sorted order, with their image files."""

    characters: list[str]  # "Alphabet/characterNN"
    files: list[list[Path]]  # sorted PNG paths per character
    n_background: int


def _list_set(folder: Path) -> dict[str, dict[str, list[Path]]]:
    """alphabet -> character -> sorted PNG files, for one extracted set."""
    found: dict[str, dict[str, list[Path]]] = {}
    for alphabet in sorted(p for p in folder.iterdir() if p.is_dir()):
        found[alphabet.name] = {
            character.name: sorted(f for f in character.iterdir() if f.suffix.lower() == ".png")
            for character in sorted(c for c in alphabet.iterdir() if c.is_dir())
        }
    return found


def verify_set(folder: Path, set_name: str, check_counts: bool = True) -> tuple[dict[str, dict[str, list[Path]]], list[str]]:
    """List one extracted set and compare it with the counts of the original release.

    Returns:
        The listing and a list of problems, each naming what is missing or extra;
        empty when the set is complete.
    """
    if not folder.is_dir():
        return {}, [f"{folder} does not exist"]
    try:
        found = _list_set(folder)
    except OSError as err:
        return {}, [f"{folder} cannot be read: {err}"]
    problems = []
    if check_counts:
        expected = ALPHABETS[set_name]
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        if missing:
            problems.append(f"{set_name}: missing alphabet(s) {', '.join(missing)}")
        if extra:
            problems.append(f"{set_name}: unexpected folder(s) {', '.join(extra)}")
        for alphabet, n_characters in expected.items():
            if alphabet in found and len(found[alphabet]) != n_characters:
                problems.append(f"{set_name}/{alphabet}: {len(found[alphabet])} characters, expected {n_characters}")
    elif not found:
        problems.append(f"{set_name}: no alphabet folders in {folder}")
    for alphabet, characters in found.items():
        for character, files in characters.items():
            if check_counts and len(files) != IMAGES_PER_CHARACTER:
                problems.append(f"{set_name}/{alphabet}/{character}: {len(files)} images, expected {IMAGES_PER_CHARACTER}")
            elif not files:
                problems.append(f"{set_name}/{alphabet}/{character}: no PNG images")
    return found, problems


def verify_or_extract(folder: Path, set_name: str, check_counts: bool = True) -> tuple[dict[str, dict[str, list[Path]]], list[str]]:
    """:func:`verify_set` of ``<folder>/<set_name>``, first extracting ``<folder>/<set_name>.zip`` (safely) where
    the extracted set is incomplete and the zip is there."""
    found, problems = verify_set(folder / set_name, set_name, check_counts)
    archive = folder / f"{set_name}.zip"
    if problems and archive.is_file():
        log.info("extracting %s", archive)
        safe_extract(archive, folder)
        found, problems = verify_set(folder / set_name, set_name, check_counts)
    return found, problems


def download_set(root: Path, set_name: str) -> None:
    """Fetch one set's zip from where torchvision's Omniglot downloads it, check its md5 and extract it into
    ``<root>/omniglot-py/`` (as ``torchvision.datasets.Omniglot(download=True)`` does, without its own checks:
    :func:`ensure_files` verifies what arrived by counting)."""
    # Imported here, not with this module: torchvision's import takes seconds (it loads its models and torch's
    # compiler) and every command imports this module, while only a download needs it.
    from torchvision.datasets import Omniglot, utils
    zip_name = f"{set_name}.zip"
    utils.download_and_extract_archive(f"{Omniglot.download_url_prefix}/{zip_name}", str(root / FOLDER), filename=zip_name,
                                       md5=Omniglot.zips_md5[set_name])


def not_found_message(root: Path, problems: list[str], reason: str) -> str:
    folder = root / FOLDER
    return (
        f"Omniglot is not available under {folder} ({reason}). Problems found: {'; '.join(problems) or 'none'}. "
        f"To place it by hand, put images_background.zip and images_evaluation.zip (from "
        f"https://github.com/brendenlake/omniglot/tree/master/python) in {folder}/, or their extracted folders "
        f"{folder}/images_background/<Alphabet>/characterNN/*.png and {folder}/images_evaluation/...; or point "
        f"data_root=<dir> (or the environment variable MAML_CLI_DATA) at a folder that holds omniglot-py/. "
        f"dataset=sinusoid runs without any data."
    )


def ensure_files(root: Path, download: bool = True, check_counts: bool = True) -> Listing:
    """Make sure both sets are on disk and complete; download them if allowed and needed.

    Raises:
        DataError: the files are missing or incomplete and could not be downloaded;
            the message lists what is missing and how to place the files.
    """
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"data_root={root} is a file, not a folder. Point data_root (or MAML_CLI_DATA) at the folder "
                        f"that holds omniglot-py/, or use dataset=sinusoid, which needs no data.")
    characters: list[str] = []
    files: list[list[Path]] = []
    n_background = 0
    for set_name in SETS:
        try:
            found, problems = verify_or_extract(root / FOLDER, set_name, check_counts)
        except OSError as err:  # a zip placed by hand that cannot be extracted here: permissions, a full disk
            problem = f"extracting {root / FOLDER / set_name}.zip failed: {err}"
            raise DataError(not_found_message(root, [problem], "extraction failed")) from err
        if problems and not download:
            raise DataError(not_found_message(root, problems, "download=false"))
        if problems:
            try:
                download_set(root, set_name)
            except Exception as err:  # torchvision raises RuntimeError offline, URLError etc. while downloading
                _, problems = verify_set(root / FOLDER / set_name, set_name, check_counts)
                raise DataError(not_found_message(root, problems, "download failed: " + str(err).splitlines()[0])) from err
            found, problems = verify_set(root / FOLDER / set_name, set_name, check_counts)
            if problems:
                raise DataError(not_found_message(root, problems, "incomplete copy"))
        for alphabet, chars in found.items():
            for character, pngs in chars.items():
                characters.append(f"{alphabet}/{character}")
                files.append(pngs)
        if set_name == "images_background":
            n_background = len(characters)
    counts = {len(f) for f in files}
    if len(counts) != 1:
        raise DataError(f"Every Omniglot character under {root / FOLDER} must have the same number of images; found {sorted(counts)}.")
    return Listing(characters, files, n_background)


def load_images(root: Path, image_size: int = 28, download: bool = True, check_counts: bool = True,
                store_dir: str | None = None) -> tuple[Tensor, Listing]:
    """All Omniglot characters as one uint8 tensor ``(n_characters, images, size, size)``, memory-mapped.

    The images are decoded once into an image store (:mod:`maml_cli.data.store`) in
    ``<root>/omniglot-py/`` (or ``store_dir``), keyed by the image size and the list of files, so later
    runs map it instead of decoding. Runs that start together take turns (a lock file
    ``<root>/.omniglot-py.lock``): the first extracts and decodes, the others then read what it left.
    """
    root = Path(root).expanduser()
    if download and not root.exists():
        with contextlib.suppress(OSError):  # a root that cannot be made is reported by ensure_files
            root.mkdir(parents=True)
    lock = root / f".{FOLDER}.lock" if root.is_dir() else None  # a root that is a file is reported by ensure_files
    with exclusive(lock, f"Omniglot under {root / FOLDER}"):
        listing = ensure_files(root, download, check_counts)
        parent = Path(store_dir).expanduser() if store_dir else root / FOLDER
        identity = [f"{c}:{len(f)}" for c, f in zip(listing.characters, listing.files)]
        store = prepared_store(parent, "omniglot", identity, lambda: ClassListing(listing.characters, listing.files),
                               image_size, channels=CHANNELS, invert=INVERT, what="Omniglot")
    return store.dense()[:, :, 0], listing


def _with_rotations(characters: Tensor) -> Tensor:
    return torch.stack([characters.repeat_interleave(len(ROTATIONS)), torch.arange(len(ROTATIONS)).repeat(len(characters))], dim=1)


def split_classes(
    listing: Listing, split: str, split_seed: int = 0, val_characters: int = 100, test_characters: int = 423,
    split_dir: str | None = None,
) -> dict[str, Tensor]:
    """Classes of the meta-train, meta-validation and meta-test splits.

    Args:
        split: ``random``: a seeded permutation of all characters, ``val_characters``
            for validation, ``test_characters`` for test and the rest for training
            (1100 / 100 / 423, as in Finn et al. 2017). ``lake``: background
            characters for training, except ``val_characters`` of them chosen with
            the seed for validation; evaluation characters for test. ``vinyals``:
            the class lists ``train.txt``, ``val.txt``, ``test.txt`` in ``split_dir``.
        split_seed: seed of the random choices; independent of the training seed.

    Returns:
        ``{"train"|"val"|"test": LongTensor (n_classes, 2)}`` of (character index, quarter turns).
    """
    n = len(listing.characters)
    generator = torch.Generator().manual_seed(split_seed)
    if split == "random":
        if val_characters + test_characters >= n:
            raise DataError(f"the random split needs more than val_characters + test_characters = {val_characters + test_characters} characters, but only {n} are present.")
        order = torch.randperm(n, generator=generator)
        parts = {"val": order[:val_characters], "test": order[val_characters : val_characters + test_characters],
                 "train": order[val_characters + test_characters :]}
        return {name: _with_rotations(idx.sort().values) for name, idx in parts.items()}
    if split == "lake":
        background = torch.randperm(listing.n_background, generator=generator)
        if val_characters >= listing.n_background:
            raise DataError(f"the lake split holds out val_characters={val_characters} of only {listing.n_background} background characters.")
        parts = {"val": background[:val_characters], "train": background[val_characters:],
                 "test": torch.arange(listing.n_background, n)}
        return {name: _with_rotations(idx.sort().values) for name, idx in parts.items()}
    if split == "vinyals":
        return _read_split_files(listing, split_dir)
    raise DataError(f"unknown Omniglot split {split!r}; choose random, lake or vinyals.")


def _read_split_files(listing: Listing, split_dir: str | None) -> dict[str, Tensor]:
    if not split_dir:
        raise DataError("split=vinyals needs the class lists: set dataset.split_dir=<folder with train.txt, val.txt and test.txt> "
                        "(one 'Alphabet/characterNN/rotDDD' per line, as in prototypical-networks' data/omniglot/splits/vinyals).")
    folder = Path(split_dir).expanduser()
    index = {name: i for i, name in enumerate(listing.characters)}
    classes = {}
    for part in ("train", "val", "test"):
        path = folder / f"{part}.txt"
        if not path.is_file():
            raise DataError(f"split=vinyals: {path} does not exist. Set dataset.split_dir to the folder holding train.txt, val.txt and test.txt.")
        rows, unknown = [], []
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            character, _, rotation = line.rpartition("/")
            degrees = rotation[3:] if rotation.startswith("rot") else ""
            if character not in index or not degrees.isdigit() or int(degrees) not in ROTATIONS:
                unknown.append(f"line {line_no}: {line!r}")
                continue
            rows.append((index[character], ROTATIONS.index(int(degrees))))
        if unknown:
            shown = "; ".join(unknown[:5]) + (f"; and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise DataError(f"{path} names {len(unknown)} class(es) that do not exist in the Omniglot copy: {shown}.")
        classes[part] = torch.tensor(rows, dtype=torch.long).reshape(-1, 2)
    return classes


class OmniglotTasks:
    """N-way K-shot Omniglot classification on one of the splits.

    Args:
        root: data root; files are in ``<root>/omniglot-py/`` (torchvision's layout).
        split: ``random`` (default, needs only the images), ``lake`` or ``vinyals``.
        split_seed, val_characters, test_characters, split_dir: see :func:`split_classes`.
        image_size: side of the resized square images (28 in the papers).
        download: let torchvision download missing files.
        check_counts: require the full release (964 + 659 characters of 20 images);
            turn off only for deliberately reduced copies.
        store_dir: where the decoded images are stored (default: ``<root>/omniglot-py/``).
    """

    kind = CLASSIFICATION
    in_channels = CHANNELS

    def __init__(self, root: str, split: str = "random", split_seed: int = 0, val_characters: int = 100,
                 test_characters: int = 423, split_dir: str | None = None, image_size: int = 28,
                 download: bool = True, check_counts: bool = True, store_dir: str | None = None) -> None:
        self.image_size = image_size
        self.split_name = str(getattr(split, "value", split))
        self.images, self.listing = load_images(Path(root), image_size, download, check_counts, store_dir)
        self.classes = split_classes(self.listing, self.split_name, split_seed, val_characters, test_characters, split_dir)

    def describe(self) -> dict[str, int]:
        return {f"{part}_classes": len(c) for part, c in self.classes.items()}

    def class_names(self) -> dict[str, list[str]]:
        """``Alphabet/characterNN/rotDDD`` (the Vinyals lists' form) of each split's classes."""
        return {part: [f"{self.listing.characters[c]}/rot{ROTATIONS[t]:03d}" for c, t in classes.tolist()]
                for part, classes in self.classes.items()}

    def check(self, split: str, way: int, shot: int, query: int) -> None:
        """Raise EpisodeError if ``split`` cannot supply the episode, without building its tensor."""
        check_episode_size(way, shot, query, len(self.classes[split]), self.images.shape[1], self._where(split))

    def _where(self, split: str) -> str:
        names = {"train": "meta-train", "val": "meta-validation", "test": "meta-test"}
        return f"{names[split]} split of omniglot ({self.split_name})"

    def sampler(self, split: str, way: int, shot: int, query: int, device: torch.device | str = "cpu") -> ClassImageSampler:
        """An episode sampler over the classes of ``split``, holding its images on ``device``."""
        self.check(split, way, shot, query)
        characters, turns = self.classes[split].unbind(dim=1)
        class_images = self.images[characters]
        for k in range(1, len(ROTATIONS)):
            chosen = turns == k
            class_images[chosen] = torch.rot90(class_images[chosen], k, dims=(-2, -1))
        return ClassImageSampler(class_images.unsqueeze(2).to(device), way, shot, query, self._where(split))


class Split(str, enum.Enum):
    random = "random"
    lake = "lake"
    vinyals = "vinyals"


@dataclass
class OmniglotConfig:
    _target_: str = "maml_cli.data.omniglot.OmniglotTasks"
    root: str = MISSING
    split: Split = Split.random
    split_seed: int = 0
    val_characters: int = 100
    test_characters: int = 423
    split_dir: Optional[str] = None
    image_size: int = 28
    download: bool = True
    check_counts: bool = True
    store_dir: Optional[str] = None


register_dataset("omniglot", OmniglotConfig, OmniglotTasks, lambda node: ImageInputs(CHANNELS, node.image_size, INVERT))
