"""Structured-config schemas: types and allowed keys of every config node.

The YAML files under ``conf/`` hold the values; these dataclasses, registered in
Hydra's ConfigStore, make a mistyped key or a wrong type fail at start-up with
the key's name, before any data is loaded.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from maml_cli.algorithms.registry import at_least, registered_algorithms
from maml_cli.data.registry import registered_datasets
from maml_cli.models import BatchNormMode


@dataclass
class Conv4Config:
    _target_: str = "maml_cli.models.Conv4"
    hidden: int = at_least(1, 64)  # filters per layer
    batch_norm: Optional[BatchNormMode] = None  # None: chosen for the algorithm (build.settle_model_choices)
    channels_last: Optional[bool] = None  # None: build_model chooses by device (build.default_channels_last)


@dataclass
class MLPConfig:
    _target_: str = "maml_cli.models.MLP"
    hidden: list[int] = at_least(1, default_factory=lambda: [40, 40])  # each hidden layer's width; [] for none


@dataclass
class ResNet12Config:
    _target_: str = "maml_cli.models.ResNet12"
    hidden: list[int] = at_least(1, default_factory=lambda: [64, 160, 320, 640])  # each block's filters
    batch_norm: Optional[BatchNormMode] = None  # None: chosen for the algorithm (build.settle_model_choices)
    channels_last: Optional[bool] = None  # None: build_model chooses by device (build.default_channels_last)


# conf/model/<name>.yaml builds on schema/model/<name>.
MODEL_SCHEMAS: dict[str, type] = {"conv4": Conv4Config, "mlp": MLPConfig, "resnet12": ResNet12Config}


@dataclass
class OptimizerConfig:
    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    lr: float = MISSING


@dataclass
class Config:
    """The top-level config; the keys a user types most are at the top level."""

    algo: Any = MISSING
    dataset: Any = MISSING
    model: Any = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: Optional[Any] = None
    way: int = MISSING
    shot: int = MISSING
    query: int = MISSING
    inner_lr: float = MISSING
    outer_lr: float = MISSING
    inner_steps: int = MISSING
    test_inner_steps: int = MISSING
    score_every: int = 1
    transductive: bool = True
    meta_batch_size: int = MISSING
    iterations: int = MISSING
    tasks_at_once: int = 1
    threads: str = "auto"
    keep_freed_memory: bool = True
    device: str = "auto"
    seed: int = 0
    eval_seed: int = 0
    data_root: str = MISSING
    log_every: int = 10
    val_every: int = 500
    val_tasks: int = 100
    test_tasks: int = 600
    checkpoint_every: int = 500
    patience: Optional[int] = None
    resume: Optional[str] = None
    force_resume: bool = False
    progress: bool = True


def default_data_root() -> str:
    """``$MAML_CLI_DATA``, else ``maml-cli`` under the user's cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    if os.environ.get("MAML_CLI_DATA"):
        return os.environ["MAML_CLI_DATA"]
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache) / "maml-cli")


# When the run started, for the names of run and sweep folders; set by maml-train to rank 0's clock when several
# ranks start together, so that every rank names the same folder.
_started: list[datetime.datetime] = []


def set_start_time(when: datetime.datetime) -> None:
    _started[:] = [when]


def start_time(pattern: str) -> str:
    """The run's start time in ``pattern`` (``%Y-%m-%d_%H-%M-%S``): Hydra's ``now``, shared by the ranks of one run."""
    if not _started:
        _started.append(datetime.datetime.now())
    return _started[0].strftime(pattern)


def run_name_suffix(overrides: str) -> str:
    """``"experiment=x,way=20"`` -> ``"_experiment-x_way-20"``: says what differs, and stays a plain
    path that can be passed back as ``resume=<dir>`` without quoting."""
    if not overrides:
        return ""
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", overrides.replace(",", "_").replace("=", "-")).strip("-")
    return "_" + slug[:120]


def swept_keys(sweep_dir: str) -> set[str] | None:
    """The keys a multirun varies (``inner_steps`` in ``inner_steps=1,3,5``), from the sweep's ``multirun.yaml``;
    None when the record cannot be read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        typed = list(OmegaConf.load(Path(sweep_dir) / "multirun.yaml").hydra.overrides.task)
        return {o.key_or_group.lstrip("+~") for o in OverridesParser.create().parse_overrides(typed) if o.is_sweep_override()}
    except Exception:  # no record (another launcher): the caller names the folder by every override
        return None


def sweep_subdir(sweep_dir: str, job_overrides: Any, override_dirname: str) -> str:
    """A sweep member's folder: its values of the keys the sweep varies (``inner_steps=3``), so that names stay
    short in TensorBoard's run list; every override stays in the member's ``.hydra/overrides.yaml``."""
    varied = swept_keys(sweep_dir)
    if varied is None:
        return override_dirname
    chosen = [str(o) for o in job_overrides if str(o).split("=", 1)[0].lstrip("+~") in varied]
    return ",".join(chosen) or override_dirname or "run"


def register() -> None:
    """Register the schemas and resolvers; called once before Hydra composes."""
    if not OmegaConf.has_resolver("maml_cli.data_root"):
        OmegaConf.register_new_resolver("maml_cli.data_root", default_data_root)
    if not OmegaConf.has_resolver("maml_cli.run_dir"):
        # A resumed run writes into the directory of the run it continues.
        OmegaConf.register_new_resolver("maml_cli.run_dir", lambda resume, fresh: resume if resume else fresh)
    if not OmegaConf.has_resolver("maml_cli.slug"):
        OmegaConf.register_new_resolver("maml_cli.slug", run_name_suffix)
    if not OmegaConf.has_resolver("maml_cli.now"):
        # Cached in the config, as Hydra's own now: a launcher's worker processes read the sweep's time from the config.
        OmegaConf.register_new_resolver("maml_cli.now", start_time, use_cache=True)
    if not OmegaConf.has_resolver("maml_cli.sweep_subdir"):
        OmegaConf.register_new_resolver("maml_cli.sweep_subdir", sweep_subdir)
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    for name, entry in registered_algorithms().items():
        store.store(group="schema/algo", name=name, node=entry.schema)
    for name, dataset in registered_datasets().items():
        store.store(group="schema/dataset", name=name, node=dataset.schema)
    for name, schema in MODEL_SCHEMAS.items():
        store.store(group="schema/model", name=name, node=schema)


def config_dir() -> str:
    """The folder holding ``config.yaml``: inside the installed package, else the checkout's ``conf/``."""
    try:
        import maml_cli.conf as packaged

        return str(Path(packaged.__file__).parent)
    except ImportError:  # running from a source tree without installing
        return str(Path(__file__).resolve().parents[2] / "conf")


def compose_defaults() -> DictConfig:
    """The config composed with no overrides at all: what a command changes is judged against it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside maml-train, or a test's compose context
        return compose(config_name="config")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config")
