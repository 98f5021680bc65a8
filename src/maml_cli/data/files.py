"""Reading what dataset authors publish, safely: archives that may try to write outside their folder,
and pickle files, which would run arbitrary code if unpickled naively."""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from maml_cli.errors import DataError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def _unsafe(name: str) -> bool:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return name.startswith(("/", "\\")) or ".." in parts or bool(parts and ":" in parts[0])


def is_archive(path: Path) -> bool:
    return path.suffix.lower() == ".zip" or path.name.lower().endswith(TAR_SUFFIXES)


def safe_extract(archive_path: Path, destination: Path) -> None:
    """Extract a zip or tar archive into ``destination``, refusing members that would land outside it.

    The archive is extracted into a scratch folder inside ``destination`` and its top-level entries
    are then moved into place, so an interrupted extraction never looks like a complete folder.

    Raises:
        DataError: the archive is unreadable or truncated, fails a CRC check, or has a member with an
            absolute path, a ``..`` component, or (tar) a link or device file.
    """
    try:
        if archive_path.suffix.lower() == ".zip":
            with zipfile.ZipFile(archive_path) as archive:
                for name in archive.namelist():
                    if _unsafe(name):
                        raise DataError(f"{archive_path} contains the unsafe entry {name!r} (absolute path or '..'); refusing to extract it.")
                bad = archive.testzip()
                if bad is not None:
                    raise DataError(f"{archive_path} is corrupt: entry {bad!r} fails its CRC check. Replace the file with a good copy.")
                _extract_into(destination, archive.extractall)
        else:
            with tarfile.open(archive_path) as archive:
                members = archive.getmembers()
                for member in members:
                    if _unsafe(member.name) or not (member.isfile() or member.isdir()):
                        what = "absolute path or '..'" if _unsafe(member.name) else "a link or special file"
                        raise DataError(f"{archive_path} contains the unsafe entry {member.name!r} ({what}); refusing to extract it.")
                _extract_into(destination, lambda folder: archive.extractall(folder, members=members))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{archive_path} is not a readable archive ({err}); it may be truncated. Replace it with a good copy.") from err


def _extract_into(destination: Path, extract: Any) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination, prefix=".extract-") as scratch:
        extract(scratch)
        for entry in Path(scratch).iterdir():
            target = destination / entry.name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(entry, target)


# What the published pickles of few-shot datasets hold: numpy arrays, dicts, lists, strings and numbers.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("_codecs", "encode"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a dataset file has no need of")


def load_pickle(path: Path) -> Any:
    """Unpickle a dataset file, allowing only numpy arrays and plain containers (a pickle can otherwise run any code).

    Pickles written by Python 2 (CIFAR-100's, tieredImageNet's) are read with ``encoding="latin1"``, as numpy advises.

    Raises:
        DataError: the file is missing, damaged, or refers to anything beyond arrays and containers.
    """
    try:
        with open(path, "rb") as handle:
            return _ArraysOnly(handle, encoding="latin1").load()
    except FileNotFoundError as err:
        raise DataError(f"{path} does not exist.") from err
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, OSError) as err:
        raise DataError(f"{path} is not a readable dataset pickle ({err}). Replace it with a good copy.") from err
