"""``maml-results`` on runs made here: a sweep over two seeds, an interrupted run, an LSTM on the sequence
protocol, and copies damaged on purpose."""
import csv
import io
import json
import os
import shutil
import signal
import statistics
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import read_scalars, run_dirs, run_in_process
from maml_cli import results
from test_e2e import omniglot_args


def interrupt_when_training(cwd: Path, done: threading.Event) -> None:
    """SIGINT this process, as Ctrl-C would, once the run under ``cwd`` has written its first checkpoint."""
    while not done.wait(0.01):
        if list((cwd / "outputs").rglob("last.pt")):
            os.kill(os.getpid(), signal.SIGINT)
            return


@pytest.fixture(scope="module")
def tree(tmp_path_factory, small_omniglot) -> Path:
    """``sweep/`` (seed=0,1), ``interrupted/``, ``lstm/`` (sequence protocol) and ``damaged/`` copies of a sweep member."""
    root = tmp_path_factory.mktemp("results")
    for name in ("sweep", "interrupted", "lstm"):
        (root / name).mkdir()
    run_in_process("maml-train", ["-m", *omniglot_args(small_omniglot, 2), "seed=0,1"], cwd=root / "sweep")
    run_in_process("maml-train", omniglot_args(small_omniglot, 2, "algo=lstm", "algo.protocol=sequence", "algo.presentations=3",
                                               "algo.hidden_size=8"), cwd=root / "lstm")
    done = threading.Event()
    watcher = threading.Thread(target=interrupt_when_training, args=(root / "interrupted", done))
    watcher.start()
    try:
        stopped = run_in_process("maml-train", omniglot_args(small_omniglot, 1000), cwd=root / "interrupted", check=False)
    finally:
        done.set()
        watcher.join()
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    member = run_dirs(root / "sweep")[0]
    garbage = shutil.copytree(member, root / "damaged" / "garbage_events")
    (events,) = garbage.glob("events.out.tfevents.*")
    events.write_bytes(b"this is not a TensorBoard event file" * 50)
    no_config = shutil.copytree(member, root / "damaged" / "no_config")
    (no_config / "config.yaml").unlink()
    return root


def maml_results(capsys, *args) -> str:
    results.main([str(a) for a in args])
    return capsys.readouterr().out


def as_json(capsys, *args) -> dict:
    return json.loads(maml_results(capsys, *args, "--format", "json"))


def test_one_row_per_run_with_its_state_and_damaged_runs_named_not_fatal(tree, capsys):
    table = as_json(capsys, tree)
    rows = {row["run"]: row for row in table["runs"]}
    sweep = [name for name in rows if name.startswith("sweep/")]
    assert [name.rsplit("/", 1)[1] for name in sweep] == ["seed=0", "seed=1"]
    assert len(rows) == 6
    for name in sweep:
        assert rows[name]["state"] == "finished" and rows[name]["iterations"] == 2 and rows[name]["metric"] == "accuracy"
        assert 0 <= rows[name]["test"]["mean"] <= 1 and rows[name]["test"]["ci95"] >= 0 and rows[name]["wall_seconds"] >= 0
        assert len(rows[name]["test_by_inner_step"]) == 3  # after 0, 1 and 2 inner steps
        assert rows[name]["tasks_per_second_logged"] and rows[name]["tasks_per_second"] > 0
    (interrupted,) = run_dirs(tree / "interrupted")
    stopped_at = torch.load(interrupted / "last.pt", weights_only=True)["iteration"]
    row = rows[next(name for name in rows if name.startswith("interrupted/"))]
    assert 2 <= stopped_at < 1000
    assert row["state"] == f"interrupted at {stopped_at:,} of 1,000" and row["iterations"] == stopped_at
    assert row["test"]["mean"] is None and row["best_val"]["mean"] is not None
    (events,) = (tree / "damaged" / "garbage_events").glob("events.out.tfevents.*")
    assert rows["damaged/garbage_events"]["state"].startswith(f"damaged: {events.name}: ")
    assert rows["damaged/garbage_events"]["test"]["mean"] is None
    assert rows["damaged/no_config"]["state"] == "damaged: config.yaml is missing"
    assert rows["damaged/no_config"]["test"]["mean"] == rows[sweep[0]]["test"]["mean"]  # its events still read


def test_differing_keys_are_the_swept_key_alone(tree, capsys):
    table = as_json(capsys, tree / "sweep")
    assert table["differing_keys"] == ["seed"]
    assert [row["config"] for row in table["runs"]] == [{"seed": 0}, {"seed": 1}]
    assert [row["run"] for row in table["runs"]] == ["seed=0", "seed=1"]  # named below the sweep folder
    # Machine and path keys never count; a node's copy of a top-level key is shown once.
    configs = [{"seed": 0, "device": "cpu", "data_root": "/a", "inner_lr": 0.1, "algo.inner_lr": 0.1},
               {"seed": 0, "device": "cuda", "data_root": "/b", "inner_lr": 0.2, "algo.inner_lr": 0.2}]
    assert results.differing_keys(configs) == ["inner_lr"]


def test_every_format_parses(tree, capsys):
    markdown = maml_results(capsys, tree / "sweep")
    header, rule, *rows = markdown.split("\n\n")[0].splitlines()
    assert header.startswith("| run | algo | dataset | split | seed | state |") and "test accuracy (%) +- 95% CI" in header
    assert rule.startswith("|---|") and len(rows) == 2 and rows[0].startswith("| seed=0 | maml | omniglot | random | 0 | finished |")
    assert "95% CI over the test tasks" in markdown.split("\n\n")[1]
    records = list(csv.DictReader(io.StringIO(maml_results(capsys, tree / "sweep", "--format", "csv"))))
    assert [r["run"] for r in records] == ["seed=0", "seed=1"] and [r["config.seed"] for r in records] == ["0", "1"]
    assert 0 <= float(records[0]["test.mean"]) <= 1 and records[0]["test_by_inner_step.2.inner_steps"] == "2"
    latex = maml_results(capsys, tree / "sweep", "--format", "latex")
    assert latex.startswith(r"\begin{tabular}") and latex.rstrip().endswith(r"\end{tabular}") and r"$\pm$" in latex
    assert r"seed=0 & maml & omniglot" in latex


def test_group_seeds_makes_one_row_with_the_mean_and_sd_over_seeds(tree, capsys):
    single = as_json(capsys, tree / "sweep")["runs"]
    (grouped,) = as_json(capsys, tree / "sweep", "--group-seeds")["runs"]
    assert grouped["n"] == 2 and grouped["config"] == {"seed": [0, 1]} and grouped["state"] == "finished"
    tests = [row["test"]["mean"] for row in single]
    assert grouped["test"]["mean"] == pytest.approx(statistics.mean(tests))
    assert grouped["test"]["sd"] == pytest.approx(statistics.stdev(tests))
    assert grouped["best_val"]["mean"] == pytest.approx(statistics.mean(row["best_val"]["mean"] for row in single))
    markdown = maml_results(capsys, tree / "sweep", "--group-seeds")
    assert "| run | n |" in markdown and "| seed=0, seed=1 | 2 |" in markdown and "+- sd over seeds (n > 1) or 95% CI" in markdown


def test_a_seed_group_shows_the_inner_steps_every_tested_seed_scored(tree):
    # Seeds whose tests scored different steps (score_every 1 and 2): a step only one scored would be that seed's alone.
    every_step, every_other = (results.read_run(run) for run in run_dirs(tree / "sweep"))
    every_other.test.by_inner_step = {k: v for k, v in every_other.test.by_inner_step.items() if k != 1}
    unfinished = results.read_run(run_dirs(tree / "sweep")[0])
    unfinished.test.by_inner_step = {}  # no test yet: it limits no step
    steps = results.Row([every_step, every_other, unfinished]).test_by_inner_step
    assert sorted(every_step.test.by_inner_step) == [0, 1, 2] and sorted(steps) == [0, 2]
    assert steps[2].mean == pytest.approx(statistics.mean([every_step.test.by_inner_step[2].mean, every_other.test.by_inner_step[2].mean]))


def test_eval_takes_the_newest_matching_maml_eval_file(tree, tmp_path, capsys):
    runs = [shutil.copytree(run, tmp_path / run.name) for run in run_dirs(tree / "sweep")]
    run_in_process("maml-eval", [f"checkpoint={runs[0]}", "test_tasks=3", "query=1"], cwd=tmp_path)
    (report,) = runs[0].glob("eval_best_test_3w1s_1q_3tasks_seed0_2steps.json")
    expected = json.loads(report.read_text())["by_inner_step"][-1]
    rows = as_json(capsys, *runs, "--eval", "eval_best_*")["runs"]
    assert rows[0]["test"] == {"mean": expected["mean"], "ci95": expected["ci95"]}
    assert rows[0]["test_on"] == {"tasks": 3, "way": 3, "shot": 1, "query": 1, "eval_file": report.name, "transductive": True}
    assert rows[1]["test"]["mean"] is None and rows[1]["test_on"] is None  # no file of its own: no number
    assert "3 tasks, 3w1s 1q (maml-eval)" in maml_results(capsys, *runs, "--eval", "eval_best_*")
    # A newer non-transductive evaluation is the one taken, and the table says how its queries were scored.
    run_in_process("maml-eval", [f"checkpoint={runs[0]}", "test_tasks=3", "query=1", "transductive=false"], cwd=tmp_path)
    (other,) = runs[0].glob("eval_best_test_3w1s_1q_3tasks_seed0_2steps_nontransductive.json")
    rows = as_json(capsys, *runs, "--eval", "eval_best_*")["runs"]
    assert rows[0]["test_on"] == {"tasks": 3, "way": 3, "shot": 1, "query": 1, "eval_file": other.name, "transductive": False}
    assert rows[0]["test"]["mean"] == json.loads(other.read_text())["by_inner_step"][-1]["mean"]
    assert "3 tasks, 3w1s 1q, non-transductive (maml-eval)" in maml_results(capsys, *runs, "--eval", "eval_best_*")


def test_curves_prints_a_runs_validation_and_test_tables(tree, capsys):
    (member, _), (lstm,) = run_dirs(tree / "sweep"), run_dirs(tree / "lstm")
    text = maml_results(capsys, "--curves", member)
    assert "| iteration | meta-train accuracy (batch) | meta-val accuracy | 95% CI |" in text
    assert [line.split(" | ")[0] for line in text.splitlines() if line.startswith(("| 2 ", "| 1 ", "| 0 "))] == ["| 2", "| 0", "| 1", "| 2"]
    assert "| inner steps at test | meta-test accuracy | 95% CI |" in text
    (interrupted,) = run_dirs(tree / "interrupted")
    every = maml_results(capsys, "--curves", interrupted, "--every", "1000")
    assert "(no meta-test yet: the run has not finished)" in every
    stopped_at = torch.load(interrupted / "last.pt", weights_only=True)["iteration"]
    validations = len(range(2, stopped_at + 1, 2))  # val_every=2
    assert len([line for line in every.splitlines() if line[2:3].isdigit()]) == min(2, validations)  # the first and the last
    sequence = maml_results(capsys, "--curves", lstm)
    assert "meta-val accuracy by presentation index at iteration 2: 1: " in sequence
    assert "| presentation index | meta-test accuracy | 95% CI |" in sequence and "\n| 3 | " in sequence


def test_plots_are_png_figures(tree, tmp_path, capsys):
    out = maml_results(capsys, tree, "--plots", tmp_path / "figures")
    names = ["validation.png", "test_by_inner_step.png", "by_presentation.png"]
    for name in names:
        path = tmp_path / "figures" / name
        assert f"written: {path}" in out
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(names)
    # A sweep's figures are labelled by the swept key.
    assert results.labels([results.read_run(run) for run in run_dirs(tree / "sweep")]) == ["seed=0", "seed=1"]


def test_a_resumed_runs_event_files_merge_as_tensorboard_merges_them(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    first = SummaryWriter(log_dir=str(tmp_path))
    for step in range(1, 11):
        first.add_scalar("train/loss", float(step), step)
    first.close()
    # Dated a second earlier, as a resumed run's first file always is: written in the same second by one process, the
    # two names would be ordered by torch's per-process file counter, where "...10.resumed" sorts before "...9".
    (first_file,) = tmp_path.glob("events.out.tfevents.*")
    stamp = first_file.name.split(".")[3]
    first_file.rename(tmp_path / first_file.name.replace(f".{stamp}.", f".{int(stamp) - 1:010d}.", 1))
    # A resumed process: steps from 6 on were logged past the last checkpoint and are superseded.
    second = SummaryWriter(log_dir=str(tmp_path), purge_step=6, filename_suffix=".resumed")
    for step in range(6, 13):
        second.add_scalar("train/loss", 100.0 + step, step)
    second.close()
    merged = results.read_events(tmp_path)
    assert [(p.step, p.value) for p in merged.scalars["train/loss"]] == read_scalars(tmp_path)["train/loss"]
    assert [p.step for p in merged.scalars["train/loss"]] == list(range(1, 13)) and merged.scalars["train/loss"][5].value == 106.0
    assert merged.problems == [] and merged.wall_seconds >= 0


def test_a_run_that_logged_no_rate_gets_one_from_its_iterations_and_wall_time(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    (tmp_path / "config.yaml").write_text("iterations: 20\nmeta_batch_size: 4\nseed: 0\n")
    start = time.time()
    writer = SummaryWriter(log_dir=str(tmp_path))  # its first event is stamped now
    for step in range(1, 11):  # an older run: a loss, no train/tasks_per_second, logged up to 110 s later
        writer.add_scalar("train/loss", 1.0, step, walltime=start + 100 + step)
    writer.close()
    run = results.read_run(tmp_path)
    assert run.state == "unfinished at 10 of 20" and run.iterations == 10 and not run.tasks_per_second_logged
    assert run.wall_seconds == pytest.approx(110, rel=1e-3)
    assert run.tasks_per_second == pytest.approx(10 * 4 / 110, rel=1e-3)
    table = maml_results(capsys, tmp_path)
    assert "| 0.4* |" in table and "*: estimated as iterations x meta_batch_size / wall time" in table


def test_a_record_cut_short_at_the_end_is_a_write_in_progress_not_damage(tree, tmp_path):
    run = shutil.copytree(run_dirs(tree / "sweep")[0], tmp_path / "run")
    (events,) = run.glob("events.out.tfevents.*")
    events.write_bytes(events.read_bytes()[:-7])
    read = results.read_run(run)
    assert not read.damaged and read.iterations == 2


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    for args in ([tmp_path / "nowhere"], [tmp_path], ["--curves", tmp_path, "--every", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            results.main([str(a) for a in args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("maml-results: error: ") or "error: --every" in err, err
        assert "Traceback" not in err


def test_a_run_from_before_the_transductive_key_compares_as_the_transductive_run_it_was(tmp_path):
    # Its config has no such key, and it scored its queries together: against a run trained with transductive=false
    # the table must show the column, and against one that says true, none.
    for name, extra in (("old", ""), ("false", "transductive: false\n"), ("true", "transductive: true\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("way: 5\n" + extra)
    old, false, true = (results.read_config(tmp_path / name)[0] for name in ("old", "false", "true"))
    assert results.differing_keys([old, false]) == ["transductive"] and results.differing_keys([old, true]) == []
