"""How a dataset joins maml-cli: its module registers its config schema and its class, and nothing else changes.

Adding a dataset is one module under ``maml_cli/data/`` that ends with
``register_dataset("<name>", <Schema>, <Class>, <inputs>)``, one ``conf/dataset/<name>.yaml`` whose defaults
start with ``/schema/dataset/<name>@dataset``, and its tests. The config store finds it through
:func:`registered_datasets`; range checks come from the schema's :func:`~maml_cli.algorithms.registry.at_least` fields.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from omegaconf import DictConfig

from maml_cli.data.base import Inputs


@dataclass(frozen=True)
class RegisteredDataset:
    """A dataset as the program knows it: its config schema, the task family its ``_target_`` builds, and
    ``inputs(node)``: what its networks take in, read from its config node alone (no data needed), so that a
    trained model can be rebuilt and fed new images (:mod:`maml_cli.learner`)."""

    name: str
    schema: type
    family: type
    inputs: Callable[[DictConfig], Inputs]


_REGISTERED: dict[str, RegisteredDataset] = {}


def register_dataset(name: str, schema: type, family: type, inputs: Callable[[DictConfig], Inputs]) -> None:
    """Make ``dataset=<name>`` known: called once at the end of the dataset's module."""
    _REGISTERED[name] = RegisteredDataset(name, schema, family, inputs)


def registered_dataset_by_target(target: str) -> RegisteredDataset | None:
    """The dataset whose schema's ``_target_`` is ``target`` (a saved run's ``dataset._target_``), or None."""
    return next((entry for entry in registered_datasets().values() if entry.schema._target_ == target), None)


def registered_datasets() -> dict[str, RegisteredDataset]:
    """Every dataset of the package, by name: importing each module of ``maml_cli.data`` registers its own."""
    import maml_cli.data as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    return dict(_REGISTERED)
