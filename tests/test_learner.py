"""A trained meta-learner on new tasks: the Python API (maml_cli.load) and maml-eval episodes=<folder>."""
import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import maml_cli
from conftest import run_in_process
from maml_cli import evaluate
from maml_cli.algorithms.base import evaluate_one_query_at_a_time, one_query_at_a_time
from maml_cli.build import build_tasks
from maml_cli.checkpoint import load_checkpoint
from maml_cli.errors import UserError
from maml_cli.loop import functional_forward
from maml_cli.results import read_eval_file
from maml_cli.tasks import Episode, EpisodeBatch
from test_e2e import omniglot_args, only_run

WAY, SHOT, QUERY = 3, 2, 2


@pytest.fixture(scope="module", params=[["algo=maml"], ["algo=protonet", "algo.train_way=6", "algo.train_query=3"]], ids=["maml", "protonet"])
def trained(request, tmp_path_factory, small_omniglot):
    """A run of a few iterations on the small Omniglot copy, and the task family its checkpoint was trained on."""
    cwd = tmp_path_factory.mktemp("run")
    run_in_process("maml-train", omniglot_args(small_omniglot, 2, *request.param), cwd=cwd)
    run = only_run(cwd)
    cfg = OmegaConf.create(load_checkpoint(run / "last.pt")["config"])
    return run, build_tasks(cfg)


def write_task(folder: Path, tasks, characters: list[int], first_image: int = 0, labelled: bool = True) -> tuple[Episode, list[str]]:
    """Copy the image files of ``characters`` (unrotated) into ``folder`` as one task, and return the same episode as the
    tensors the dataset gives (classes and images in name order, as the folder is read), with the class names."""
    names = [f"class_{i}" for i in range(len(characters))]
    support, query = [], []
    for name, character in zip(names, characters):
        files = tasks.listing.files[character][first_image:first_image + SHOT + QUERY]
        pixels = tasks.images[character, first_image:first_image + SHOT + QUERY].float().div(255).unsqueeze(1)
        (folder / "support" / name).mkdir(parents=True)
        for k, file in enumerate(files[:SHOT]):
            shutil.copy(file, folder / "support" / name / f"{k:02d}.png")
        query_dir = folder / "query" / name if labelled else folder / "query"
        query_dir.mkdir(parents=True, exist_ok=True)
        for k, file in enumerate(files[SHOT:]):
            shutil.copy(file, query_dir / f"{name if not labelled else ''}{k:02d}.png")
        support.append(pixels[:SHOT])
        query.append(pixels[SHOT:])
    labels = torch.arange(len(characters))
    episode = Episode(torch.cat(support), labels.repeat_interleave(SHOT), torch.cat(query), labels.repeat_interleave(QUERY))
    return episode, names


def test_an_episode_given_as_image_files_scores_exactly_as_the_same_episode_given_as_tensors(trained, tmp_path, capsys):
    run, tasks = trained
    episodes = tmp_path / "episodes"
    reference = []
    learner = maml_cli.load(run / "last.pt")
    for t, characters in enumerate(([0, 1, 2], [3, 4, 5])):
        episode, names = write_task(episodes / f"task{t}", tasks, characters)
        # The episode as tensors through the evaluation loop's own path (what maml-eval runs on sampled episodes).
        by_step = learner.algorithm.evaluate(functional_forward(learner.model), dict(learner.model.named_parameters()),
                                             EpisodeBatch.stack([episode]), tasks.kind.objective)
        reference.append([float(step["accuracy"][0]) for step in by_step.values()])
        # The API on tensors and on the files: the same scores, bit for bit.
        from_tensors = learner.adapt(episode.support_x, episode.support_y).scores(episode.query_x)
        files = sorted((episodes / f"task{t}" / "support").rglob("*.png"))
        adapted = learner.adapt(files, [f.parent.name for f in files])
        queries = sorted((episodes / f"task{t}" / "query").rglob("*.png"))
        assert adapted.classes == names
        assert torch.equal(adapted.scores(queries), from_tensors)
        assert adapted.predict(queries) == [names[i] for i in from_tensors.argmax(dim=-1).tolist()]
        assert torch.allclose(adapted.probabilities(queries).sum(dim=-1), torch.ones(len(queries)))
    evaluate.main([f"checkpoint={run / 'last.pt'}", f"episodes={episodes}"])
    out = capsys.readouterr().out
    written = [Path(line.split(": ", 1)[1]) for line in out.splitlines() if line.startswith("written: ")]
    report = json.loads(written[0].read_text())
    assert [task["accuracy_by_inner_step"] for task in report["per_task"]] == reference
    assert report["tasks"] == 2 and report["by_inner_step"][-1]["mean"] == pytest.approx(sum(r[-1] for r in reference) / 2)
    assert written[0].name.startswith("eval_last_episodes-episodes") and written[1].suffix == ".csv"


def test_an_episodes_folder_scored_non_transductively_scores_as_the_same_episodes_given_as_tensors(trained, tmp_path, capsys):
    run, tasks = trained
    episodes = tmp_path / "episodes"
    learner = maml_cli.load(run / "last.pt")
    reference, scores_by_mode = [], []
    for t, characters in enumerate(([0, 1, 2], [3, 4, 5])):
        episode, _ = write_task(episodes / f"task{t}", tasks, characters)
        forward, params = functional_forward(learner.model), dict(learner.model.named_parameters())
        by_step = evaluate_one_query_at_a_time(learner.algorithm, forward, params, EpisodeBatch.stack([episode]), tasks.kind.objective)
        reference.append([float(step["accuracy"][0]) for step in by_step.values()])
        *_, predict = learner.algorithm.adaptations(forward, params, episode.support_x, episode.support_y, tasks.kind.objective)
        scores_by_mode.append((predict(episode.query_x),
                                    one_query_at_a_time(predict, episode.support_x, learner.algorithm.queries_with_support)(episode.query_x)))
    evaluate.main([f"checkpoint={run / 'last.pt'}", f"episodes={episodes}", "transductive=false"])
    out = capsys.readouterr().out
    written = [Path(line.split(": ", 1)[1]) for line in out.splitlines() if line.startswith("written: ")]
    report = json.loads(written[0].read_text())
    assert [task["accuracy_by_inner_step"] for task in report["per_task"]] == reference and report["transductive"] is False
    assert written[0].name.endswith("_nontransductive.json") and "non-transductive" in out.splitlines()[0]
    # The CSV's probabilities are the non-transductive predictions, not those of the queries normalised together.
    rows = list(csv.DictReader(written[1].open()))
    first_task = [float(r["probability"]) for r in rows if r["task"] == "task0"]
    assert len(first_task) == WAY * QUERY
    together, alone = (scores.softmax(dim=-1).max(dim=-1).values.tolist() for scores in scores_by_mode[0])
    assert first_task == pytest.approx(alone, abs=1e-6) and first_task != pytest.approx(together, abs=1e-6)
    # The Python API on the same files, asked for the same.
    files = sorted((episodes / "task0" / "support").rglob("*.png"))
    adapted = learner.adapt(files, [f.parent.name for f in files])
    queries = sorted((episodes / "task0" / "query").rglob("*.png"))
    torch.testing.assert_close(adapted.scores(queries, transductive=False), scores_by_mode[0][1], rtol=0, atol=0)
    torch.testing.assert_close(adapted.scores(queries), scores_by_mode[0][0], rtol=0, atol=0)
    assert adapted.probabilities(queries, transductive=False).max(dim=-1).values.tolist() == pytest.approx(first_task, abs=1e-6)


def refuse_non_numbers(constant: str) -> float:
    raise ValueError(f"{constant} is not JSON")


def test_unlabelled_queries_are_predicted_one_csv_row_per_image_and_two_evaluations_keep_both(trained, tmp_path, capsys):
    run, tasks = trained
    episodes = tmp_path / "new_tasks"
    write_task(episodes / "a", tasks, [0, 1, 2], labelled=False)
    write_task(episodes / "b", tasks, [3, 4, 5], first_image=4)
    evaluate.main([f"checkpoint={run}", f"episodes={episodes}"])
    first = [Path(line.split(": ", 1)[1]) for line in capsys.readouterr().out.splitlines() if line.startswith("written: ")]
    rows = list(csv.DictReader(first[1].open()))
    assert len(rows) == 2 * WAY * QUERY and list(rows[0]) == ["task", "image", "label", "prediction", "probability"]
    unlabelled = [r for r in rows if r["task"] == "a"]
    assert len(unlabelled) == WAY * QUERY and all(r["label"] == "" and r["prediction"].startswith("class_") for r in unlabelled)
    assert sorted(r["image"] for r in unlabelled) == sorted(p.relative_to(episodes).as_posix() for p in (episodes / "a" / "query").glob("*.png"))
    assert all(0 < float(r["probability"]) <= 1 for r in rows)
    report = json.loads(first[0].read_text(), parse_constant=refuse_non_numbers)  # strict JSON, as jq or a browser reads it
    assert (report["tasks"], report["unlabelled_tasks"]) == (1, 1) and Path(report["predictions"]) == first[1]
    assert all(row["ci95"] is None and 0 <= row["mean"] <= 1 for row in report["by_inner_step"])  # one task has no CI
    test, metric = read_eval_file(first[0])
    assert metric == "accuracy" and math.isnan(test.final.spread) and test.final.mean == report["by_inner_step"][-1]["mean"]
    evaluate.main([f"checkpoint={run}", f"episodes={episodes}"])  # the same again: new files, the first ones kept
    second = [Path(line.split(": ", 1)[1]) for line in capsys.readouterr().out.splitlines() if line.startswith("written: ")]
    assert second[0] != first[0] and second[1] != first[1] and first[1].read_text().count("\n") == len(rows) + 1


def test_mistakes_with_new_tasks_are_one_line_errors(trained, tmp_path, capsys):
    run, tasks = trained
    learner = maml_cli.load(run)
    episode, _ = write_task(tmp_path / "task", tasks, [0, 1, 2])
    if learner.way is not None:  # MAML's head has 3 outputs; ProtoNet takes any number of classes
        with pytest.raises(UserError, match="trained on 3-way tasks"):
            learner.adapt(episode.support_x[:4], episode.support_y[:4])
    with pytest.raises(UserError, match="support examples but"):
        learner.adapt(episode.support_x, episode.support_y[:2])
    with pytest.raises(UserError, match=r"takes a batch of shape \(n, 1, 28, 28\)"):
        learner.adapt(episode.support_x[:, :, :20], episode.support_y)
    shutil.copytree(tmp_path / "task", tmp_path / "bad" / "t")
    (tmp_path / "bad" / "t" / "query" / "class_0").rename(tmp_path / "bad" / "t" / "query" / "unknown")
    for args, message in (([f"episodes={tmp_path / 'bad'}"], "query class .*unknown has no support images"),
                          ([f"episodes={tmp_path / 'missing'}"], "is not a folder"),
                          ([f"episodes={tmp_path / 'task'}", "way=5"], "way apply only to sampled episodes"),
                          ([f"episodes={tmp_path / 'task'}", "score_every=2"], "score_every apply only to sampled episodes")):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main([f"checkpoint={run}", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert __import__("re").search(message, err), err
    # A single task folder is read as one task.
    evaluate.main([f"checkpoint={run}", f"episodes={tmp_path / 'task'}"])
    assert "1 with labelled queries" in capsys.readouterr().out


def test_the_learner_needs_no_data_root_and_adapts_with_the_steps_asked_for(trained, tmp_path, monkeypatch):
    run, tasks = trained
    episode, _ = write_task(tmp_path / "task", tasks, [0, 1, 2])
    from maml_cli.data import omniglot

    def no_data(*args, **kwargs):
        raise AssertionError("the learner read the dataset")

    monkeypatch.setattr(omniglot.OmniglotTasks, "__init__", no_data)
    monkeypatch.setattr(omniglot, "load_images", no_data)
    learner = maml_cli.load(run / "last.pt")  # only the checkpoint: building the task family would fail here
    if learner.inner_steps:
        assert learner.inner_steps == 2
        before = learner.adapt(episode.support_x, episode.support_y, inner_steps=0).scores(episode.query_x)
        after = learner.adapt(episode.support_x, episode.support_y).scores(episode.query_x)
        assert not torch.equal(before, after)
        assert torch.equal(learner.adapt(episode.support_x, episode.support_y, inner_steps=2).scores(episode.query_x), after)
    else:
        with pytest.raises(UserError, match="has no inner loop"):
            learner.adapt(episode.support_x, episode.support_y, inner_steps=3)
    images = learner.preprocess(sorted((tmp_path / "task" / "support").rglob("*.png")))
    assert images.shape == (WAY * SHOT, 1, 28, 28) and torch.equal(images, episode.support_x)


def test_adapting_works_inside_no_grad_and_inference_mode_and_refuses_raw_pixels(trained, tmp_path):
    run, tasks = trained
    learner = maml_cli.load(run)
    episode, _ = write_task(tmp_path / "task", tasks, [0, 1, 2])
    expected = learner.adapt(episode.support_x, episode.support_y).scores(episode.query_x)
    with torch.no_grad():
        assert torch.equal(learner.adapt(episode.support_x, episode.support_y).scores(episode.query_x), expected)
    with torch.inference_mode():
        support_x, query_x = episode.support_x.clone(), episode.query_x.clone()  # tensors made under inference mode
        assert torch.equal(learner.adapt(support_x, episode.support_y).scores(query_x), expected)
    with pytest.raises(UserError, match="Divide 8-bit pixels by 255"):
        learner.adapt((episode.support_x * 255).to(torch.uint8), episode.support_y)


def test_an_episodes_folder_with_an_empty_class_or_a_csv_output_is_refused_before_any_work(trained, tmp_path, capsys):
    run, tasks = trained
    write_task(tmp_path / "ok", tasks, [0, 1, 2])
    for args, message in (([f"episodes={tmp_path / 'ok'}", f"output={tmp_path / 'x.csv'}"], "give a .json name"),
                          ([f"episodes={tmp_path / 'ok'}", f"output={tmp_path / 'missing' / 'x.json'}"], "does not exist")):
        with pytest.raises(SystemExit):
            evaluate.main([f"checkpoint={run}", *args])
        assert message in capsys.readouterr().err
    (tmp_path / "ok" / "support" / "class_9").mkdir()
    with pytest.raises(SystemExit):
        evaluate.main([f"checkpoint={run}", f"episodes={tmp_path / 'ok'}"])
    assert "class folders without images (class_9)" in capsys.readouterr().err


def test_a_regression_learner_adapts_to_points_and_predicts_values(tmp_path):
    from test_e2e import SINE
    run_in_process("maml-train", SINE, cwd=tmp_path)
    learner = maml_cli.load(only_run(tmp_path))
    x = torch.linspace(-5, 5, 20)[:, None]
    y = 2 * torch.sin(x + 1)
    adapted = learner.adapt(x[::2], y[::2])
    predicted = adapted.predict(x[1::2])
    assert predicted.shape == (10, 1)
    # The same task through the evaluation loop's path: the same mean squared error.
    by_step = learner.algorithm.evaluate(functional_forward(learner.model), dict(learner.model.named_parameters()),
                                         EpisodeBatch.stack([Episode(x[::2], y[::2], x[1::2], y[1::2])]), learner.inputs.kind.objective)
    assert float((predicted - y[1::2]).pow(2).mean()) == pytest.approx(float(by_step[max(by_step)]["mse"][0]), rel=1e-6)
    with pytest.raises(UserError, match="10 support examples but 3 target values"):
        learner.adapt(x[::2], y[:3])
    with pytest.raises(UserError, match="trained on vectors"):
        learner.preprocess(["a.png"])
    # The MLP gives each example an output of its own: a non-transductive prediction would be the same, one pass per query.
    with pytest.raises(UserError, match="this MAML network gives each example an output of its own.*Leave it out"):
        adapted.predict(x[1::2], transductive=False)
