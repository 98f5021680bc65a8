"""How a dataset joins maml-cli: its module registers its config schema and its class, and nothing else changes.

Adding a dataset is one module under ``maml_cli/data/`` that ends with
``register_dataset("<name>", <Schema>, <Class>)``, one ``conf/dataset/<name>.yaml`` whose defaults
start with ``/schema/dataset/<name>@dataset``, and its tests. The config store finds it through
:func:`registered_datasets`; range checks come from the schema's :func:`~maml_cli.algorithms.registry.at_least` fields.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass


@dataclass(frozen=True)
class RegisteredDataset:
    """A dataset as the program knows it: its config schema and the task family its ``_target_`` builds."""

    name: str
    schema: type
    family: type


_REGISTERED: dict[str, RegisteredDataset] = {}


def register_dataset(name: str, schema: type, family: type) -> None:
    """Make ``dataset=<name>`` known: called once at the end of the dataset's module."""
    _REGISTERED[name] = RegisteredDataset(name, schema, family)


def registered_datasets() -> dict[str, RegisteredDataset]:
    """Every dataset of the package, by name: importing each module of ``maml_cli.data`` registers its own."""
    import maml_cli.data as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    return dict(_REGISTERED)
