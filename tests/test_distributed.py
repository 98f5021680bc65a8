"""Beyond one process: the meta-batch over ranks (torchrun, gloo), sweeps on Hydra's joblib launcher, the run-directory lock."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import console_script, read_scalars, run_dirs, run_in_process
from maml_cli.distributed import Ranks, check_meta_batch
from maml_cli.errors import UserError
from test_e2e import SINE, only_run, steps

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

# The meta-gradient of one meta-batch, in float64, by one process or by each rank's share summed over the ranks:
# the code the trainer runs (accumulate_meta_gradient on this rank's share, then Ranks.sum_gradients).
GRADIENTS = textwrap.dedent("""
    import json, sys
    import torch
    from maml_cli import distributed
    from maml_cli.algorithms.maml import MAML
    from maml_cli.algorithms.reptile import Reptile
    from maml_cli.loop import accumulate_meta_gradient
    from maml_cli.models import MLP
    from maml_cli.tasks import Episode, regression_objective

    torch.set_default_dtype(torch.float64)
    ranks = distributed.start()
    generator = torch.Generator().manual_seed(0)
    episodes = []
    for _ in range(4):
        x = torch.rand(20, 1, generator=generator, dtype=torch.float64) * 10 - 5
        y = torch.rand(1, generator=generator, dtype=torch.float64) * 4 * torch.sin(x + torch.rand(1, generator=generator, dtype=torch.float64))
        episodes.append(Episode(x[:10], y[:10], x[10:], y[10:]))
    out = {}
    for name, algorithm in (("maml", MAML(inner_lr=0.01, inner_steps=2, test_inner_steps=2)),
                            ("reptile", Reptile(inner_lr=0.01, inner_steps=3, test_inner_steps=3, inner_batch=5))):
        torch.manual_seed(1)
        model = MLP(1, 1, (16, 16))
        accumulate_meta_gradient(algorithm, model, ranks.share(episodes), regression_objective, mean_over=len(episodes))
        ranks.sum_gradients(model)
        out[name] = {n: p.grad.reshape(-1).tolist() for n, p in model.named_parameters()}
    if ranks.main:
        with open(sys.argv[1], "w") as handle:
            json.dump(out, handle)
    distributed.stop()
""")


def torchrun(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None, script: str | None = None) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node=2 <maml-train or script> ARGS``, started the way a user starts it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script or console_script("maml-train"), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finished(process: subprocess.Popen, timeout: float = 300) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{output[-5000:]}")
    return output


def test_two_gloo_ranks_compute_the_single_process_meta_gradient_in_float64(tmp_path):
    script = tmp_path / "gradients.py"
    script.write_text(GRADIENTS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.json")], check=True, env=env, timeout=300)
    process = torchrun([str(tmp_path / "two.json")], tmp_path, script=str(script))
    output = finished(process)
    assert process.returncode == 0, output[-5000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for algorithm in ("maml", "reptile"):
        for name, values in one[algorithm].items():
            assert torch.allclose(torch.tensor(two[algorithm][name]), torch.tensor(values), rtol=1e-12, atol=1e-15), (algorithm, name)
        assert any(abs(v) > 0 for values in one[algorithm].values() for v in values)


def test_a_two_rank_run_is_the_one_process_run_and_resumes_under_torchrun(tmp_path):
    common = ["dataset=sinusoid", "meta_batch_size=4", "progress=false", "log_every=1", "val_every=2", "val_tasks=4",
              "test_tasks=5", "checkpoint_every=2"]
    (tmp_path / "one").mkdir()
    run_in_process("maml-train", [*common, "iterations=4"], cwd=tmp_path / "one")
    reference = read_scalars(only_run(tmp_path / "one"))
    (tmp_path / "two").mkdir()
    output = finished(process := torchrun([*common, "iterations=2"], tmp_path / "two"))
    assert process.returncode == 0, output[-5000:]
    run = only_run(tmp_path / "two")
    assert len(list(run.glob("events.out.tfevents.*"))) == 1 and (run / ".hydra").is_dir() and (run / "last.pt").is_file()
    assert run_dirs(tmp_path / "two") == [run], "every rank must write into one run folder"
    output = finished(process := torchrun([f"resume={run}", "iterations=4"], tmp_path / "two"))
    assert process.returncode == 0, output[-5000:]
    assert "resumed" in output
    scalars = read_scalars(run)
    for tag in ("train/loss", "val/mse"):
        assert steps(scalars, tag) == steps(reference, tag), tag
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in reference[tag]], rel=1e-5), tag
    # The 2-iteration run had its own final test; the resumed run's final test follows it in the events.
    final = scalars["test/mse_by_inner_step"][-len(reference["test/mse_by_inner_step"]):]
    assert [v for _, v in final] == pytest.approx([v for _, v in reference["test/mse_by_inner_step"]], rel=1e-5)
    assert dict(scalars["test/mse"])[4] == pytest.approx(dict(reference["test/mse"])[4], rel=1e-5)
    assert torch.load(run / "last.pt", weights_only=True)["iteration"] == 4


def test_a_rank_killed_mid_run_ends_the_job_with_an_error_naming_it(tmp_path):
    process = torchrun(["dataset=sinusoid", "meta_batch_size=4", "iterations=1000000", "progress=false", "val_every=1000000"], tmp_path)
    deadline = time.monotonic() + 180
    while not list(tmp_path.rglob("events.out.tfevents.*")):  # training has started
        assert process.poll() is None and time.monotonic() < deadline, "the run did not start"
        time.sleep(0.5)
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    killed = time.monotonic()
    os.kill(int(workers[1]), signal.SIGKILL)
    output = finished(process, timeout=120)
    assert process.returncode != 0 and time.monotonic() - killed < 90
    assert "rank" in output and ("Signal 9" in output or "SIGKILL" in output), output[-3000:]


def test_a_misspelt_key_under_torchrun_is_one_paragraph_not_one_per_rank(tmp_path):
    output = finished(torchrun(["dataset=sinusoid", "inner_setps=3"], tmp_path), timeout=180)
    assert output.count("maml-train: error:") == 1 and "inner_setps" in output, output[-3000:]
    assert "Traceback" not in output.split("maml-train: error:")[0], output[-3000:]


def test_a_meta_batch_the_ranks_cannot_share_is_refused_and_shares_are_the_meta_batch():
    with pytest.raises(UserError, match="meta_batch_size=3 cannot be shared equally by 2 ranks"):
        check_meta_batch(3, Ranks(0, 2))
    items = list(range(8))
    assert Ranks(0, 2).share(items) + Ranks(1, 2).share(items) == items
    assert [i for i in range(5) if Ranks(1, 2).owns(i)] == [1, 3]


def test_a_two_member_sweep_through_the_joblib_launcher_writes_two_runs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    result = run_in_process("maml-train", ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SINE, "seed=0,1"], cwd=tmp_path)
    runs = run_dirs(tmp_path)
    assert [run.name for run in runs] == ["seed=0", "seed=1"] and len({run.parent for run in runs}) == 1, result.stdout[-2000:]
    for run in runs:
        assert steps(read_scalars(run), "train/loss") == [1, 2, 3, 4] and (run / "last.pt").is_file()


def test_a_second_process_training_in_a_run_directory_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
    run_in_process("maml-train", SINE, cwd=tmp_path)
    run = only_run(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from maml_cli.run_lock import run_lock
        with run_lock(Path({str(run)!r})):
            print("locked", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = run_in_process("maml-train", [f"resume={run}", "iterations=6"], cwd=tmp_path, check=False)
        assert refused.returncode == 2 and f"process {holder.pid} on " in refused.stderr and "is being trained by" in refused.stderr
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed: its lock file is left, with its process id, but nobody holds the lock.
    assert f"process {holder.pid}" in (run / ".maml-cli.lock").read_text()
    caplog.set_level("WARNING")
    resumed = run_in_process("maml-train", [f"resume={run}", "iterations=6"], cwd=tmp_path)
    assert f"was locked by process {holder.pid}" in resumed.stdout + resumed.stderr + caplog.text
    assert steps(read_scalars(run), "train/loss") == [1, 2, 3, 4, 5, 6]
    assert (run / ".maml-cli.lock").read_text() == ""
