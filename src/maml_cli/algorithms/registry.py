"""How an algorithm joins maml-cli: its module registers its config schema and its class, and nothing else changes.

Adding an algorithm is one module under ``maml_cli/algorithms/`` that ends with
``register_algorithm("<name>", <Schema>, <Class>)``, one ``conf/algo/<name>.yaml`` whose defaults
start with ``/schema/algo/<name>@_here_``, and its tests. The config store, the build, the loops
and the entry points find it through :func:`registered_algorithms`.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

from omegaconf import II


@dataclass
class InnerLoopConfig:
    """The schema fields of an algorithm with an inner loop: the top-level keys a user types and sweeps
    (``inner_steps=3``, ``maml-train -m inner_steps=1,3,5``), read through into the algorithm."""

    inner_lr: float = II("inner_lr")
    inner_steps: int = II("inner_steps")
    test_inner_steps: int = II("test_inner_steps")


def at_least(low: float, default: Any = dataclasses.MISSING, positive: bool = False, default_factory: Any = dataclasses.MISSING) -> Any:
    """A schema field with a lower bound that ``maml-train`` checks at start-up (``positive``: strictly above ``low``); a
    list field (its default from ``default_factory``) bounds each of its entries."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"at_least": low, "positive": positive})


def field_bounds(schema: type) -> dict[str, tuple[float, bool]]:
    """``{field: (low, strictly)}`` of the fields declared with :func:`at_least`."""
    return {f.name: (f.metadata["at_least"], f.metadata["positive"]) for f in dataclasses.fields(schema) if "at_least" in f.metadata}


@dataclass(frozen=True)
class Registered:
    """An algorithm as the program knows it: its config schema and the class the schema's ``_target_`` builds."""

    name: str
    schema: type
    algorithm: type

    @property
    def inner_loop(self) -> bool:
        return bool(self.algorithm.inner_loop)


_REGISTERED: dict[str, Registered] = {}


def register_algorithm(name: str, schema: type, algorithm: type) -> None:
    """Make ``algo=<name>`` known: called once at the end of the algorithm's module."""
    _REGISTERED[name] = Registered(name, schema, algorithm)


def registered_algorithms() -> dict[str, Registered]:
    """Every algorithm of the package, by name: importing each module of ``maml_cli.algorithms`` registers it."""
    import maml_cli.algorithms as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    return dict(_REGISTERED)


def registered_by_target(target: str) -> Registered | None:
    """The algorithm whose schema builds ``target`` (a config's ``algo._target_``), if any."""
    return next((entry for entry in registered_algorithms().values() if entry.schema._target_ == target), None)
