"""Turn a composed config into objects; shared by ``maml-train`` and ``maml-eval``.

This is the edge of the program: only here and in the two entry points is the
config read. Everything built here takes plain arguments.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
import re
from pathlib import Path
from typing import Any, Collection

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from maml_cli.algorithms.base import Algorithm
from maml_cli.algorithms.registry import field_bounds, registered_algorithms, registered_by_target
from maml_cli.config import MODEL_SCHEMAS, Config, config_dir
from maml_cli.data.base import ImageShaped, ImageTaskFamily, TaskFamily, VectorShaped, VectorTaskFamily
from maml_cli.data.registry import registered_dataset_by_target
from maml_cli.errors import UserError
from maml_cli.models import Backbone
from maml_cli.tasks import EpisodeSampler
from maml_cli.suggest import GROUPS, HIDDEN_FIELDS, schema_fields, unknown_key_message
from maml_cli.threads import threads_problem

# How the machine at hand computes and reports: a resumed run takes these from the resume command (its
# defaults where they are not typed), never from the machine it ran on before (a GPU host's threads=7 on a
# 2-core laptop would oversubscribe it).
MACHINE_KEYS = ("device", "threads", "keep_freed_memory", "tasks_at_once", "progress")

# Keys that may change between a run and its resumption without changing its results.
RESUME_FREE_KEYS = {
    *MACHINE_KEYS, "iterations", "resume", "force_resume", "log_every", "val_every", "val_tasks", "test_tasks", "score_every",
    "checkpoint_every", "data_root", "dataset.root", "dataset.download", "dataset.store_dir", "dataset.in_memory", "patience",
    "model.channels_last", "algo.batch_tasks",
}


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not match:
        raise UserError(f"device={spec!r} is not one of auto, cpu, cuda, cuda:N.")
    if not torch.cuda.is_available():
        raise UserError(f"device={spec} was asked for, but this machine has no usable CUDA device "
                        f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). Use device=cpu or device=auto.")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"device={spec}: there are only {torch.cuda.device_count()} CUDA device(s), numbered 0..{torch.cuda.device_count() - 1}.")
    return torch.device("cuda", index)


def validate(cfg: DictConfig) -> None:
    """Check what the schema's types cannot: values left to the user (``???``), ranges, and keys appended with
    ``+`` that no schema declares."""
    removed = [node for node in ("algo", "dataset", "model", "optimizer") if node not in cfg]
    if removed:
        raise UserError(f"{', '.join(removed)} cannot be removed (~{removed[0]}): every run needs its {' and '.join(removed)}; "
                        f"change {'its' if len(removed) == 1 else 'their'} keys instead.")
    problems = [f"{key} has no default and must be given, e.g. {key}=<{'folder' if key.endswith(('root', '_dir')) else 'value'}>"
                for key in sorted(OmegaConf.missing_keys(cfg)) if not key.startswith("hydra.")]
    # Keys appended with + are not checked by Hydra against the schema; judge them by the schema's fields.
    top_level = schema_fields(Config)
    problems += [unknown_key_message(key, top_level + list(GROUPS)) for key in cfg if key not in top_level]
    for node_name in ("algo", "dataset", "model", "optimizer"):
        schema = OmegaConf.get_type(cfg[node_name])
        if dataclasses.is_dataclass(schema):
            declared = schema_fields(schema)
            if node_name == "optimizer":  # its class's own settings, appended with + (+optimizer.weight_decay=1e-4)
                accepted = constructor_arguments(cfg.optimizer._target_)
                if accepted is None or cfg.get("resume"):
                    # Not importable (the build says so), taking any keyword, or a resume's (the command's default
                    # class, not the run's): the class itself judges the keys when it is built.
                    continue
                declared += sorted(accepted - {"params", *declared})
            problems += [unknown_key_message(f"{node_name}.{key}", declared) for key in cfg[node_name]
                         if key not in declared and key not in HIDDEN_FIELDS]
    for key in ("inner_lr", "outer_lr"):
        if not 0 < cfg[key] < math.inf:
            problems.append(f"{key} must be positive and finite (got {cfg[key]})")
    for key, low in (("way", 1), ("shot", 1), ("query", 1), ("meta_batch_size", 1), ("tasks_at_once", 1), ("inner_steps", 0),
                     ("test_inner_steps", 0), ("iterations", 0), ("log_every", 1), ("val_every", 1),
                     ("val_tasks", 1), ("test_tasks", 1), ("score_every", 1), ("checkpoint_every", 1)):
        if cfg[key] < low:
            problems.append(f"{key} must be at least {low} (got {cfg[key]})")
    for node_name in ("algo", "dataset", "model"):
        schema = OmegaConf.get_type(cfg[node_name])
        for key, (low, strictly) in (field_bounds(schema).items() if dataclasses.is_dataclass(schema) else ()):
            value = cfg[node_name].get(key)
            entries = list(value) if OmegaConf.is_list(value) else [value]  # a list field (model.hidden) bounds each entry
            if any(v is not None and (v <= low if strictly else v < low) for v in entries):
                problems.append(f"{node_name}.{key} must be {'above' if strictly else 'at least'} {low} (got {value})")
            elif any(v is not None and not math.isfinite(v) for v in entries):
                problems.append(f"{node_name}.{key} must be finite (got {value})")
    if not cfg.get("resume"):  # a run seeded before seeds were checked resumes with its own
        seeds = {"seed": cfg.seed, "eval_seed": cfg.eval_seed, **({"dataset.split_seed": cfg.dataset.split_seed} if "split_seed" in cfg.dataset else {})}
        problems += [problem for key, value in seeds.items() if (problem := seed_problem(key, value))]
    if threads_problem(cfg.threads):
        problems.append(threads_problem(cfg.threads))
    if cfg.get("patience") is not None and cfg.patience < 1:
        problems.append(f"patience must be at least 1 or null (got {cfg.patience})")
    if problems:
        raise UserError("invalid config: " + " ".join(p if p.endswith((".", "?")) else p + "." for p in problems))


# torch's generators take seeds of 64 bits.
LARGEST_SEED = 2 ** 64 - 1


def seed_problem(key: str, value: int) -> str | None:
    """What is wrong with a seed a user typed, or None: torch maps a negative seed to a large one without a word, and
    elsewhere -1 often means "a random seed", which here it would not."""
    if 0 <= value <= LARGEST_SEED:
        return None
    negative = ", and a negative seed does not mean a random one" if value < 0 else ""
    return (f"{key} must be a whole number from 0 to 2**64-1 (got {value}): every run is seeded so that it can be "
            f"reproduced{negative}; for a new seed, type one, e.g. {key}=$RANDOM.")


def _instantiate(node: DictConfig, what: str, **kwargs: Any) -> Any:
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, UserError):
            raise cause
        if isinstance(cause, ImportError):
            # Hydra's text asks for HYDRA_FULL_ERROR=1; what failed is the ImportError's own cause (a missing module,
            # or an error raised while the user's module was imported), else its last line.
            original = cause.__cause__
            own_path = isinstance(original, ModuleNotFoundError) and f"{node._target_}.".startswith(f"{original.name}.")
            why = (f"{type(original).__name__}: {original}" if original is not None and not own_path
                   else str(cause).strip().splitlines()[-1])  # the target's own path: Hydra says which part is not there
            raise UserError(f"could not build the {what}: its _target_ {node._target_} cannot be imported ({why}).") from err
        detail = "; ".join(line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith("full_key:"))
        raise UserError(f"could not build the {what} from its config: {detail}") from err


def build_tasks(cfg: DictConfig) -> TaskFamily:
    """The task family of ``cfg.dataset`` (an image dataset, sinusoid regression).

    Raises:
        UserError: what ``dataset._target_`` builds does not keep the task-family contract (:mod:`maml_cli.data.base`).
    """
    tasks = _instantiate(cfg.dataset, "dataset")
    if not isinstance(tasks, (ImageTaskFamily, VectorTaskFamily)):
        raise UserError(f"dataset._target_={cfg.dataset._target_} built a {type(tasks).__name__}, which is not a task family: it needs "
                        f"kind, split_name, sampler(), describe() and class_names(), and in_channels and image_size (images) or in_features (vectors).")
    return tasks


def default_channels_last(device: torch.device) -> bool:
    """conv4's layout when ``model.channels_last`` is null: channels-last on CPU.

    On a 2-core CPU it made a forward+backward of conv4 1.26-1.86x faster (docs/performance.md,
    ``scripts/bench_conv4_layout.py``); MAML's second-order inner loop stays contiguous regardless (see
    :func:`maml_cli.models.differentiated_twice`). On a GPU it was not measured, so it stays
    off there unless asked for.
    """
    return device.type == "cpu"


# Images the recurrent learner embeds per call on a CPU, where conv4's activations for a few dozen images stay
# in cache and those of a whole meta-batch do not (docs/performance.md).
CPU_EMBEDDING_CHUNK = 64


def settle_model_choices(cfg: DictConfig, algorithm: Algorithm) -> None:
    """Fill the model keys left null for the algorithm to choose, in ``cfg`` itself, so the run's config.yaml records them.

    ``model.batch_norm`` (conv4): ``example`` for an algorithm that needs each example computed on its own
    (``per_example_network``: the LSTM), else ``batch`` (Finn et al.'s batch statistics).
    """
    if "batch_norm" in cfg.model and cfg.model.batch_norm is None:
        cfg.model.batch_norm = "example" if algorithm.per_example_network else "batch"


def build_model(cfg: DictConfig, tasks: ImageShaped | VectorShaped, algorithm: Algorithm,
                device: torch.device = torch.device("cpu")) -> nn.Module:
    """The network the algorithm needs, from ``cfg.model``, shaped for the task family (or a trained model's
    :class:`~maml_cli.data.base.ImageInputs`) and ``cfg.way``, on ``device``.

    MAML gets the backbone with a head of ``way`` outputs (1 for regression),
    ProtoNet the backbone without a head, and the recurrent learner an LSTM over
    the head-less backbone. Keys left for the algorithm to choose are settled first
    (:func:`settle_model_choices`).

    Raises:
        UserError: the model is not built for the dataset's inputs, or cannot be built from its config, or it mixes
            the examples of a batch and the algorithm needs each example computed on its own.
    """
    settle_model_choices(cfg, algorithm)
    outputs = cfg.way if tasks.kind.name == "classification" else 1
    if isinstance(tasks, ImageShaped):
        shape = {"in_channels": tasks.in_channels, "image_size": tasks.image_size}
        input_size = tasks.in_channels * tasks.image_size ** 2
    else:
        shape = {"in_features": tasks.in_features}
        input_size = tasks.in_features
    if algorithm.network == "embedding" and tasks.kind.name != "classification":
        raise UserError(f"algo={algorithm_name(cfg)} classifies by distances to class prototypes and needs a classification "
                        f"dataset (an image dataset, e.g. dataset=omniglot); dataset={dataset_name(cfg)} is {tasks.kind.name}.")
    check_model_takes(cfg, set(shape), tasks)
    if "channels_last" in cfg.model:
        chosen = cfg.model.channels_last
        shape["channels_last"] = default_channels_last(device) if chosen is None else bool(chosen)
    try:
        backbone = _instantiate(cfg.model, "model", **shape, out_features=outputs if algorithm.network == "classifier" else 0)
    except UserError as err:
        raise UserError(f"{model_setting(cfg)} on dataset={dataset_name(cfg)}: {err}") from err
    network = backbone
    if algorithm.network == "recurrent":
        network = algorithm.make_network(backbone, input_size, label_size=outputs, out_features=outputs,
                                         embedding_chunk=CPU_EMBEDDING_CHUNK if device.type == "cpu" else None)
    network = algorithm.attach(network)
    if algorithm.per_example_network and network.mixes_examples:
        fix = ("model.batch_norm=example, or leave model.batch_norm unset (null lets the algorithm choose)"
               if "batch_norm" in cfg.model else "a model that computes each example on its own")
        raise UserError(f"algo={algorithm_name(cfg)} puts several examples of a task through the network in one call and needs each "
                        f"example's output to depend on that example alone, but model {cfg.model._target_.rsplit('.', 1)[-1]} as "
                        f"configured mixes the examples of a batch (batch statistics): a later image would change an earlier "
                        f"step's output. Use {fix}.")
    return network.to(device)


def scores_transductively(run_config: DictConfig | dict[str, Any]) -> bool:
    """Whether a run scores the queries of an episode together (``transductive=``, true by default): what its
    validation did, and what ``maml-eval`` and the Python API do unless told. A run saved before the key existed did."""
    return run_config.get("transductive", True) is not False


def check_non_transductive(network: Backbone, algo: str, asked: str, advice: str) -> None:
    """Refuse non-transductive scoring (``asked``: how it was asked for) where it would change nothing.

    Raises:
        UserError: ``network`` gives each example an output of its own, so an episode's queries never meet each other.
    """
    if not network.mixes_examples:
        raise UserError(f"{asked} puts each query through the network with the support set alone, which matters only for a "
                        f"network that normalises with each batch's statistics (model.batch_norm=batch, conv4's and ResNet-12's "
                        f"default); this {algo} network gives each example an output of its own, so its queries never see "
                        f"each other and the default predicts the same, in one pass instead of one per query. {advice}")


def constructor_arguments(target: str) -> set[str] | None:
    """The arguments the class ``target`` is built with; None when it cannot be imported (the build says why) or
    takes any keyword (``**kwargs``: what it accepts is known only by building it)."""
    module, _, name = target.rpartition(".")
    try:
        # Imported here rather than by hydra.utils.get_class, which logs an error for a target that is not there.
        parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return set(parameters)


def check_model_takes(cfg: DictConfig, inputs: set[str], tasks: ImageShaped | VectorShaped) -> None:
    """Refuse a model that is not built for the dataset's inputs, naming the models that are: a model of
    ``conf/model/`` takes ``in_features`` (vectors), or ``in_channels`` and ``image_size`` (images), or both."""
    arguments = constructor_arguments(cfg.model._target_)
    if arguments is None or inputs <= arguments:
        return
    given = (f"{tasks.in_channels}x{tasks.image_size}x{tasks.image_size} images" if isinstance(tasks, ImageShaped)
             else f"vectors of {tasks.in_features} value{'s' if tasks.in_features != 1 else ''}")
    fitting = [name for name, schema in MODEL_SCHEMAS.items() if inputs <= (constructor_arguments(schema._target_) or set())]
    raise UserError(f"{model_setting(cfg)} is not built for the inputs of dataset={dataset_name(cfg)}, which are {given}"
                    f"{'; models that are: ' + ', '.join(f'model={name}' for name in fitting) if fitting else ''}.")


def build_samplers(cfg: DictConfig, tasks: TaskFamily, algorithm: Algorithm, device: torch.device) -> dict[str, EpisodeSampler]:
    """One episode sampler per split, in the shape the algorithm trains and is scored on."""
    samplers = {}
    for split in ("train", "val", "test"):
        way, shot, query = algorithm.episode_shape(split, cfg.way, cfg.shot, cfg.query)
        samplers[split] = tasks.sampler(split, way, shot, query, device)
    return samplers


def build_algorithm(cfg: DictConfig, device: torch.device | None = None) -> Algorithm:
    """The algorithm of ``cfg.algo``.

    For an algorithm whose schema has ``batch_tasks``: left null (or absent, in the config of a run saved before the
    key existed) it is settled for ``device`` (:func:`default_batch_tasks`), and the tasks computed together are
    capped at ``meta_batch_size`` (evaluation then holds no more tasks at once than a training step does).
    """
    batch_tasks = batch_tasks_in_use(cfg, device)
    if batch_tasks is None:
        return _instantiate(cfg.algo, "algorithm")
    return _instantiate(cfg.algo, "algorithm", batch_tasks=batch_tasks, tasks_per_call=cfg.meta_batch_size)


def batch_tasks_in_use(cfg: DictConfig, device: torch.device | None) -> bool | None:
    """``algo.batch_tasks`` as it applies on ``device`` (null settled by :func:`default_batch_tasks`), or None for an
    algorithm without the key."""
    if not offers_batch_tasks(cfg):
        return None
    chosen = cfg.algo.get("batch_tasks")
    return default_batch_tasks(device) if chosen is None else bool(chosen)


def offers_batch_tasks(cfg: DictConfig) -> bool:
    """Whether the algorithm of ``cfg.algo`` has ``batch_tasks`` in its schema (its saved config may predate the key)."""
    entry = registered_by_target(cfg.algo._target_)
    return entry is not None and _has_batch_tasks(entry.schema)


def _has_batch_tasks(schema: type) -> bool:
    return "batch_tasks" in {field.name for field in dataclasses.fields(schema)}


def batch_tasks_algorithms() -> list[str]:
    """The class names of the algorithms that offer ``batch_tasks`` (for messages)."""
    return sorted(entry.algorithm.__name__ for entry in registered_algorithms().values() if _has_batch_tasks(entry.schema))


def default_batch_tasks(device: torch.device | None) -> bool:
    """Whether the tasks of a meta-batch are computed together when ``algo.batch_tasks`` is null: on a GPU.

    A second-order MAML step of a meta-batch computed task by task is thousands of small kernels on a GPU, so the
    step is launch-bound; under ``vmap`` over the tasks it is a few hundred larger ones, several times faster
    (docs/performance.md). On a CPU the batched path is slower and takes several times the memory (the same page), so
    it stays off there (and when no device is given).
    """
    return device is not None and device.type == "cuda"


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    # _convert_: settings reach the class as plain lists and dicts, which the checkpoint's safe loading accepts (a
    # ListConfig kept in the optimizer's state, as Rprop keeps etas, would make every checkpoint of the run unloadable).
    return _built(_instantiate(cfg.optimizer, "optimizer", _convert_="all"), cfg.optimizer._target_, model.parameters())


def _built(partial: Any, target: str, *args: Any) -> Any:
    """``partial(*args)``: the class ``target`` checks the values of its settings when built (``+optimizer.momentum=-1``),
    and what it refuses is said in one line, naming it."""
    try:
        return partial(*args)
    except (TypeError, ValueError) as err:
        raise UserError(f"{target} refused its settings: {type(err).__name__}: {err}") from err


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, algorithm: Algorithm | None = None) -> Any:
    """The learning-rate schedule (stepped once per meta-update): the run's ``scheduler``, or the one the algorithm's
    recipe prescribes (``outer_lr_schedule``: Reptile's linear annealing, MAML++'s cosine), or None.

    Raises:
        UserError: both are set, which would apply two schedules to one rate; or the run's schedule ends before its
            ``iterations`` (see ``check_schedule_lasts``).
    """
    schedule = algorithm.outer_lr_schedule if algorithm is not None else None
    if cfg.get("scheduler") is not None:
        if algorithm is not None:
            check_one_schedule(cfg, algorithm)
        if not OmegaConf.is_dict(cfg.scheduler) or "_target_" not in cfg.scheduler or not cfg.scheduler.get("_partial_"):
            typed = f"scheduler={cfg.scheduler}" if not OmegaConf.is_dict(cfg.scheduler) else "scheduler without _target_ and _partial_=true"
            raise UserError(f"{typed}: scheduler is not a choice of configs but a node of settings; set its class "
                            f"with +scheduler._target_=<class> (e.g. torch.optim.lr_scheduler.StepLR), +scheduler._partial_=true "
                            f"and its settings as +scheduler.<key>=<value> (see conf/experiment/protonet_*.yaml).")
        scheduler = _built(_instantiate(cfg.scheduler, "learning-rate scheduler", _convert_="all"), cfg.scheduler._target_, optimizer)
        check_schedule_lasts(scheduler, int(cfg.iterations))
        return scheduler
    if schedule is None:
        return None
    base_lr, iterations = float(cfg.outer_lr), int(cfg.iterations)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda iteration: schedule(base_lr, iteration, iterations) / base_lr)


def check_schedule_lasts(scheduler: torch.optim.lr_scheduler.LRScheduler, iterations: int) -> None:
    """Refuse a OneCycleLR shorter than the run before training starts: stepped past its ``total_steps`` it raises,
    which would end the run there (the other schedulers of torch.optim keep their last rate or go on cycling). One
    inside a SequentialLR or ChainedScheduler is not looked into."""
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) and scheduler.total_steps < iterations:
        raise UserError(f"scheduler: OneCycleLR's schedule has {scheduler.total_steps} steps (total_steps, or epochs x "
                        f"steps_per_epoch) and the run has iterations={iterations}: it would stop with an error at step "
                        f"{scheduler.total_steps + 1}. Give it the run's length: '++scheduler.total_steps=${{iterations}}' (on a "
                        f"resume that raises iterations: +scheduler.total_steps=<iterations> force_resume=true).")


def check_one_schedule(cfg: DictConfig, algorithm: Algorithm) -> None:
    """Refuse a ``scheduler`` beside an algorithm that anneals the outer rate itself (two schedules on one rate)."""
    if cfg.get("scheduler") is not None and algorithm.outer_lr_schedule is not None:
        raise UserError(f"algo={algorithm_name(cfg)} anneals the outer learning rate itself (its recipe; see conf/algo/{algorithm_name(cfg)}.yaml), "
                        f"so scheduler= would apply a second schedule to the same rate; leave scheduler out, or switch the "
                        f"algorithm's own annealing off.")


def algorithm_name(cfg: DictConfig) -> str:
    """``algo=<name>``: the registered algorithm that builds ``algo._target_``, else Hydra's choice or the class's name
    (the registry first: on a resume Hydra's choice is the command's default, not the run's algorithm)."""
    entry = registered_by_target(cfg.algo._target_)
    return entry.name if entry is not None else hydra_choice("algo") or cfg.algo._target_.rsplit(".", 1)[-1]


def dataset_name(cfg: DictConfig) -> str:
    """``dataset=<name>``: the registered dataset that builds ``dataset._target_``, else the class's name (not Hydra's
    choice, which on a resume is the command's default rather than the run's dataset)."""
    entry = registered_dataset_by_target(cfg.dataset._target_)
    return entry.name if entry is not None else cfg.dataset._target_.rsplit(".", 1)[-1]


def model_setting(cfg: DictConfig) -> str:
    """``model=<name>`` for the ``conf/model/`` entry that builds ``model._target_``, else ``model._target_=<class>``
    (a model of the user's own, or a resume's, whose Hydra choices are the command's defaults)."""
    known = next((name for name, schema in MODEL_SCHEMAS.items() if schema._target_ == cfg.model._target_), None)
    return f"model={known}" if known is not None else f"model._target_={cfg.model._target_}"


INNER_LOOP_KEYS = ("inner_lr", "inner_steps", "test_inner_steps", "score_every")


def check_inner_loop_overrides(cfg: DictConfig, overrides: list[str], sweep: list[str] | None = None, resumed: bool = False) -> None:
    """Refuse inner-loop keys typed for an algorithm without an inner loop, so that a sweep over them is not a silent no-op.

    Args:
        overrides: the run's own overrides (``inner_steps=3``).
        sweep: in a multirun, the overrides as typed (``algo=maml,protonet``, ``inner_steps=1,3``).
            A single inner-loop value is then allowed when ``algo`` is swept too, because it is
            meant for the members that have an inner loop; a swept inner-loop key never is.
        resumed: ``cfg`` is a resumed run's config, whose algorithm the command did not choose.
    """
    typed = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    unused = [key for key in INNER_LOOP_KEYS if key in typed and not has_inner_loop(cfg)]
    if sweep is not None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = {o.key_or_group.lstrip("+~"): o for o in OverridesParser.create().parse_overrides(sweep)}
        typed_algos = [str(c) for c in parsed["algo"].sweep_string_iterator()] if "algo" in parsed else [algorithm_name(cfg)]
        choices = typed_algos if "algo" in parsed and parsed["algo"].is_sweep_override() else []
        if "experiment" in parsed and parsed["experiment"].is_sweep_override():
            # Each swept preset brings its own algorithm (or keeps the typed one): the members' algorithms.
            presets = [experiment_algorithm(str(name)) for name in parsed["experiment"].sweep_string_iterator()]
            choices = list(dict.fromkeys([*choices, *(a for p in presets for a in ([p] if p else typed_algos))]))
        algo_swept = len(choices) > 0

        def meant_for_another_member(key: str) -> bool:
            return (key in parsed and not parsed[key].is_sweep_override()
                    and any(choice_has_inner_loop(choice) for choice in choices))

        unused = [key for key in unused if not meant_for_another_member(key)]
        if algo_swept:
            # Judge the whole sweep in its first run, before any member trains: a swept inner-loop key is
            # refused if any swept algorithm lacks it.
            for key in INNER_LOOP_KEYS:
                if key in parsed and parsed[key].is_sweep_override():
                    lacking = [c for c in choices if not choice_has_inner_loop(c)]
                    if lacking:
                        raise UserError(f"{key} is swept, but it does not apply to algo={','.join(lacking)}, which has no inner loop; "
                                        f"sweep {key} in a separate multirun with the algorithms that have one (a sweep over it "
                                        f"would train the same model again).")
    if unused and resumed:
        entry = registered_by_target(cfg.algo._target_)
        raise UserError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to the resumed run's algorithm "
                        f"({entry.name if entry is not None else cfg.algo._target_}), which has no inner loop; remove "
                        f"{' and '.join(f'{k}=...' for k in unused)} from the resume command.")
    if unused:
        raise UserError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to algo={algorithm_name(cfg)}, "
                        f"which has no inner loop; remove {' and '.join(f'{k}=...' for k in unused)} from the command "
                        f"(a sweep over {'it' if len(unused) == 1 else 'them'} would train the same model again).")


def datasets_with_own_settings(algo: str) -> list[str]:
    """The datasets for which ``algo=<algo>``, an algorithm with an inner loop, has its own recipe
    (``conf/algo_dataset/<algo>_<dataset>.yaml``: Reptile's optimizers and steps, MAML++'s steps and meta-batch), in name
    order; on any other dataset it takes the dataset's settings, which are MAML's. Empty for an algorithm without an
    inner loop (``lstm_sinusoid`` adapts the LSTM's input to regression; it is not a recipe of steps and rates)."""
    if not choice_has_inner_loop(algo):
        return []
    folder = Path(config_dir())
    return sorted(path.stem.removeprefix(f"{algo}_") for path in (folder / "algo_dataset").glob(f"{algo}_*.yaml")
                  if (folder / "dataset" / f"{path.stem.removeprefix(f'{algo}_')}.yaml").is_file())


def without_own_settings(cfg: DictConfig, algo: str, dataset: str) -> str | None:
    """What a run of ``algo`` on ``dataset`` should be told when the algorithm has recipes for other datasets but not
    this one (None otherwise): it runs with the dataset's MAML settings, which the message lists."""
    own = datasets_with_own_settings(algo)
    if not own or dataset in own:
        return None
    return (f"algo={algo} has its own settings for dataset={','.join(own)} (conf/algo_dataset), not for dataset={dataset}: what the "
            f"command does not set comes from the dataset's MAML settings (this run: inner_lr={cfg.inner_lr}, inner_steps={cfg.inner_steps}, test_inner_steps="
            f"{cfg.test_inner_steps}, meta_batch_size={cfg.meta_batch_size}, outer optimizer {cfg.optimizer._target_.rsplit('.', 1)[-1]} "
            f"with outer_lr={cfg.outer_lr}). Type the algorithm's own to follow its recipe (the presets "
            f"experiment={algo}_{own[0]}_* show it on {own[0]}).")


def experiment_algorithm(name: str) -> str | None:
    """The ``algo`` that preset ``experiment=<name>`` chooses (its ``override /algo: <algo>`` default); None when it
    chooses none, or there is no such preset (Hydra reports that itself)."""
    path = Path(config_dir()) / "experiment" / f"{name}.yaml"
    if not path.is_file():
        return None
    defaults = OmegaConf.load(path).get("defaults") or []
    return next((str(entry[key]) for entry in defaults if isinstance(entry, DictConfig)
                 for key in entry if str(key).strip() in ("override /algo", "/algo")), None)


def has_inner_loop(cfg: DictConfig) -> bool:
    """Whether the configured algorithm declares an inner loop (so :data:`INNER_LOOP_KEYS` apply)."""
    entry = registered_by_target(cfg.algo._target_)
    return entry.inner_loop if entry is not None else "inner_steps" in cfg.algo


def choice_has_inner_loop(name: str) -> bool:
    """Whether ``algo=<name>`` declares an inner loop (False for an unknown name, which Hydra reports itself)."""
    entry = registered_algorithms().get(name)
    return entry is not None and entry.inner_loop


def hydra_choice(group: str) -> str | None:
    """The group choice (``algo=protonet``) of the running Hydra app, when there is one."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None



def flatten(container: Any, prefix: str = "", resolve: bool = True) -> dict[str, Any]:
    """``{"algo": {"inner_lr": 0.4}}`` -> ``{"algo.inner_lr": 0.4}`` (``resolve=False``: interpolations as written)."""
    if isinstance(container, DictConfig):
        container = OmegaConf.to_container(container, resolve=resolve, enum_to_str=True)
    flat: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any], keys: set[str] | None = None,
                       also_free: Collection[str] = ()) -> list[str]:
    """Keys (of ``keys``, else all) whose values differ between two flattened configs, ignoring those that do not change
    results (:data:`RESUME_FREE_KEYS` and ``also_free``)."""
    keys = set(saved) | set(current) if keys is None else keys
    return [f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
            for k in sorted(keys) if k not in RESUME_FREE_KEYS and k not in also_free and saved.get(k) != current.get(k)]


NODES = ("algo", "dataset", "model", "optimizer", "scheduler")


def typed_keys(overrides: list[str], current: dict[str, Any], defaults: dict[str, Any]) -> set[str]:
    """The flattened keys that the overrides typed on a command change: those they name (a whole node for
    ``algo=...``), and those whose composed value differs from the defaults (what ``experiment=...`` sets)."""
    named = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    changed = {k for k in set(current) | set(defaults) if current.get(k) != defaults.get(k)}
    return changed | {k for k in current if k in named or any(k.startswith(n + ".") for n in named)}


def resume_config(saved: dict[str, Any], current: dict[str, Any], typed: set[str],
                  also_free: Collection[str] = (), interpolations: dict[str, str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The config a resumed run continues with, and the typed changes that would change its results.

    The run's own config (``saved``, flattened) is the base: a resume needs none of the original
    overrides. Keys in ``typed`` and :data:`MACHINE_KEYS` take the value of ``current`` (the config
    composed from the resume command); a key this version knows and the run's config lacks takes its
    current default (in a node, only when the node builds the same class).

    ``also_free``: keys that may change on this resume beyond :data:`RESUME_FREE_KEYS` (the caller checks their effect).
    ``interpolations``: the keys of ``current`` whose value the command's config computes from another key
    (``optimizer.lr: ${outer_lr}``), with that expression: a key taken from ``current`` that was not typed keeps it, so
    that it follows the run's value (an optimizer class changed on a resume takes the run's ``outer_lr``, not the
    command's default); a typed key keeps the value it was judged by.

    Returns:
        The flattened effective config, and ``"key: saved -> typed"`` for each typed key that differs from
        the run's value and changes results (the caller refuses these unless forced).
    """
    differences = config_differences(saved, current, {k for k in typed if k not in ("resume", "force_resume")}, also_free)
    # A typed node that builds another class replaces the run's node whole (forced resumes only).
    replaced = {n for n in NODES if f"{n}._target_" in typed and saved.get(f"{n}._target_") != current.get(f"{n}._target_")}
    effective = {k: v for k, v in saved.items() if k.split(".", 1)[0] not in replaced}
    for key, value in current.items():
        node = key.split(".", 1)[0]
        same_class = node not in NODES or node in replaced or saved.get(f"{node}._target_") == current.get(f"{node}._target_")
        if key in typed or key in MACHINE_KEYS or node in replaced or (key not in effective and same_class and not _inside_a_value(key, effective)):
            # A typed key keeps the value it was judged by (differences); the others follow the run's values.
            effective[key] = value if key in typed else (interpolations or {}).get(key, value)
    for key in typed:  # a forced key under a node the run left null (+scheduler.gamma): the node is the typed one now
        parts = key.split(".")
        for prefix in (".".join(parts[:i]) for i in range(1, len(parts))):
            if prefix in effective and effective[prefix] is None:
                del effective[prefix]
    return effective, differences


def _inside_a_value(key: str, flat: dict[str, Any]) -> bool:
    """Whether a prefix of ``key`` is itself a key of ``flat`` (``scheduler`` is null, so ``scheduler.gamma`` cannot exist)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in flat for i in range(1, len(parts)))


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"algo.inner_lr": 0.4}`` -> ``{"algo": {"inner_lr": 0.4}}``."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


# Keys of a node that say how it is built, not which settings it has.
BUILD_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")
# Settings of the nodes that the HParams tab leaves out: where a run's files are and what only guards the data. The
# keys a run's name leaves out for the same reason are among them (tests/test_config.py checks it).
HPARAMS_LEFT_OUT = frozenset({*RESUME_FREE_KEYS, "dataset.split", "dataset.split_dir", "dataset.check_counts", "optimizer.lr"})


def hparams(cfg: DictConfig, tasks: TaskFamily) -> dict[str, int | float | str]:
    """The hyperparameters of a run as TensorBoard's HParams tab shows them.

    Args:
        cfg: the run's config, its model choices settled.
        tasks: the run's task family (for the split's name).

    Returns:
        The top-level task and optimisation keys (``outer_lr``: the rate the outer optimizer was built with), the class
        each node builds (``algo``, ``dataset``, ``model``, ``optimizer``, ``scheduler``), and every setting of those
        nodes that can change what a run learns, so that a sweep over any of them shows rows that differ. Values are
        numbers or text as a user types them (``true``, ``null``, ``[64,64]``): TensorBoard takes no lists or nulls,
        and would show booleans as 1 and 0.
    """
    keys = ["way", "shot", "query", "inner_lr", "outer_lr", "inner_steps", "test_inner_steps", "meta_batch_size", "iterations",
            "patience", "seed", "eval_seed", "transductive"]
    # Inner-loop keys mean nothing to an algorithm without an inner loop; showing them would suggest they mattered.
    keys = [k for k in keys if k not in INNER_LOOP_KEYS or has_inner_loop(cfg)]
    values: dict[str, Any] = {k: cfg[k] for k in keys}
    values["outer_lr"] = cfg.optimizer.get("lr", cfg.outer_lr)  # optimizer.lr= sets it apart from outer_lr
    values["algo"] = cfg.algo._target_.rsplit(".", 1)[-1]
    values["dataset"] = cfg.dataset._target_.rsplit(".", 1)[-1]
    values["model"] = "raw input" if cfg.algo.get("embedding") == "raw" else cfg.model._target_.rsplit(".", 1)[-1]
    values["split"] = tasks.split_name
    values["optimizer"] = cfg.optimizer._target_.rsplit(".", 1)[-1]
    values["scheduler"] = "none" if cfg.scheduler is None else str(cfg.scheduler._target_).rsplit(".", 1)[-1]
    for node in NODES:
        if cfg[node] is None or (node == "model" and values["model"] == "raw input"):
            continue
        for key, value in flatten(cfg[node], f"{node}.").items():
            if key.split(".")[-1] not in BUILD_KEYS and key not in HPARAMS_LEFT_OUT and key.removeprefix(f"{node}.") not in keys:
                values[key] = value
    return {key: _hparam_value(value) for key, value in values.items()}


def _hparam_value(value: Any) -> int | float | str:
    """A config value as the HParams tab can show it: numbers as they are, the rest as the text a user would type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return value
    if value is None:
        return "null"
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)
