"""``maml-results``: runs side by side, read from their own files.

Usage::

    maml-results outputs/                           # every run under outputs/, one row each
    maml-results outputs/multirun/<sweep> --group-seeds      # seeds of one setting in one row: mean and sd
    maml-results outputs/runs/<a> outputs/runs/<b> --format csv|json|latex
    maml-results <runs> --eval 'eval_best_test_*_1000tasks_*'   # score by maml-eval's newest matching file
    maml-results <runs> --plots figures/            # validation curves, test by inner step, by presentation
    maml-results --curves outputs/runs/<run> [--every N]      # one run's curves as Markdown tables

Everything is read from a run directory's ``config.yaml``, its TensorBoard event files and the JSON
files ``maml-eval`` writes beside its checkpoints, so runs made before this command existed are read
too, and reading a run that is still training does not disturb it. A run that is unfinished,
interrupted or damaged (an unreadable event file or config) is listed with its state.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import math
import os
import re
import statistics
import struct
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence, Union

import yaml
from google.protobuf.message import DecodeError
from omegaconf import OmegaConf
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.plugins.hparams.metadata import SESSION_START_INFO_TAG
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from tensorboard.util import tensor_util

from maml_cli.build import INNER_LOOP_KEYS, MACHINE_KEYS, flatten, has_inner_loop, scores_transductively
from maml_cli.loop import duration, strict_json
from maml_cli.tasks import TASK_KINDS

# A value of a flattened config.yaml.
ConfigValue = Union[str, int, float, bool, None, list]

# Keys that say where and how a run computed, not what it learned: never a column of their own.
IGNORED_KEYS = frozenset({
    *MACHINE_KEYS, "data_root", "dataset.root", "dataset.split_dir", "dataset.store_dir", "dataset.in_memory",
    "dataset.download", "resume", "force_resume", "log_every", "checkpoint_every", "score_every",
})
# Keys shown in columns of their own (algorithm, dataset, split).
OWN_COLUMNS = frozenset({"algo._target_", "dataset._target_", "dataset.split"})
EVENTS_PREFIX = "events.out.tfevents."
RUN_FILES = frozenset({"config.yaml", "last.pt", "best.pt"})
HIGHER_IS_BETTER = {kind.metric: kind.higher_is_better for kind in TASK_KINDS}
FORMATS = ("markdown", "csv", "json", "latex")


class Point(NamedTuple):
    """One scalar of an event file (a tuple: a run holds many thousands)."""

    step: int
    value: float


@dataclass(frozen=True)
class Estimate:
    """A mean and its spread: the 95% CI half-width over tasks, or (seeds grouped) the standard deviation over seeds."""

    mean: float
    spread: float


@dataclass
class EventData:
    """The scalars of a run's event files, merged as TensorBoard merges them, and how long they were written."""

    scalars: dict[str, list[Point]] = field(default_factory=dict)
    wall_seconds: float | None = None
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TestEpisodes:
    """What the test metric was computed on: the run's own final test, or a ``maml-eval`` file."""

    tasks: int | None
    way: int | None
    shot: int | None
    query: int | None
    eval_file: str | None = None
    transductive: bool = True  # False: each query was scored in one batch with the support set alone (maml-eval transductive=false)


@dataclass
class Validation:
    """A run's meta-validation: the curve (mean and 95% CI by iteration), its best point, and at the last
    validation the accuracy by presentation index (the LSTM's sequence protocol)."""

    curve: dict[int, Estimate] = field(default_factory=dict)
    best: float | None = None
    best_iteration: int | None = None
    by_presentation: dict[int, float] = field(default_factory=dict)


@dataclass
class TestResult:
    """A meta-test: the final metric, the metric after each scored inner step (by step) and by presentation index, and its episodes."""

    final: Estimate | None = None
    by_inner_step: dict[int, Estimate] = field(default_factory=dict)
    by_presentation: list[Estimate] = field(default_factory=list)
    episodes: TestEpisodes | None = None


@dataclass
class Run:
    """What a run directory says about its run."""

    path: Path
    name: str
    config: dict[str, ConfigValue]
    algo: str
    dataset: str
    split: str | None
    metric: str | None
    state: str
    problems: list[str]
    iterations: int | None
    planned_iterations: int | None
    wall_seconds: float | None
    tasks_per_second: float | None
    tasks_per_second_logged: bool
    train: dict[int, float]
    validation: Validation
    test: TestResult

    @property
    def damaged(self) -> bool:
        """Whether a file of the run (config, event file, maml-eval file) could not be read."""
        return bool(self.problems)


# -- finding runs --------------------------------------------------------------------------------------------------


def is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` holds a run: TensorBoard event files (the trainer opens its file before it writes
    ``config.yaml``), or ``config.yaml`` beside ``last.pt`` or ``best.pt``. ``.hydra`` never does."""
    if folder.name == ".hydra":
        return False
    with os.scandir(folder) as entries:  # names first: a data folder of many images costs no stat per file
        names = {e.name for e in entries if (e.name.startswith(EVENTS_PREFIX) or e.name in RUN_FILES) and e.is_file()}
    return any(n.startswith(EVENTS_PREFIX) for n in names) or "config.yaml" in names and bool(names & {"last.pt", "best.pt"})


def natural_key(path: Path) -> list[str | int]:
    """Sort key that puts ``inner_steps=2`` before ``inner_steps=10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """The run directories at or below each of ``paths``, each once, in natural order of their paths.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    found: set[Path] = set()
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        if path.is_dir() and is_run_dir(path):
            found.add(path.resolve())
            continue
        for folder, subfolders, _ in os.walk(path):
            subfolders[:] = sorted(s for s in subfolders if s != ".hydra")
            if is_run_dir(Path(folder)):
                found.add(Path(folder).resolve())
                subfolders[:] = []  # a run does not hold runs
    return sorted(found, key=natural_key)


# -- reading event files ------------------------------------------------------------------------------------------


class DamagedEventFile(Exception):
    """An event file holds a record that fails its checksum or does not parse."""


def read_records(path: Path) -> Iterator[bytes]:
    """The records of a TFRecord file (TensorBoard's event files).

    A record cut short at the end of the file is a write still in progress (or a killed writer's last)
    and ends the file quietly, as TensorBoard reads it.

    Raises:
        DamagedEventFile: a length or a record fails its CRC: the file is not an event file or is corrupt.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    offset = 0
    while offset + 12 <= len(data):
        header = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
        if masked_crc32c(header) != header_crc:
            raise DamagedEventFile(f"unreadable from byte {offset} on (a record's length fails its checksum: not an event file, or corrupt)")
        end = offset + 12 + length
        if end + 4 > len(data):
            return
        record = data[offset + 12:end]
        (record_crc,) = struct.unpack("<I", data[end:end + 4])
        if masked_crc32c(record) != record_crc:
            raise DamagedEventFile(f"unreadable from byte {offset} on (a record fails its checksum: corrupt)")
        yield record
        offset = end + 4


def event_files(run_dir: Path) -> list[Path]:
    """A run's event files in the order they were written (each process of a resumed run starts a new one)."""

    def created(path: Path) -> tuple[int, str]:
        stamp = path.name[len(EVENTS_PREFIX):].split(".", 1)[0]
        return (int(stamp) if stamp.isdigit() else 0, path.name)

    return sorted((p for p in run_dir.iterdir() if p.name.startswith(EVENTS_PREFIX) and p.is_file()), key=created)


def scalar_value(value: Summary.Value) -> float | None:
    """The number of a summary value written by ``add_scalar`` (old or new style), else None."""
    if value.HasField("simple_value"):
        return value.simple_value
    if value.HasField("tensor") and value.metadata.plugin_data.plugin_name == "scalars":
        return float(tensor_util.make_ndarray(value.tensor))
    return None


def read_events(run_dir: Path) -> EventData:
    """Read every event file of ``run_dir``, merged in the order written.

    A resumed run's writer starts its file with a session start at its resume step (``purge_step``), and
    the steps the previous process logged from there on are dropped, as TensorBoard drops them. The wall
    time is the sum over files of the span from their first to their last event, so the pauses between
    sessions are not counted. A damaged file is named in ``problems``; what it held before the damage is kept.
    """
    data = EventData()
    spans: list[float] = []
    for path in event_files(run_dir):
        first = last = None
        try:
            for record in read_records(path):
                try:
                    event = Event.FromString(record)
                except DecodeError as err:
                    raise DamagedEventFile(f"a record is not an event ({err})") from None
                first = event.wall_time if first is None else first
                last = event.wall_time
                if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                    data.scalars = {tag: [p for p in points if p.step < event.step] for tag, points in data.scalars.items()}
                for value in event.summary.value:
                    number = scalar_value(value)
                    if number is not None:
                        data.scalars.setdefault(value.tag, []).append(Point(event.step, number))
        except DamagedEventFile as err:
            data.problems.append(f"{path.name}: {err}")
        except OSError as err:
            data.problems.append(f"{path.name}: unreadable ({err.strerror or err})")
        if first is not None:
            spans.append(last - first)
    data.wall_seconds = sum(spans) if spans else None
    return data


def first_hparams(run_dir: Path) -> dict[str, float | str | bool] | None:
    """The hyperparameters the run's first session recorded for TensorBoard's HParams tab, which shows that record
    alone (a resumed run's writer does not write another); None where the first event file has none or is unreadable."""
    files = event_files(run_dir)
    if not files:
        return None
    try:
        for record in read_records(files[0]):
            for value in Event.FromString(record).summary.value:
                if value.tag == SESSION_START_INFO_TAG:
                    start = HParamsPluginData.FromString(value.metadata.plugin_data.content).session_start_info
                    return {name: getattr(v, v.WhichOneof("kind")) for name, v in start.hparams.items() if v.WhichOneof("kind")}
    except (DamagedEventFile, DecodeError, OSError):
        return None
    return None


# -- reading a run ------------------------------------------------------------------------------------------------


def read_config(run_dir: Path) -> tuple[dict[str, ConfigValue], str | None]:
    """The run's ``config.yaml`` flattened to dotted keys, and what is wrong with it (None when it reads).

    The inner-loop keys (``inner_lr``, ``inner_steps``, ``test_inner_steps``, ``score_every``) are left out for an algorithm
    without an inner loop: they are in its config but do not apply, so they tell no runs apart.
    """
    path = run_dir / "config.yaml"
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return {}, "config.yaml is missing"
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        return {}, f"config.yaml is unreadable ({str(err).splitlines()[0]})"
    if not isinstance(loaded, dict):
        return {}, "config.yaml does not hold a config"
    config = flatten(loaded)
    config["transductive"] = scores_transductively(config)  # a run from before the key compares equal to one that says so
    algo = loaded.get("algo")
    if isinstance(algo, dict) and isinstance(algo.get("_target_"), str) and not has_inner_loop(OmegaConf.create({"algo": algo})):
        config = {k: v for k, v in config.items() if k.removeprefix("algo.") not in INNER_LOOP_KEYS}
    return config, None


def short_target(target: ConfigValue) -> str:
    """``maml_cli.algorithms.maml.MAML`` -> ``maml``: the module, which is the name of the config choice."""
    if not isinstance(target, str) or "." not in target:
        return "-"
    return target.rsplit(".", 2)[-2]


STOP_LINE = re.compile(r"stopped by (SIG\w+) after iteration (\d+)")


def stop_in_log(run_dir: Path) -> tuple[str, int] | None:
    """``(signal, iteration)`` when the run's log says its last session was stopped by a signal."""
    stopped = None
    for log_file in sorted(run_dir.glob("*.log")):
        try:
            lines = log_file.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if "meta-training starts at iteration" in line:
                stopped = None
            match = STOP_LINE.search(line)
            if match:
                stopped = (match.group(1), int(match.group(2)))
    return stopped


def number(value: ConfigValue) -> int | None:
    """An integer config value, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def reported(value: float | int | None) -> float:
    """A number of a ``maml-eval`` file; ``null`` (written for NaN, e.g. the CI of a single task) as NaN."""
    return math.nan if value is None else float(value)


def read_eval_file(path: Path) -> tuple[TestResult, str]:
    """The meta-test of a ``maml-eval`` JSON file, and its metric.

    Raises:
        ValueError: the file is not a ``maml-eval`` report.
    """
    try:
        report = json.loads(path.read_text())
        by_step = {int(r["inner_steps"]): Estimate(reported(r["mean"]), reported(r["ci95"])) for r in report["by_inner_step"]}
        by_presentation = [Estimate(reported(r["mean"]), reported(r["ci95"])) for r in report.get("by_presentation", [])]
        episodes = TestEpisodes(report.get("tasks"), report.get("way"), report.get("shot"), report.get("query"), path.name,
                                bool(report.get("transductive", True)))
        return TestResult(by_step[max(by_step)], by_step, by_presentation, episodes), str(report["metric"])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:  # max() of no steps: ValueError
        raise ValueError(f"{path.name} is not a maml-eval report ({err})") from None


def newest_eval_file(run_dir: Path, pattern: str) -> Path | None:
    """The most recently written ``*.json`` in ``run_dir`` whose name matches ``pattern``."""
    matches = [p for p in run_dir.iterdir() if p.suffix == ".json" and fnmatch.fnmatch(p.name, pattern)]
    return max(matches, key=lambda p: (p.stat().st_mtime, p.name), default=None)


def run_state(metric: str | None, scalars: dict[str, list[Point]], planned: int | None, stop: tuple[str, int] | None,
              last_logged: int | None) -> tuple[str, int | None]:
    """The run's state in words and the iterations it ran."""
    of = f" of {planned:,}" if planned is not None else ""
    tested = scalars.get(f"test/{metric}")
    if tested:
        done = tested[-1].step
        early = planned is not None and done < planned
        return (f"finished (stopped early at {done:,}{of})" if early else "finished"), done
    if stop is not None:
        return f"interrupted at {stop[1]:,}{of}", stop[1]
    return f"unfinished at {last_logged or 0:,}{of}", last_logged


def series(scalars: dict[str, list[Point]], tag: str) -> dict[int, float]:
    """The values of one tag by step."""
    return {p.step: p.value for p in scalars.get(tag, [])}


def last_test(points: list[Point]) -> list[Point]:
    """The points of a by-step test series written by the run's last meta-test. Each test writes its steps in increasing
    order, and a resumed run's test follows the interrupted run's own: its series starts where the steps go back down
    (the earlier test may have scored other steps, with another ``score_every``)."""
    starts = [i for i in range(1, len(points)) if points[i].step <= points[i - 1].step]
    return points[starts[-1]:] if starts else points


def read_validation(scalars: dict[str, list[Point]], metric: str | None) -> Validation:
    """The meta-validation curve and its best point (``val/best_<metric>``, else the best of the curve)."""
    values, cis = series(scalars, f"val/{metric}"), series(scalars, f"val/{metric}_ci95")
    curve = {step: Estimate(value, cis.get(step, math.nan)) for step, value in sorted(values.items())}
    if not curve:
        return Validation()
    best = scalars.get(f"val/best_{metric}")
    if best:
        best_value, best_iteration = best[-1].value, best[-1].step
    else:
        best_iteration = (max if HIGHER_IS_BETTER[metric] else min)(curve, key=lambda step: curve[step].mean)
        best_value = curve[best_iteration].mean
    last = max(curve)
    instances = {int(tag.rsplit("_", 1)[1]): series(scalars, tag) for tag in scalars if tag.startswith(f"val/{metric}_instance_")}
    return Validation(curve, best_value, best_iteration, {k: v[last] for k, v in sorted(instances.items()) if last in v})


def read_test(scalars: dict[str, list[Point]], metric: str | None, config: dict[str, ConfigValue]) -> TestResult:
    """The run's own final meta-test (none before the run has finished), on the episodes its config describes."""
    final, final_ci = scalars.get(f"test/{metric}"), series(scalars, f"test/{metric}_ci95")
    if not final:
        return TestResult()

    def estimates(name: str) -> dict[int, Estimate]:
        values, cis = ({p.step: p.value for p in last_test(scalars.get(tag, []))} for tag in (f"test/{metric}_{name}", f"test/{metric}_ci95_{name}"))
        return {step: Estimate(v, cis.get(step, math.nan)) for step, v in sorted(values.items())}

    episodes = (TestEpisodes(*(number(config.get(k)) for k in ("test_tasks", "way", "shot", "query")),
                             transductive=scores_transductively(config)) if config else None)
    return TestResult(Estimate(final[-1].value, final_ci.get(final[-1].step, math.nan)), estimates("by_inner_step"),
                      list(estimates("by_presentation").values()), episodes)


def tasks_per_second(scalars: dict[str, list[Point]], iterations: int | None, meta_batch_size: int | None,
                     wall_seconds: float | None) -> tuple[float | None, bool]:
    """The median of the logged meta-training rates, and True; for a run that logged none, iterations x
    meta_batch_size / wall time (validation and test included), and False."""
    logged = scalars.get("train/tasks_per_second")
    if logged:
        return statistics.median(p.value for p in logged), True
    if iterations and meta_batch_size and wall_seconds:
        return iterations * meta_batch_size / wall_seconds, False
    return None, False


def read_run(run_dir: Path, eval_pattern: str | None = None) -> Run:
    """Read one run directory into a :class:`Run`; nothing here raises for a damaged or unfinished run.

    Args:
        eval_pattern: take the meta-test from the newest ``maml-eval`` file matching this glob
            instead of the run's own final test (none where no file matches).
    """
    config, config_problem = read_config(run_dir)
    events = read_events(run_dir)
    scalars = events.scalars
    problems = ([config_problem] if config_problem else []) + events.problems
    if not event_files(run_dir):
        problems.append("no TensorBoard event files")
    metric = next((m for m in HIGHER_IS_BETTER if any(tag.split("/", 1)[-1].startswith(m) for tag in scalars)), None)
    planned = number(config.get("iterations"))
    logged = max((p.step for tag, points in scalars.items() if tag.startswith("train/") for p in points), default=None)
    state, iterations = run_state(metric, scalars, planned, stop_in_log(run_dir), logged)
    test = read_test(scalars, metric, config)
    if eval_pattern is not None:
        test, found = TestResult(), newest_eval_file(run_dir, eval_pattern)
        try:
            if found is not None:
                test, eval_metric = read_eval_file(found)
                metric = metric or eval_metric
        except ValueError as err:
            problems.append(str(err))
    rate, rate_logged = tasks_per_second(scalars, iterations, number(config.get("meta_batch_size")), events.wall_seconds)
    return Run(
        path=run_dir, name=run_dir.name, config=config,
        algo=short_target(config.get("algo._target_")), dataset=short_target(config.get("dataset._target_")),
        split=config.get("dataset.split") if isinstance(config.get("dataset.split"), str) else None, metric=metric,
        state="damaged: " + "; ".join(problems) if problems else state, problems=problems, iterations=iterations,
        planned_iterations=planned, wall_seconds=events.wall_seconds, tasks_per_second=rate, tasks_per_second_logged=rate_logged,
        train=series(scalars, f"train/{metric}"), validation=read_validation(scalars, metric), test=test,
    )


def name_runs(runs: list[Run]) -> None:
    """Name each run by its path below the folder that holds them all (``inner_steps=1`` in a sweep)."""
    if not runs:
        return
    base = Path(os.path.commonpath([r.path.parent for r in runs]))
    for run in runs:
        run.name = str(run.path.relative_to(base))


# -- comparing runs -----------------------------------------------------------------------------------------------


def canonical(value: ConfigValue) -> str:
    """A value as comparable text: ``1``, ``1.0`` and ``true`` stay apart."""
    return json.dumps(value, sort_keys=True)


def differing_keys(configs: Sequence[dict[str, ConfigValue]]) -> list[str]:
    """The config keys whose values differ among the runs that have them, experiment keys only.

    Keys of the machine and of paths (:data:`IGNORED_KEYS`) and those with columns of their own are left
    out, and so is a node's copy of a top-level key (``algo.inner_lr`` of ``inner_lr``,
    ``optimizer.lr`` of ``outer_lr``) where it holds the same values. Top-level keys come first.
    """
    keys = sorted({k for c in configs for k in c} - IGNORED_KEYS - OWN_COLUMNS, key=lambda k: ("." in k, k))
    differ = [k for k in keys if len({canonical(c[k]) for c in configs if k in c}) > 1]

    def mirrored(key: str) -> bool:
        source = "outer_lr" if key == "optimizer.lr" else key.rsplit(".", 1)[-1].removeprefix("train_")
        return ("." in key and source in differ
                and all(canonical(c[key]) == canonical(c.get(source)) for c in configs if key in c))

    return [k for k in differ if not mirrored(k)]


def show_value(value: ConfigValue, key: str = "") -> str:
    """A config value as typed on the command line; a class (``_target_``) by its own name."""
    if key.endswith("_target_") and isinstance(value, str):
        return value.rsplit(".", 1)[-1]
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def labels(runs: list[Run], most: int = 3, width: int = 40) -> list[str]:
    """Short names for plots: what tells these runs apart (``inner_steps=3, seed=1``; a node's key by its last
    part where that is unambiguous), wrapped at ``width`` characters. Where more than ``most`` things tell them
    apart, or none, the runs' own names read better."""
    keys = differing_keys([r.config for r in runs if r.config])
    last = [k.removesuffix("._target_").rsplit(".", 1)[-1] for k in keys]
    short = {k: s if last.count(s) == 1 else k for k, s in zip(keys, last)}
    shown = [{"algo": r.algo, "dataset": r.dataset, "split": r.split} for r in runs]
    spread = [attr for attr in ("algo", "dataset", "split") if len({s[attr] for s in shown}) > 1]
    if not 0 < len(spread) + len(keys) <= most:
        last_parts = [run.path.name for run in runs]
        names = last_parts if len(set(last_parts)) == len(runs) else [run.name for run in runs]
        return [textwrap.fill(name if len(name) <= 2 * width else name[:2 * width - 3] + "...", width) for name in names]
    out = [", ".join([*(f"{attr}={values[attr]}" for attr in spread),
                      *(f"{short[k]}={show_value(run.config[k], k)}" for k in keys if k in run.config)]) for run, values in zip(runs, shown)]
    if len(set(out)) < len(out):
        out = [f"{text} ({run.name})" for text, run in zip(out, runs)]
    return [textwrap.fill(text, width) for text in out]


@dataclass
class Row:
    """A line of the table: one run, or (``--group-seeds``) the runs of one setting that differ only in seed."""

    runs: list[Run]

    @property
    def first(self) -> Run:
        """The row's first run: its algorithm, dataset and metric are the group's."""
        return self.runs[0]

    @property
    def grouped(self) -> bool:
        """Whether the row stands for several seeds."""
        return len(self.runs) > 1

    @property
    def name(self) -> str:
        """The run's name; for a group, the seeds' folders beside one another (``sweep/seed=0, seed=1``)."""
        paths = [Path(r.name) for r in self.runs]
        if len({p.parent for p in paths}) > 1:
            return ", ".join(map(str, paths))
        parent = "" if str(paths[0].parent) == "." else f"{paths[0].parent}/"
        return parent + ", ".join(p.name for p in paths)

    def combine(self, values: list[Estimate | None]) -> Estimate | None:
        """The run's own estimate, or across seeds the mean and standard deviation of their means."""
        if not self.grouped:
            return values[0]
        means = [v.mean for v in values if v is not None]
        if not means:
            return None
        return Estimate(statistics.mean(means), statistics.stdev(means) if len(means) > 1 else math.nan)

    def mean_of(self, values: list[float | None]) -> float | None:
        """The mean of the values present (a run's own value when the row is one run)."""
        present = [v for v in values if v is not None]
        return statistics.mean(present) if present else None

    @property
    def state(self) -> str:
        """The runs' state; for a group whose runs differ, each state with its count."""
        states = [r.state for r in self.runs]
        if len(set(states)) == 1:
            return states[0]
        return ", ".join(f"{s} x{states.count(s)}" for s in dict.fromkeys(states))

    @property
    def test(self) -> Estimate | None:
        """The final meta-test metric."""
        return self.combine([r.test.final for r in self.runs])

    @property
    def best_val(self) -> Estimate | None:
        """The best meta-validation score."""
        return self.combine([None if r.validation.best is None else Estimate(r.validation.best, math.nan) for r in self.runs])

    @property
    def test_by_inner_step(self) -> dict[int, Estimate | None]:
        """The meta-test metric after each inner step, by step: for a group, the steps every tested run scored (seeds
        run with different ``score_every`` share only some), so that each mean is over the same seeds as the final one."""
        tested = [set(r.test.by_inner_step) for r in self.runs if r.test.by_inner_step]
        steps = sorted(set.intersection(*tested)) if tested else []
        return {k: self.combine([r.test.by_inner_step.get(k) for r in self.runs]) for k in steps}


def make_rows(runs: list[Run], keys: list[str], group_seeds: bool) -> list[Row]:
    """One row per run, or with ``group_seeds`` one per setting whose runs differ only in ``seed`` (damaged runs alone)."""
    if not group_seeds or "seed" not in keys:
        return [Row([run]) for run in runs]
    groups: dict[tuple[str, ...], Row] = {}
    rows: list[Row] = []
    for run in runs:
        if run.damaged:
            rows.append(Row([run]))
            continue
        setting = (run.algo, run.dataset, str(run.split), str(run.test.episodes),
                   *(canonical(run.config.get(k)) for k in keys if k != "seed"))
        if setting in groups:
            groups[setting].runs.append(run)
        else:
            groups[setting] = Row([run])
            rows.append(groups[setting])
    return rows


# -- the table ----------------------------------------------------------------------------------------------------


def metric_text(value: float | None, metric: str | None) -> str:
    """Accuracy as a percentage with 2 decimals, MSE with 4."""
    if value is None or math.isnan(value):
        return "-"
    return f"{100 * value:.2f}" if metric == "accuracy" else f"{value:.4f}"


def estimate_text(estimate: Estimate | None, metric: str | None) -> str:
    """``97.22 +- 0.26``; the mean alone where there is no spread."""
    if estimate is None:
        return "-"
    if math.isnan(estimate.spread):
        return metric_text(estimate.mean, metric)
    return f"{metric_text(estimate.mean, metric)} +- {metric_text(estimate.spread, metric)}"


def wall_time_text(seconds: float | None) -> str:
    """``1 h 05 min`` from an hour on, ``12.3 min`` below, ``40 s`` under a minute."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return duration(seconds) if seconds >= 3600 else f"{seconds / 60:.1f} min"


def episodes_text(episodes: TestEpisodes | None, metric: str | None) -> str:
    """``1,000 tasks, 5w1s 15q (maml-eval)``, ``..., non-transductive (maml-eval)``: what the test metric was computed on."""
    if episodes is None:
        return "-"
    shape = f"{episodes.shot}s {episodes.query}q" if metric == "mse" else f"{episodes.way}w{episodes.shot}s {episodes.query}q"
    tasks = f"{episodes.tasks:,} tasks" if isinstance(episodes.tasks, int) else "? tasks"
    mode = "" if episodes.transductive else "non-transductive"
    return ", ".join(filter(None, [tasks, shape, mode])) + (" (maml-eval)" if episodes.eval_file else "")


def table_header(keys: list[str], metrics: set[str | None], by_step: bool, grouped: bool) -> list[str]:
    """The column titles of the Markdown and LaTeX tables."""
    spread = "sd over seeds (n > 1) or 95% CI" if grouped else "95% CI"
    what = {"accuracy": "accuracy (%)", "mse": "MSE"}.get(next(iter(metrics)), "") if len(metrics) == 1 else ""
    return ["run", *(["n"] if grouped else []), "algo", "dataset", "split", *keys, "state", "iterations run", "wall time",
            "tasks/s", f"best val {what}".rstrip(), f"test {what} +- {spread}".replace("  ", " "), "test episodes",
            *(["test by inner step"] if by_step else [])]


def row_cells(row: Row, keys: list[str], by_step: bool, grouped: bool) -> list[str]:
    """A row as the Markdown and LaTeX tables show it."""
    run, metric = row.first, row.first.metric
    iterations = sorted({r.iterations for r in row.runs if r.iterations is not None})
    best = row.best_val
    best_text = metric_text(best.mean, metric) if best is not None else "-"
    if best is not None and not row.grouped and run.validation.best_iteration is not None:
        best_text += f" @ {run.validation.best_iteration:,}"
    elif best is not None and row.grouped and not math.isnan(best.spread):
        best_text += f" +- {metric_text(best.spread, metric)}"
    rate = row.mean_of([r.tasks_per_second for r in row.runs])
    estimated = "" if all(r.tasks_per_second_logged for r in row.runs) else "*"
    cells = [
        row.name, *([str(len(row.runs))] if grouped else []),
        run.algo, run.dataset, run.split or "-",
        *(",".join(dict.fromkeys(show_value(r.config[k], k) for r in row.runs if k in r.config)) or "-" for k in keys),
        row.state, "-" if not iterations else "-".join(dict.fromkeys(f"{i:,}" for i in (iterations[0], iterations[-1]))),
        wall_time_text(row.mean_of([r.wall_seconds for r in row.runs])),
        "-" if rate is None else f"{rate:.1f}{estimated}",
        best_text, estimate_text(row.test, metric), episodes_text(run.test.episodes, metric),
    ]
    if by_step:
        cells.append(inner_steps_text(row.test_by_inner_step, metric))
    return cells


def inner_steps_text(steps: dict[int, Estimate | None], metric: str | None, most: int = 6) -> str:
    """The means after each scored inner step: plain when the steps are 0, 1, 2, ...; otherwise each with its step,
    and a long series as its first steps and its last."""
    if len(steps) < 2:
        return "-"
    texts = {k: metric_text(e.mean if e else None, metric) for k, e in steps.items()}
    if len(texts) <= most and list(texts) == list(range(len(texts))):
        return ", ".join(texts.values())
    shown = [f"{k}: {text}" for k, text in texts.items()]
    return ", ".join(shown if len(shown) <= most else [*shown[:most - 2], "...", shown[-1]])


def legend(rows: list[Row], eval_pattern: str | None) -> str:
    """A line under the Markdown table saying what its numbers are."""
    grouped = any(r.grouped for r in rows)
    parts = ["accuracy in %, MSE as is",
             "+-: " + ("with n > 1 the standard deviation of the seeds' means, with n = 1 the 95% CI over the test tasks"
                       if grouped else "95% CI over the test tasks"),
             "best val: best meta-validation score" + ("" if grouped else " @ its iteration"),
             "wall time: the event files' spans, pauses between sessions not counted",
             "tasks/s: median of the logged meta-training rates"]
    if any(r.tasks_per_second is not None and not r.tasks_per_second_logged for row in rows for r in row.runs):
        parts.append("*: estimated as iterations x meta_batch_size / wall time (the run logged no rate)")
    parts.append(f"test: the newest maml-eval file matching '{eval_pattern}'" if eval_pattern else "test: the run's own final meta-test")
    return "; ".join(parts) + "."


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A Markdown table, numbers right-aligned."""
    numeric = {"n", "iterations run", "wall time", "tasks/s"}
    align = ["---:" if title in numeric or title.startswith(("best val", "test ")) and title != "test episodes" else "---" for title in header]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "|".join(align) + "|", *(line(cells) for cells in body)])


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                 "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped, and ``+-`` as ``$\\pm$``."""
    return "".join(LATEX_SPECIAL.get(c, c) for c in text).replace("+-", r"$\pm$")


def latex_table(header: list[str], body: list[list[str]]) -> str:
    """A ``tabular`` of the cells (no package needed beyond LaTeX itself)."""
    lines = [r"\begin{tabular}{" + "l" * len(header) + "}", r"\hline",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\hline"]
    lines += [" & ".join(latex_escape(c) for c in cells) + r" \\" for cells in body]
    return "\n".join([*lines, r"\hline", r"\end{tabular}"])


def estimate_record(estimate: Estimate | None, spread: str) -> dict[str, float | None]:
    """``{"mean": ..., "ci95" or "sd": ...}`` with None for what is missing (JSON has no NaN)."""
    if estimate is None:
        return {"mean": None, spread: None}
    return {"mean": estimate.mean, spread: None if math.isnan(estimate.spread) else estimate.spread}


def row_record(row: Row, keys: list[str]) -> dict[str, object]:
    """A row as raw numbers (fractions, seconds) for CSV and JSON."""
    run = row.first
    spread = "sd" if row.grouped else "ci95"
    record: dict[str, object] = {
        "run": row.name,
        "paths": [str(r.path) for r in row.runs], "n": len(row.runs),
        "algo": run.algo, "dataset": run.dataset, "split": run.split,
        "config": {k: ([r.config.get(k) for r in row.runs] if k == "seed" and row.grouped else run.config.get(k)) for k in keys},
        "state": row.state, "problems": [p for r in row.runs for p in r.problems], "metric": run.metric,
        "iterations": [r.iterations for r in row.runs] if row.grouped else run.iterations,
        "planned_iterations": run.planned_iterations,
        "wall_seconds": row.mean_of([r.wall_seconds for r in row.runs]),
        "tasks_per_second": row.mean_of([r.tasks_per_second for r in row.runs]),
        "tasks_per_second_logged": all(r.tasks_per_second_logged for r in row.runs),
        "best_val": {**estimate_record(row.best_val, spread), "iteration": None if row.grouped else run.validation.best_iteration},
        "test": estimate_record(row.test, spread),
        "test_by_inner_step": [{"inner_steps": k, **estimate_record(e, spread)} for k, e in row.test_by_inner_step.items()],
        "test_on": None if run.test.episodes is None else vars(run.test.episodes),
    }
    if not row.grouped:
        record["test_by_presentation"] = [{"presentation": k + 1, **estimate_record(e, spread)} for k, e in enumerate(run.test.by_presentation)]
    return record


def csv_text(records: list[dict[str, object]]) -> str:
    """Nested fields become columns (``test.mean``, ``test_by_inner_step.2.ci95``: after 2 inner steps, whichever steps
    were scored), lists are joined with ``;``."""

    def flat(value: object, prefix: str) -> dict[str, object]:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}{item.get('inner_steps', i)}.").items()}
        if isinstance(value, list):
            value = ";".join("" if v is None else str(v) for v in value)
        return {prefix[:-1]: value}

    flats = [flat(r, "") for r in records]
    columns = list(dict.fromkeys(c for f in flats for c in f))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flats)
    return out.getvalue()


def render(rows: list[Row], keys: list[str], fmt: str, eval_pattern: str | None = None) -> str:
    """The table of ``rows`` as ``markdown`` (with a legend line), ``csv``, ``json`` or ``latex``."""
    if fmt in ("csv", "json"):
        records = [row_record(row, keys) for row in rows]
        return csv_text(records) if fmt == "csv" else json.dumps(strict_json({"differing_keys": keys, "runs": records}), indent=2, allow_nan=False)
    grouped = any(row.grouped for row in rows)
    by_step = any(len(r.test.by_inner_step) > 1 for row in rows for r in row.runs)
    header = table_header(keys, {r.first.metric for r in rows if r.first.metric}, by_step, grouped)
    body = [row_cells(row, keys, by_step, grouped) for row in rows]
    if fmt == "latex":
        return latex_table(header, body)
    return markdown_table(header, body) + "\n\n" + legend(rows, eval_pattern)


# -- one run's curves ---------------------------------------------------------------------------------------------


def curves_text(run: Run, every: int = 1) -> str:
    """One run's curves as Markdown: meta-train and meta-validation by iteration (every ``every``-th
    validation, and the last), meta-validation by presentation, and the meta-test by inner step and by presentation."""
    metric = run.metric or "metric"
    shape = f"{show_value(run.config.get('way'))}-way {show_value(run.config.get('shot'))}-shot, query {show_value(run.config.get('query'))}"
    planned = f"{run.planned_iterations:,}" if run.planned_iterations is not None else "?"
    scoring = "" if scores_transductively(run.config) else " (non-transductive)"
    lines = [f"run: `{run.path}`; {run.algo} on {run.dataset}, split: {run.split or 'n/a'}; {shape}, iterations {planned}; {run.state}", "",
             f"| iteration | meta-train {metric} (batch) | meta-val {metric}{scoring} | 95% CI |", "|---:|---:|---:|---:|"]
    curve = run.validation.curve
    steps = list(curve)
    for i, step in enumerate(steps):
        if i % every == 0 or step == steps[-1]:
            point = curve[step]
            lines.append(f"| {step:,} | {metric_text(run.train.get(step), metric)} | {metric_text(point.mean, metric)} | "
                         f"{metric_text(point.spread, metric)} |")
    if not steps and run.train:
        last = max(run.train)
        lines.append(f"| {last:,} | {metric_text(run.train[last], metric)} | (no validation yet) | |")
    if run.validation.by_presentation:
        lines += ["", f"meta-val {metric} by presentation index at iteration {steps[-1]:,}: "
                  + ", ".join(f"{k}: {metric_text(v, metric)}" for k, v in run.validation.by_presentation.items())]
    test = run.test
    if test.by_inner_step:
        source = f" ({test.episodes.eval_file})" if test.episodes and test.episodes.eval_file else ""
        if test.episodes and not test.episodes.transductive:
            source += ", non-transductive"
        lines += ["", f"| inner steps at test | meta-test {metric}{source} | 95% CI |", "|---:|---:|---:|"]
        lines += [f"| {k} | {metric_text(e.mean, metric)} | {metric_text(e.spread, metric)} |" for k, e in test.by_inner_step.items()]
    else:
        lines += ["", "(no meta-test yet: the run has not finished)"]
    if test.by_presentation:
        lines += ["", f"| presentation index | meta-test {metric} | 95% CI |", "|---:|---:|---:|"]
        lines += [f"| {k + 1} | {metric_text(e.mean, metric)} | {metric_text(e.spread, metric)} |" for k, e in enumerate(run.test.by_presentation)]
    lines += ["", f"wall time (the event files' spans, pauses between sessions not counted): {wall_time_text(run.wall_seconds)}"]
    return "\n".join(lines)


# -- plots --------------------------------------------------------------------------------------------------------


def metric_axis(metric: str | None) -> tuple[float, str]:
    """The factor and the axis title of a metric: accuracy in percent."""
    return (100.0, "accuracy (%)") if metric == "accuracy" else (1.0, "MSE" if metric == "mse" else "metric")


def write_plots(runs: list[Run], folder: Path) -> list[Path]:
    """Write PNG figures of ``runs`` to ``folder`` and return their paths.

    ``validation.png``: every run's meta-validation curve with its 95% CI band; ``test_by_inner_step.png``
    (when a run has more than one inner step): the meta-test after each scored inner step; ``by_presentation.png``
    (when a run has presentation scalars): accuracy by presentation index for the LSTM's sequence protocol.
    In each figure the runs are labelled by the config keys that tell its runs apart.
    """
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: files only, whatever backend the user has
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    colours = {id(r): f"C{i % 10}" for i, r in enumerate(runs)}
    written = []

    def save(figure: Figure, name: str) -> None:
        FigureCanvasAgg(figure)
        figure.tight_layout()
        path = folder / name
        figure.savefig(path, dpi=100)
        written.append(path)

    def panels(title: str, chosen: list[Run]) -> tuple[Figure, dict[str | None, Axes], dict[int, str]]:
        metrics = list(dict.fromkeys(r.metric for r in chosen))
        figure = Figure(figsize=(6 * len(metrics), 4))
        axes = {m: figure.add_subplot(1, len(metrics), i + 1) for i, m in enumerate(metrics)}
        for metric, ax in axes.items():
            ax.set_title(title + (f" ({metric})" if len(metrics) > 1 else ""))
            ax.grid(alpha=0.3)
        return figure, axes, dict(zip((id(r) for r in chosen), labels(chosen)))

    chosen = [r for r in runs if r.validation.curve]
    if chosen:
        figure, axes, names = panels("Meta-validation (95% CI)", chosen)
        for run in chosen:
            ax, (scale, title) = axes[run.metric], metric_axis(run.metric)
            steps, points = list(run.validation.curve), list(run.validation.curve.values())
            means = [p.mean * scale for p in points]
            cis = [0.0 if math.isnan(p.spread) else p.spread * scale for p in points]
            ax.plot(steps, means, marker="o" if len(steps) < 20 else None, markersize=3, color=colours[id(run)], label=names[id(run)])
            ax.fill_between(steps, [m - c for m, c in zip(means, cis)], [m + c for m, c in zip(means, cis)], color=colours[id(run)], alpha=0.2)
            ax.set_xlabel("iteration")
            ax.set_ylabel(f"meta-validation {title}")
            ax.xaxis.get_major_locator().set_params(integer=True)
        for ax in axes.values():
            ax.legend(fontsize="small" if len(chosen) <= 4 else "x-small")
        save(figure, "validation.png")

    def series_figure(chosen: list[Run], values_of: Callable[[TestResult], dict[int, Estimate]], title: str, xlabel: str,
                      name: str) -> None:
        figure, axes, names = panels(title, chosen)
        for run in chosen:
            ax, (scale, ytitle) = axes[run.metric], metric_axis(run.metric)
            points = values_of(run.test)
            values = list(points.values())
            ax.errorbar(list(points), [e.mean * scale for e in values],
                        yerr=[0.0 if math.isnan(e.spread) else e.spread * scale for e in values],
                        marker="o", markersize=4, capsize=3, color=colours[id(run)], label=names[id(run)])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"meta-test {ytitle}")
            ax.xaxis.get_major_locator().set_params(integer=True)
        for ax in axes.values():
            ax.legend(fontsize="small" if len(chosen) <= 4 else "x-small")
        save(figure, name)

    stepped = [r for r in runs if len(r.test.by_inner_step) > 1]
    if stepped:
        series_figure(stepped, lambda test: test.by_inner_step, "Meta-test by inner step (95% CI)", "inner steps at test",
                      "test_by_inner_step.png")
    presented = [r for r in runs if r.test.by_presentation]
    if presented:
        series_figure(presented, lambda test: dict(enumerate(test.by_presentation, start=1)), "Accuracy by presentation (95% CI)",
                      "presentation of the class", "by_presentation.png")
    return written


# -- the command --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; argparse reports a misused option and exits 2."""
    parser = argparse.ArgumentParser(
        prog="maml-results", description="Runs side by side, read from their config.yaml, event files and maml-eval files.",
        epilog="Examples: maml-results outputs/ | maml-results outputs/multirun/<sweep> --group-seeds --plots figures/ | "
               "maml-results --curves outputs/runs/<run> --every 5")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="a run, a sweep folder, or any folder holding runs (e.g. outputs/)")
    parser.add_argument("--format", choices=FORMATS, default="markdown", help="table format (default: markdown)")
    parser.add_argument("--group-seeds", action="store_true", help="one row per setting whose runs differ only in seed: mean and sd over seeds")
    parser.add_argument("--eval", metavar="GLOB", dest="eval_pattern",
                        help="test metric from each run's newest maml-eval file whose name matches GLOB (e.g. 'eval_best_test_*')")
    parser.add_argument("--plots", metavar="DIR", type=Path, help="write PNG figures to DIR")
    parser.add_argument("--keys", metavar="KEY,...", type=lambda text: [k for k in text.split(",") if k],
                        help="the config keys to show as columns (default: every key whose value differs between the runs)")
    parser.add_argument("--curves", action="store_true", help="print each run's curves (validation, test by inner step) instead of the table")
    parser.add_argument("--every", type=int, default=1, metavar="N", help="with --curves: every N-th validation point (and the last)")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error(f"--every must be 1 or more (got {args.every})")
    return args


def fail(message: str) -> SystemExit:
    """Print ``message`` as the command's one-line error and return the exit (status 2) to raise."""
    print(f"maml-results: error: {message}", file=sys.stderr)
    return SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """Console script ``maml-results``: print the table (or ``--curves``), and write ``--plots``."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run_dirs = find_runs(args.paths)
    except FileNotFoundError as err:
        raise fail(f"{err}; give a run directory, a sweep folder or outputs/") from None
    if not run_dirs:
        raise fail(f"no runs under {' '.join(map(str, args.paths))} (a run is a folder with config.yaml and TensorBoard event files)")
    if args.plots is not None and args.plots.exists() and not args.plots.is_dir():
        raise fail(f"--plots {args.plots} is a file; give a folder to write the figures to")
    runs = [read_run(d, args.eval_pattern) for d in run_dirs]
    name_runs(runs)
    keys = differing_keys([r.config for r in runs if r.config])
    shown = keys if args.keys is None else args.keys
    unknown = [k for k in shown if not any(k in r.config for r in runs)]
    if unknown:
        raise fail(f"--keys: no run has {', '.join(unknown)}; the keys that differ between these runs: {', '.join(keys) or 'none'}")
    if args.curves:
        text = "\n\n".join(curves_text(run, args.every) for run in runs)
    else:
        text = render(make_rows(runs, keys, args.group_seeds), shown, args.format, args.eval_pattern)
    written = write_plots(runs, args.plots) if args.plots is not None else []
    try:
        print(text)
        for path in written:  # on stderr beside a CSV or JSON table, which stays parseable
            print(f"written: {path}", file=sys.stderr if args.format in ("csv", "json") and not args.curves else sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # maml-results outputs/ | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
