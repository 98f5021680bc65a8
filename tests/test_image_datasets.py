"""Image datasets on the image store: miniature copies of every supported on-disk format, written here in the
real layouts, each composed, decoded, sampled and trained for 2 iterations; the memory map; errors a user sees."""
from __future__ import annotations

import io
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_OMNIGLOT, run_in_process
from image_formats import (write_cifar100, write_cub_archive, write_folder, write_miniimagenet_images, write_miniimagenet_pickles,
                           write_tieredimagenet)
from maml_cli.data import store
from maml_cli.data.base import ImageTaskFamily, class_split_changes, class_split_record
from maml_cli.data.cifar import CifarFSTasks, FC100Tasks, cifar100_superclasses
from maml_cli.data.cub import CUBTasks
from maml_cli.data.files import load_pickle, safe_extract
from maml_cli.data.folder import FolderTasks
from maml_cli.data.miniimagenet import MiniImageNetTasks, read_split_csv
from maml_cli.data.omniglot import OmniglotTasks
from maml_cli.data.store import PACKAGED_SPLITS, ImageStore, StoreSampler
from maml_cli.data.tieredimagenet import TieredImageNetTasks
from maml_cli.errors import DataError

TINY = ["model.hidden=8", "way=3", "shot=1", "query=2", "meta_batch_size=2", "inner_steps=1", "test_inner_steps=1",
        "iterations=2", "progress=false", "val_every=2", "val_tasks=2", "test_tasks=2", "checkpoint_every=2"]


def check_episodes(tasks: ImageTaskFamily, way: int, shot: int, query: int, channels: int, size: int) -> None:
    """Every split yields N-way K-shot episodes of images of the dataset's shape, in [0, 1]."""
    assert isinstance(tasks, ImageTaskFamily) and (tasks.in_channels, tasks.image_size) == (channels, size)
    for split in ("train", "val", "test"):
        episode = tasks.sampler(split, way, shot, query).sample(torch.Generator().manual_seed(1))
        assert episode.support_x.shape == (way * shot, channels, size, size)
        assert episode.query_x.shape == (way * query, channels, size, size)
        assert sorted(episode.support_y.tolist()) == sorted(list(range(way)) * shot)
        assert sorted(episode.query_y.tolist()) == sorted(list(range(way)) * query)
        assert 0 <= float(episode.support_x.min()) and float(episode.support_x.max()) <= 1


def test_decoding_gives_the_pixels_of_torchvisions_resize(tmp_path):
    # Stores and trained models hold images decoded by torchvision's resize before maml-cli stopped importing it at
    # start-up: the same pixels keep those stores valid and runs resuming to the same curves.
    from PIL import Image
    from torchvision.transforms import functional as TF
    generator = np.random.default_rng(0)
    images = {"1-bit 105x105 (Omniglot's PNGs)": Image.fromarray(generator.random((105, 105)) > 0.7).convert("1"),
              "RGB 500x375": Image.fromarray(generator.integers(0, 256, (375, 500, 3), dtype=np.uint8)),
              "grayscale 10x10, enlarged": Image.fromarray(generator.integers(0, 256, (10, 10), dtype=np.uint8)),
              "RGBA 84x84, kept": Image.fromarray(generator.integers(0, 256, (84, 84, 4), dtype=np.uint8))}
    for what, image in images.items():
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.png"
        image.save(path)
        for size, channels in ((28, 1), (84, 3), (16, 3)):
            with Image.open(path) as opened:
                expected = np.asarray(TF.resize(opened.convert("L" if channels == 1 else "RGB"), [size, size], antialias=True))
            expected = expected[None] if channels == 1 else expected.transpose(2, 0, 1)
            assert np.array_equal(store.decode_image(path, size, channels), expected), (what, size, channels)
            assert np.array_equal(store.decode_image(path, size, channels, invert=True), 255 - expected), (what, size, channels)


def test_folder_of_class_folders_decodes_unequal_classes_and_trains(tmp_path):
    root = write_folder(tmp_path / "images")
    tasks = FolderTasks(str(root), image_size=16, train_classes=4, val_classes=2, test_classes=2)
    assert tasks.describe() == {"train_classes": 4, "val_classes": 2, "test_classes": 2}
    store_ = tasks.splits["train"][0]
    assert sorted(store_.counts.tolist()) == sorted([4, 5, 6, 4, 5, 6, 4, 5])
    check_episodes(tasks, way=2, shot=2, query=2, channels=3, size=16)
    # The image of a class folder is its file, decoded as the public preprocessing decodes it.
    first = store_.images[store_.offsets[store_.classes.index("class_00")]]
    assert np.array_equal(first, store.decode_image(root / "class_00" / "000.jpg", 16, 3))
    # A seeded split is the same on every build, and another seed gives another split.
    again = FolderTasks(str(root), image_size=16, train_classes=4, val_classes=2, test_classes=2)
    other = FolderTasks(str(root), image_size=16, train_classes=4, val_classes=2, test_classes=2, split_seed=1)
    assert [list(again.splits[s][1]) for s in ("train", "val", "test")] == [list(tasks.splits[s][1]) for s in ("train", "val", "test")]
    assert [list(other.splits[s][1]) for s in ("train", "val", "test")] != [list(tasks.splits[s][1]) for s in ("train", "val", "test")]
    run_in_process("maml-train", ["dataset=folder", f"dataset.root={root}", "dataset.image_size=16", "dataset.train_classes=4",
                                  "dataset.val_classes=2", "dataset.test_classes=2", *TINY, "way=2"], cwd=tmp_path)


def test_folder_split_from_class_list_files_and_the_errors_of_a_bad_one(tmp_path):
    root = write_folder(tmp_path / "images", classes=6)
    lists = tmp_path / "lists"
    lists.mkdir()
    for split, names in (("train", ["class_00", "class_01", "class_02"]), ("val", ["class_03", "class_04"]), ("test", ["class_05"])):
        (lists / f"{split}.txt").write_text("\n".join(names) + "\n")
    tasks = FolderTasks(str(root), image_size=16, split_dir=str(lists))
    assert tasks.describe() == {"train_classes": 3, "val_classes": 2, "test_classes": 1} and tasks.split_name == "lists"
    (lists / "test.txt").write_text("class_05\nclass_99\n")
    with pytest.raises(DataError, match=r"test.txt names 1 class\(es\) that are not in the dataset copy: 'class_99'"):
        FolderTasks(str(root), image_size=16, split_dir=str(lists))
    (lists / "val.txt").unlink()
    result = run_in_process("maml-train", ["dataset=folder", f"dataset.root={root}", "dataset.image_size=16", f"dataset.split_dir={lists}",
                                           *TINY], cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"the class list {lists / 'val.txt'} does not exist" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_corrupted_image_is_one_paragraph_naming_the_file(tmp_path):
    root = write_folder(tmp_path / "images", classes=6)
    bad = root / "class_03" / "002.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    result = run_in_process("maml-train", ["dataset=folder", f"dataset.root={root}", "dataset.image_size=16", *TINY], cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("decoding")]
    assert len(lines) == 1 and f"{bad} is not a readable image" in lines[0]
    # Nothing half-written is left to be mistaken for a store.
    assert not list((root / ".maml-cli-store").glob("maml-cli-store-*"))


def test_miniimagenet_from_csv_and_images_and_from_pickle_caches(tmp_path):
    splits = write_miniimagenet_images(tmp_path / "csv")
    tasks = MiniImageNetTasks(str(tmp_path / "csv"), image_size=20, split_dir=str(splits))
    assert tasks.describe() == {"train_classes": 4, "val_classes": 3, "test_classes": 3}
    check_episodes(tasks, way=3, shot=1, query=3, channels=3, size=20)
    # The CSVs choose each class's images: lists naming the same classes with an image fewer are another split to a resume.
    edited = shutil.copytree(splits, tmp_path / "edited")
    rows = (edited / "train.csv").read_text().splitlines()
    (edited / "train.csv").write_text("\n".join(rows[:-1]) + "\n")
    fewer = MiniImageNetTasks(str(tmp_path / "csv"), image_size=20, split_dir=str(edited))
    assert [name.split()[0] for name in fewer.class_names()["train"]] == [name.split()[0] for name in tasks.class_names()["train"]]
    assert class_split_changes(class_split_record(tasks), class_split_record(fewer)) == [
        "the train split's 4 classes are other classes, in another order, or (lists that name images) other images"]
    write_miniimagenet_pickles(tmp_path / "pkl")
    cached = MiniImageNetTasks(str(tmp_path / "pkl"), image_size=84)
    assert cached.describe() == {"train_classes": 4, "val_classes": 3, "test_classes": 3}
    check_episodes(cached, way=3, shot=1, query=3, channels=3, size=84)
    # At its own size a pickled image is stored unchanged.
    data = load_pickle(tmp_path / "pkl" / "miniimagenet" / "mini-imagenet-cache-train.pkl")
    train_store = cached.splits["train"][0]
    assert np.array_equal(train_store.images[0], data["image_data"][0].transpose(2, 0, 1))
    run_in_process("maml-train", ["dataset=miniimagenet", f"data_root={tmp_path / 'csv'}", f"dataset.split_dir={splits}",
                                  "dataset.image_size=20", *TINY], cwd=tmp_path)
    run_in_process("maml-train", ["dataset=miniimagenet", f"data_root={tmp_path / 'pkl'}", "algo=protonet", "algo.train_way=3",
                                  *[a for a in TINY if "inner_steps" not in a]], cwd=tmp_path)


def test_packaged_class_lists_have_the_published_sizes_and_are_disjoint():
    def sizes(folder, suffix=".txt"):
        lists = {s: (PACKAGED_SPLITS / folder / f"{s}{suffix}").read_text().split() for s in ("train", "val", "test")}
        assert not (set(lists["train"]) & set(lists["val"]) or set(lists["train"]) & set(lists["test"]) or set(lists["val"]) & set(lists["test"]))
        return [len(lists[s]) for s in ("train", "val", "test")]
    assert sizes("cifar_fs") == [64, 16, 20] and sizes("fc100") == [12, 4, 4] and sizes("cub") == [100, 50, 50]
    assert sizes("tieredimagenet") == [351, 97, 160]
    mini = {s: read_split_csv(PACKAGED_SPLITS / "miniimagenet" / f"{s}.csv.gz") for s in ("train", "val", "test")}
    assert [len(mini[s][0]) for s in ("train", "val", "test")] == [64, 16, 20]
    assert {len(files) for s in mini for files in mini[s][1]} == {600}
    cifar_fs = {name for s in ("train", "val", "test") for name in (PACKAGED_SPLITS / "cifar_fs" / f"{s}.txt").read_text().split()}
    assert cifar_fs == {fine for members in cifar100_superclasses().values() for fine in members} and len(cifar_fs) == 100


def test_cifar_fs_and_fc100_from_cifar100_python_files_share_one_store(tmp_path):
    write_cifar100(tmp_path)
    fs = CifarFSTasks(str(tmp_path))
    assert fs.describe() == {"train_classes": 64, "val_classes": 16, "test_classes": 20}
    check_episodes(fs, way=5, shot=1, query=2, channels=3, size=32)
    fc = FC100Tasks(str(tmp_path))
    assert fc.describe() == {"train_classes": 60, "val_classes": 20, "test_classes": 20}
    assert fc.splits["train"][0].folder == fs.splits["train"][0].folder
    # Each fine class holds its training and test images; pixels are CIFAR's R, G, B planes.
    data = load_pickle(tmp_path / "cifar-100-python" / "train")
    train_store = fs.splits["train"][0]
    assert train_store.counts.tolist() == [3] * 100
    assert np.array_equal(train_store.images[0], np.asarray(data["data"][0]).reshape(3, 32, 32))
    # FC100's test classes belong to its test superclasses only.
    members = cifar100_superclasses()
    test_fine = {train_store.classes[i] for i in fc.splits["test"][1]}
    assert test_fine == {f for coarse in (PACKAGED_SPLITS / "fc100" / "test.txt").read_text().split() for f in members[coarse]}
    run_in_process("maml-train", ["dataset=fc100", f"data_root={tmp_path}", *TINY], cwd=tmp_path)


def test_cub_from_its_published_archive_with_classes_of_unequal_size(tmp_path):
    write_cub_archive(tmp_path)
    tasks = CUBTasks(str(tmp_path), image_size=16)
    assert tasks.describe() == {"train_classes": 100, "val_classes": 50, "test_classes": 50}
    assert set(tasks.splits["train"][0].counts.tolist()) == {2, 3, 4}
    check_episodes(tasks, way=5, shot=1, query=1, channels=3, size=16)
    with pytest.raises(Exception, match="the smallest class of the meta-test split of cub"):
        tasks.sampler("test", way=5, shot=3, query=1)
    run_in_process("maml-train", ["dataset=cub", f"data_root={tmp_path}", "dataset.image_size=16", *TINY, "query=1"], cwd=tmp_path)


def test_tieredimagenet_from_the_release_pickles(tmp_path):
    write_tieredimagenet(tmp_path)
    tasks = TieredImageNetTasks(str(tmp_path), image_size=84)
    assert tasks.describe() == {"train_classes": 351, "val_classes": 97, "test_classes": 160}
    check_episodes(tasks, way=5, shot=1, query=1, channels=3, size=84)
    run_in_process("maml-train", ["dataset=tieredimagenet", f"data_root={tmp_path}", "dataset.image_size=16", *TINY, "query=1"], cwd=tmp_path)


def test_a_second_build_maps_the_store_without_decoding_or_reading_it_whole(tmp_path, monkeypatch):
    # A store of 112 MiB, written as a decoded store is (images.npy + index.json): the sampler must open it
    # memory-mapped and read only the drawn images' rows.
    classes, per_class, shape = 40, 240, (3, 64, 64)
    folder = tmp_path / "stores" / "maml-cli-store-test"
    chunk = np.random.default_rng(0).integers(0, 256, (per_class, *shape), dtype=np.uint8)
    store.write_store_rows(folder, [f"c{i}" for i in range(classes)], [per_class] * classes, (chunk for _ in range(classes)))

    def resident_bytes() -> int:
        return int(next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS")).split()[1]) * 1024

    # Warm torch up on episodes of the same shape from a tensor, so that its first allocations do not count.
    warm = StoreSampler(torch.zeros(80, *shape, dtype=torch.uint8), np.arange(0, 80, 16), np.full(5, 16), 5, 1, 15, "warm-up")
    for _ in range(3):
        warm.sample(torch.Generator().manual_seed(0))
    before = resident_bytes()
    opened = ImageStore(folder)
    assert isinstance(opened.images, np.memmap)
    sampler = StoreSampler(opened, opened.offsets[:-1], opened.counts, way=5, shot=1, query=15, where="test")
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        sampler.sample(generator)
    grown = resident_bytes() - before
    assert grown < opened.images.nbytes / 8, f"resident memory grew by {grown / 2**20:.0f} MiB for a {opened.images.nbytes / 2**20:.0f} MiB store"
    # A second build opens the store the first one decoded.
    root = write_folder(tmp_path / "images", classes=4)
    FolderTasks(str(root), image_size=16, train_classes=2, val_classes=1, test_classes=1)
    monkeypatch.setattr(store, "decode_image", lambda *a: pytest.fail("decoded again instead of using the store"))
    again = FolderTasks(str(root), image_size=16, train_classes=2, val_classes=1, test_classes=1)
    assert isinstance(again.splits["train"][0].images, np.memmap)


def test_in_memory_draws_the_same_episodes_as_the_memory_map(tmp_path):
    root = write_folder(tmp_path / "images")
    mapped = FolderTasks(str(root), image_size=16, train_classes=4, val_classes=2, test_classes=2)
    held = FolderTasks(str(root), image_size=16, train_classes=4, val_classes=2, test_classes=2, in_memory=True)
    a, b = (t.sampler("train", 3, 1, 2).sample(torch.Generator().manual_seed(5)) for t in (mapped, held))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archives_refuse_members_that_leave_the_target_folder(tmp_path, kind):
    for name in ("../evil.txt", "/abs/evil.txt", "images/../../evil.txt"):
        archive = tmp_path / f"bad.{kind}"
        if kind == "zip":
            with zipfile.ZipFile(archive, "w") as z:
                z.writestr("images/ok.txt", "fine")
                z.writestr(name, "owned")
        else:
            with tarfile.open(archive, "w") as t:
                for member, data in (("images/ok.txt", b"fine"), (name, b"owned")):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
        with pytest.raises(DataError, match="unsafe entry"):
            safe_extract(archive, tmp_path / "out")
        assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "images").exists()
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as t:
        info = tarfile.TarInfo("images/passwd")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(info)
    with pytest.raises(DataError, match="a link or special file"):
        safe_extract(link, tmp_path / "out")


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would have run",))
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps({"image_data": Payload()}))
    with pytest.raises(DataError, match="builtins.print, which a dataset file has no need of"):
        load_pickle(path)


@pytest.mark.skipif(not (SHARED_OMNIGLOT / "omniglot" / "images_background.zip").is_file(), reason="shared Omniglot copy not present")
def test_real_omniglot_through_dataset_folder_gives_exactly_the_images_of_dataset_omniglot(tmp_path):
    # Two alphabets of the real release (one from each set), extracted as Omniglot keeps them.
    for set_name, alphabet in (("images_background", "Latin"), ("images_evaluation", "Angelic")):
        with zipfile.ZipFile(SHARED_OMNIGLOT / "omniglot" / f"{set_name}.zip") as archive:
            archive.extractall(tmp_path / "omniglot-py", [n for n in archive.namelist() if n.startswith(f"{set_name}/{alphabet}/")])
    omniglot = OmniglotTasks(str(tmp_path), val_characters=5, test_characters=5, download=False, check_counts=False)
    folder = FolderTasks(str(tmp_path / "omniglot-py" / "images_background"), image_size=28, channels=1, invert=True,
                         class_depth=2, store_dir=str(tmp_path / "folder-store"))
    stored = folder.splits["train"][0]
    assert stored.classes == [c for c in omniglot.listing.characters if c.startswith("Latin/")] and len(stored.classes) == 26
    for name in stored.classes:
        rows = slice(stored.offsets[stored.classes.index(name)], stored.offsets[stored.classes.index(name) + 1])
        assert torch.equal(torch.from_numpy(stored.images[rows][:, 0]), omniglot.images[omniglot.listing.characters.index(name)])


def test_maml_eval_scores_a_folder_run_whose_images_moved(tmp_path, capsys):
    from maml_cli import evaluate
    root = write_folder(tmp_path / "images", classes=8)
    run_in_process("maml-train", ["dataset=folder", f"dataset.root={root}", "dataset.image_size=16", "dataset.train_classes=4",
                                  "dataset.val_classes=2", "dataset.test_classes=2", *TINY, "way=2"], cwd=tmp_path)
    run = next((tmp_path / "outputs" / "runs").iterdir())
    moved = root.rename(tmp_path / "moved")
    # data_root is where datasets live, not dataset=folder's own root: typing it changes nothing for this run.
    with pytest.raises(SystemExit):
        evaluate.main([f"checkpoint={run}", "test_tasks=3", f"data_root={tmp_path}"])
    assert f"dataset.root={root} is not a folder" in capsys.readouterr().err
    evaluate.main([f"checkpoint={run}", "test_tasks=3", f"dataset.root={moved}"])
    assert "2-way 1-shot, 3 tasks" in capsys.readouterr().out
