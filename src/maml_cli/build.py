"""Turn a composed config into objects; shared by ``maml-train`` and ``maml-eval``.

This is the edge of the program: only here and in the two entry points is the
config read. Everything built here takes plain arguments.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from maml_cli.errors import UserError

# Keys that may change between a run and its resumption without changing its results.
RESUME_FREE_KEYS = {
    "iterations", "device", "resume", "force_resume", "progress", "log_every", "val_every", "val_tasks", "test_tasks",
    "checkpoint_every", "data_root", "dataset.root", "dataset.download",
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
    """Check what the schema's types cannot: ranges, and keys appended with ``+`` that no schema declares."""
    problems = []
    for node_name in ("algo", "dataset", "model", "optimizer"):
        schema = OmegaConf.get_type(cfg[node_name])
        if dataclasses.is_dataclass(schema):
            declared = {f.name for f in dataclasses.fields(schema)}
            problems += [f"unknown key {node_name}.{key} (not in {schema.__name__}: {', '.join(sorted(declared))})"
                         for key in cfg[node_name] if key not in declared]
    for key in ("inner_lr", "outer_lr"):
        if not cfg[key] > 0:
            problems.append(f"{key} must be positive (got {cfg[key]})")
    for key, low in (("way", 1), ("shot", 1), ("query", 1), ("meta_batch_size", 1), ("inner_steps", 0),
                     ("test_inner_steps", 0), ("iterations", 0), ("log_every", 1), ("val_every", 1),
                     ("val_tasks", 1), ("test_tasks", 1), ("checkpoint_every", 1)):
        if cfg[key] < low:
            problems.append(f"{key} must be at least {low} (got {cfg[key]})")
    if problems:
        raise UserError("invalid config: " + "; ".join(problems) + ".")


def _instantiate(node: DictConfig, what: str, **kwargs: Any) -> Any:
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, UserError):
            raise cause
        raise UserError(f"could not build the {what} from its config: {err}") from err


def build_tasks(cfg: DictConfig) -> Any:
    """The task family of ``cfg.dataset`` (Omniglot, sinusoid)."""
    return _instantiate(cfg.dataset, "dataset")


def build_model(cfg: DictConfig, tasks: Any) -> nn.Module:
    """The network of ``cfg.model``, shaped for the task family and ``cfg.way``."""
    if tasks.kind.name == "classification":
        shape = {"in_channels": tasks.in_channels, "out_features": cfg.way, "image_size": tasks.image_size}
    else:
        shape = {"in_features": tasks.in_features, "out_features": 1}
    try:
        return _instantiate(cfg.model, "model", **shape)
    except UserError as err:
        raise UserError(f"model {cfg.model._target_} does not fit dataset {cfg.dataset._target_}: {err}") from err


def build_algorithm(cfg: DictConfig) -> Any:
    return _instantiate(cfg.algo, "algorithm")


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    return _instantiate(cfg.optimizer, "optimizer")(model.parameters())


def flatten(container: Any, prefix: str = "") -> dict[str, Any]:
    """``{"algo": {"inner_lr": 0.4}}`` -> ``{"algo.inner_lr": 0.4}``."""
    if isinstance(container, DictConfig):
        container = OmegaConf.to_container(container, resolve=True, enum_to_str=True)
    flat: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two flattened configs, ignoring those that do not change results."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
            for k in keys if k not in RESUME_FREE_KEYS and saved.get(k) != current.get(k)]


def hparams(cfg: DictConfig, tasks: Any) -> dict[str, Any]:
    """The hyperparameters shown in TensorBoard's HParams tab (scalars and strings only)."""
    keys = ["way", "shot", "query", "inner_lr", "outer_lr", "inner_steps", "test_inner_steps", "meta_batch_size", "iterations", "seed"]
    values: dict[str, Any] = {k: cfg[k] for k in keys}
    values["algo"] = cfg.algo._target_.rsplit(".", 1)[-1]
    values["dataset"] = cfg.dataset._target_.rsplit(".", 1)[-1]
    values["model"] = cfg.model._target_.rsplit(".", 1)[-1]
    values["split"] = tasks.split_name
    for key, value in flatten(cfg.algo).items():
        if key not in ("_target_",) and key not in keys and isinstance(value, (int, float, str, bool)):
            values[f"algo.{key}"] = value
    return values
