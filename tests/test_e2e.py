"""End-to-end: the installed commands, run from a scratch directory, write what a researcher looks at."""
import json
import os
import platform
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, SMALL_OVERRIDES, read_scalars, run_cli, run_dirs, run_in_process
from maml_cli.algorithms.registry import registered_algorithms

FAST = ["progress=false", "log_every=1", "val_every=2", "val_tasks=4", "test_tasks=5", "checkpoint_every=2"]
SINE = ["dataset=sinusoid", "iterations=4", "meta_batch_size=3", *FAST]


def omniglot_args(data_root, iterations=3, *extra):
    algo = next((e.split("=", 1)[1] for e in extra if e.startswith("algo=")), "maml")
    # test_inner_steps applies to the algorithms with an inner loop; the others refuse inner-loop keys.
    inner_loop = ["test_inner_steps=2"] if registered_algorithms()[algo].inner_loop else []
    return [f"data_root={data_root}", *SMALL_OVERRIDES, "way=3", "shot=1", "query=2", "meta_batch_size=2",
            "model.hidden=8", *inner_loop, f"iterations={iterations}", *FAST, *extra]


def only_run(cwd: Path) -> Path:
    runs = run_dirs(cwd)
    assert len(runs) == 1, runs
    return runs[0]


def steps(scalars, tag):
    return [s for s, _ in scalars[tag]]


def test_sinusoid_run_writes_curves_checkpoints_config_and_hparams(tmp_path):
    result = run_cli("maml-train", SINE, cwd=tmp_path)
    run = only_run(tmp_path)
    # The end of a run says what was tested, the best validation, where the run is and how to look at it.
    log = result.stdout + result.stderr
    assert f"the meta-test scored {run / 'last.pt'} (the weights at the end, iteration 4)" in log
    assert "best meta-validation mse: " in log and f"run directory: {run}" in log
    assert f"curves: tensorboard --logdir {tmp_path / 'outputs'}" in log
    assert "computing on 1 CPU thread (auto: OMP_NUM_THREADS=1)" in log  # run_cli sets OMP_NUM_THREADS=1
    assert ("; glibc asked to keep freed memory for reuse (keep_freed_memory=true)" in log) == (platform.libc_ver()[0] == "glibc")
    assert run.parent == tmp_path / "outputs" / "runs" and run.name.endswith("_dataset-sinusoid_iterations-4_meta_batch_size-3")
    scalars = read_scalars(run)
    assert steps(scalars, "train/loss") == [1, 2, 3, 4] and steps(scalars, "train/mse") == [1, 2, 3, 4]
    assert steps(scalars, "val/mse") == [2, 4]
    assert steps(scalars, "test/mse_by_inner_step") == list(range(11))  # 0..test_inner_steps=10
    assert steps(scalars, "test/mse") == [4] and scalars["test/mse_ci95"][0][1] > 0
    assert {"last.pt", "best.pt", "config.yaml"} <= {p.name for p in run.iterdir()}
    assert "shot: 10" in (run / "config.yaml").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    hparams = accumulator.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams and b"inner_lr" in hparams["_hparams_/session_start_info"]
    assert "_hparams_/experiment" not in hparams  # which would fix every run's columns to this one's


def hparams_table(logdir: Path) -> tuple[dict[str, bool], set[str]]:
    """The HParams tab's columns as TensorBoard's own backend makes them for ``logdir``: each hyperparameter with
    whether it differs between the runs, and the metric tags."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    backend = backend_context.Context(base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer, data_provider=provider))
    request = context.RequestContext()
    experiment = backend.experiment_from_metadata(request, "", True, backend.hparams_metadata(request, ""),
                                                  backend.hparams_from_data_provider(request, "", None))
    return {info.name: info.differs for info in experiment.hparam_infos}, {info.name.tag for info in experiment.metric_infos}


def test_the_hparams_tab_shows_every_runs_settings_and_metrics_side_by_side(tmp_path, small_omniglot):
    # TensorBoard fixes the columns from the first run's experiment record where one exists; without it, the columns
    # are every run's: a setting only one run has, and the metrics of classification and regression side by side.
    run_in_process("maml-train", [*SINE, "iterations=1", "hydra.run.dir=outputs/runs/plain"], cwd=tmp_path)
    run_in_process("maml-train", [*SINE, "iterations=1", "+optimizer.weight_decay=0.0001", "hydra.run.dir=outputs/runs/decay"],
                   cwd=tmp_path)
    run_in_process("maml-train", [*SINE, "iterations=1", "optimizer.lr=0.01", "hydra.run.dir=outputs/runs/lr"], cwd=tmp_path)
    run_in_process("maml-train", omniglot_args(small_omniglot, 1, "hydra.run.dir=outputs/runs/omniglot"), cwd=tmp_path)
    columns, metrics = hparams_table(tmp_path / "outputs")
    assert columns["optimizer.weight_decay"] is False  # one run has it, so it cannot differ, but it is there
    assert columns["outer_lr"] and columns["dataset"] and columns["model.hidden"] and not columns["seed"]
    assert "optimizer.lr" not in columns and not any("root" in name or "dir" in name for name in columns)
    assert {"test/accuracy", "val/best_accuracy", "test/mse", "val/best_mse"} <= metrics


def test_two_tasks_at_once_train_the_same_curve_as_one_at_a_time(tmp_path, small_omniglot):
    curves = {}
    for tasks_at_once in (1, 2):
        cwd = tmp_path / str(tasks_at_once)
        cwd.mkdir()
        result = run_in_process("maml-train", omniglot_args(small_omniglot, 4, f"tasks_at_once={tasks_at_once}"), cwd=cwd)
        assert ("2 tasks at a time on threads" in result.stdout + result.stderr) == (tasks_at_once == 2)
        scalars = read_scalars(only_run(cwd))
        curves[tasks_at_once] = [v for _, v in scalars["train/loss"]] + [v for _, v in scalars["val/accuracy"]]
    assert len(curves[1]) == 6
    assert curves[2] == pytest.approx(curves[1], rel=1e-5)


def test_omniglot_run_on_a_small_copy_writes_accuracy_curves(tmp_path, small_omniglot):
    result = run_in_process("maml-train", omniglot_args(small_omniglot, 4), cwd=tmp_path)
    scalars = read_scalars(only_run(tmp_path))
    assert steps(scalars, "train/accuracy") == [1, 2, 3, 4]
    assert steps(scalars, "val/accuracy") == [2, 4]
    assert steps(scalars, "test/accuracy_by_inner_step") == [0, 1, 2]
    assert all(0 <= v <= 1 for _, v in scalars["test/accuracy_by_inner_step"])
    assert "meta-test accuracy after 2 inner step(s)" in result.stdout + result.stderr


def test_multirun_names_each_run_by_the_swept_keys_alone(tmp_path):
    run_in_process("maml-train", ["-m", *SINE, "iterations=2", "inner_steps=1,2"], cwd=tmp_path)
    runs = run_dirs(tmp_path)
    assert [r.name for r in runs] == ["inner_steps=1", "inner_steps=2"]  # not every override: TensorBoard cuts long names
    assert "iterations=2" in (runs[0] / ".hydra" / "overrides.yaml").read_text()  # the full command stays with the run
    assert all(r.parent.parent == tmp_path / "outputs" / "multirun" for r in runs)
    for run, inner_steps in zip(runs, (1, 2)):
        assert steps(read_scalars(run), "train/loss") == [1, 2]
        assert f"inner_steps: {inner_steps}" in (run / "config.yaml").read_text()


# ProtoNet with a learning-rate schedule (its state must be restored too) and 6-way training episodes.
PROTONET_SCHEDULED = ["algo=protonet", "algo.train_way=6", "+scheduler._target_=torch.optim.lr_scheduler.StepLR",
                      "+scheduler._partial_=true", "+scheduler.step_size=2", "+scheduler.gamma=0.5"]


@pytest.mark.parametrize("algo_args", [[], PROTONET_SCHEDULED], ids=["maml", "protonet-scheduled"])
def test_resume_continues_from_the_saved_iteration_and_matches_an_uninterrupted_run(tmp_path, small_omniglot, algo_args):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    run_in_process("maml-train", omniglot_args(small_omniglot, 3, *algo_args), cwd=tmp_path / "a")
    first = only_run(tmp_path / "a")
    assert torch.load(first / "last.pt", weights_only=True)["iteration"] == 3
    result = run_in_process("maml-train", omniglot_args(small_omniglot, 6, *algo_args, f"resume={first}"), cwd=tmp_path / "a")
    assert "resumed" in result.stdout + result.stderr and only_run(tmp_path / "a") == first
    assert torch.load(first / "last.pt", weights_only=True)["iteration"] == 6
    resumed = read_scalars(first)
    assert steps(resumed, "train/loss") == [1, 2, 3, 4, 5, 6]

    run_in_process("maml-train", omniglot_args(small_omniglot, 6, *algo_args), cwd=tmp_path / "b")
    straight = read_scalars(only_run(tmp_path / "b"))
    assert resumed["train/loss"] == straight["train/loss"]
    assert resumed["test/accuracy"][-1][1] == straight["test/accuracy"][-1][1]


def test_resume_takes_the_runs_own_config_and_refuses_typed_keys_that_change_results_unless_forced(tmp_path):
    run_in_process("maml-train", SINE, cwd=tmp_path)
    run = only_run(tmp_path)
    # Only resume= typed: the run's config (sinusoid, 3 tasks per batch, ...) comes from the run; iterations
    # may be raised on the way.
    continued = run_in_process("maml-train", [f"resume={run}", "iterations=6", *FAST], cwd=tmp_path)
    assert "resumed" in continued.stdout + continued.stderr and steps(read_scalars(run), "train/loss") == [1, 2, 3, 4, 5, 6]
    assert only_run(tmp_path) == run
    assert "iterations: 6" in (run / "config.yaml").read_text()  # the run's config.yaml says what the run now uses
    result = run_in_process("maml-train", [*SINE, "inner_lr=0.5", "shot=5", f"resume={run}"], cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "inner_lr: 0.01 -> 0.5" in result.stderr and "shot: 10 -> 5" in result.stderr and "iterations:" not in result.stderr
    other_algo = run_in_process("maml-train", [*SINE, "algo=lstm", f"resume={run}"], cwd=tmp_path, check=False)
    assert other_algo.returncode == 2
    assert "algo._target_: 'maml_cli.algorithms.maml.MAML' -> 'maml_cli.algorithms.lstm.RecurrentMetaLearner'" in other_algo.stderr
    forced = run_in_process("maml-train", [*SINE, "inner_lr=0.5", "iterations=8", f"resume={run}", "force_resume=true"], cwd=tmp_path)
    assert "resumed" in forced.stdout + forced.stderr and steps(read_scalars(run), "train/loss") == list(range(1, 9))
    assert torch.load(run / "last.pt", weights_only=True)["config"]["inner_lr"] == 0.5


def test_resume_that_raises_iterations_says_a_schedule_spread_over_the_first_total_keeps_it_and_a_forced_one_is_used(tmp_path):
    cosine = ["+scheduler._target_=torch.optim.lr_scheduler.CosineAnnealingLR", "+scheduler._partial_=true",
              "+scheduler.T_max=${iterations}"]
    run_in_process("maml-train", [*SINE, *cosine], cwd=tmp_path)
    run = only_run(tmp_path)
    assert torch.load(run / "last.pt", weights_only=True)["scheduler"]["T_max"] == 4
    raised = run_in_process("maml-train", [f"resume={run}", "iterations=6"], cwd=tmp_path)
    said = raised.stdout + raised.stderr
    assert "iterations 4 -> 6: the run's scheduler.T_max is its first total (4)" in said and "CosineAnnealingLR" in said
    assert "+scheduler.T_max=6 force_resume=true" in said
    without_plus = run_in_process("maml-train", [f"resume={run}", "iterations=8", "scheduler.T_max=8", "force_resume=true"],
                                  cwd=tmp_path, check=False)
    assert without_plus.returncode == 2 and "Add one with a plus: +scheduler.T_max=<value>" in without_plus.stderr
    assert torch.load(run / "last.pt", weights_only=True)["scheduler"]["T_max"] == 4  # as the warning says
    # Forced, the typed schedule is the one used, replayed from the start (the saved state would put the old T_max back, and
    # the cosine, at its floor at 4, would stay there): at 8 of T_max=16 the rate is half the initial one, and it trained.
    before = torch.load(run / "last.pt", weights_only=True)["model"]
    forced = run_in_process("maml-train", [f"resume={run}", "iterations=8", "+scheduler.T_max=16", "force_resume=true"], cwd=tmp_path)
    assert "first total" not in forced.stdout + forced.stderr
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["iteration"] == 8 and state["scheduler"]["T_max"] == 16 and state["scheduler"]["last_epoch"] == 8
    group = state["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(group["initial_lr"] * 0.5, rel=1e-6)
    assert any(not torch.equal(before[name], state["model"][name]) for name in before)


def test_a_forced_change_of_the_outer_optimizer_on_resume_is_used_and_list_settings_keep_checkpoints_loadable(tmp_path):
    # Rprop keeps its etas as given: a list from the command line must reach it as a plain list, or torch.load's safe
    # loading refuses every checkpoint of the run.
    run_in_process("maml-train", [*SINE, "optimizer._target_=torch.optim.Rprop", "+optimizer.etas=[0.4,1.3]"], cwd=tmp_path)
    run = only_run(tmp_path)
    assert list(torch.load(run / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]["etas"]) == [0.4, 1.3]
    # The same class with another setting, and outer_lr: loading the saved state puts the run's back; forced, the typed ones are used.
    run_in_process("maml-train", [f"resume={run}", "iterations=5", "+optimizer.etas=[0.3,1.1]", "outer_lr=0.002", "force_resume=true"],
                   cwd=tmp_path)
    group = torch.load(run / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert list(group["etas"]) == [0.3, 1.1] and group["lr"] == 0.002
    # Another class: its state starts afresh, said in the log.
    switched = run_in_process("maml-train", [f"resume={run}", "iterations=6", "optimizer._target_=torch.optim.SGD",
                                             "+optimizer.momentum=0.9", "force_resume=true"], cwd=tmp_path)
    assert "the outer optimizer is now torch.optim.SGD (the run's was torch.optim.Rprop)" in switched.stdout + switched.stderr
    # TensorBoard shows a run's first hyperparameters: which of them no longer hold is said.
    said = switched.stdout + switched.stderr
    assert "TensorBoard's HParams tab shows the values this run started with: outer_lr 0.001 (now 0.002); iterations 4 (now 6)" in said
    assert "optimizer Rprop (now SGD); optimizer.etas [0.4,1.3] (now unset)" in said
    state = torch.load(run / "last.pt", weights_only=True)
    # The new class's rate follows the run's outer_lr (0.002 since the last resume), not the command's default.
    assert state["iteration"] == 6 and state["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.002
    assert "etas" not in state["optimizer"]["param_groups"][0]


def test_resume_follows_moved_class_lists_and_refuses_other_classes_unless_forced(tmp_path, small_omniglot, capsys):
    # The run moves machines: its class lists are elsewhere there. The same classes may continue it; others may not.
    from conftest import write_small_vinyals_split
    lists = write_small_vinyals_split(tmp_path / "lists")
    run_in_process("maml-train", omniglot_args(small_omniglot, 2, "dataset.split=vinyals", f"dataset.split_dir={lists}"), cwd=tmp_path)
    run = only_run(tmp_path)
    assert set(torch.load(run / "last.pt", weights_only=True)["class_split"]) == {"train", "val", "test"}
    moved = lists.rename(tmp_path / "moved")
    continued = run_in_process("maml-train", [f"resume={run}", "iterations=3", f"dataset.split_dir={moved}"], cwd=tmp_path)
    assert "resumed" in continued.stdout + continued.stderr and torch.load(run / "last.pt", weights_only=True)["iteration"] == 3
    train = (moved / "train.txt").read_text().splitlines()
    (moved / "train.txt").write_text("\n".join(train[4:] + train[:4]) + "\n")  # the same classes, in another order
    (moved / "val.txt").write_text("\n".join((moved / "val.txt").read_text().splitlines()[:-4]) + "\n")  # a character fewer
    refused = run_in_process("maml-train", [f"resume={run}", "iterations=4"], cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "the train split's" in refused.stderr and "in another order" in refused.stderr
    assert "the val split has" in refused.stderr and "where the run's had" in refused.stderr and "force_resume=true" in refused.stderr
    # maml-eval may score other classes, and says so: the test lists are the run's, the val lists no longer are.
    from maml_cli import evaluate
    capsys.readouterr()
    for split in ("test", "val"):
        evaluate.main([f"checkpoint={run / 'last.pt'}", f"split={split}", "test_tasks=2", f"output={tmp_path / split}.json"])
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "test.json").read_text())["classes"] == "the run's"
    assert "where the run's had" in json.loads((tmp_path / "val.json").read_text())["classes"]
    assert printed.count("note: not the run's") == 1 and "note: not the run's val classes: the val split has" in printed
    forced = run_in_process("maml-train", [f"resume={run}", "iterations=4", "force_resume=true"], cwd=tmp_path)
    assert "resumed" in forced.stdout + forced.stderr and torch.load(run / "last.pt", weights_only=True)["iteration"] == 4


def test_maml_eval_scores_a_checkpoint_on_the_same_test_episodes(tmp_path, small_omniglot):
    run_in_process("maml-train", omniglot_args(small_omniglot, 2), cwd=tmp_path)
    run = only_run(tmp_path)
    result = run_cli("maml-eval", [f"checkpoint={run / 'last.pt'}"], cwd=tmp_path)  # the console script itself, once
    lines = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in lines] == [0, 1, 2]
    logged = dict(read_scalars(run)["test/accuracy_by_inner_step"])
    for row in lines:
        assert float(row[1]) == pytest.approx(logged[int(row[0])], abs=1e-4)
    report = json.loads((run / "eval_last_test_3w1s_2q_5tasks_seed0_2steps.json").read_text())
    assert report["tasks"] == 5 and len(report["by_inner_step"]) == 3


def test_score_every_scores_the_final_test_and_maml_eval_after_every_kth_inner_step_and_the_last(tmp_path, capsys):
    from maml_cli import evaluate, results
    trained = run_in_process("maml-train", [*SINE, "score_every=4", "test_tasks=20"], cwd=tmp_path)  # sinusoid: test_inner_steps=10
    run = only_run(tmp_path)
    assert "score_every" not in run.name  # it changes what is scored, not what is learned
    logged = dict(read_scalars(run)["test/mse_by_inner_step"])
    assert list(logged) == [0, 4, 8, 10]
    log = trained.stdout + trained.stderr
    assert "meta-test mse after 8 inner step(s)" in log and "after 9 inner step(s)" not in log
    # maml-eval: the run's score_every unless typed; the same episodes give the same numbers at the steps both scored.
    evaluate.main([f"checkpoint={run / 'last.pt'}", "score_every=3", "test_tasks=20"])
    out = capsys.readouterr().out
    written = Path(next(line for line in out.splitlines() if line.startswith("written: ")).split(": ", 1)[1])
    assert written.name == "eval_last_test_1w10s_10q_20tasks_seed0_10steps_every3.json"
    report = json.loads(written.read_text())
    by_step = {row["inner_steps"]: row["mean"] for row in report["by_inner_step"]}
    assert list(by_step) == [0, 3, 6, 9, 10] and report["score_every"] == 3 and report["classes"] is None  # sinusoid has none
    assert by_step[0] == pytest.approx(logged[0], rel=1e-5) and by_step[10] == pytest.approx(logged[10], rel=1e-5)
    evaluate.main([f"checkpoint={run / 'last.pt'}", "test_tasks=3"])
    assert [row["inner_steps"] for row in json.loads(written.with_name("eval_last_test_1w10s_10q_3tasks_seed0_10steps_every4.json")
                                                                 .read_text())["by_inner_step"]] == [0, 4, 8, 10]
    # maml-results labels sparse steps with their step numbers.
    capsys.readouterr()
    results.main([str(run), "--eval", "eval_last_test_1w10s_10q_20tasks*", "--format", "markdown"])
    table = capsys.readouterr().out
    assert ", 3: " in table and ", 10: " in table and ", 1: " not in table
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([f"checkpoint={run / 'last.pt'}", "score_every=0"])
    assert exit_info.value.code == 2 and "score_every must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # torch would take it as another seed without a word
        evaluate.main([f"checkpoint={run / 'last.pt'}", "eval_seed=-1"])
    assert exit_info.value.code == 2 and "eval_seed must be a whole number from 0 to 2**64-1 (got -1)" in capsys.readouterr().err
    # Typed on a resume, it is taken (the learned weights do not depend on it); maml-results reads the resumed run's
    # own final test, not the steps the interrupted run's test scored besides (4 and 8).
    run_in_process("maml-train", [*SINE, "iterations=5", "score_every=5", f"resume={run}"], cwd=tmp_path)
    assert [s for s, _ in read_scalars(run)["test/mse_by_inner_step"]][-3:] == [0, 5, 10]
    capsys.readouterr()
    results.main([str(run), "--format", "json"])
    (record,) = json.loads(capsys.readouterr().out)["runs"]
    assert [row["inner_steps"] for row in record["test_by_inner_step"]] == [0, 5, 10]
    results.main([str(run), "--format", "csv"])
    assert "test_by_inner_step.5.mean" in capsys.readouterr().out.splitlines()[0]  # columns named by inner step


def test_an_algorithm_with_recipes_for_other_datasets_warns_that_it_runs_with_the_datasets_maml_settings(tmp_path):
    # Reptile's recipe (SGD outer steps of 1, inner Adam at 1e-3, ...) exists for Omniglot and miniImageNet only.
    result = run_in_process("maml-train", [*SINE, "algo=reptile", "iterations=1"], cwd=tmp_path)
    log = result.stdout + result.stderr
    assert "algo=reptile has its own settings for dataset=miniimagenet,omniglot (conf/algo_dataset), not for dataset=sinusoid" in log
    assert "inner_lr=0.01" in log and "outer optimizer Adam with outer_lr=0.001" in log
    # MAML has no recipe files (the datasets' settings are its own); Reptile on Omniglot has its recipe: no warning.
    plain = run_in_process("maml-train", [*SINE, "iterations=1", "seed=1"], cwd=tmp_path)
    assert "has its own settings" not in plain.stdout + plain.stderr
    from maml_cli.build import datasets_with_own_settings, without_own_settings
    from test_config import compose_config
    assert without_own_settings(compose_config(["algo=reptile"]), "reptile", "omniglot") is None
    assert datasets_with_own_settings("mamlpp") == ["miniimagenet", "omniglot"] and datasets_with_own_settings("maml") == []
    assert without_own_settings(compose_config(["algo=lstm"]), "lstm", "omniglot") is None  # lstm_sinusoid is no recipe of rates


def test_without_the_progress_bar_the_log_shows_each_validation_and_the_time_to_go(tmp_path):
    result = run_in_process("maml-train", SINE, cwd=tmp_path)  # SINE: progress=false, val_every=2, iterations=4
    lines = [line for line in (result.stdout + result.stderr).splitlines() if ": meta-validation mse " in line]
    assert [line.split(" - ", 1)[1].split(":", 1)[0] for line in lines] == ["iteration 2 of 4", "iteration 4 of 4"]
    assert "s per iteration, about " in lines[0] and "to go" in lines[0] and "to go" not in lines[1]
    assert "(best " in lines[0] and "meta-batch mse " in lines[0]
    # Every log_every iterations (1 here) a line with the loss, the metric and the speed, on the console and in train.log.
    every = [line.split(" - ", 1)[1] for line in (result.stdout + result.stderr).splitlines() if "tasks/s" in line]
    assert [line.split(":", 1)[0] for line in every] == [f"iteration {k} of 4" for k in range(1, 5)]
    assert all(", mse " in line and line.startswith(f"iteration {k} of 4: loss ") for k, line in enumerate(every, 1))
    assert (only_run(tmp_path) / "train.log").read_text().count(" tasks/s") == 4
    # With the progress bar the console leaves them to the bar; train.log still has them.
    shown = run_in_process("maml-train", [*SINE, "progress=true", "seed=1"], cwd=tmp_path)
    assert "iteration 2 of 4: meta-validation" in shown.stdout + shown.stderr and ": loss " not in shown.stdout + shown.stderr
    newest = max(run_dirs(tmp_path), key=lambda run: run.stat().st_mtime)
    assert (newest / "train.log").read_text().count(" tasks/s") == 4


def test_one_task_has_no_interval_and_the_logs_and_tables_say_so_instead_of_printing_nan(tmp_path, capsys):
    from maml_cli import evaluate
    result = run_in_process("maml-train", [*SINE, "val_tasks=1", "test_tasks=1"], cwd=tmp_path)
    log = result.stdout + result.stderr
    assert "meta-validation mse " in log and "meta-test mse after 10 inner step(s): " in log
    assert "+- n/a (95% CI, 1 task)" in log and "nan" not in log.lower()
    evaluate.main([f"checkpoint={only_run(tmp_path) / 'last.pt'}", "test_tasks=1"])
    table = capsys.readouterr().out
    assert " n/a" in table and "nan" not in table.lower()
    evaluate.main([f"checkpoint={only_run(tmp_path) / 'last.pt'}", "test_tasks=2"])
    assert "n/a" not in capsys.readouterr().out


def test_maml_eval_never_writes_over_another_evaluations_results(tmp_path, capsys):
    from maml_cli import evaluate
    run_in_process("maml-train", SINE, cwd=tmp_path)
    run = only_run(tmp_path)

    def written() -> Path:
        return Path(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("written: ")).split(": ", 1)[1])

    evaluate.main([f"checkpoint={run / 'last.pt'}", "test_tasks=3"])
    first = written()
    assert first == run / "eval_last_test_1w10s_10q_3tasks_seed0_10steps.json"
    evaluate.main([f"checkpoint={run / 'last.pt'}", "test_tasks=3", "shot=5", "query=7", "eval_seed=4"])
    assert written().name == "eval_last_test_1w5s_7q_3tasks_seed4_10steps.json"
    # The same settings again: a second file, the first one left as it was.
    before = first.read_text()
    evaluate.main([f"checkpoint={run / 'last.pt'}", "test_tasks=3"])
    assert written().name == "eval_last_test_1w10s_10q_3tasks_seed0_10steps-2.json" and first.read_text() == before
    evaluate.main([f"checkpoint={run / 'last.pt'}", "test_tasks=3", f"output={tmp_path / 'mine.json'}"])
    assert written() == tmp_path / "mine.json" and json.loads((tmp_path / "mine.json").read_text())["tasks"] == 3
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([f"checkpoint={run / 'last.pt'}", f"output={tmp_path / 'mine.json'}"])
    assert exit_info.value.code == 2 and "exists already" in capsys.readouterr().err


def test_maml_eval_takes_a_run_directory_and_says_which_checkpoint_it_scores(tmp_path, capsys, caplog):
    from maml_cli import evaluate
    caplog.set_level("INFO", logger="maml_cli")
    run_in_process("maml-train", SINE, cwd=tmp_path)
    run = only_run(tmp_path)
    evaluate.main([f"checkpoint={run}", "test_tasks=3"])
    assert f"{run / 'best.pt'} (iteration" in capsys.readouterr().out and "using its best.pt" in caplog.text
    (run / "best.pt").unlink()
    evaluate.main([f"checkpoint={run}", "test_tasks=3"])
    assert f"{run / 'last.pt'} (iteration 4" in capsys.readouterr().out and "using its last.pt (it has no best.pt)" in caplog.text
    (run / "last.pt").unlink()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([f"checkpoint={run}"])
    assert exit_info.value.code == 2 and "is a directory without best.pt or last.pt" in capsys.readouterr().err


def test_maml_eval_shows_its_progress_bar_unless_told_not_to_as_maml_train(tmp_path, capsys):
    from maml_cli import evaluate
    run_in_process("maml-train", SINE, cwd=tmp_path)
    run = only_run(tmp_path)
    evaluate.main([f"checkpoint={run}", "test_tasks=3", f"output={tmp_path / 'bar.json'}"])
    assert "meta-test: 100%" in capsys.readouterr().err
    evaluate.main([f"checkpoint={run}", "test_tasks=3", "progress=false", f"output={tmp_path / 'quiet.json'}"])
    out, err = capsys.readouterr()
    assert "meta-test:" not in err and "written: " in out  # a log file gets the results, not thousands of bar updates


def test_maml_eval_finds_a_named_split_whose_class_lists_have_moved(tmp_path, small_omniglot, capsys):
    # A run trained elsewhere (another machine, a GPU) names a split_dir that does not exist here.
    from maml_cli import evaluate
    from conftest import write_small_vinyals_split
    lists = write_small_vinyals_split(tmp_path / "lists")
    run_in_process("maml-train", omniglot_args(small_omniglot, 2, "dataset.split=vinyals", f"dataset.split_dir={lists}"), cwd=tmp_path)
    run = only_run(tmp_path)
    moved = lists.rename(tmp_path / "moved")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([f"checkpoint={run}", "test_tasks=3", "query=1"])
    assert exit_info.value.code == 2 and str(lists) in capsys.readouterr().err
    evaluate.main([f"checkpoint={run}", "test_tasks=3", "query=1", f"dataset.split_dir={moved}"])
    assert "split=vinyals" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        evaluate.main([f"checkpoint={run}", "dataset.splitdir=x"])
    assert "unknown key dataset.splitdir. Did you mean split_dir?" in capsys.readouterr().err


def test_maml_eval_notes_episodes_shaped_otherwise_than_training_for_a_network_with_batch_statistics(tmp_path, small_omniglot, capsys):
    # With batch statistics the query batch's size changes what each query is normalised with, so the same model scores
    # differently at 1 and 15 queries per class; a reader comparing with a paper's protocol has to know.
    from maml_cli import evaluate
    for norm in ("batch", "example"):
        (tmp_path / norm).mkdir()
        run_in_process("maml-train", omniglot_args(small_omniglot, 1, f"model.batch_norm={norm}"), cwd=tmp_path / norm)
        run = only_run(tmp_path / norm)
        for query in (2, 1):
            capsys.readouterr()
            evaluate.main([f"checkpoint={run}", "test_tasks=3", f"query={query}", "progress=false"])
            table = capsys.readouterr().out
            written = next(line for line in table.splitlines() if line.startswith("written: ")).split(": ", 1)[1]
            report = json.loads(Path(written).read_text())
            assert report["trained_episodes"] == {"way": 3, "shot": 1, "query": 2} and report["batch_statistics"] == (norm == "batch")
            noted = "note: the network normalises each batch with the batch's own statistics" in table
            assert noted == (norm == "batch" and query == 1), table
            if noted:
                assert ("it trained on 3-way 1-shot with 2 queries per class, these are 3-way 1-shot with 1 query per class"
                        in table)
        # Non-transductive: each query normalised with the 3 support images alone, on the same episodes; refused where the
        # queries never meet (it would score the same), and with batch_tasks, which computes the episodes together.
        args = [f"checkpoint={run}", "test_tasks=3", "progress=false", "transductive=false"]
        if norm == "example":
            with pytest.raises(SystemExit) as exit_info:
                evaluate.main(args)
            assert exit_info.value.code == 2 and "Leave transductive out" in capsys.readouterr().err
            continue
        evaluate.main(args)
        table = capsys.readouterr().out
        written = Path(next(line for line in table.splitlines() if line.startswith("written: ")).split(": ", 1)[1])
        report = json.loads(written.read_text())
        assert written.name.endswith("_3tasks_seed0_2steps_nontransductive.json") and report["transductive"] is False
        assert "non-transductive: each query in one batch with the support set alone" in table.splitlines()[0]
        assert ("here each query is normalised in one batch with the 3 support images and no other query, while in training the "
                "queries of an episode (3-way 1-shot with 2 queries per class) were normalised together") in table
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(args + ["batch_tasks=true"])
        assert exit_info.value.code == 2 and "leave batch_tasks out" in capsys.readouterr().err


def test_train_transductive_false_validates_and_tests_each_query_with_its_support_set_alone(tmp_path, small_omniglot, capsys):
    # The run's meta-validation and meta-test are maml-eval transductive=false's numbers on the same weights and episodes,
    # maml-eval follows the run's setting unless told otherwise, and maml-results says how the run's test scored.
    from maml_cli import evaluate, results
    run_in_process("maml-train", omniglot_args(small_omniglot, 2, "transductive=false"), cwd=tmp_path)
    run = only_run(tmp_path)
    scalars = read_scalars(run)
    # The setting changes how the run is scored, not what it learns: the same weights as a run with the default.
    (tmp_path / "default").mkdir()
    run_in_process("maml-train", omniglot_args(small_omniglot, 2), cwd=tmp_path / "default")
    default_weights = torch.load(only_run(tmp_path / "default") / "last.pt", weights_only=False)["model"]
    for name, tensor in torch.load(run / "last.pt", weights_only=False)["model"].items():
        assert torch.equal(tensor, default_weights[name]), name

    def scored(*args):
        capsys.readouterr()
        evaluate.main([f"checkpoint={run / 'last.pt'}", "progress=false", *args])
        written = Path(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("written: ")).split(": ", 1)[1])
        report = json.loads(written.read_text())
        return written.name, report["transductive"], report["by_inner_step"][-1]["mean"]

    name, transductive, test_accuracy = scored()
    assert name.endswith("_5tasks_seed0_2steps_nontransductive.json") and transductive is False
    assert scalars["test/accuracy"][-1] == (2, pytest.approx(test_accuracy, rel=1e-6))
    name, transductive, val_accuracy = scored("split=val", "test_tasks=4")
    assert transductive is False and scalars["val/accuracy"][-1] == (2, pytest.approx(val_accuracy, rel=1e-6))
    name, transductive, together = scored("transductive=true", "test_tasks=20")
    assert transductive is True and not name.endswith("_nontransductive.json") and together != pytest.approx(scored("test_tasks=20")[2])
    results.main([str(run)])
    assert "5 tasks, 3w1s 2q, non-transductive" in capsys.readouterr().out
    # The Python API predicts as the run scored, unless told otherwise.
    from maml_cli import load
    images = torch.rand(9, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    adapted = load(run / "last.pt").adapt(images[:3], ["a", "b", "c"])
    assert torch.equal(adapted.scores(images[3:]), adapted.scores(images[3:], transductive=False))
    assert not torch.allclose(adapted.scores(images[3:]), adapted.scores(images[3:], transductive=True))
    results.main(["--curves", str(run)])
    curves = capsys.readouterr().out
    assert "| meta-val accuracy (non-transductive) | 95% CI |" in curves and "| meta-test accuracy, non-transductive | 95% CI |" in curves
    # A resume keeps the run's way of scoring: best.pt would be chosen by comparing scores of both kinds.
    changed = run_in_process("maml-train", [f"resume={run}", "iterations=4", "transductive=true"], cwd=tmp_path, check=False)
    assert changed.returncode == 2 and "transductive: False -> True" in changed.stderr and "force_resume=true" in changed.stderr
    # Where queries never meet it would score the same, one pass per query: refused before training.
    (tmp_path / "example").mkdir()
    refused = run_in_process("maml-train", omniglot_args(small_omniglot, 2, "transductive=false", "model.batch_norm=example"),
                             cwd=tmp_path / "example", check=False)
    assert refused.returncode == 2 and "Leave transductive out" in refused.stderr and "Traceback" not in refused.stderr


def test_impossible_episode_is_an_error_before_training_naming_the_numbers(tmp_path, small_omniglot):
    result = run_in_process("maml-train", omniglot_args(small_omniglot, 2, "way=40"), cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "way=40 needs 40 distinct classes per episode, but the meta-validation split of omniglot (random) has only 16 classes" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "outputs" / "runs").iterdir()), "a failed start left a run directory behind"


def test_missing_omniglot_offline_names_the_folder_and_the_sinusoid_alternative(tmp_path):
    result = run_in_process("maml-train", [f"data_root={tmp_path / 'empty'}", "dataset.download=false", "iterations=1", "progress=false"],
                     cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert str(tmp_path / "empty" / "omniglot-py") in result.stderr and "dataset=sinusoid" in result.stderr


def test_a_misspelt_override_fails_with_the_key_name(tmp_path):
    result = run_in_process("maml-train", ["dataset=sinusoid", "inner_setps=3"], cwd=tmp_path, check=False)
    assert result.returncode != 0 and "inner_setps" in result.stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.pt"))


@pytest.mark.slow
def test_a_plain_wheel_ships_the_configs_and_runs_from_another_directory(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)], check=True, capture_output=True)
    wheel = next(wheels.glob("maml_cli-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "maml_cli/conf/config.yaml" in names and "maml_cli/conf/experiment/maml_omniglot_5w1s.yaml" in names
    assert "maml_cli/conf/algo_dataset/lstm_sinusoid.yaml" in names  # algo=lstm needs it from an installed wheel
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", "import maml_cli.train as t; print(t.__file__); t.main()", *SINE],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(str(target))
    assert steps(read_scalars(only_run(elsewhere)), "train/loss") == [1, 2, 3, 4]


# -- ProtoNet and the recurrent learner: peers of MAML in the same runner -------------------------------

@pytest.fixture(scope="module")
def maml_tags(tmp_path_factory, small_omniglot):
    cwd = tmp_path_factory.mktemp("maml")
    run_in_process("maml-train", omniglot_args(small_omniglot, 2), cwd=cwd)
    return set(read_scalars(only_run(cwd)))


@pytest.mark.parametrize("algo_args", [["algo=protonet", "algo.train_way=6", "algo.train_query=3"], ["algo=lstm"],
                                       ["algo=lstm", "algo.protocol=sequence", "algo.presentations=4"]])
def test_every_algorithm_writes_the_tags_of_maml_and_is_scored_by_maml_eval(tmp_path, small_omniglot, maml_tags, algo_args):
    run_in_process("maml-train", omniglot_args(small_omniglot, 2, *algo_args), cwd=tmp_path)
    run = only_run(tmp_path)
    scalars = read_scalars(run)
    assert maml_tags <= set(scalars), sorted(maml_tags - set(scalars))
    assert steps(scalars, "test/accuracy_by_inner_step") == [0]  # no inner loop: one row
    # The run's final test scored the final weights (last.pt) on the eval_seed episodes: maml-eval must agree.
    result = run_in_process("maml-eval", [f"checkpoint={run / 'last.pt'}"], cwd=tmp_path)
    first_row = next(line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["0"])
    assert float(first_row[1]) == pytest.approx(scalars["test/accuracy_by_inner_step"][0][1], abs=1e-4)
    # ProtoNet trained on 6-way episodes with 3 queries, normalising each with its own statistics: the 3-way ones differ.
    assert ("it trained on 6-way 1-shot with 3 queries per class, these are 3-way 1-shot with 2 queries" in result.stdout) == (
        "algo=protonet" in algo_args)
    if "algo.protocol=sequence" in algo_args:
        assert steps(scalars, "test/accuracy_by_presentation") == [1, 2, 3, 4]
        assert steps(scalars, "train/accuracy_instance_04") == [1, 2]
        assert "instance" in result.stdout and len([ln for ln in result.stdout.splitlines()[-6:] if ln.split()[:1] in (["1"], ["4"])]) == 2
    else:
        assert "test/accuracy_by_presentation" not in scalars


def test_protonet_scores_any_way_from_one_checkpoint_and_maml_refuses(tmp_path, small_omniglot):
    run_in_process("maml-train", omniglot_args(small_omniglot, 2, "algo=protonet", "algo.train_way=6"), cwd=tmp_path)
    run = only_run(tmp_path)
    result = run_in_process("maml-eval", [f"checkpoint={run / 'last.pt'}", "way=5"], cwd=tmp_path)
    assert "5-way 1-shot" in result.stdout and list(run.glob("eval_last_test_5w1s_*q_*tasks_seed0*.json"))
    no_inner_loop = run_in_process("maml-eval", [f"checkpoint={run / 'last.pt'}", "test_inner_steps=3"], cwd=tmp_path, check=False)
    assert no_inner_loop.returncode == 2 and "test_inner_steps does not apply to ProtoNet" in no_inner_loop.stderr
    no_steps = run_in_process("maml-eval", [f"checkpoint={run / 'last.pt'}", "score_every=2"], cwd=tmp_path, check=False)
    assert no_steps.returncode == 2 and "score_every does not apply to ProtoNet" in no_steps.stderr
    # On a resume too, judged by the run's own algorithm (the command's default is MAML, which has an inner loop).
    resumed = run_in_process("maml-train", [f"resume={run}", "score_every=2"], cwd=tmp_path, check=False)
    assert resumed.returncode == 2 and "score_every does not apply to the resumed run's algorithm (protonet)" in resumed.stderr
    (tmp_path / "m").mkdir()
    run_in_process("maml-train", omniglot_args(small_omniglot, 1), cwd=tmp_path / "m")
    refused = run_in_process("maml-eval", [f"checkpoint={only_run(tmp_path / 'm') / 'last.pt'}", "way=5"], cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "trained with way=3" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("protocol", ["support_query", "sequence"])
def test_lstm_on_sinusoid_writes_the_regression_tags_of_maml(tmp_path, protocol):
    run_in_process("maml-train", [*SINE, "algo=lstm", f"algo.protocol={protocol}"], cwd=tmp_path)
    scalars = read_scalars(only_run(tmp_path))
    assert steps(scalars, "train/mse") == [1, 2, 3, 4] and steps(scalars, "val/mse") == [2, 4] and steps(scalars, "test/mse") == [4]
    assert "embedding: raw" in (only_run(tmp_path) / "config.yaml").read_text()


@pytest.mark.parametrize("args,message", [
    (["algo=protonet", "inner_steps=3"], "inner_steps does not apply to algo=protonet, which has no inner loop"),
    (["algo=lstm", "inner_lr=0.1"], "inner_lr does not apply to algo=lstm"),
    (["algo=lstm", "inner_lr=0.1", "inner_steps=2"], "inner_lr, inner_steps do not apply to algo=lstm"),
])
def test_inner_loop_keys_with_an_algorithm_without_one_are_an_error(tmp_path, small_omniglot, args, message):
    result = run_in_process("maml-train", omniglot_args(small_omniglot, 1, *args), cwd=tmp_path, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_protonet_on_regression_is_an_error(tmp_path):
    result = run_in_process("maml-train", [*SINE, "algo=protonet"], cwd=tmp_path, check=False)
    assert result.returncode == 2 and "needs a classification dataset" in result.stderr


def test_a_failed_member_does_not_stop_the_other_members_of_a_multirun(tmp_path):
    # The first member diverges (a non-finite loss is an error); the second still trains, and the sweep then fails.
    result = run_in_process("maml-train", ["-m", *SINE, "iterations=3", "inner_lr=1000000,0.01"], cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the meta-training loss became inf" in result.stderr and "the multirun member inner_lr=1000000 failed" in result.stderr
    assert [run.name for run in run_dirs(tmp_path)] == ["inner_lr=0.01"] and (run_dirs(tmp_path)[0] / "last.pt").is_file()


def test_multirun_over_the_three_algorithms(tmp_path, small_omniglot):
    # test_inner_steps=2 (in the MAML arguments) is meant for the MAML member of an algorithm sweep, so it is allowed.
    run_in_process("maml-train", ["-m", *omniglot_args(small_omniglot, 2), "algo=maml,protonet,lstm"], cwd=tmp_path)
    runs = run_dirs(tmp_path)
    assert [r.name.split(",")[0] for r in runs] == ["algo=lstm", "algo=maml", "algo=protonet"]
    for run in runs:
        assert steps(read_scalars(run), "test/accuracy") == [2] and (run / "last.pt").is_file()


def test_patience_stops_early_and_the_final_test_scores_best_pt(tmp_path):
    # A large outer_lr (0.03, measured) makes meta-validation worse after iteration 2, so patience stops the run;
    # its final test must score best.pt, not the worse weights of last.pt.
    result = run_in_process("maml-train", [*SINE, "iterations=50", "val_every=1", "patience=2", "outer_lr=0.03"], cwd=tmp_path)
    run = only_run(tmp_path)
    scalars = read_scalars(run)
    assert "has not improved for 2 iterations" in result.stderr + result.stdout
    last_step = steps(scalars, "train/loss")[-1]
    best_step = steps(scalars, "val/best_mse")[-1]
    assert last_step < 50 and last_step - best_step == 2

    def eval_mse(name):
        report = run_in_process("maml-eval", [f"checkpoint={run / name}"], cwd=tmp_path).stdout
        return float([line.split() for line in report.splitlines() if line.split()[:1] == ["10"]][0][1])

    assert eval_mse("best.pt") == pytest.approx(scalars["test/mse"][0][1], abs=1e-4)
    assert eval_mse("last.pt") != pytest.approx(scalars["test/mse"][0][1], abs=1e-2)


def test_bad_input_is_one_paragraph_unless_hydra_full_error_asks_for_the_traceback(tmp_path):
    short = run_cli("maml-train", ["dataset=sinusoid", "inner_lr=-1"], cwd=tmp_path, check=False)
    assert short.returncode == 2 and short.stderr.strip() == "maml-train: error: invalid config: inner_lr must be positive and finite (got -1.0)."
    full = run_cli("maml-train", ["dataset=sinusoid", "inner_lr=-1"], cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"}, check=False)
    assert full.returncode != 0 and "Traceback" in full.stderr and "inner_lr must be positive" in full.stderr


@pytest.mark.parametrize("group", ["algo", "dataset", "model"])
def test_an_unknown_group_choice_lists_the_choices(tmp_path, group):
    # The choices are what the package holds (every algorithm registered, every dataset and model YAML), not a list kept here.
    from maml_cli.config import config_dir

    choices = sorted(registered_algorithms()) if group == "algo" else sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))
    result = run_in_process("maml-train", [f"{group}=nope"], cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == f"maml-train: error: {group}=nope: there is no {group} called 'nope'. Choices of {group}: {', '.join(choices)}.\n"
    assert not (tmp_path / "outputs").exists()


# Every algorithm with an inner loop, found through the registry (MAML has its own tests above).
FAMILY = sorted(name for name, entry in registered_algorithms().items() if entry.inner_loop and name != "maml")
UNANNEALED = {"reptile": ["algo.final_outer_lr=null"], "mamlpp": ["algo.cosine_outer_lr=false"]}


@pytest.mark.parametrize("algo", FAMILY)
def test_each_inner_loop_algorithm_resumes_exactly_and_maml_eval_reproduces_its_test_by_inner_step(tmp_path, small_omniglot, algo):
    # Meta-SGD's and MAML++'s rates, Reptile's annealed outer step and its mini-batch draws, MAML++'s iteration-dependent
    # step weights: all must come back from last.pt for the resumed curve to equal the uninterrupted one.
    # A resume that extends the run (3 -> 5 iterations) would change an annealed outer rate's schedule (refused, below):
    # the schedules are switched off here; LambdaLR's state is restored like any scheduler's (the ProtoNet test above).
    args = [f"algo={algo}", *UNANNEALED.get(algo, [])]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    run_in_process("maml-train", omniglot_args(small_omniglot, 3, *args), cwd=tmp_path / "a")
    first = only_run(tmp_path / "a")
    run_in_process("maml-train", omniglot_args(small_omniglot, 5, *args, f"resume={first}"), cwd=tmp_path / "a")
    run_in_process("maml-train", omniglot_args(small_omniglot, 5, *args), cwd=tmp_path / "b")
    resumed, straight = read_scalars(first), read_scalars(only_run(tmp_path / "b"))
    assert steps(resumed, "train/loss") == [1, 2, 3, 4, 5]
    assert resumed["train/loss"] == straight["train/loss"]
    # Test steps 0, 1, 2; Reptile's Omniglot recipe scores every 10th and the last: 0 and 2.
    scored = [0, 2] if algo == "reptile" else [0, 1, 2]
    by_step = resumed["test/accuracy_by_inner_step"][-len(scored):]  # the points before: the interrupted run's own final test
    assert [s for s, _ in by_step] == scored and by_step == straight["test/accuracy_by_inner_step"]
    report = run_in_process("maml-eval", [f"checkpoint={first / 'last.pt'}"], cwd=tmp_path).stdout.splitlines()
    rows = [line.split() for line in report if line.split()[:1] and line.split()[0].isdigit()]  # after the title and any notes
    assert [int(row[0]) for row in rows] == scored
    assert [float(row[1]) for row in rows] == pytest.approx([v for _, v in by_step], abs=1e-4)


def test_resume_refuses_a_new_iteration_count_when_the_algorithm_anneals_its_outer_rate_over_it(tmp_path, small_omniglot):
    run_in_process("maml-train", omniglot_args(small_omniglot, 2, "algo=reptile"), cwd=tmp_path)
    run = only_run(tmp_path)
    refused = run_in_process("maml-train", omniglot_args(small_omniglot, 4, "algo=reptile", f"resume={run}"), cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "iterations: 2 -> 4" in refused.stderr and "changes the schedule" in refused.stderr
