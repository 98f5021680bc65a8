"""Every config composes and instantiates; the schema rejects unknown keys and wrong types by name."""
import math
from pathlib import Path
import warnings

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException

from conftest import SMALL_OVERRIDES, image_dataset_overrides, run_in_process
from maml_cli import config
from maml_cli.build import (build_algorithm, build_model, build_optimizer, build_samplers, build_scheduler, build_tasks,
                            has_inner_loop, validate)
from maml_cli.errors import UserError
from maml_cli.algorithms.base import scored as scored_predictors
from maml_cli.data.base import ImageTaskFamily
from maml_cli.learner import dataset_inputs
from maml_cli.models import MLP
from maml_cli.loop import accumulate_meta_gradient, evaluate, functional_forward
from maml_cli.tasks import EpisodeBatch

config.register()
CONF = Path(config.config_dir())
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUP_CHOICES = [(group, p.stem) for group in ("algo", "dataset", "model") for p in sorted((CONF / group).glob("*.yaml"))]
# conf/algo_dataset/ holds per-combination settings, chosen by the defaults list from algo and dataset.


def compose_config(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_the_package_finds_the_repository_configs():
    assert (CONF / "config.yaml").is_file() and EXPERIMENTS and len(GROUP_CHOICES) >= 5


def test_defaults_are_maml_on_omniglot_5_way_1_shot():
    cfg = compose_config([])
    assert cfg.algo._target_.endswith("MAML") and cfg.dataset._target_.endswith("OmniglotTasks")
    assert (cfg.way, cfg.shot, cfg.inner_lr, cfg.inner_steps, cfg.meta_batch_size, cfg.algo.first_order) == (5, 1, 0.4, 1, 32, False)
    assert cfg.dataset.split == "random"
    cfg = compose_config(["algo=maml", "way=20", "shot=1"])
    assert (cfg.way, cfg.shot, cfg.query) == (20, 1, 1)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(name, small_omniglot, small_vinyals_split, small_image_root):
    if "miniimagenet" in name:
        overrides = image_dataset_overrides("miniimagenet", small_image_root)
    else:
        overrides = [f"data_root={small_omniglot}", *(
            # 20-way presets need 20 validation classes: 5 characters x 4 rotations.
            SMALL_OVERRIDES + ["dataset.val_characters=5", f"dataset.split_dir={small_vinyals_split}"] if "omniglot" in name else [])]
    _instantiate_all(compose_config([f"experiment={name}", *overrides]))


@pytest.mark.parametrize("group,choice", GROUP_CHOICES)
def test_every_group_option_composes_and_instantiates(group, choice, small_omniglot, small_image_root):
    overrides = [f"{group}={choice}", f"data_root={small_omniglot}", *SMALL_OVERRIDES]
    if group == "dataset" and choice == "sinusoid":
        overrides = [f"{group}={choice}"]
    elif group == "dataset" and choice != "omniglot":
        overrides = [f"{group}={choice}", "query=1", *image_dataset_overrides(choice, small_image_root)]
    if group == "model" and choice == "mlp":
        overrides = ["dataset=sinusoid", "model=mlp"]
    if group == "model" and choice == "resnet12":
        overrides.append("model.hidden=[8,8,8,8]")  # the default widths are tested in test_resnet12.py; here, that it composes
    _instantiate_all(compose_config(overrides))


def _instantiate_all(cfg):
    """Build everything from ``cfg`` the way maml-train does, take one meta-step and score the episodes of one call: the
    same path for every algorithm, whichever kind of outer update it has."""
    validate(cfg)
    algorithm = build_algorithm(cfg)
    tasks = build_tasks(cfg)
    samplers = build_samplers(cfg, tasks, algorithm, torch.device("cpu"))
    model = build_model(cfg, tasks, algorithm)
    optimizer = build_optimizer(cfg, model)
    build_scheduler(cfg, optimizer, algorithm)
    generator = torch.Generator().manual_seed(0)
    # One call's worth of episodes (a stack of two where the algorithm takes any number): presets are sized for
    # training, and a second call of the same computation would only double this test's time.
    per_call = algorithm.episodes_per_call or 2
    episodes = [samplers["train"].sample(generator) for _ in range(per_call)]
    means = accumulate_meta_gradient(algorithm.at_iteration(0, cfg.iterations), model, episodes, tasks.kind.objective)
    assert math.isfinite(means["loss"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    optimizer.step()
    scored = evaluate(algorithm, model, samplers["test"], tasks.kind, per_call, 0, torch.device("cpu"))
    last = cfg.test_inner_steps if has_inner_loop(cfg) else 0
    assert list(scored) == list(range(last + 1))
    assert all(math.isfinite(step[tasks.kind.metric][0]) for step in scored.values())
    # Scoring every other step, or the last alone (meta-validation), scores the kept steps of the same tasks the same.
    for score_every, kept in ((2, sorted({*range(0, last + 1, 2), last})), (None, [last])):
        sparse = evaluate(algorithm, model, samplers["test"], tasks.kind, per_call, 0, torch.device("cpu"), score_every=score_every)
        assert list(sparse) == kept
        assert all(sparse[k][tasks.kind.metric] == pytest.approx(scored[k][tasks.kind.metric], abs=1e-6, nan_ok=True) for k in kept)
    # A trained model meets a new task through the same computation: the dataset's registered inputs are what the
    # family built, and each step's predictor scores a test episode exactly as evaluate does.
    inputs = dataset_inputs(cfg)
    assert inputs.kind == tasks.kind
    assert ((inputs.in_channels, inputs.image_size) == (tasks.in_channels, tasks.image_size) if isinstance(tasks, ImageTaskFamily)
            else inputs.in_features == tasks.in_features)
    episode = samplers["test"].sample(torch.Generator().manual_seed(3))
    forward, params, objective = functional_forward(model), dict(model.named_parameters()), tasks.kind.objective
    if cfg.algo.get("protocol") == "sequence":
        with pytest.raises(UserError, match="algo.protocol=sequence"):
            next(algorithm.adaptations(forward, params, episode.support_x, episode.support_y, objective))
        return
    by_step = algorithm.evaluate(forward, params, EpisodeBatch.stack([episode]), objective)
    predicted = scored_predictors(algorithm.adaptations(forward, params, episode.support_x, episode.support_y, objective),
                                  episode.query_x, episode.query_y, objective, steps=range(last + 1))
    assert list(predicted) == list(by_step)
    for mine, theirs in zip(predicted.values(), by_step.values()):
        assert torch.allclose(mine[tasks.kind.metric], theirs[tasks.kind.metric][0], atol=1e-6)


def test_lstm_on_sinusoid_reads_the_raw_input():
    cfg = compose_config(["algo=lstm", "dataset=sinusoid"])
    assert cfg.algo.embedding == "raw"
    _instantiate_all(cfg)
    assert compose_config(["algo=lstm"]).algo.embedding == "backbone"


DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_the_lstm_network_computes_each_step_on_its_own_for_every_dataset_and_model(dataset, model, small_omniglot, small_image_root):
    # Whatever the dataset and model, a step's output must not depend on later inputs of the sequence: the build
    # either chooses a per-example model (conv4's batch_norm left null) or it refuses (below).
    data = ([f"data_root={small_omniglot}", *SMALL_OVERRIDES] if dataset == "omniglot" else [] if dataset == "sinusoid"
            else image_dataset_overrides(dataset, small_image_root)[:-1])
    cfg = compose_config(["algo=lstm", f"dataset={dataset}", f"model={model}", "algo.embedding=backbone", "algo.protocol=sequence", *data])
    tasks = build_tasks(cfg)
    try:
        network = build_model(cfg, tasks, build_algorithm(cfg))
    except UserError as error:  # a model that does not fit the dataset (conv4 on sinusoid), not a leak
        assert dataset == "sinusoid" and model != "mlp" and "is not built for the inputs of dataset=sinusoid" in str(error)
        return
    assert not network.mixes_examples
    episode = tasks.sampler("train", cfg.way, 2, 0).sample(torch.Generator().manual_seed(0))
    labels_in = torch.zeros(1, len(episode.support_x), network.head.out_features)
    outputs, _ = network(episode.support_x[None], labels_in)
    later = episode.support_x.clone()
    later[-1] = later[-1] + 1.0
    changed, _ = network(later[None], labels_in)
    torch.testing.assert_close(changed[0, :-1], outputs[0, :-1], rtol=0, atol=0)


@pytest.mark.parametrize("algo", ["maml", "anil", "protonet", "lstm"])
def test_the_mlp_reads_images_flattened(algo, small_omniglot):
    cfg = compose_config([f"algo={algo}", "model=mlp", "model.hidden=[32,16]", f"data_root={small_omniglot}", *SMALL_OVERRIDES])
    _instantiate_all(cfg)
    first = dict(build_model(cfg, build_tasks(cfg), build_algorithm(cfg)).named_parameters())
    assert any(p.shape == (32, 28 * 28) for p in first.values())  # one input per pixel


@pytest.mark.parametrize("model", ["conv4", "resnet12"])
def test_an_image_model_on_vectors_is_refused_naming_the_models_that_fit(model):
    cfg = compose_config(["dataset=sinusoid", f"model={model}"])
    with pytest.raises(UserError, match=rf"^model={model} is not built for the inputs of dataset=sinusoid, which are vectors "
                                        r"of 1 value; models that are: model=mlp\.$"):
        build_model(cfg, build_tasks(cfg), build_algorithm(cfg))


class AnyInputsMLP(MLP):
    """A user's model that passes every keyword on: what it takes is known only by building it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)


def test_a_model_that_takes_any_keyword_is_built_not_refused():
    cfg = compose_config(["dataset=sinusoid", f"model._target_={__name__}.AnyInputsMLP"])
    assert isinstance(build_model(cfg, build_tasks(cfg), build_algorithm(cfg)), AnyInputsMLP)


def test_the_build_chooses_per_example_normalisation_for_the_lstm_and_refuses_batch_statistics(small_omniglot):
    base = [f"data_root={small_omniglot}", *SMALL_OVERRIDES]
    for algo, chosen in (("lstm", "example"), ("maml", "batch"), ("protonet", "batch")):
        cfg = compose_config([f"algo={algo}", *base])
        assert cfg.model.batch_norm is None
        build_model(cfg, build_tasks(cfg), build_algorithm(cfg))
        assert cfg.model.batch_norm == chosen  # recorded in the config the run saves
    cfg = compose_config(["algo=lstm", "model.batch_norm=batch", *base])
    with pytest.raises(UserError, match="needs each example's output to depend on that example alone.*model.batch_norm=example"):
        build_model(cfg, build_tasks(cfg), build_algorithm(cfg))


def test_protonet_and_lstm_presets_hold_the_papers_protocols():
    proto = compose_config(["experiment=protonet_omniglot_20w1s"])
    assert (proto.way, proto.shot, proto.algo.train_way, proto.algo.train_shot, proto.algo.train_query) == (20, 1, 60, 1, 5)
    assert proto.scheduler.step_size == 2000 and proto.scheduler.gamma == 0.5 and proto.optimizer.lr == 0.001
    assert proto.test_tasks == 1000 and proto.dataset.split == "vinyals" and proto.meta_batch_size == 1
    santoro = compose_config(["experiment=lstm_omniglot_5w"])
    assert (santoro.way, santoro.algo.protocol, santoro.algo.presentations) == (5, "sequence", 10)


def test_paper_presets_hold_finn_et_al_settings():
    five = compose_config(["experiment=maml_omniglot_5w1s"])
    assert (five.way, five.shot, five.inner_lr, five.inner_steps, five.test_inner_steps, five.meta_batch_size) == (5, 1, 0.4, 1, 3, 32)
    twenty = compose_config(["experiment=maml_omniglot_20w1s"])
    assert (twenty.way, twenty.shot, twenty.inner_lr, twenty.inner_steps, twenty.meta_batch_size) == (20, 1, 0.1, 5, 16)
    sine = compose_config(["experiment=maml_sinusoid"])
    assert (sine.shot, sine.inner_lr, sine.inner_steps, sine.meta_batch_size, sine.outer_lr) == (10, 0.01, 1, 25, 0.001)
    assert sine.model._target_.endswith("MLP") and list(sine.model.hidden) == [40, 40]


@pytest.mark.parametrize("override,key", [
    ("algo.inner_lrr=0.1", "algo.inner_lrr"),
    ("wayy=5", "wayy"),
    ("way=five", "way"),
    ("inner_lr=fast", "inner_lr"),
    ("dataset.split=alphabetical", "split"),
    ("model.batch_norm=running", "batch_norm"),
    ("algo.first_order=maybe", "first_order"),
    ("algo=protonet algo.distance=manhattan", "distance"),
    ("algo=lstm algo.protocol=omniglot", "protocol"),
    ("algo=lstm algo.hidden=3", "algo.hidden"),
])
def test_unknown_keys_and_wrong_types_fail_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(override.split())
    chain, exc = [], error.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__
    assert key in " ".join(chain)


def test_the_outer_optimizer_takes_its_own_classs_settings_with_a_plus_and_refuses_others_naming_them():
    cfg = compose_config(["dataset=sinusoid", "optimizer._target_=torch.optim.SGD", "+optimizer.momentum=0.9", "+optimizer.nesterov=true"])
    validate(cfg)
    optimizer = build_optimizer(cfg, build_model(cfg, build_tasks(cfg), build_algorithm(cfg)))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["nesterov"]
    with pytest.raises(UserError, match=r"unknown key optimizer.momentum. Keys under optimizer: amsgrad, betas, .*weight_decay"):
        validate(compose_config(["dataset=sinusoid", "+optimizer.momentum=0.9"]))  # Adam has none
    with pytest.raises(UserError, match=r"unknown key optimizer.momentun. Did you mean momentum"):
        validate(compose_config(["optimizer._target_=torch.optim.SGD", "+optimizer.momentun=0.9"]))


@pytest.mark.parametrize("override,key", [("+algo.foo=1", "algo.foo"), ("+dataset.splitt=lake", "dataset.splitt")])
def test_keys_appended_with_plus_are_rejected_before_any_work(override, key):
    with pytest.raises(UserError, match=f"unknown key {key}"):
        validate(compose_config([override]))


def test_a_config_file_with_a_misspelt_key_is_rejected(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\ninner_setps: 3\n")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as error:
            compose("config", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "experiment=typo"])
    assert "inner_setps" in repr(error.value) + repr(error.value.__cause__)


@pytest.mark.parametrize("override,message", [
    ("inner_lr=-0.1", "inner_lr must be positive"),
    ("outer_lr=0", "outer_lr must be positive"),
    ("meta_batch_size=0", "meta_batch_size must be at least 1"),
    ("inner_steps=-1", "inner_steps must be at least 0"),
    ("shot=0", "shot must be at least 1"),
    ("query=0", "query must be at least 1"),
    ("algo=protonet algo.train_shot=0", "algo.train_shot must be at least 1"),
    ("algo=lstm algo.hidden_size=0", "algo.hidden_size must be at least 1"),
    ("algo=reptile algo.inner_batch=0", "algo.inner_batch must be at least 1"),
    ("algo=reptile algo.final_outer_lr=-1", "algo.final_outer_lr must be at least 0"),
    ("algo=mamlpp algo.msl_iterations=-5", "algo.msl_iterations must be at least 0"),
    ("patience=0", "patience must be at least 1 or null"),
    ("tasks_at_once=0", "tasks_at_once must be at least 1"),
    ("threads=many", "threads must be auto or a whole number of at least 1"),
    ("threads=0", "threads must be auto or a whole number of at least 1"),
    ("inner_lr=inf", "inner_lr must be positive and finite"),
    ("algo=reptile algo.final_outer_lr=inf", "algo.final_outer_lr must be finite"),
    ("dataset=sinusoid model.hidden=[40,0]", r"model.hidden must be at least 1 \(got \[40, 0\]\)"),
    ("dataset=sinusoid model.hidden=[-3]", "model.hidden must be at least 1"),
    ("model.hidden=0", "model.hidden must be at least 1"),
    ("seed=-1", r"seed must be a whole number from 0 to 2\*\*64-1 \(got -1\).*a negative seed does not mean a random one"),
    ("eval_seed=18446744073709551616", r"eval_seed must be a whole number from 0 to 2\*\*64-1"),
    ("dataset.split_seed=-3", "dataset.split_seed must be a whole number"),
])
def test_out_of_range_values_are_user_errors(override, message):
    with pytest.raises(UserError, match=message):
        validate(compose_config(override.split()))


@pytest.mark.parametrize("algo", ["reptile", "mamlpp"])
def test_a_scheduler_beside_an_algorithm_that_anneals_its_own_outer_rate_is_refused(algo, small_omniglot):
    cfg = compose_config([f"algo={algo}", f"data_root={small_omniglot}", *SMALL_OVERRIDES, "+scheduler._target_=torch.optim.lr_scheduler.StepLR",
                          "+scheduler._partial_=true", "+scheduler.step_size=2"])
    model = build_model(cfg, build_tasks(cfg), build_algorithm(cfg))
    with pytest.raises(UserError, match=f"algo={algo} anneals the outer learning rate itself"):
        build_scheduler(cfg, build_optimizer(cfg, model), build_algorithm(cfg))


def test_a_one_cycle_schedule_shorter_than_the_run_is_refused_before_training(small_omniglot):
    def scheduler_for(total_steps):
        cfg = compose_config([f"data_root={small_omniglot}", *SMALL_OVERRIDES, "iterations=5",
                              "+scheduler._target_=torch.optim.lr_scheduler.OneCycleLR", "+scheduler._partial_=true",
                              "+scheduler.max_lr=0.01", f"+scheduler.total_steps={total_steps}"])
        model = build_model(cfg, build_tasks(cfg), build_algorithm(cfg))
        return build_scheduler(cfg, build_optimizer(cfg, model), build_algorithm(cfg))

    with pytest.raises(UserError, match=r"OneCycleLR's schedule has 4 steps .* iterations=5: it would stop with an error at step 5"):
        scheduler_for(4)
    scheduler = scheduler_for(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # step() before optimizer.step()
        for _ in range(5):  # as the loop does, once per meta-update: the run's length is accepted and reached
            scheduler.step()


def test_data_root_defaults_to_env_var_then_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MAML_CLI_DATA", str(tmp_path / "data"))
    assert compose_config([]).data_root == str(tmp_path / "data")
    monkeypatch.delenv("MAML_CLI_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = compose_config([])
    assert cfg.data_root == str(tmp_path / "cache" / "maml-cli") and cfg.dataset.root == cfg.data_root


@pytest.mark.parametrize("overrides,channels_last", [
    ([], True),
    (["algo=protonet"], True),
    (["algo=lstm"], True),
    (["model.channels_last=false"], False),
])
def test_conv4_is_channels_last_on_cpu_unless_turned_off(overrides, channels_last, small_omniglot):
    cfg = compose_config([f"data_root={small_omniglot}", *SMALL_OVERRIDES, *overrides])
    model = build_model(cfg, build_tasks(cfg), build_algorithm(cfg), torch.device("cpu"))
    conv4 = getattr(model, "embedding", model)
    assert conv4.channels_last is channels_last


def run_main_in_process(cwd, *args):
    """``maml-train ARGS`` in this process; returns (exit status, stderr)."""
    result = run_in_process("maml-train", list(args), cwd=cwd, check=False)
    return result.returncode, result.stderr


@pytest.mark.parametrize("args,expected", [
    (["inner_setps=3"], "unknown key inner_setps. Did you mean inner_steps"),
    (["algo=mamal"], "algo=mamal: there is no algo called 'mamal'. Did you mean maml"),
    (["experiment=maml_omniglot_5w"], "Did you mean maml_omniglot_5w5s or maml_omniglot_5w1s"),
    (["algo.inner_lrr=0.1"], "unknown key algo.inner_lrr. Did you mean inner_lr"),
    (["iterations=1e3"], "iterations must be an integer (got '1000.0'), e.g. iterations=1000."),
    (["way=five"], "way must be an integer (got 'five')"),
    (["dataset.split=vinyal"], "dataset.split=vinyal is not one of random, lake, vinyals. Did you mean vinyals?"),
    (["algo.first_order=maybe"], "algo.first_order must be true or false"),
    (["dataset=sinusoid", "model.hidden.x=1"], "model.hidden.x: model.hidden is a list, whose items are numbered, not named. "
                                                "Set one item by its index (model.hidden.0=<value>)"),
    (["optimizer=sgd"], "optimizer=sgd: optimizer is not a choice of configs but a node of settings; set its class with "
                        "optimizer._target_=<class> (e.g. optimizer._target_=torch.optim.SGD)"),
    (["dataset=sinusoid", "optimizer._target_=torch.optim.Nope"],
     "could not build the optimizer: its _target_ torch.optim.Nope cannot be imported (Are you sure that 'Nope' is importable"),
    (["dataset=sinusoid", "optimizer._target_=torch.optim.SGD", "+optimizer.momentum=-1"],
     "torch.optim.SGD refused its settings: ValueError: Invalid momentum value: -1"),
    (["dataset=sinusoid", "optimizer._target_=torch.optim.SDG", "+optimizer.momentum=0.9"],  # the class's name, not momentum
     "could not build the optimizer: its _target_ torch.optim.SDG cannot be imported"),
    (["dataset=sinusoid", "+scheduler.gamma=0.5"], "scheduler without _target_ and _partial_=true: scheduler is not a choice"),
    (["dataset=sinusoid", "~optimizer"], "optimizer cannot be removed (~optimizer): every run needs its optimizer"),
    (["dataset=sinusoid", "+scheduler=cosine"], "scheduler=cosine: scheduler is not a choice of configs but a node of settings"),
    (["dataset=sinusoid", "model.hidden.x.y=1"], "model.hidden.x.y: model.hidden is a list, whose items are numbered"),
    (["dataset=sinusoid", "model._target_=maml_cli.models.Conv4"],
     "model=conv4 is not built for the inputs of dataset=sinusoid, which are vectors of 1 value; models that are: model=mlp."),
])
def test_misspelt_keys_choices_and_types_get_one_paragraph_with_a_suggestion(tmp_path, args, expected):
    code, err = run_main_in_process(tmp_path, *args)
    assert code == 2 and err.startswith("maml-train: error: ") and expected in err, err
    assert "+inner_setps" not in err and "HYDRA_FULL_ERROR" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "outputs" / "runs").exists() or not any((tmp_path / "outputs" / "runs").iterdir())


def test_a_target_whose_module_fails_to_import_names_what_failed(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text("import a_dependency_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err = run_main_in_process(tmp_path, "dataset=sinusoid", "model._target_=my_models.Net")
    assert code == 2 and "its _target_ my_models.Net cannot be imported" in err, err
    assert "No module named 'a_dependency_not_installed'" in err and len(err.strip().splitlines()) == 1


def test_a_run_folder_the_system_refuses_is_one_line_naming_it(tmp_path):
    (tmp_path / "a_file").write_text("")
    code, err = run_main_in_process(tmp_path, "dataset=sinusoid", f"hydra.run.dir={tmp_path / 'a_file' / 'run'}")
    assert code == 1 and err.startswith("maml-train: error: ") and str(tmp_path / "a_file") in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("override,expected", [
    ("+inner_setps=3", "unknown key inner_setps. Did you mean inner_steps"),
    ("+foo=1", "unknown key foo. Keys: algo,"),
])
def test_top_level_keys_appended_with_plus_are_refused_before_any_work(tmp_path, override, expected):
    code, err = run_main_in_process(tmp_path, "dataset=sinusoid", override)
    assert code == 2 and expected in err, err
    assert not any((tmp_path / "outputs" / "runs").iterdir())  # nothing trained, no run left behind


def test_a_resumed_run_computes_as_the_resume_command_says_not_as_the_machine_it_ran_on_before():
    from maml_cli.build import MACHINE_KEYS, resume_config
    # Saved on a 16-core GPU host by `resume=<run> device=cuda threads=7`; resumed on a laptop with only resume= typed.
    saved = {"device": "cuda", "threads": "7", "keep_freed_memory": False, "tasks_at_once": 4, "progress": False, "inner_lr": 0.4, "data_root": "/gpu/data"}
    current = {"device": "auto", "threads": "auto", "keep_freed_memory": True, "tasks_at_once": 1, "progress": True, "inner_lr": 0.01, "data_root": "data"}
    effective, differences = resume_config(saved, current, typed={"resume"})
    assert {k: effective[k] for k in MACHINE_KEYS} == {"device": "auto", "threads": "auto", "keep_freed_memory": True, "tasks_at_once": 1, "progress": True}
    assert effective["inner_lr"] == 0.4 and effective["data_root"] == "/gpu/data" and differences == []
    typed, _ = resume_config(saved, {**current, "threads": "1"}, typed={"resume", "threads"})
    assert typed["threads"] == "1"


def test_a_resume_judges_typed_keys_by_the_values_it_uses_and_untyped_expressions_follow_the_run():
    from omegaconf import OmegaConf
    from maml_cli.train import resumed_config

    def resumed(run_overrides, resume_overrides):
        saved = OmegaConf.to_container(compose_config(run_overrides), resolve=True)
        overrides = ["resume=/runs/x", *resume_overrides]
        return resumed_config(compose_config(overrides), {"config": saved}, overrides)

    # algo=protonet retyped on the resume: its train_way (${way}, 5 by the command) is judged and used as 5, the run's
    # value, not resolved against the run's way=20 into a silent change of the training episodes.
    assert resumed(["algo=protonet", "way=20", "algo.train_way=5"], ["algo=protonet"]).algo.train_way == 5
    # Another optimizer class, forced: its rate (${outer_lr}) follows the run's outer_lr, not the command's default.
    switched = resumed(["dataset=sinusoid", "outer_lr=0.002"], ["optimizer._target_=torch.optim.SGD", "force_resume=true"])
    assert switched.optimizer._target_ == "torch.optim.SGD" and switched.optimizer.lr == 0.002
    # A forced scheduler setting on a run without one replaces the null node (it was a TypeError in unflatten).
    added = resumed(["dataset=sinusoid"], ["+scheduler.gamma=0.5", "force_resume=true"])
    assert OmegaConf.to_container(added.scheduler) == {"gamma": 0.5}


def test_a_key_added_after_a_run_was_saved_resumes_as_its_default():
    # A run saved before `transductive` existed scored transductively: typing the default on its resume changes nothing,
    # the other value is a change of its results (refused unless forced), and an untyped resume takes the default.
    from omegaconf import OmegaConf
    from maml_cli.errors import UserError
    from maml_cli.train import resumed_config
    saved = OmegaConf.to_container(compose_config([]), resolve=True)
    del saved["transductive"]

    def resumed(*typed):
        overrides = ["resume=/runs/x", *typed]
        return resumed_config(compose_config(overrides), {"config": saved}, overrides)

    assert resumed().transductive is True and resumed("transductive=true").transductive is True
    with pytest.raises(UserError, match="transductive: True -> False"):
        resumed("transductive=false")
    assert resumed("transductive=false", "force_resume=true").transductive is False


@pytest.mark.parametrize("launcher,target", [("joblib", "JoblibLauncher"), ("submitit_slurm", "SlurmLauncher")])
def test_the_launcher_configs_compose_with_their_defaults(launcher, target):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "submitit_slurm":
        assert (cfg.hydra.launcher.cpus_per_task, cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.timeout_min) == (8, 1, 240)


def test_the_hyperparameter_search_config_searches_the_inner_loop_and_maximises_accuracy():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=maml_omniglot"], return_hydra_config=True)
    assert cfg.hydra.sweeper.direction == "maximize" and set(cfg.hydra.sweeper.params) == {"inner_lr", "outer_lr", "inner_steps"}


class NamedSplit:
    split_name = "vinyals"


@pytest.mark.parametrize("override, column, value", [
    ("+optimizer.weight_decay=0.0001", "optimizer.weight_decay", 0.0001),
    ("optimizer._target_=torch.optim.SGD", "optimizer", "SGD"),
    ("optimizer.lr=0.01", "outer_lr", 0.01),  # the rate the optimizer is built with
    ("model.hidden=[20,20]", "model.hidden", "[20,20]"),
    ("dataset.amplitude_max=2.0", "dataset.amplitude_max", 2.0),
    ("algo.first_order=true", "algo.first_order", "true"),  # TensorBoard would show a bool as 1
    ("patience=50", "patience", 50),
    ("eval_seed=3", "eval_seed", 3),
    ("transductive=false", "transductive", "false"),  # how validation chose best.pt and the test scored
    ("+scheduler={_target_:torch.optim.lr_scheduler.StepLR,_partial_:true,step_size:10}", "scheduler.step_size", 10),
])
def test_a_sweep_over_any_setting_that_changes_what_a_run_learns_shows_rows_that_differ(override, column, value):
    from maml_cli.build import hparams
    plain = hparams(compose_config(["dataset=sinusoid"]), NamedSplit())
    changed = hparams(compose_config(["dataset=sinusoid", override]), NamedSplit())
    assert changed[column] == value and plain.get(column) != value
    assert plain["optimizer"] == "Adam" and plain["scheduler"] == "none" and plain["patience"] == "null"


@pytest.mark.parametrize("overrides", [[f"experiment={name}"] for name in EXPERIMENTS] + [["algo=lstm"], ["algo=lstm", "dataset=sinusoid"],
                                                                                      ["model=resnet12"], ["dataset=miniimagenet"]])
def test_the_hparams_tab_gets_numbers_and_text_and_no_paths_or_machine_keys(overrides):
    from torch.utils.tensorboard.summary import hparams as hparams_summary
    from maml_cli.build import hparams
    cfg = compose_config(overrides)
    shown = hparams(cfg, NamedSplit())
    # TensorBoard drops nulls without a word, refuses lists and shows booleans as numbers.
    assert all(type(value) in (int, float, str) for value in shown.values()), shown
    hparams_summary(shown, {})
    assert not {"dataset.root", "dataset.store_dir", "dataset.split_dir", "dataset.download", "dataset.in_memory",
                "model.channels_last", "data_root", "device", "threads"} & set(shown)
    assert "algo.batch_tasks" not in shown  # how the tasks are computed, not what is learned
    assert shown["algo"] == cfg.algo._target_.rsplit(".", 1)[-1] and all(f"algo.{key}" in shown or key in shown for key in cfg.algo
                                                                          if key not in ("_target_", "batch_tasks"))
    if cfg.scheduler is not None:  # the ProtoNet presets' StepLR
        assert shown["scheduler"] == "StepLR" and "scheduler.step_size" in shown


def test_run_names_leave_out_exactly_the_keys_that_do_not_change_what_a_run_learns():
    # conf/config.yaml lists them by hand (YAML cannot read build.py's tuples): a key added to one list and not the
    # other would name runs by where they ran, or hide a setting that matters.
    from omegaconf import OmegaConf
    from maml_cli.build import MACHINE_KEYS, RESUME_FREE_KEYS
    excluded = set(OmegaConf.load(CONF / "config.yaml").hydra.job.config.override_dirname.exclude_keys)
    assert set(MACHINE_KEYS) <= excluded
    # Resume-free but in the name: how long it ran, when it stops early, and three settings a name may as well show
    # (a sweep over how the tasks are computed, algo.batch_tasks=true,false, would otherwise give its runs one folder).
    assert RESUME_FREE_KEYS - excluded == {"iterations", "patience", "dataset.download", "model.channels_last", "algo.batch_tasks"}
    # Left out of the name although a resume may not change it freely: the folder of the split's class lists, a path a
    # name should not carry (a resume takes another folder only when its lists name the run's classes in the run's order).
    assert excluded - RESUME_FREE_KEYS == {"dataset.split_dir"}
    # The HParams tab leaves out every setting of a node that a run's name leaves out.
    from maml_cli.build import HPARAMS_LEFT_OUT
    assert {key for key in excluded if "." in key} <= HPARAMS_LEFT_OUT
