"""CUB-200-2011 birds (Wah et al. 2011) with the 100 / 50 / 50 class split of Chen et al. (2019), 84x84 RGB
(``dataset=cub``).

Read from ``<root>/CUB_200_2011/images/<class>/*.jpg`` (or the archive ``CUB_200_2011.tgz`` beside it, as
Caltech publishes it). Classes hold 41 to 60 images. The class lists ship inside maml-cli
(``maml_cli/splits/cub``: Chen et al.'s rule over the sorted class folders).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from maml_cli.data.files import safe_extract
from maml_cli.data.folder import list_class_folders
from maml_cli.data.registry import register_dataset
from maml_cli.data.store import SplitListsConfig, PACKAGED_SPLITS, StoreTasks, prepared_store, read_class_lists, rgb_inputs
from maml_cli.errors import DataError

FOLDER = "CUB_200_2011"
ARCHIVES = ("CUB_200_2011.tgz", "CUB_200_2011.tar.gz", "CUB_200_2011.tar")


class CUBTasks(StoreTasks):
    """CUB-200-2011 few-shot classification.

    Args:
        root: the data root holding ``CUB_200_2011/``.
        image_size: side of the square the photographs are resized to (84 in Chen et al.'s comparisons).
        split_dir: other class lists (``train.txt`` ... of class folder names); default the packaged split.
        store_dir: where the decoded images are stored (default ``<root>/CUB_200_2011/``).
        in_memory: copy the images to the device instead of reading the file per episode (same episodes).
    """

    def __init__(self, root: str, image_size: int = 84, split_dir: str | None = None, store_dir: str | None = None,
                 in_memory: bool = False) -> None:
        base = Path(root).expanduser()
        images = base / FOLDER / "images"
        archive = next((base / name for name in ARCHIVES if (base / name).is_file()), None)
        if not images.is_dir() and archive is not None:
            safe_extract(archive, base)
        if not images.is_dir():
            raise DataError(
                f"CUB-200-2011 is not under {base}: looked for {images}/<class>/*.jpg and for {' / '.join(str(base / a) for a in ARCHIVES)}. "
                f"Caltech publishes CUB_200_2011.tgz at https://www.vision.caltech.edu/datasets/cub_200_2011/; put it (or its extracted "
                f"CUB_200_2011/ folder) in {base}, or point data_root (or MAML_CLI_DATA) at the folder that holds it. maml-cli downloads nothing.")
        listing = list_class_folders(images)
        identity = [str(images)] + [[name, len(files)] for name, files in zip(listing.names, listing.sources)]
        store = prepared_store(Path(store_dir).expanduser() if store_dir else base / FOLDER, "cub", identity, lambda: listing,
                               image_size, 3, False, "CUB-200-2011")
        lists = read_class_lists(Path(split_dir).expanduser() if split_dir else PACKAGED_SPLITS / "cub", store.classes, "CUB-200-2011")
        super().__init__({split: (store, names) for split, names in lists.items()}, "cub", "chen" if not split_dir else "lists", image_size, 3,
                         in_memory)


@dataclass
class CUBConfig(SplitListsConfig):
    _target_: str = "maml_cli.data.cub.CUBTasks"


register_dataset("cub", CUBConfig, CUBTasks, rgb_inputs)
