"""Shared fixtures: a small Omniglot-shaped copy written by the tests, and a runner for the installed commands."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = Path(os.environ.get("MAML_CLI_SHARED_DATA", REPO.parent / "shared" / "data"))

# A reduced copy: 2 + 2 alphabets, 28 characters, 20 images each, in torchvision's layout.
SMALL_LAYOUT = {"images_background": {"Alpha": 8, "Beta": 8}, "images_evaluation": {"Gamma": 6, "Delta": 6}}
SMALL_OVERRIDES = ["dataset.check_counts=false", "dataset.val_characters=4", "dataset.test_characters=8", "dataset.download=false"]


@pytest.fixture(autouse=True)
def pytests_own_allocator(monkeypatch):
    """``keep_freed_memory`` changes a process's allocator for good: runs made in this process (``maml-train`` or
    ``maml-eval`` called in-process) leave pytest's as it is; tests/test_allocator.py checks the change in a process of
    its own, and records the calls the entry points make."""
    try:
        from maml_cli import threads
    except ImportError:  # the package is not installed here (tests of an installed wheel run it in subprocesses)
        return
    monkeypatch.setattr(threads, "keep_freed_memory", lambda: True)


def write_small_omniglot(root: Path, layout: dict = SMALL_LAYOUT, images: int = 20, seed: int = 0) -> Path:
    """Write random 1-bit 105x105 PNGs as <root>/omniglot-py/<set>/<Alphabet>/characterNN/IIII_DD.png."""
    generator = torch.Generator().manual_seed(seed)
    char_id = 1
    for set_name, alphabets in layout.items():
        for alphabet, n_characters in alphabets.items():
            for c in range(1, n_characters + 1):
                folder = root / "omniglot-py" / set_name / alphabet / f"character{c:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                # Each character is a fixed random pattern; its drawings are noisy copies, so classes are learnable.
                pattern = torch.rand(105, 105, generator=generator) > 0.7
                for d in range(1, images + 1):
                    noise = torch.rand(105, 105, generator=generator) > 0.95
                    pixels = (pattern ^ noise).numpy()
                    Image.fromarray(pixels).convert("1").save(folder / f"{char_id:04d}_{d:02d}.png")
                char_id += 1
    return root


@pytest.fixture(scope="session")
def small_omniglot(tmp_path_factory) -> Path:
    return write_small_omniglot(tmp_path_factory.mktemp("data"))


def write_small_vinyals_split(folder: Path, layout: dict = SMALL_LAYOUT) -> Path:
    """Class lists in the Vinyals format for the small copy: Alpha and Beta train, Gamma validation, Delta test."""
    parts = {"train": ["Alpha", "Beta"], "val": ["Gamma"], "test": ["Delta"]}
    sizes = {a: n for alphabets in layout.values() for a, n in alphabets.items()}
    folder.mkdir(parents=True, exist_ok=True)
    for part, alphabets in parts.items():
        lines = [f"{a}/character{c:02d}/rot{r:03d}" for a in alphabets for c in range(1, sizes[a] + 1) for r in (0, 90, 180, 270)]
        (folder / f"{part}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def small_vinyals_split(tmp_path_factory) -> Path:
    return write_small_vinyals_split(tmp_path_factory.mktemp("splits"))


@pytest.fixture(scope="session")
def small_image_root(tmp_path_factory) -> Path:
    """A data root with a miniature copy of every image dataset's files (image_formats.py), ``folder/`` a plain
    folder of class folders; enough classes and images for every preset's episodes at reduced image sizes."""
    from image_formats import write_cifar100, write_cub_archive, write_folder, write_miniimagenet_pickles, write_tieredimagenet

    root = tmp_path_factory.mktemp("images")
    write_miniimagenet_pickles(root, classes=(30, 5, 5), per_class=31)
    write_cifar100(root)
    write_cub_archive(root)
    write_tieredimagenet(root)
    write_folder(root / "folder", classes=32)
    return root


def image_dataset_overrides(dataset: str, root: Path) -> list[str]:
    """What makes ``dataset=<dataset>`` run on :func:`small_image_root`'s copy: its data, small images and a small conv4."""
    folder = [f"dataset.root={root / 'folder'}"] if dataset == "folder" else []
    return [f"data_root={root}", *folder, "dataset.image_size=16", "model.hidden=8"]


def console_script(name: str) -> str:
    """The installed console script next to this interpreter (the venv's), else on PATH."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed; run the README's install command first")
    return found


def run_cli(name: str, args: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    result = subprocess.run([console_script(name), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        pytest.fail(f"{name} {' '.join(args)} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}")
    return result


def run_in_process(name: str, args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``maml-train ARGS`` or ``maml-eval ARGS`` from ``cwd`` in this process, as :func:`run_cli` would run it in a new one.

    For tests where a new process adds nothing: each launch costs seconds of start-up (torch, Hydra,
    TensorBoard imports). Tests of what only a process shows (signals, exit codes of the console script,
    an installed wheel) keep :func:`run_cli`.
    """
    from maml_cli import evaluate, train  # here, not at the top: conftest loads even where the package is not installed
    main = {"maml-train": train.main, "maml-eval": evaluate.main}[name]
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd, saved_threads = sys.argv, os.getcwd(), torch.get_num_threads()
    saved_env = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "HYDRA_FULL_ERROR")}
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level  # pytest's log capture among them
    returncode = 0
    try:
        os.chdir(cwd)
        sys.argv = [name, *args]
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ.pop("HYDRA_FULL_ERROR", None)
        # A run seeds torch's global generator; fork it so the tests after this one draw what they would have.
        with torch.random.fork_rng(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main()
            except SystemExit as exit_info:
                returncode = exit_info.code if isinstance(exit_info.code, int) else 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        torch.set_num_threads(saved_threads)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for handler in root.handlers[:]:  # Hydra's logging config replaced them with this run's streams and train.log
            if handler not in saved_handlers:
                root.removeHandler(handler)
                handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    result = subprocess.CompletedProcess([name, *args], returncode, stdout.getvalue(), stderr.getvalue())
    if check and returncode != 0:
        pytest.fail(f"{name} {' '.join(args)} exited {returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}")
    return result


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars of a run's TensorBoard event files, as tag -> [(step, value)], honouring purged steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for tag in accumulator.Tags()["scalars"]:
        scalars[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return dict(scalars)


def run_dirs(cwd: Path) -> list[Path]:
    return sorted(p.parent for p in (cwd / "outputs").rglob("config.yaml") if p.parent.name != ".hydra")
