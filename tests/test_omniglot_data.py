"""Omniglot files: verification by counts, safe extraction, splits, the decoded cache, and the real copy."""
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import SHARED_OMNIGLOT, write_small_omniglot
from maml_cli.data import omniglot
from maml_cli.data import store
from maml_cli.data.files import safe_extract
from maml_cli.data.omniglot import ALPHABETS, Listing, OmniglotTasks, ensure_files, split_classes, verify_set
from maml_cli.errors import DataError


def fake_full_tree(root: Path) -> Path:
    """Empty files in the full release's layout: enough for the counting checks."""
    for set_name, alphabets in ALPHABETS.items():
        for alphabet, n in alphabets.items():
            for c in range(1, n + 1):
                folder = root / "omniglot-py" / set_name / alphabet / f"character{c:02d}"
                folder.mkdir(parents=True)
                for d in range(1, 21):
                    (folder / f"0000_{d:02d}.png").touch()
    return root


def full_listing() -> Listing:
    characters = [f"{a}/character{c:02d}" for s in ALPHABETS.values() for a, n in s.items() for c in range(1, n + 1)]
    return Listing(characters, [[] for _ in characters], n_background=964)


def test_verification_counts_the_full_release_and_names_what_is_missing(tmp_path):
    root = fake_full_tree(tmp_path)
    background = root / "omniglot-py" / "images_background"
    found, problems = verify_set(background, "images_background")
    assert problems == [] and sum(len(c) for c in found.values()) == 964
    shutil.rmtree(background / "Latin")
    shutil.rmtree(background / "Greek" / "character03")
    (background / "Korean" / "character01" / "0000_07.png").unlink()
    _, problems = verify_set(background, "images_background")
    assert "images_background: missing alphabet(s) Latin" in problems
    assert "images_background/Greek: 23 characters, expected 24" in problems
    assert "images_background/Korean/character01: 19 images, expected 20" in problems


def test_missing_data_offline_says_where_how_and_mentions_sinusoid(tmp_path):
    with pytest.raises(DataError) as error:
        ensure_files(tmp_path / "nowhere", download=False)
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "omniglot-py") in message
    assert "images_background.zip" in message and "dataset=sinusoid" in message and "MAML_CLI_DATA" in message


def test_an_incomplete_copy_is_downloaded_through_torchvision_and_a_failed_download_names_what_is_missing(tmp_path, monkeypatch):
    # No network here: torchvision's download is replaced by one that places the zip it would fetch, or fails as offline.
    import urllib.error
    from torchvision.datasets import utils as torchvision_utils
    source = write_small_omniglot(tmp_path / "src", {"images_background": {"A": 2}, "images_evaluation": {"B": 2}}, images=2)
    fetched = []

    def place_zip(url, download_root, filename, md5):
        fetched.append(url)
        set_name = filename.removesuffix(".zip")
        shutil.make_archive(str(Path(download_root) / set_name), "zip", source / "omniglot-py", set_name)
        safe_extract(Path(download_root) / filename, Path(download_root))

    root = tmp_path / "root"
    shutil.copytree(source / "omniglot-py" / "images_background", root / "omniglot-py" / "images_background")
    monkeypatch.setattr(torchvision_utils, "download_and_extract_archive", place_zip)
    listing = ensure_files(root, download=True, check_counts=False)
    # Only the incomplete set is fetched, from where torchvision's Omniglot fetches it.
    assert fetched == ["https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_evaluation.zip"]
    assert listing.characters == ["A/character01", "A/character02", "B/character01", "B/character02"]

    shutil.rmtree(root / "omniglot-py" / "images_evaluation")
    (root / "omniglot-py" / "images_evaluation.zip").unlink()
    monkeypatch.setattr(torchvision_utils, "download_and_extract_archive", lambda url, download_root, filename, md5: None)
    with pytest.raises(DataError, match=r"\(incomplete copy\)") as error:
        ensure_files(root, download=True, check_counts=False)
    assert f"{root / 'omniglot-py' / 'images_evaluation'} does not exist" in str(error.value)

    def offline(url, download_root, filename, md5):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision_utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as error:
        ensure_files(root, download=True, check_counts=False)
    assert "download failed: <urlopen error [Errno -3] Temporary failure in name resolution>" in str(error.value)
    assert f"{root / 'omniglot-py' / 'images_evaluation'} does not exist" in str(error.value)


def test_a_zip_that_cannot_be_extracted_here_is_a_data_error_naming_it(tmp_path, monkeypatch):
    source = write_small_omniglot(tmp_path / "src", {"images_background": {"A": 2}, "images_evaluation": {"B": 2}}, images=2)
    folder = tmp_path / "root" / "omniglot-py"
    folder.mkdir(parents=True)
    shutil.make_archive(str(folder / "images_background"), "zip", source / "omniglot-py", "images_background")

    def denied(archive, destination):
        raise PermissionError(13, "Permission denied", str(destination / "images_background"))

    monkeypatch.setattr(omniglot, "safe_extract", denied)
    for download in (False, True):
        with pytest.raises(DataError, match=r"\(extraction failed\)") as error:
            ensure_files(tmp_path / "root", download=download, check_counts=False)
        assert f"extracting {folder / 'images_background'}.zip failed: [Errno 13] Permission denied" in str(error.value)


def test_safe_extract_refuses_path_traversal_and_absolute_paths(tmp_path):
    for name in ("../evil.txt", "/abs/evil.txt", "images_background/../../evil.txt"):
        archive = tmp_path / "bad.zip"
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("images_background/ok.txt", "fine")
            z.writestr(name, "owned")
        with pytest.raises(DataError, match="unsafe entry"):
            safe_extract(archive, tmp_path / "out")
        assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "images_background").exists()


def test_truncated_zip_is_reported(tmp_path):
    archive = tmp_path / "images_background.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("images_background/a.txt", "x" * 10000)
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(DataError, match="not a readable archive"):
        safe_extract(archive, tmp_path / "out")


def test_random_split_sizes_and_independence_from_training_seed():
    listing = full_listing()
    split = split_classes(listing, "random", split_seed=0)
    assert {k: len(v) // 4 for k, v in split.items()} == {"train": 1100, "val": 100, "test": 423}
    characters = [set(v[:, 0].tolist()) for v in split.values()]
    assert not (characters[0] & characters[1] or characters[0] & characters[2] or characters[1] & characters[2])
    assert all(torch.equal(split[k], split_classes(listing, "random", split_seed=0)[k]) for k in split)
    assert not torch.equal(split["test"], split_classes(listing, "random", split_seed=1)["test"])


def test_lake_split_uses_background_for_training_and_evaluation_for_test():
    split = split_classes(full_listing(), "lake", val_characters=100)
    assert len(split["test"]) == 659 * 4 and split["test"][:, 0].min() == 964
    assert len(split["train"]) + len(split["val"]) == 964 * 4 and split["train"][:, 0].max() < 964


def test_vinyals_split_reads_class_files_and_rejects_unknown_classes(tmp_path):
    (tmp_path / "train.txt").write_text("Latin/character01/rot000\nLatin/character01/rot090\n")
    (tmp_path / "val.txt").write_text("Greek/character02/rot180\n")
    (tmp_path / "test.txt").write_text("Angelic/character20/rot270\n")
    split = split_classes(full_listing(), "vinyals", split_dir=str(tmp_path))
    names = full_listing().characters
    assert [(names[c], r) for c, r in split["train"].tolist()] == [("Latin/character01", 0), ("Latin/character01", 1)]
    assert [(names[c], r) for c, r in split["test"].tolist()] == [("Angelic/character20", 3)]
    (tmp_path / "test.txt").write_text("Angelic/character99/rot000\nKlingon/character01/rot000\n")
    with pytest.raises(DataError, match=r"names 2 class\(es\) that do not exist.*Angelic/character99/rot000"):
        split_classes(full_listing(), "vinyals", split_dir=str(tmp_path))
    with pytest.raises(DataError, match="dataset.split_dir"):
        split_classes(full_listing(), "vinyals", split_dir=None)


@pytest.mark.skipif(not (SHARED_OMNIGLOT / "splits" / "omniglot_vinyals").is_dir(), reason="shared split files not present")
def test_vinyals_split_files_give_the_published_class_counts():
    split = split_classes(full_listing(), "vinyals", split_dir=str(SHARED_OMNIGLOT / "splits" / "omniglot_vinyals"))
    assert {k: len(v) for k, v in split.items()} == {"train": 4112, "val": 688, "test": 1692}


def test_small_copy_decodes_rotates_and_caches(tmp_path, monkeypatch):
    root = write_small_omniglot(tmp_path, {"images_background": {"A": 3}, "images_evaluation": {"B": 3}}, images=4)
    tasks = OmniglotTasks(str(root), val_characters=1, test_characters=2, download=False, check_counts=False)
    assert tasks.images.shape == (6, 4, 28, 28) and tasks.images.dtype == torch.uint8
    sampler = tasks.sampler("train", way=12, shot=1, query=1)
    # Class k of a character is the character turned k quarter turns.
    characters, turns = tasks.classes["train"].unbind(1)
    for i in range(len(characters)):
        expected = torch.rot90(tasks.images[characters[i]], int(turns[i]), dims=(-2, -1))
        assert torch.equal(sampler.class_images[i, :, 0], expected)
    # A second load reads the cache instead of decoding.
    monkeypatch.setattr(store, "decode_image", lambda *a: pytest.fail("decoded again instead of using the store"))
    again = OmniglotTasks(str(root), val_characters=1, test_characters=2, download=False, check_counts=False)
    assert torch.equal(again.images, tasks.images)


def test_a_non_image_file_is_reported_with_its_path(tmp_path):
    root = write_small_omniglot(tmp_path, {"images_background": {"A": 2}, "images_evaluation": {"B": 2}}, images=2)
    bad = next((root / "omniglot-py" / "images_evaluation").rglob("*.png"))
    bad.write_text("not a png")
    with pytest.raises(DataError, match=str(bad).replace("(", r"\(").replace(")", r"\)")):
        OmniglotTasks(str(root), val_characters=1, test_characters=1, download=False, check_counts=False)


@pytest.mark.skipif(not (SHARED_OMNIGLOT / "omniglot" / "images_background.zip").is_file(), reason="shared Omniglot copy not present")
def test_real_omniglot_zips_placed_by_hand_are_extracted_verified_and_split(tmp_path):
    folder = tmp_path / "omniglot-py"
    folder.mkdir()
    for name in ("images_background.zip", "images_evaluation.zip"):
        shutil.copy(SHARED_OMNIGLOT / "omniglot" / name, folder / name)
    tasks = OmniglotTasks(str(tmp_path), download=False)
    assert tasks.images.shape == (1623, 20, 28, 28)
    assert {k: len(v) for k, v in tasks.classes.items()} == {"val": 400, "test": 1692, "train": 4400}
    assert tasks.listing.characters[0] == "Alphabet_of_the_Magi/character01"


def test_a_data_root_that_is_a_file_is_named_as_such(tmp_path):
    not_a_folder = tmp_path / "data.txt"
    not_a_folder.write_text("not a folder")
    with pytest.raises(DataError, match=f"data_root={not_a_folder} is a file, not a folder"):
        ensure_files(not_a_folder, download=False)


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_run_waits_while_another_prepares_the_same_data_root(tmp_path):
    # Runs started together share a data root: while one holds the preparation lock (extracting,
    # decoding), another must wait rather than list or replace half-extracted folders.
    import fcntl
    import threading
    write_small_omniglot(tmp_path / "src", {"images_background": {"A": 2}, "images_evaluation": {"B": 2}}, images=2)
    folder = tmp_path / "root" / "omniglot-py"
    folder.mkdir(parents=True)
    for set_name in ("images_background", "images_evaluation"):
        shutil.make_archive(str(folder / set_name), "zip", tmp_path / "src" / "omniglot-py", set_name)
    loaded = []
    with open(tmp_path / "root" / ".omniglot-py.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        thread = threading.Thread(target=lambda: loaded.append(omniglot.load_images(tmp_path / "root", check_counts=False, download=False)))
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive() and not (folder / "images_background").exists()
        fcntl.flock(held, fcntl.LOCK_UN)
    thread.join(timeout=60)
    images, listing = loaded[0]
    assert images.shape == (4, 2, 28, 28) and len(listing.characters) == 4
