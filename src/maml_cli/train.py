"""``maml-train``: the Hydra entry point of meta-training.

Examples::

    maml-train dataset=sinusoid                     # no data needed, minutes on a laptop
    maml-train algo=maml way=20 shot=1              # MAML on Omniglot 20-way 1-shot
    maml-train experiment=maml_omniglot_5w1s        # the paper's settings
    maml-train -m algo=maml inner_steps=1,3,5       # a sweep; one run directory per value
    maml-train experiment=maml_omniglot_5w1s resume=outputs/runs/<run>   # continue a run
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import shlex
import shutil
import sys
import warnings
from pathlib import Path
from typing import Iterator

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from maml_cli import config as config_module
from maml_cli import distributed
from maml_cli.algorithms.base import Algorithm
from maml_cli.build import (build_algorithm, build_model, build_optimizer, build_samplers, build_scheduler, build_tasks,
                            algorithm_name, batch_tasks_in_use, check_inner_loop_overrides, check_non_transductive, check_one_schedule, dataset_name, flatten, hparams, resolve_device, resume_config, settle_model_choices,
                            typed_keys, unflatten, validate, without_own_settings)
from maml_cli.checkpoint import load_checkpoint
from maml_cli.data.base import TaskFamily, class_split_changes, class_split_record
from maml_cli.errors import UserError, out_of_memory_explained
from maml_cli.learner import dataset_inputs
from maml_cli.loop import MetaTrainer, TaskThreads, after_last_step, by_presentation, ci_text
from maml_cli.results import first_hparams
from maml_cli.run_lock import run_lock
from maml_cli.suggest import explain_config_error, explain_list_item_error
from maml_cli.threads import set_up_cpu

log = logging.getLogger("maml_cli")


def task_threads(model: torch.nn.Module, tasks_at_once: int, meta_batch_size: int, device: torch.device,
                 episodes_per_call: int | None) -> TaskThreads | None:
    """Threads for ``tasks_at_once`` calls of the algorithm, or None when one at a time is all there can be (one task per
    meta-batch, or an algorithm that computes a whole meta-batch in one call)."""
    at_once = min(tasks_at_once, meta_batch_size)
    if at_once < 2:
        return None
    if episodes_per_call is None or episodes_per_call >= meta_batch_size:
        log.warning("tasks_at_once=%d has nothing to run at once: the algorithm computes a meta-batch in one call "
                    "(algo.batch_tasks, or an algorithm that always does); the tasks are computed together instead", tasks_at_once)
        return None
    if device.type == "cuda":
        log.warning("tasks_at_once=%d on CUDA: the tasks share one stream, so this is unlikely to help (not measured on a GPU)", at_once)
    log.info("meta-training runs %d tasks at a time on threads", at_once)
    return TaskThreads(model, at_once)


def resume_override(run_dir: Path) -> str:
    """``resume=<run_dir>`` as typed in a shell; quoted for Hydra when the path holds ``=`` or ``,`` (multirun members)."""
    value = str(run_dir)
    if any(c in value for c in "=,[]{}()'\" "):
        value = "'" + value + "'"
    return shlex.quote(f"resume={value}")


def load_resume_state(run_dir: Path) -> dict:
    """``last.pt`` of ``run_dir``; if it does not load, the error names the run's other checkpoint that does."""
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"resume={run_dir} is not a run directory (it has no config.yaml); pass the folder of a run "
                        f"under outputs/runs/ or outputs/multirun/.")
    try:
        return load_checkpoint(run_dir / "last.pt", map_location="cpu")
    except UserError as err:
        fallback = run_dir / "best.pt"
        try:
            iteration = load_checkpoint(fallback, map_location="cpu")["iteration"]
            hint = f" The run's {fallback} (iteration {iteration}) loads: copy it over last.pt to resume from there."
        except UserError:
            hint = " No other checkpoint of this run loads."
        raise UserError(f"cannot resume {run_dir}: {err}{hint}") from err


def resumed_config(cfg: DictConfig, resume_state: dict, overrides: list[str]) -> DictConfig:
    """The run's own saved config, with what the resume command typed applied where it does not change results.

    Raises:
        UserError: a typed key would change the run's results (unless ``force_resume=true``).
    """
    current = flatten(cfg)
    defaults = flatten(config_module.compose_defaults())
    typed = typed_keys(overrides, current, defaults)
    # A top-level key added after the run was saved: the run computed as the key's default does (transductive: true).
    run_config = flatten(resume_state["config"])
    nodes = {key.split(".", 1)[0] for key in run_config if "." in key}  # a node's keys, not a null top-level default over them
    saved = {**{k: v for k, v in defaults.items() if "." not in k and k not in nodes}, **run_config}
    # The class lists may move (another machine): a checkpoint that records its split lets the resume compare the
    # classes themselves once they are built (check_class_split), instead of refusing every other folder.
    moved = {"dataset.split_dir"} if resume_state.get("class_split") is not None else set()
    interpolations = {key: value for key, value in flatten(cfg, resolve=False).items()
                      if isinstance(value, str) and OmegaConf.is_interpolation(OmegaConf.create({"value": value}), "value")}
    effective, differences = resume_config(saved, current, typed, also_free=moved, interpolations=interpolations)
    if "iterations" in typed and saved.get("iterations") != current["iterations"] and not cfg.force_resume:
        schedule = build_algorithm(OmegaConf.create(unflatten(saved))).outer_lr_schedule
        if schedule is not None:
            # Elsewhere iterations only says where to stop; here the outer rate's schedule is spread over it.
            differences.append(f"iterations: {saved['iterations']!r} -> {current['iterations']!r} (algo anneals its outer "
                               f"learning rate over the run's iterations, so a new total changes the schedule)")
    if "iterations" in typed and current["iterations"] > saved.get("iterations", current["iterations"]) and distributed.current().main:
        warn_scheduler_keeps_its_total(saved, current, typed)
    if differences and not cfg.force_resume:
        raise UserError(f"resume={cfg.resume}: the command sets {'; '.join(differences)} (the run's value -> the typed one), "
                        f"which would change the run's results. Leave {'these keys' if len(differences) > 1 else 'it'} out: the run's "
                        f"config is saved with it ({Path(cfg.resume) / 'config.yaml'}), and resume=<run> alone continues it. "
                        f"Or add force_resume=true to continue with the change.")
    return OmegaConf.create(unflatten(effective))


def warn_scheduler_keeps_its_total(saved: dict, current: dict, typed: set[str]) -> None:
    """A resume that raises ``iterations`` leaves the run's ``scheduler`` as saved: a setting that was the run's first
    total (``scheduler.T_max=${iterations}``, saved as its value) keeps it, and past it the schedule does what its class
    does after its total (a cosine rises again; a OneCycleLR is refused by ``build_scheduler``). Said, with the command
    that spreads it over the new total."""
    total = saved["iterations"]
    tied = [key for key, value in saved.items() if key.startswith("scheduler.") and key not in typed
            and type(value) is int and value == total]
    if tied:
        # + : on a resume the typed config's scheduler is null until a key is added (the run's own is in the saved config).
        retype = " ".join(f"+{key}={current['iterations']}" for key in tied)
        log.warning("iterations %s -> %s: the run's %s %s its first total (%s), which the saved config keeps; past it the "
                    "schedule does what %s does after its total. To spread it over the new total instead, add %s force_resume=true.",
                    total, current["iterations"], ", ".join(tied), "is" if len(tied) == 1 else "are", total,
                    str(saved.get("scheduler._target_", "its class")).rsplit(".", 1)[-1], retype)


def replayed_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, algorithm: Algorithm,
                       iteration: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The ``scheduler`` a forced resume changed, rebuilt and stepped from the start to ``iteration``: the rate is the
    one the new schedule gives there. Restoring the saved state would put the old settings back (a scheduler saves
    them with its progress), and overlaying the new ones on it is wrong for schedules that compute each rate from the
    previous one (a cosine already at its floor stays there) or keep derived tables (OneCycleLR's phases).

    Raises:
        UserError: the new schedule ends before ``iteration`` (OneCycleLR's ``total_steps``).
    """
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"])
    scheduler = build_scheduler(cfg, optimizer, algorithm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "step() before optimizer.step()": nothing trains while the rate is replayed
        try:
            for _ in range(iteration):
                scheduler.step()
        except ValueError as err:
            raise UserError(f"resume={cfg.resume}: the scheduler as typed cannot reach the run's iteration {iteration}: {err}") from err
    return scheduler


def check_class_split(cfg: DictConfig, resume_state: dict, class_split: dict) -> None:
    """Refuse to resume on classes other than the run's (unless ``force_resume=true``): the class lists of a moved
    ``dataset.split_dir``, or of the same folder since edited, or another copy of the dataset under another data root.
    Checkpoints written before the record existed are not checked."""
    recorded = resume_state.get("class_split")
    changes = class_split_changes(recorded, class_split) if recorded is not None else []
    if changes and not cfg.force_resume:
        lists = f" (dataset.split_dir={cfg.dataset.split_dir})" if cfg.dataset.get("split_dir") else ""
        raise UserError(f"resume={cfg.resume}: the classes built now{lists} are not those the run trained on: {'; '.join(changes)}. "
                        f"Point dataset.split_dir (or data_root) at the run's class lists and data, or add force_resume=true to "
                        f"continue on these classes.")


PROGRESS_LOGGER = "maml_cli.progress"


class _Drop(logging.Filter):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.dropped = name

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(self.dropped)


@contextlib.contextmanager
def console_quiet(logger: str | None) -> Iterator[None]:
    """Keep ``logger``'s records (the line every ``log_every`` iterations) off the console, where the progress bar shows
    the same, and in the log file; ``None``: change nothing."""
    handlers = [h for h in logging.getLogger().handlers if not isinstance(h, logging.FileHandler)] if logger else []
    drop = _Drop(logger or "")
    for handler in handlers:
        handler.addFilter(drop)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(drop)


def warn_of_stale_hparams(run_dir: Path, cfg: DictConfig, tasks: TaskFamily) -> None:
    """Say which of the HParams tab's values no longer hold after a resume (``iterations``, or what ``force_resume=true``
    let through): TensorBoard shows the run's first record of them."""
    recorded = first_hparams(run_dir)
    if recorded is None:
        return
    now = hparams(cfg, tasks)

    def same(shown: float | str | bool, value: int | float | str | None) -> bool:
        # The record holds every number as a float; older versions recorded booleans as 1 and 0.
        if isinstance(shown, float) and value in ("true", "false"):
            return shown == float(value == "true")
        if isinstance(shown, float) and isinstance(value, (int, float)):
            return float(value) == shown
        if isinstance(shown, str) and isinstance(value, str) and shown[:1] in "[{" and value[:1] in "[{":
            return json.loads(shown) == json.loads(value)  # lists, spaced or not
        return value == shown

    def text(shown: float | str | bool) -> str:
        return str(int(shown)) if isinstance(shown, float) and shown.is_integer() else repr(shown) if isinstance(shown, float) else str(shown)

    # A column the first record lacks (written by an older version) is not shown for the run, so not stale either.
    columns = [*now, *sorted(set(recorded) - set(now))]  # the record's own order is a protobuf map's
    stale = [f"{column} {text(shown)} (now {now.get(column, 'unset')})"
             for column in columns if column in recorded and not same(shown := recorded[column], now.get(column))]
    if stale:
        log.warning("TensorBoard's HParams tab shows the values this run started with: %s", "; ".join(stale))


def train(cfg: DictConfig, run_dir: Path, overrides: list[str], sweep: list[str] | None = None) -> float:
    """Meta-train as ``cfg`` says, writing everything under ``run_dir``.

    Under ``torchrun`` every rank runs this with the same ``cfg`` and ``run_dir`` (:mod:`maml_cli.distributed`);
    rank 0 alone writes there.

    Returns:
        The final meta-validation metric (accuracy, or MSE for regression), for sweepers (the meta-test's
        when the run had no validation).
    """
    ranks = distributed.current()
    if not ranks.main:  # one voice on the console: the other ranks say only what goes wrong
        logging.getLogger("maml_cli").setLevel(logging.WARNING)
    validate(cfg)
    distributed.check_meta_batch(cfg.meta_batch_size, ranks)
    check_inner_loop_overrides(cfg, overrides, sweep)
    if ranks.main and not cfg.resume:  # a resumed run keeps its own settings, whatever the command's defaults
        gap = without_own_settings(cfg, algorithm_name(cfg), dataset_name(cfg))
        if gap:
            log.warning("%s", gap)
    with run_lock(run_dir) if ranks.main else contextlib.nullcontext():
        return _train(cfg, run_dir, overrides, ranks)


def _train(cfg: DictConfig, run_dir: Path, overrides: list[str], ranks: distributed.Ranks) -> float:
    resume_state = None
    if not cfg.resume and (run_dir / "last.pt").exists():
        raise UserError(f"{run_dir} already holds a run (last.pt); to continue it pass {resume_override(run_dir)}, or start the new run a second later.")
    if cfg.resume:
        resume_state = load_resume_state(Path(cfg.resume))
        cfg = resumed_config(cfg, resume_state, overrides)
        # Judged again against the run's own algorithm: the check before it saw the resume command's default one.
        check_inner_loop_overrides(cfg, overrides, resumed=True)
    set_up_cpu(cfg.threads, cfg.keep_freed_memory)
    device = distributed.device_of(resolve_device(cfg.device), ranks)
    torch.manual_seed(cfg.seed)
    algorithm = build_algorithm(cfg, device)
    check_one_schedule(cfg, algorithm)
    settle_model_choices(cfg, algorithm)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)

    if not cfg.transductive:
        # Before the dataset is built, on a network shaped from its config, drawn outside the seeded stream so that the
        # run's own network starts the same either way.
        with torch.random.fork_rng(devices=[]):
            network = build_model(cfg, dataset_inputs(cfg), algorithm)
        check_non_transductive(network, algorithm_name(cfg), "transductive=false", "Leave transductive out.")
    tasks = build_tasks(cfg)
    class_split = class_split_record(tasks)
    if resume_state:
        check_class_split(cfg, resume_state, class_split)
    samplers = build_samplers(cfg, tasks, algorithm, device)
    model = build_model(cfg, tasks, algorithm, device)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, algorithm)

    start = resume_state["iteration"] if resume_state else 0
    # purge_step drops events a killed run logged after its last checkpoint, so curves continue without duplicates.
    writer = SummaryWriter(log_dir=str(run_dir), purge_step=start + 1 if resume_state else None) if ranks.main else Unwritten()
    trainer = MetaTrainer(
        algorithm=algorithm, model=model, kind=tasks.kind, optimizer=optimizer,
        train_sampler=samplers["train"], val_sampler=samplers["val"], test_sampler=samplers["test"],
        generator=torch.Generator().manual_seed(cfg.seed), writer=writer, run_dir=run_dir, device=device,
        iterations=cfg.iterations, meta_batch_size=cfg.meta_batch_size, log_every=cfg.log_every,
        val_every=cfg.val_every, val_tasks=cfg.val_tasks, test_tasks=cfg.test_tasks,
        checkpoint_every=cfg.checkpoint_every, eval_seed=cfg.eval_seed, config=config, progress=cfg.progress and ranks.main,
        scheduler=scheduler, grad_clip=algorithm.grad_clip, patience=cfg.patience, score_every=cfg.score_every,
        transductive=cfg.transductive,
        threads=task_threads(model, cfg.tasks_at_once, cfg.meta_batch_size, device, algorithm.episodes_per_call),
        resume_hint=f"maml-train {resume_override(run_dir)}", ranks=ranks, class_split=class_split,
    )
    metric = tasks.kind.metric
    # On resume too: the config in use (the run's own, with the locations or iterations typed on the resume command).
    if ranks.main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    if resume_state:
        for stale in run_dir.glob(".*.pt.*.tmp"):  # a checkpoint write cut short by kill -9
            stale.unlink(missing_ok=True)
        saved_optimizer = resume_state["config"].get("optimizer", config["optimizer"])
        if saved_optimizer.get("_target_") != config["optimizer"]["_target_"]:
            # A forced change of the outer optimizer's class: the saved state is another class's, so this one starts afresh.
            log.warning("the outer optimizer is now %s (the run's was %s): its state (moments, momentum) starts afresh",
                        config["optimizer"]["_target_"], saved_optimizer.get("_target_"))
            resume_state = {**resume_state, "optimizer": optimizer.state_dict()}
        trainer.restore(resume_state)
        optimizer_changed = saved_optimizer != config["optimizer"]
        if optimizer_changed:
            # Loading the saved state put the run's settings back into the groups; a forced change (outer_lr,
            # +optimizer.<key>) is used: the optimizer's defaults are still the ones it was built with from cfg.
            for group in optimizer.param_groups:
                group.update(optimizer.defaults)
                group["initial_lr"] = optimizer.defaults["lr"]  # where a scheduler scales the rate, from the new base
        if scheduler is not None and (config.get("scheduler") != resume_state["config"].get("scheduler") or optimizer_changed):
            trainer.scheduler = replayed_scheduler(cfg, optimizer, algorithm, trainer.state.iteration)
        log.info("resumed %s at iteration %d", run_dir, trainer.state.iteration)
        if ranks.main:
            warn_of_stale_hparams(run_dir, cfg, tasks)
    elif ranks.main:
        # The session's records alone, without the experiment record that would fix the table's columns: where no run
        # has one, TensorBoard makes its columns from every run's hyperparameters and scalars, so runs of other
        # algorithms, datasets or settings side by side each show theirs.
        _, session_start, session_end = hparams_summary(hparams(cfg, tasks), {})
        for summary in (session_start, session_end):
            writer.file_writer.add_summary(summary)
    log.info("run directory: %s", run_dir)
    log.info("dataset split: %s %s; device: %s; %d parameters", tasks.split_name,
             tasks.describe(), device, sum(p.numel() for p in model.parameters()))
    if (batch_tasks := batch_tasks_in_use(cfg, device)) is not None:
        # The config records what was typed (null: settled per device, also on a resume elsewhere); the log, what ran.
        log.info("algo.batch_tasks=%s%s: %s", str(batch_tasks).lower(),
                 f" (null, settled for {device.type})" if cfg.algo.get("batch_tasks") is None else "",
                 "the tasks of a meta-batch are computed together" if batch_tasks else "each task is computed on its own")
    if not cfg.transductive:
        log.info("transductive=false: meta-validation and the meta-test put each query through the network in one batch with "
                 "its task's support set and no other query (one pass per query)")
    try:
        with console_quiet(PROGRESS_LOGGER if cfg.progress else None):
            if not trainer.train():
                writer.close()
                raise SystemExit(130)
        results = trainer.test()
    finally:
        writer.close()
        if trainer.threads is not None:
            trainer.threads.close()
    for inner_step, step_results in results.items():
        value, ci = step_results[metric]
        log.info("meta-test %s after %d inner step(s): %.4f +- %s (95%% CI, %d task%s)", metric, inner_step, value, ci_text(ci), cfg.test_tasks,
                 "" if cfg.test_tasks == 1 else "s")
    final = after_last_step(results)
    for name, series in by_presentation(final).items():
        log.info("meta-test %s by presentation index: %s", name,
                 ", ".join(f"{index}: {value:.4f} +- {ci_text(ci)}" for index, (value, ci) in sorted(series.items())))
    tested = run_dir / trainer.tested_checkpoint
    log.info("the meta-test scored %s (%s)", tested, f"iteration {trainer.state.best_iteration}, chosen by early stopping"
             if trainer.tested_checkpoint == "best.pt" else f"the weights at the end, iteration {trainer.state.iteration}")
    if trainer.state.best_metric is not None:
        log.info("best meta-validation %s: %.4f at iteration %d (%s)", metric, trainer.state.best_metric, trainer.state.best_iteration,
                 run_dir / "best.pt")
    log.info("run directory: %s", run_dir)
    log.info("curves: tensorboard --logdir %s", shlex.quote(str(outputs_folder(run_dir))))
    value = trainer.last_validation if trainer.last_validation is not None else final[metric][0]
    if not math.isfinite(value):  # a diverged run: the worst value, which a search can rank (Optuna refuses nan)
        log.warning("the final meta-validation %s is %s; a sweeper is told %s, the worst value", metric, value,
                    "-inf" if tasks.kind.higher_is_better else "inf")
        return -math.inf if tasks.kind.higher_is_better else math.inf
    return value


class Unwritten:
    """The TensorBoard writer of a rank other than 0: rank 0 writes the run's events."""

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def outputs_folder(run_dir: Path) -> Path:
    """The ``outputs`` folder holding a run (``outputs/runs/<run>``, ``outputs/multirun/<sweep>/<run>``), where
    TensorBoard shows it beside the others; the run directory itself when it lies elsewhere."""
    for parent in run_dir.parents:
        if parent.name == "outputs":
            return parent
    return run_dir


def sweep_overrides(hydra_cfg: DictConfig) -> list[str] | None:
    """In a multirun, the overrides as the user typed them (``inner_steps=1,3``), read from the sweep's record."""
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    record = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    try:
        return list(OmegaConf.load(record).hydra.overrides.task)
    except Exception:  # no record: judge the run by its own overrides
        return None


def remove_if_nothing_trained(run_dir: Path, resumed: bool) -> None:
    """Leave no directory that could pass for a run: one with no checkpoint that this start created (rank 0's to judge)."""
    if not distributed.current().main or any(run_dir.glob("*.pt")):
        return
    if not resumed or not (run_dir / "config.yaml").exists():  # a mistyped resume=<dir> gets a fresh folder from Hydra
        shutil.rmtree(run_dir, ignore_errors=True)


class MemberFailed(UserError):
    """A multirun member's error, after it was printed."""


config_module.register()
# Whether the user set HYDRA_FULL_ERROR=1 (main() sets it for Hydra in any case).
_user_wants_tracebacks = False
# Whether Hydra got as far as calling the task (it makes the run folder before): an error before is about the command.
_task_started = False


@hydra.main(version_base="1.3", config_path=config_module.config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    global _task_started
    _task_started = True
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        with out_of_memory_explained("algo.batch_tasks"):
            return train(cfg, run_dir, list(hydra_cfg.overrides.task), sweep_overrides(hydra_cfg))
    except UserError as err:
        remove_if_nothing_trained(run_dir, resumed=bool(cfg.resume))
        if _user_wants_tracebacks:
            raise
        print(f"maml-train: error: {err}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # Raised, not exited: the launcher goes on with the other members (a search records a failed trial),
            # and the sweep reports the failure when it ends.
            raise MemberFailed(f"the multirun member {run_dir.name} failed (the error above); the other members ran") from None
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        # A second Ctrl-C (or a first one before training starts): quit at once, keeping whatever
        # checkpoint was last written whole.
        remove_if_nothing_trained(run_dir, resumed=bool(cfg.resume))
        last = run_dir / "last.pt"
        kept = f"{last} (written before the interrupt) is kept" if last.exists() else "no checkpoint was written"
        print(f"maml-train: interrupted; {kept}.", file=sys.stderr)
        raise SystemExit(130) from None


def main() -> None:
    """Console script ``maml-train``."""
    # conf/hydra/launcher/{joblib,submitit_slurm}.yaml give the plugins' launchers this project's defaults under the
    # plugins' own names, which Hydra checks against the plugins' schemas and calls deprecated (it still does in 1.3).
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/(joblib|submitit_slurm)' is validated against ConfigStore schema")
    # Hydra prints a composition error (a misspelt key, an unknown choice, a wrong type) in its own words,
    # suggesting +key=value for a misspelling; with HYDRA_FULL_ERROR=1 it raises instead, so the error can
    # be explained here in one paragraph. The user's own HYDRA_FULL_ERROR=1 still shows tracebacks.
    global _user_wants_tracebacks, _task_started
    _user_wants_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    _task_started = False
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        join_ranks()
        _hydra_main()
    except UserError as err:  # before Hydra: joining the ranks torchrun started (or a run's error re-raised for tracebacks)
        if _user_wants_tracebacks:
            raise
        print(f"maml-train: error: {err}", file=sys.stderr)  # every rank: a collective that timed out is this rank's own story
        raise SystemExit(2) from None
    except HydraException as err:
        if _user_wants_tracebacks:
            raise
        _command_error(explain_config_error(err) or str(err).strip().splitlines()[0])
        raise SystemExit(2) from None
    except OSError as err:
        if _user_wants_tracebacks or err.filename is None or _task_started:
            raise
        # The run folder, which Hydra makes before the task starts, where the system refuses it (hydra.run.dir under a
        # file, or where nothing can be made): its path and why. Errors while training keep their traceback.
        print(f"maml-train: error: {err.strerror or err}: {err.filename} (HYDRA_FULL_ERROR=1 shows where it happened)", file=sys.stderr)
        raise SystemExit(1) from None
    except (ValueError, TypeError) as err:
        explanation = None if _user_wants_tracebacks else explain_list_item_error(err, sys.argv[1:])
        if explanation is None:
            raise
        _command_error(explanation)
        raise SystemExit(2) from None
    finally:
        distributed.stop()
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def _command_error(explanation: str) -> None:
    """Print an error in the command itself (its composition, its overrides). Every rank torchrun starts composes the
    same command and fails the same way, so one rank per machine says so, not every rank the same paragraph."""
    if distributed.current().local_rank == 0:
        print(f"maml-train: error: {explanation}", file=sys.stderr)


def join_ranks() -> None:
    """Set the run's start time, which names its folder; under ``torchrun``, join the other ranks first, take rank 0's
    start time, and leave ``.hydra/`` and ``train.log`` to rank 0 (the ranks share one run folder)."""
    ranks = distributed.start()
    config_module.set_start_time(distributed.broadcast_from_main(datetime.datetime.now()))
    if not ranks.several:
        return
    if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
        raise UserError("a multirun is not started under torchrun: torchrun runs one meta-training over several ranks. Sweep with "
                        "maml-train -m (hydra/launcher=joblib or submitit_slurm) and give each member its ranks there, or run "
                        "one torchrun per setting.")
    if not ranks.main:
        sys.argv += ["hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]"]


if __name__ == "__main__":
    main()
