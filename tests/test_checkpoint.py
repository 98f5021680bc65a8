"""Checkpoints: written atomically, loaded without running code, and unreadable ones reported by path."""
import pytest
import torch

from conftest import run_in_process
from maml_cli import checkpoint as checkpoint_module
from maml_cli.checkpoint import load_checkpoint, save_checkpoint
from maml_cli.errors import UserError


class RunsCode:
    """Unpickling this object would create the file named by ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "owned"
    torch.save({"format": "maml-cli-checkpoint", "version": 1, "payload": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="was refused: it holds objects other than tensors"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_truncated_checkpoint_is_reported_with_its_path(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"iteration": 3, "model": {"w": torch.randn(100, 100)}}, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError, match=f"checkpoint {path} cannot be read; it may be truncated"):
        load_checkpoint(path)


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"iteration": 1, "model": {"w": torch.ones(3)}}, path)

    def crash_half_way(obj, handle):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"iteration": 2, "model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "a temporary file was left behind"


def test_a_file_that_is_not_a_maml_cli_checkpoint_is_named(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="is not a maml-cli checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_a_non_finite_loss_stops_the_run_at_once_with_a_hint(tmp_path):
    result = run_in_process("maml-train", ["dataset=sinusoid", "inner_lr=1e30", "iterations=20", "progress=false"], cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the meta-training loss became" in result.stderr and "at iteration 1;" in result.stderr
    assert "Try a smaller inner_lr or outer_lr" in result.stderr and "none (no checkpoint was written yet)" in result.stderr
    assert not list((tmp_path / "outputs").rglob("config.yaml")), "a run that trained nothing was left behind"


def test_resuming_from_a_damaged_last_pt_names_the_checkpoint_that_still_loads(tmp_path):
    args = ["dataset=sinusoid", "iterations=4", "meta_batch_size=3", "progress=false", "val_every=2", "val_tasks=4", "test_tasks=5"]
    run_in_process("maml-train", args, cwd=tmp_path)
    (run,) = [p.parent for p in (tmp_path / "outputs").rglob("last.pt")]
    best_iteration = torch.load(run / "best.pt", weights_only=True)["iteration"]
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:300])
    result = run_in_process("maml-train", [*args, f"resume={run}"], cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"checkpoint {run / 'last.pt'} cannot be read; it may be truncated" in result.stderr
    assert f"The run's {run / 'best.pt'} (iteration {best_iteration}) loads" in result.stderr
    assert (run / "best.pt").exists(), "a failed resume must not remove the run"


def test_kill_9_at_any_moment_leaves_a_whole_last_pt(tmp_path):
    # checkpoint_every=1 writes last.pt every few milliseconds, so a SIGKILL lands in or near a write.
    import os
    import random
    import signal
    import subprocess
    import time

    from conftest import console_script

    args = ["dataset=sinusoid", "iterations=100000", "meta_batch_size=1", "progress=false", "checkpoint_every=1", "val_every=100000"]
    rng = random.Random(0)
    for attempt in range(4):
        cwd = tmp_path / str(attempt)
        cwd.mkdir()
        process = subprocess.Popen([console_script("maml-train"), *args], cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not list((cwd / "outputs").rglob("last.pt")):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.5))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        (last,) = (cwd / "outputs").rglob("last.pt")
        assert load_checkpoint(last)["iteration"] >= 1


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n", bytes(300), bytes(range(256)) * 4],
                         ids=["empty", "text", "zeros", "random"])
def test_damaged_files_are_reported_as_unreadable_not_as_malicious(tmp_path, content):
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"checkpoint {path} cannot be read; it may be truncated or not a checkpoint"):
        load_checkpoint(path)


def test_resuming_clears_the_temporary_file_of_a_write_cut_short(tmp_path):
    args = ["dataset=sinusoid", "meta_batch_size=3", "progress=false", "val_every=2", "val_tasks=4", "test_tasks=5"]
    run_in_process("maml-train", [*args, "iterations=4"], cwd=tmp_path)
    (run,) = [p.parent for p in (tmp_path / "outputs").rglob("last.pt")]
    leftovers = [run / ".last.pt.k9x2.tmp", run / ".best.pt.a1b2.tmp"]  # the names save_checkpoint's mkstemp gives
    for leftover in leftovers:
        leftover.write_bytes(b"half a checkpoint")
    run_in_process("maml-train", [*args, "iterations=5", f"resume={run}"], cwd=tmp_path)
    assert not any(p.exists() for p in leftovers) and load_checkpoint(run / "last.pt")["iteration"] == 5


def test_resume_of_a_folder_that_is_not_a_run_says_so_and_leaves_nothing(tmp_path):
    result = run_in_process("maml-train", ["dataset=sinusoid", "resume=outputs/runs/typo"], cwd=tmp_path, check=False)
    assert result.returncode == 2 and "resume=outputs/runs/typo is not a run directory" in result.stderr
    assert not (tmp_path / "outputs" / "runs" / "typo").exists()
