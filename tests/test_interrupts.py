"""Ctrl-C and SIGTERM stop a run cleanly, and the printed resume command continues it to the same curve."""
import os
import re
import shlex
import signal
import subprocess
import time

import pytest
import torch

from conftest import console_script, read_scalars, run_cli, run_dirs

ARGS = ["dataset=sinusoid", "iterations=600", "meta_batch_size=2", "progress=false", "val_every=200", "val_tasks=2",
        "test_tasks=3", "checkpoint_every=50", "log_every=1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("straight")
    run_cli("maml-train", ARGS, cwd=cwd)
    (run,) = run_dirs(cwd)
    return read_scalars(run)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_stopped_run_resumes_to_the_curve_of_the_uninterrupted_run(tmp_path, uninterrupted, sig):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([console_script("maml-train"), *ARGS], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    # The first checkpoint (iteration 50) says training is under way; 550 iterations remain.
    while not list((tmp_path / "outputs").rglob("last.pt")):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.02)
    if sig == signal.SIGKILL:
        # Let it log past its last checkpoint (resuming must drop those events, not repeat them): counted in
        # iterations, not seconds, so that a fast machine cannot finish the run first.
        for line in process.stdout:
            logged = re.search(r"iteration (\d+) of", line)
            if logged and int(logged.group(1)) >= 60:
                break
    process.send_signal(sig)
    output, _ = process.communicate(timeout=120)
    (run,) = run_dirs(tmp_path)
    stopped_at = torch.load(run / "last.pt", weights_only=True)["iteration"]
    assert 50 <= stopped_at < 600
    if sig == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
        resume_command = ["maml-train", *ARGS, f"resume={run}"]
    else:
        assert process.returncode == 130, output[-3000:]
        assert f"stopped by {sig.name} after iteration" in output and "Traceback" not in output
        resume_command = shlex.split(output.split("Resume with: ", 1)[1].splitlines()[0])
        assert resume_command[0] == "maml-train" and f"resume={run}" in resume_command
    run_cli("maml-train", resume_command[1:], cwd=tmp_path)
    resumed = read_scalars(run)
    # Every step once, with the values of the run that was never stopped, up to the final test.
    assert resumed["train/loss"] == uninterrupted["train/loss"]
    assert resumed["val/mse"] == uninterrupted["val/mse"]
    assert resumed["test/mse_by_inner_step"] == uninterrupted["test/mse_by_inner_step"]


def test_a_second_ctrl_c_quits_at_once_without_a_traceback(tmp_path):
    # Iterations of 3,000 tasks take seconds; the second SIGINT follows the first as soon as its warning is printed.
    args = ["dataset=sinusoid", "iterations=100", "meta_batch_size=3000", "progress=false", "checkpoint_every=1", "val_every=100"]
    process = subprocess.Popen([console_script("maml-train"), *args], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "outputs").rglob("last.pt")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    (run,) = run_dirs(tmp_path)
    before = torch.load(run / "last.pt", weights_only=True)["iteration"]
    process.send_signal(signal.SIGINT)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "SIGINT received" in line:
            process.send_signal(signal.SIGINT)
            break
    output = "".join(lines) + process.communicate(timeout=60)[0]
    assert process.returncode == 130 and "Traceback" not in output, output[-3000:]
    assert "maml-train: interrupted;" in output and "last.pt (written before the interrupt) is kept" in output
    # The iteration in flight was abandoned, not finished and saved (no wall-clock bound: shared machines are noisy).
    assert torch.load(run / "last.pt", weights_only=True)["iteration"] == before, output[-2000:]
