"""``algo.batch_tasks``: a meta-batch's tasks computed together under ``vmap`` must give the task-by-task path's numbers."""
import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from maml_cli.algorithms.registry import registered_algorithms
from maml_cli.build import build_algorithm, build_model, build_optimizer, build_samplers, build_tasks, validate
from maml_cli.loop import accumulate_meta_gradient, functional_forward
from maml_cli.models import MLP, Conv4, ResNet12
from maml_cli.tasks import Episode, EpisodeBatch, classification_objective
from maml_cli.train import task_threads
from conftest import run_in_process
from test_config import compose_config, run_main_in_process

REGISTERED = registered_algorithms()
# Found through the schemas, not listed: an algorithm offers the switch by declaring the field.
BATCHABLE = sorted(n for n, e in REGISTERED.items() if any(f.name == "batch_tasks" for f in dataclasses.fields(e.schema)))
WAY, SHOT, QUERY, TASKS = 3, 2, 2, 3


def episodes(seed=1, tasks=TASKS, side=16):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(WAY)
    return [Episode(torch.randn(WAY * SHOT, 1, side, side, generator=g, dtype=torch.float64), labels.repeat_interleave(SHOT),
                    torch.randn(WAY * QUERY, 1, side, side, generator=g, dtype=torch.float64), labels.repeat_interleave(QUERY))
            for _ in range(tasks)]


def algorithm(name, batch_tasks, first_order=False, steps=2):
    return REGISTERED[name].algorithm(inner_lr=0.4, inner_steps=steps, test_inner_steps=steps + 1, first_order=first_order,
                                      batch_tasks=batch_tasks)


BACKBONES = {
    "conv4": lambda batch_norm, channels_last: Conv4(1, WAY, hidden=4, image_size=16, batch_norm=batch_norm, channels_last=channels_last),
    "resnet12": lambda batch_norm, channels_last: ResNet12(1, WAY, hidden=(2, 3, 3, 4), image_size=16, batch_norm=batch_norm,
                                                           channels_last=channels_last),
    "mlp": lambda batch_norm, channels_last: MLP(out_features=WAY, hidden=(8, 6), in_channels=1, image_size=16),
}


def network(name, batch_norm, channels_last=False, backbone="conv4"):
    torch.manual_seed(0)
    model = algorithm(name, False).attach(BACKBONES[backbone](batch_norm, channels_last))
    with torch.no_grad():  # learned rates that differ by element (Meta-SGD), as after some meta-training
        for n, p in model.named_parameters():
            if n.startswith("inner_lrs."):
                p.mul_(1 + 0.5 * torch.rand(p.shape))
    return model.double()


def test_the_algorithms_that_offer_batch_tasks_are_found_and_mamlpp_is_not_among_them():
    assert {"maml", "anil", "metasgd"} <= set(BATCHABLE) and "mamlpp" not in BATCHABLE
    assert algorithm("maml", True).episodes_per_call is None and algorithm("maml", False).episodes_per_call == 1


@pytest.mark.parametrize("name", BATCHABLE)
def test_batch_tasks_left_null_is_on_for_a_gpu_and_off_for_a_cpu_and_a_typed_value_wins(name):
    # torch.device("cuda") is only a name here: nothing is put on a GPU.
    cfg = compose_config([f"algo={name}"])
    assert cfg.algo.batch_tasks is None
    assert build_algorithm(cfg, torch.device("cuda")).batch_tasks is True
    assert build_algorithm(cfg, torch.device("cpu")).batch_tasks is False and build_algorithm(cfg).batch_tasks is False
    assert build_algorithm(compose_config([f"algo={name}", "algo.batch_tasks=false"]), torch.device("cuda")).batch_tasks is False
    # Batched, a call holds at most a meta-batch: evaluation stacks are no larger than a training step's.
    assert build_algorithm(compose_config([f"algo={name}", "algo.batch_tasks=true", "meta_batch_size=7"]),
                           torch.device("cpu")).episodes_per_call == 7
    # The config of a run saved before the key existed has none: settled like null.
    saved = OmegaConf.create(OmegaConf.to_container(compose_config([f"algo={name}"]), resolve=True))
    del saved.algo["batch_tasks"]
    assert build_algorithm(saved, torch.device("cuda")).batch_tasks is True and build_algorithm(saved).batch_tasks is False


def test_tasks_at_once_gives_no_threads_to_an_algorithm_that_computes_a_meta_batch_in_one_call():
    model = torch.nn.Linear(1, 1)
    assert task_threads(model, 2, 8, torch.device("cpu"), episodes_per_call=8) is None
    assert task_threads(model, 2, 8, torch.device("cpu"), episodes_per_call=None) is None
    threads = task_threads(model, 2, 8, torch.device("cpu"), episodes_per_call=1)
    assert threads is not None
    threads.close()


@pytest.mark.parametrize("entry_point", ["maml-train", "maml-eval"])
def test_running_out_of_gpu_memory_is_one_line_naming_batch_tasks(tmp_path, monkeypatch, entry_point):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    if entry_point == "maml-train":
        monkeypatch.setattr("maml_cli.train.train", out_of_memory)
        code, err = run_main_in_process(tmp_path, "dataset=sinusoid")
    else:
        from maml_cli import evaluate

        monkeypatch.setattr(evaluate, "run_eval", out_of_memory)
        result = run_in_process("maml-eval", [f"checkpoint={tmp_path / 'last.pt'}"], cwd=tmp_path, check=False)
        code, err = result.returncode, result.stderr
    assert code == 2 and err.startswith(f"{entry_point}: error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)")
    typed = "algo.batch_tasks=false" if entry_point == "maml-train" else "batch_tasks=false"
    assert f" {typed} computes one task at a time" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("name", BATCHABLE)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("batch_norm,channels_last", [("batch", False), ("batch", True), ("example", False)])
def test_the_batched_meta_gradient_and_metrics_equal_the_task_by_task_ones_in_float64(name, first_order, batch_norm, channels_last):
    assert_batched_equals_task_by_task(name, first_order, batch_norm, channels_last, "conv4")


@pytest.mark.parametrize("name", BATCHABLE)
@pytest.mark.parametrize("backbone,batch_norm", [("resnet12", "batch"), ("resnet12", "example"), ("mlp", None)])
def test_the_other_backbones_give_the_task_by_task_meta_gradient_batched_in_float64(name, backbone, batch_norm):
    # Second order: ResNet-12's shortcut and leaky ReLU, and the MLP's flattened images, under vmap.
    assert_batched_equals_task_by_task(name, False, batch_norm, False, backbone)


def assert_batched_equals_task_by_task(name, first_order, batch_norm, channels_last, backbone):
    tasks = episodes()
    results = {}
    for batch_tasks in (False, True):
        model = network(name, batch_norm, channels_last, backbone)
        metrics = accumulate_meta_gradient(algorithm(name, batch_tasks, first_order), model, tasks, classification_objective)
        results[batch_tasks] = metrics, {n: p.grad for n, p in model.named_parameters()}
    (loop_metrics, loop_grads), (batched_metrics, batched_grads) = results[False], results[True]
    assert loop_metrics.keys() == batched_metrics.keys()
    for key in loop_metrics:
        assert batched_metrics[key] == pytest.approx(loop_metrics[key], rel=1e-12, abs=1e-12)
    scale = torch.cat([g.flatten() for g in loop_grads.values()]).norm()
    assert scale > 0
    # Against the whole gradient's norm: the convolution biases before batch statistics have a true gradient of zero,
    # so their own relative error is rounding noise over rounding noise.
    for n, grad in loop_grads.items():
        assert batched_grads[n].shape == grad.shape
        assert (batched_grads[n] - grad).norm() / scale < 1e-12, n


@pytest.mark.parametrize("name", BATCHABLE)
def test_batched_evaluation_scores_each_episode_as_the_task_by_task_evaluation_does(name):
    model = network(name, "batch")
    forward, params = functional_forward(model), dict(model.named_parameters())
    stack = EpisodeBatch.stack(episodes(seed=5, tasks=4))
    loop = algorithm(name, False).evaluate(forward, params, stack, classification_objective)
    batched = algorithm(name, True).evaluate(forward, params, stack, classification_objective)
    assert sorted(batched) == sorted(loop) == [0, 1, 2, 3]
    for step in loop:
        for metric, values in loop[step].items():
            assert batched[step][metric].shape == (4,)
            torch.testing.assert_close(batched[step][metric], values, rtol=1e-10, atol=1e-12)
    assert not any(p.grad is not None for p in model.parameters())


def test_a_batched_run_takes_the_same_steps_as_the_task_by_task_run():
    # Built as maml-train builds them, on sinusoid regression (the MLP under vmap), trained a few outer steps.
    curves = {}
    for batch_tasks in ("false", "true"):
        cfg = compose_config(["algo=maml", "dataset=sinusoid", f"algo.batch_tasks={batch_tasks}"])
        validate(cfg)
        algo, tasks = build_algorithm(cfg), build_tasks(cfg)
        sampler = build_samplers(cfg, tasks, algo, torch.device("cpu"))["train"]
        torch.manual_seed(0)
        model = build_model(cfg, tasks, algo)
        optimizer = build_optimizer(cfg, model)
        generator = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(8):
            optimizer.zero_grad()
            meta_batch = [sampler.sample(generator) for _ in range(4)]
            losses.append(accumulate_meta_gradient(algo, model, meta_batch, tasks.kind.objective)["loss"])
            optimizer.step()
        curves[batch_tasks] = losses
    assert curves["true"] == pytest.approx(curves["false"], rel=1e-4)


def test_batch_tasks_for_mamlpp_is_refused_as_a_key_it_does_not_have(tmp_path):
    code, err = run_main_in_process(tmp_path, "algo=mamlpp", "dataset=sinusoid", "algo.batch_tasks=true")
    assert code == 2 and "algo.batch_tasks" in err and len(err.strip().splitlines()) == 1, err


def test_maml_eval_scores_the_same_with_and_without_batch_tasks_and_refuses_it_for_mamlpp(tmp_path):
    run_in_process("maml-train", ["dataset=sinusoid", "iterations=2", "val_every=2", "val_tasks=4", "test_tasks=6",
                                  "progress=false", f"hydra.run.dir={tmp_path / 'maml'}"], cwd=tmp_path)
    tables = {}
    for batch_tasks in ("false", "true"):
        result = run_in_process("maml-eval", [f"checkpoint={tmp_path / 'maml'}", f"batch_tasks={batch_tasks}", "progress=false"], cwd=tmp_path)
        tables[batch_tasks] = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"], ["3"])]
    assert len(tables["true"]) == 4
    for batched, one_by_one in zip(tables["true"], tables["false"]):
        assert [float(v) for v in batched] == pytest.approx([float(v) for v in one_by_one], rel=1e-4)
    run_in_process("maml-train", ["dataset=sinusoid", "algo=mamlpp", "iterations=1", "val_every=1", "val_tasks=2", "test_tasks=2",
                                  "progress=false", f"hydra.run.dir={tmp_path / 'mamlpp'}"], cwd=tmp_path)
    refused = run_in_process("maml-eval", [f"checkpoint={tmp_path / 'mamlpp'}", "batch_tasks=true"], cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "batch_tasks does not apply to MAMLPlusPlus" in refused.stderr, refused.stderr
    offering = refused.stderr.partition("(only ")[2].partition(" do)")[0].split(", ")  # from the registry, not a list here
    assert "MAML" in offering and "MAMLPlusPlus" not in offering, refused.stderr


def test_the_log_says_whether_the_tasks_were_computed_together_as_settled_for_the_device(tmp_path):
    # config.yaml keeps null (so a resume on a GPU settles it afresh); the log says what the run did.
    tiny = ["dataset=sinusoid", "iterations=2", "meta_batch_size=2", "val_every=2", "val_tasks=2", "test_tasks=2", "progress=false"]
    run = run_in_process("maml-train", [*tiny, "algo=maml"], cwd=tmp_path)
    assert "algo.batch_tasks=false (null, settled for cpu): each task is computed on its own" in run.stdout + run.stderr
    run_dir = next(tmp_path.glob("outputs/runs/*"))
    assert OmegaConf.load(run_dir / "config.yaml").algo.batch_tasks is None
    resumed = run_in_process("maml-train", [f"resume={run_dir}", "iterations=4", "algo.batch_tasks=true"], cwd=tmp_path)
    assert "algo.batch_tasks=true: the tasks of a meta-batch are computed together" in resumed.stdout + resumed.stderr
    (tmp_path / "reptile").mkdir()
    other = run_in_process("maml-train", [*tiny, "algo=reptile"], cwd=tmp_path / "reptile")
    assert "algo.batch_tasks" not in other.stdout + other.stderr
