"""The meta-training loop and the evaluation loop shared by every algorithm."""
from __future__ import annotations

import copy
import functools
import logging
import math
import re
import signal
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

from maml_cli.algorithms.base import Algorithm, Forward, Metrics, Params, evaluate_one_query_at_a_time
from maml_cli.checkpoint import load_checkpoint, save_checkpoint
from maml_cli.distributed import SINGLE, Ranks
from maml_cli.errors import UserError
from maml_cli.tasks import Episode, EpisodeBatch, EpisodeSampler, Objective, TaskKind

log = logging.getLogger(__name__)
# A line every log_every iterations: always in train.log; on the console only without the progress bar, which shows the same.
progress_log = logging.getLogger("maml_cli.progress")


def has_tied_tensors(model: nn.Module) -> bool:
    """Whether one tensor is a parameter or buffer of ``model`` under two names (tied weights)."""
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)] + [t for _, t in model.named_buffers(remove_duplicate=False)]
    return len({id(t) for t in tensors}) < len(tensors)


def functional_forward(model: nn.Module) -> Forward:
    """``forward(params, *inputs)``: the model evaluated with ``params`` instead of its own parameters."""
    # functional_call looks for tied tensors by walking every parameter and buffer of the model on each call,
    # which costs more than a head-only forward (ANIL's inner steps) computes; the answer does not change, so ask once.
    tie_weights = has_tied_tensors(model)

    def forward(params: Params, *inputs: Tensor | tuple[Tensor, Tensor]) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        return functional_call(model, params, inputs, tie_weights=tie_weights)

    return forward


def duration(seconds: float) -> str:
    """``3 h 05 min``, ``12 min``, ``40 s``: a time to go, as a person reads it."""
    minutes = int(seconds // 60)
    if minutes >= 60:
        return f"{minutes // 60} h {minutes % 60:02d} min"
    return f"{minutes} min" if minutes else f"{int(seconds)} s"


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% confidence interval (1.96 standard errors)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n)


def ci_text(ci: float) -> str:
    """A 95% CI half-width for a log line or a table: "n/a" where there is none (one task has no spread)."""
    return "n/a" if math.isnan(ci) else f"{ci:.4f}"


def strict_json(value: object) -> object:
    """``value`` with NaN and infinities (the CI of a single task, a diverged MSE) as ``None``: JSON has no such
    numbers, and strict readers (``jq``, JavaScript, ``json.loads`` with ``parse_constant``) refuse Python's ``NaN``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


# Episodes per call when evaluating an algorithm that computes any number at once: 1,000 test episodes
# become 20 calls, while a chunk's activations stay small.
EVAL_EPISODES_PER_CALL = 50


def batches_of(episodes: list[Episode], per_call: int | None) -> list[EpisodeBatch]:
    """The episodes as stacks of ``per_call`` (all of them when ``None``), in order."""
    size = per_call or len(episodes)
    return [EpisodeBatch.stack(episodes[i:i + size]) for i in range(0, len(episodes), size)]


def evaluate(algorithm: Algorithm, model: nn.Module, sampler: EpisodeSampler, kind: TaskKind, n_tasks: int, seed: int,
             device: torch.device, progress: bool = False, description: str = "evaluate",
             ranks: Ranks = SINGLE, score_every: Optional[int] = 1, transductive: bool = True) -> dict[int, dict[str, tuple[float, float]]]:
    """Score the meta-parameters on ``n_tasks`` episodes drawn from a generator seeded with ``seed``.

    The episodes depend only on ``seed`` and the sampler, so every run and every
    algorithm is scored on the same tasks. They go to the algorithm in stacks of
    ``algorithm.episodes_per_call`` (:data:`EVAL_EPISODES_PER_CALL` when it takes any number).

    Args:
        progress: show a progress bar over the episodes.
        ranks: with several ranks, each draws every episode (the draws stay the same) and computes the stacks
            it owns; the scores are gathered in episode order, so the result is the single process's.
        score_every: for an algorithm with an inner loop, score the query set after every ``score_every``-th inner
            step and after the last (:func:`~maml_cli.algorithms.base.scored_steps`); ``None``: after the last only.
        transductive: the queries of an episode are predicted together (``algorithm.evaluate``; with batch statistics
            they are normalised together, as in training); False: each query in one batch with the support set alone
            (:func:`~maml_cli.algorithms.base.evaluate_one_query_at_a_time`), on the same episodes.

    Returns:
        By the number of inner steps taken before scoring, in increasing order (0, 1, ..., ``test_inner_steps``
        for MAML with ``score_every=1``; ``{0: ...}`` for ProtoNet and the LSTM): each metric (``kind.metric``,
        ``loss``, and any the algorithm adds) as ``(mean, ci95)`` over the tasks. :func:`after_last_step` picks the
        final one.
    """
    generator = torch.Generator().manual_seed(seed)
    forward = functional_forward(model)
    params = dict(model.named_parameters())
    per_call = algorithm.episodes_per_call or EVAL_EPISODES_PER_CALL
    scores = algorithm.evaluate if transductive else functools.partial(evaluate_one_query_at_a_time, algorithm)
    # Each stack's scores: by scored adaptation step, metric name -> per-episode values.
    scored: dict[int, dict[int, dict[str, list[float]]]] = {}
    with tqdm(total=n_tasks, disable=not progress, dynamic_ncols=True, desc=description, unit="task") as bar:
        for index, start in enumerate(range(0, n_tasks, per_call)):
            episodes = [sampler.sample(generator) for _ in range(min(per_call, n_tasks - start))]
            if ranks.owns(index):
                batch = EpisodeBatch.stack([episode.to(device) for episode in episodes])
                scored[index] = {step: {name: values.tolist() for name, values in metrics.items()}
                                 for step, metrics in scores(forward, params, batch, kind.objective, score_every).items()}
            bar.update(len(episodes))
    if ranks.several:
        scored = {index: stack for part in ranks.gather(scored) for index, stack in part.items()}
    per_step: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for index in sorted(scored):
        for step, metrics in scored[index].items():
            for name, values in metrics.items():
                per_step[step][name].extend(values)
    return {step: {name: mean_ci95(values) for name, values in per_step[step].items()} for step in sorted(per_step)}


def after_last_step(results: dict[int, dict[str, tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    """The scores of :func:`evaluate` after the last inner step: the final result of an evaluation."""
    return results[max(results)]


class TaskThreads:
    """Runs the tasks of a meta-batch concurrently, one call of the algorithm (one task for the optimization family) per thread.

    The tasks of a meta-batch are independent until their meta-gradients are summed.
    Whether running them side by side, each on a share of the cores, beats running them one
    after another on all of them depends on the work: on a 2-core CPU two at a time made
    second-order MAML 1.06-1.12x faster at 2.4x the peak memory, and first-order MAML and
    the LSTM slower (docs/performance.md, from ``scripts/bench.py``). Each thread runs the model through
    its own structural copy (``functional_call`` swaps parameters into a module, so
    threads must not share one) with the meta-parameters passed in, and returns the
    task's gradient; the caller sums them in task order, so the result does not depend
    on which thread finished first (it equals one-at-a-time to rounding: a thread's
    reductions split differently over fewer cores).

    Args:
        model: the network; each thread copies it once.
        tasks_at_once: threads; the cores are shared out evenly between them.
    """

    def __init__(self, model: nn.Module, tasks_at_once: int) -> None:
        self.model = model
        self.tasks_at_once = tasks_at_once
        self.intra_op_threads = max(1, torch.get_num_threads() // tasks_at_once)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(tasks_at_once, thread_name_prefix="maml-task", initializer=self._start_thread)

    def _start_thread(self) -> None:
        # This thread's share of the cores (OpenMP's thread count is per thread; the calling thread keeps its own).
        torch.set_num_threads(self.intra_op_threads)

    def _forward(self) -> Forward:
        if getattr(self._local, "forward", None) is None:
            # New modules, the same tensors: no second copy of the weights (on a GPU it would count).
            shared = {id(t): t for t in (*self.model.parameters(), *self.model.buffers())}
            self._local.forward = functional_forward(copy.deepcopy(self.model, memo=shared))
        return self._local.forward

    def _task(self, algorithm: Algorithm, params: Params, batch: EpisodeBatch, objective: Objective, scale: float) -> tuple[tuple[Tensor | None, ...], Metrics]:
        if algorithm.outer == "gradient":
            direction, metrics = algorithm.meta_gradient(self._forward(), params, batch, objective)
            return tuple(direction[name] * scale if name in direction else None for name in params), metrics
        losses, metrics = algorithm.meta_loss(self._forward(), params, batch, objective)
        learned = [name for name, p in params.items() if p.requires_grad]  # MAML++'s rates with lslr=false are not
        grads = dict(zip(learned, torch.autograd.grad(losses.sum() * scale, [params[n] for n in learned], allow_unused=True)))
        return tuple(grads.get(name) for name in params), metrics

    def map(self, algorithm: Algorithm, params: Params, batches: list[EpisodeBatch], objective: Objective, scale: float) -> Iterator[tuple[tuple[Tensor | None, ...], Metrics]]:
        """Yield ``(gradients, metrics)`` of each batch's summed meta-loss times ``scale``, in batch order."""
        futures = [self._pool.submit(self._task, algorithm, params, batch, objective, scale) for batch in batches]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:  # interrupted: tasks not yet started are dropped, not run at exit
                future.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def accumulate_meta_gradient(algorithm: Algorithm, model: nn.Module, episodes: list[Episode], objective: Objective,
                             threads: TaskThreads | None = None, mean_over: int | None = None) -> dict[str, float]:
    """Add the meta-gradient of the mean meta-loss over ``episodes`` to the ``.grad`` of ``model``'s parameters.

    This is all of a meta-training step but the optimizer's: the trainer and
    ``scripts/bench.py`` both call it, so the benchmark times the code that trains.
    The episodes go to the algorithm in stacks of ``algorithm.episodes_per_call``
    (all at once when it takes any number). An algorithm that supplies its outer direction itself
    (``outer == "gradient"``, Reptile) has it averaged the same way, in place of a gradient.

    Args:
        threads: run several stacks at once (see :class:`TaskThreads`); ``None``: one after another.
        mean_over: the number of tasks the mean is over (a rank's ``episodes`` are its share of a meta-batch of
            this many); ``None``: ``len(episodes)``.

    Returns:
        Each metric of ``algorithm.meta_loss`` summed over the episodes and divided by ``mean_over``.
    """
    params = dict(model.named_parameters())
    count = mean_over or len(episodes)
    batches = batches_of(episodes, algorithm.episodes_per_call)
    # Kept as tensors and summed once at the end: a float() per task would make a GPU wait for every task.
    collected: dict[str, list[Tensor]] = defaultdict(list)

    def add_metrics(metrics: Metrics) -> None:
        for name, values in metrics.items():
            collected[name].append(values)

    if threads is None:
        forward = functional_forward(model)
        for batch in batches:
            if algorithm.outer == "gradient":
                direction, metrics = algorithm.meta_gradient(forward, params, batch, objective)
                names = [name for name in params if name in direction]
                add_to_grads([params[n] for n in names], torch._foreach_div([direction[n] for n in names], count))
            else:
                losses, metrics = algorithm.meta_loss(forward, params, batch, objective)
                # Backward per call frees its graph at once: memory stays that of one call's episodes.
                (losses.sum() / count).backward()
            add_metrics(metrics)
    else:
        summed: list[Tensor | None] = [None] * len(params)
        for grads, metrics in threads.map(algorithm, params, batches, objective, 1 / count):
            summed = [s if g is None else g if s is None else s + g for s, g in zip(summed, grads)]
            add_metrics(metrics)
        present = [(p, g) for p, g in zip(params.values(), summed) if g is not None]
        add_to_grads([p for p, _ in present], [g for _, g in present])
    totals = {name: (torch.cat(values) if len(values) > 1 else values[0]).sum() for name, values in collected.items()}
    return {name: float(total) / count for name, total in totals.items()}


def add_to_grads(params: list[nn.Parameter], grads: list[Tensor]) -> None:
    """``p.grad += g`` for each pair (``p.grad = g`` where it has none), the additions in one multi-tensor operation."""
    accumulated = [i for i, p in enumerate(params) if p.grad is not None]
    if accumulated:
        torch._foreach_add_([params[i].grad for i in accumulated], [grads[i] for i in accumulated])
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g


# Metrics of the k-th instance of a class (``accuracy_instance_03``), reported as a series over k.
PRESENTATION_METRIC = re.compile(r"(.+)_instance_(\d+)")


def by_presentation(metrics: dict[str, Any]) -> dict[str, dict[int, Any]]:
    """``{"accuracy_instance_03": v}`` -> ``{"accuracy": {3: v}}``: metrics reported per presentation index."""
    series: dict[str, dict[int, Any]] = defaultdict(dict)
    for name, value in metrics.items():
        match = PRESENTATION_METRIC.fullmatch(name)
        if match:
            series[match.group(1)][int(match.group(2))] = value
    return dict(series)


class NonFiniteLoss(UserError):
    pass


class StopRequested:
    """SIGINT/SIGTERM ask the loop to stop after the current iteration; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequested":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing the current iteration, then saving last.pt (Ctrl-C again to quit at once)", self.signal_name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __bool__(self) -> bool:
        return self.signal_name is not None


@dataclass
class TrainState:
    """What a checkpoint restores besides the model and optimizer."""

    iteration: int = 0
    best_metric: float | None = None
    best_iteration: int = 0


@dataclass
class MetaTrainer:
    """Runs meta-training for any algorithm with ``meta_loss`` and ``evaluate``.

    Writes TensorBoard scalars, ``last.pt`` and ``best.pt`` under ``run_dir``.
    """

    algorithm: Algorithm
    model: nn.Module
    kind: TaskKind
    optimizer: torch.optim.Optimizer
    train_sampler: EpisodeSampler
    val_sampler: EpisodeSampler
    test_sampler: EpisodeSampler
    generator: torch.Generator
    writer: Any
    run_dir: Path
    device: torch.device
    iterations: int
    meta_batch_size: int
    log_every: int
    val_every: int
    val_tasks: int
    test_tasks: int
    checkpoint_every: int
    eval_seed: int
    config: dict[str, Any]
    scheduler: Any = None
    grad_clip: float | None = None
    patience: int | None = None
    score_every: int = 1  # the final meta-test scores the query set after every score_every-th inner step and the last
    # False: validation and the meta-test predict each query in one batch with its support set alone (evaluate's transductive).
    transductive: bool = True
    threads: TaskThreads | None = None
    progress: bool = True
    resume_hint: str = ""
    ranks: Ranks = SINGLE  # with several, this rank computes its share of each meta-batch; rank 0 alone writes files
    state: TrainState = field(default_factory=TrainState)
    # What the final meta-test scores: the weights at the end (last.pt), or best.pt after early stopping.
    tested_checkpoint: str = "last.pt"
    last_validation: float | None = None  # the latest meta-validation score (what a sweeper optimises)
    # The classes of each split, counted and hashed (maml_cli.data.base.class_split_record): a resume checks them.
    class_split: dict[str, dict[str, int | str]] | None = None

    # -- checkpoints -------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "iteration": self.state.iteration,
            "best_metric": self.state.best_metric,
            "best_iteration": self.state.best_iteration,
            "metric": self.kind.metric,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "train_generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": self.config,
            "class_split": self.class_split,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["train_generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.state = TrainState(state["iteration"], state["best_metric"], state["best_iteration"])

    def save(self, name: str) -> Path:
        path = self.run_dir / name
        if self.ranks.main:  # every rank holds the same state
            save_checkpoint(self.checkpoint_state(), path)
        return path

    # -- one meta-training step -------------------------------------------
    def step(self) -> tuple[dict[str, float], float]:
        """One meta-update over ``meta_batch_size`` tasks; returns mean metrics and seconds spent sampling."""
        self.optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        # Every rank draws the whole meta-batch, so the generator stays the same on all of them, and computes its share.
        episodes = [self.train_sampler.sample(self.generator) for _ in range(self.meta_batch_size)]
        episodes = [episode.to(self.device) for episode in self.ranks.share(episodes)]
        data_seconds = time.perf_counter() - start
        algorithm = self.algorithm.at_iteration(self.state.iteration, self.iterations)
        means = accumulate_meta_gradient(algorithm, self.model, episodes, self.kind.objective, self.threads, self.meta_batch_size)
        self.ranks.sum_gradients(self.model)
        means = self.ranks.sum_metrics(means, self.device)
        if not math.isfinite(means["loss"]):
            raise NonFiniteLoss(
                f"the meta-training loss became {means['loss']} at iteration {self.state.iteration + 1}; stopped instead of training on garbage. "
                f"The last good checkpoint is {self._last_good()}. Try a smaller inner_lr or outer_lr."
            )
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return means, data_seconds

    def _last_good(self) -> str:
        path = self.run_dir / "last.pt"
        return str(path) if path.exists() else "none (no checkpoint was written yet)"

    # -- validation and test ----------------------------------------------
    def validate(self) -> tuple[float, float]:
        """Score the model on the meta-validation episodes, log it, keep ``best.pt``; returns the metric and its 95% CI."""
        # Only the last inner step is logged and compared, so only it is scored.
        results = after_last_step(evaluate(self.algorithm, self.model, self.val_sampler, self.kind, self.val_tasks, self.eval_seed,
                                           self.device, ranks=self.ranks, score_every=None, transductive=self.transductive))
        step = self.state.iteration
        for name, (value, ci) in results.items():
            self.writer.add_scalar(f"val/{name}", value, step)
            if name == self.kind.metric:
                self.writer.add_scalar(f"val/{name}_ci95", ci, step)
        value = results[self.kind.metric][0]
        self.last_validation = value
        better = self.state.best_metric is None or (value > self.state.best_metric if self.kind.higher_is_better else value < self.state.best_metric)
        if better:
            self.state.best_metric, self.state.best_iteration = value, step
            self.writer.add_scalar(f"val/best_{self.kind.metric}", value, step)
            self.save("best.pt")
        return value, results[self.kind.metric][1]

    def test(self) -> dict[int, dict[str, tuple[float, float]]]:
        results = evaluate(self.algorithm, self.model, self.test_sampler, self.kind, self.test_tasks, self.eval_seed, self.device,
                           progress=self.progress, description="meta-test", ranks=self.ranks, score_every=self.score_every,
                           transductive=self.transductive)
        metric = self.kind.metric
        for inner_step, step_results in results.items():
            value, ci = step_results[metric]
            self.writer.add_scalar(f"test/{metric}_by_inner_step", value, inner_step)
            self.writer.add_scalar(f"test/{metric}_ci95_by_inner_step", ci, inner_step)
        final = after_last_step(results)
        for name, (value, ci) in final.items():
            if PRESENTATION_METRIC.fullmatch(name):
                continue
            self.writer.add_scalar(f"test/{name}", value, self.state.iteration)
            self.writer.add_scalar(f"test/{name}_ci95", ci, self.state.iteration)
        for name, series in by_presentation(final).items():
            for index, (value, ci) in sorted(series.items()):
                self.writer.add_scalar(f"test/{name}_by_presentation", value, index)
                self.writer.add_scalar(f"test/{name}_ci95_by_presentation", ci, index)
        return results

    def stalled(self) -> bool:
        """True when ``patience`` iterations have passed since the best meta-validation score."""
        return bool(self.patience) and self.state.best_metric is not None and self.state.iteration - self.state.best_iteration >= self.patience

    # -- the loop -----------------------------------------------------------
    def train(self) -> bool:
        """Meta-train until ``iterations``; returns False if stopped early by a signal (``last.pt`` is saved)."""
        bar = tqdm(total=self.iterations, initial=self.state.iteration, disable=not self.progress, dynamic_ncols=True, desc="meta-train")
        window_start, window_tasks = time.perf_counter(), 0
        session_start, session_first = time.perf_counter(), self.state.iteration
        log.info("meta-training starts at iteration %d of %d", self.state.iteration, self.iterations)
        with StopRequested() as stop:
            while self.state.iteration < self.iterations:
                step_start = time.perf_counter()
                means, data_seconds = self.step()
                step_seconds = time.perf_counter() - step_start
                self.state.iteration += 1
                it = self.state.iteration
                window_tasks += self.meta_batch_size
                if it % self.log_every == 0 or it == self.iterations:
                    elapsed = time.perf_counter() - window_start
                    for name, value in means.items():
                        self.writer.add_scalar(f"train/{name}", value, it)
                    self.writer.add_scalar("train/tasks_per_second", window_tasks / elapsed, it)
                    progress_log.info("iteration %d of %d: %s; %.2f tasks/s", it, self.iterations,
                                      ", ".join(f"{name} {means[name]:.4g}" for name in dict.fromkeys(("loss", self.kind.metric)) if name in means),
                                      window_tasks / elapsed)
                    window_start, window_tasks = time.perf_counter(), 0
                if it % self.val_every == 0 or it == self.iterations:
                    value, ci = self.validate()
                    # A line per validation, so that a log without the progress bar (progress=false, train.log) shows the run's course.
                    per_iteration = (time.perf_counter() - session_start) / (it - session_first)
                    to_go = f", about {duration(per_iteration * (self.iterations - it))} to go" if it < self.iterations else ""
                    log.info("iteration %d of %d: meta-validation %s %.4f +- %s (best %.4f at %d); meta-batch %s %.4g; %.2f s per "
                             "iteration%s", it, self.iterations, self.kind.metric, value, ci_text(ci), self.state.best_metric, self.state.best_iteration,
                             self.kind.metric, means.get(self.kind.metric, float("nan")), per_iteration, to_go)
                    if self.stalled():
                        log.info("meta-validation %s has not improved for %d iterations (best %.4f at iteration %d): stopping early",
                                 self.kind.metric, self.patience, self.state.best_metric, self.state.best_iteration)
                        self.save("last.pt")
                        # Score the model that stopping chose, not the one patience iterations past it.
                        self.model.load_state_dict(load_checkpoint(self.run_dir / "best.pt")["model"])
                        self.tested_checkpoint = "best.pt"
                        log.info("the final meta-test scores best.pt (iteration %d)", self.state.best_iteration)
                        break
                if it % self.checkpoint_every == 0 or it == self.iterations:
                    self.save("last.pt")
                bar.update(1)
                bar.set_postfix({
                    **{name: f"{means[name]:.4g}" for name in dict.fromkeys(("loss", self.kind.metric)) if name in means},
                    "tasks/s": f"{self.meta_batch_size / step_seconds:.1f}",
                    "data": f"{100 * data_seconds / step_seconds:.0f}%",
                }, refresh=False)
                if self.ranks.any(bool(stop), self.device):  # all ranks stop after the same iteration
                    self.save("last.pt")
                    self.writer.flush()
                    bar.close()
                    if self.ranks.main:
                        log.warning("stopped by %s after iteration %d; saved %s. Resume with: %s",
                                    stop.signal_name or "a signal to another rank", it, self.run_dir / "last.pt", self.resume_hint)
                    return False
        bar.close()
        return True
