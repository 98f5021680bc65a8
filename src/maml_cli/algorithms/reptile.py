"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

For each task of a meta-batch: k steps of an ordinary optimizer (Adam with beta1 = 0 in the paper's
Omniglot runs) on mini-batches of the task's data, from the meta-parameters theta to theta'. The outer
update moves theta toward the adapted weights averaged over the meta-batch,
theta <- theta + epsilon * mean(theta' - theta), with epsilon annealed linearly (1 -> 0 in the paper).

theta' - theta is the gradient of no loss the loop could backpropagate, so Reptile supplies its outer
direction itself (``outer = "gradient"``): the loop hands theta - theta' to the outer optimizer as the
gradient, and plain SGD at rate epsilon then takes exactly the step above.

Two choices differ from openai/supervised-reptile and are deliberate: the inner Adam starts from
zero moments on every task (theirs carries Adam's moments from task to task, an artefact of reusing
one TensorFlow optimizer that makes a task's adaptation depend on the tasks before it), and queries are
classified together, with batch statistics over the query set (their "transductive" setting, which is
how every other algorithm here is scored by default; ``transductive=false``, for ``maml-train``'s validation and test
or for ``maml-eval``, scores their non-transductive one, each query with the support set alone).
"""
from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

from maml_cli.algorithms.base import (AlgorithmDefaults, Forward, Metrics, OuterSchedule, Params, Predictor, each_episode_by_step, scored,
                                     scored_steps, stack_metrics, sum_each)
from maml_cli.algorithms.inner import SGD, Adam, InnerOptimizer, inner_step, predictor
from maml_cli.algorithms.registry import InnerLoopConfig, at_least, register_algorithm
from maml_cli.tasks import Episode, EpisodeBatch, Objective


class InnerOptimizerName(str, enum.Enum):
    adam = "adam"
    sgd = "sgd"


@dataclass
class ReptileConfig(InnerLoopConfig):
    _target_: str = "maml_cli.algorithms.reptile.Reptile"
    inner_optimizer: InnerOptimizerName = InnerOptimizerName.adam
    adam_beta1: float = 0.0
    inner_batch: Optional[int] = at_least(1, None)
    test_inner_batch: Optional[int] = at_least(1, None)
    train_shot: Optional[int] = at_least(1, None)
    final_outer_lr: Optional[float] = at_least(0, 0.0)


def minibatch_indices(n: int, batch: Optional[int], steps: int, generator: Optional[torch.Generator] = None) -> list[Optional[Tensor]]:
    """The examples each of ``steps`` inner steps trains on: ``batch`` of the ``n`` at a time, drawn without replacement
    from a shuffled order and reshuffled when it runs out (a batch may span two orders), as in openai/supervised-reptile.
    ``None`` entries mean all ``n`` (``batch`` None or at least ``n``)."""
    if batch is None or batch >= n:
        return [None] * steps
    order: list[int] = []
    chosen = []
    for _ in range(steps):
        if len(order) < batch:
            order += torch.randperm(n, generator=generator).tolist()
        chosen.append(torch.tensor(order[:batch]))
        order = order[batch:]
    return chosen


class Reptile(AlgorithmDefaults):
    """Reptile: move the initialisation toward the weights an optimizer reaches on each task.

    Args:
        inner_lr: the inner optimizer's learning rate (Adam 1e-3 for Omniglot 5-way in the paper).
        inner_steps: inner steps on each meta-training task (5).
        test_inner_steps: inner steps at meta-validation and meta-test (50: more than in training).
        inner_optimizer: ``adam`` (with ``adam_beta1``, 0 in the paper) or ``sgd``.
        adam_beta1: Adam's first-moment decay.
        inner_batch: examples per inner step at meta-training (10); ``None``: the task's whole training set.
        test_inner_batch: the same at evaluation (5 for 5-way, 10 for 20-way); ``None``: the whole support set.
        train_shot: examples per class of a meta-training task (10 in the paper; evaluation uses the run's ``shot``);
            ``None``: the run's ``shot``.
        final_outer_lr: the outer learning rate reached at the last iteration, linearly from the optimizer's
            (``outer_lr``); ``None``: no annealing.

    Example:
        >>> reptile = Reptile(inner_lr=1e-3, inner_steps=5, test_inner_steps=50, inner_batch=10, train_shot=10)
        >>> direction, metrics = reptile.meta_gradient(forward, params, EpisodeBatch.stack([episode]), classification_objective)
    """

    network = "classifier"
    inner_loop = True
    outer = "gradient"
    episodes_per_call = 1

    def __init__(self, inner_lr: float, inner_steps: int, test_inner_steps: int, inner_optimizer: str = "adam", adam_beta1: float = 0.0,
                 inner_batch: Optional[int] = None, test_inner_batch: Optional[int] = None, train_shot: Optional[int] = None,
                 final_outer_lr: Optional[float] = 0.0) -> None:
        self.inner_lr, self.inner_steps, self.test_inner_steps = inner_lr, inner_steps, test_inner_steps
        self.inner_optimizer = InnerOptimizerName(inner_optimizer)
        self.adam_beta1 = adam_beta1
        self.inner_batch, self.test_inner_batch, self.train_shot = inner_batch, test_inner_batch, train_shot
        self.final_outer_lr = final_outer_lr
        self.outer_lr_schedule: Optional[OuterSchedule] = None if final_outer_lr is None else self.linear_outer_lr

    def linear_outer_lr(self, base_lr: float, iteration: int, iterations: int) -> float:
        """epsilon at ``iteration``: from ``base_lr`` at the first iteration linearly to ``final_outer_lr`` (openai/supervised-reptile)."""
        done = iteration / max(iterations, 1)
        return (1 - done) * base_lr + done * self.final_outer_lr

    def episode_shape(self, split: str, way: int, shot: int, query: int) -> tuple[int, int, int]:
        """Meta-training tasks have ``train_shot`` examples per class; the run's query set only reports how the adapted weights do."""
        return (way, self.train_shot or shot, query) if split == "train" else (way, shot, query)

    def rule(self) -> InnerOptimizer:
        return Adam(self.inner_lr, beta1=self.adam_beta1) if self.inner_optimizer is InnerOptimizerName.adam else SGD(self.inner_lr)

    def adaptation(self, forward: Forward, params: Params, x: Tensor, y: Tensor, objective: Objective, steps: int, batch: Optional[int],
                   generator: Optional[torch.Generator] = None) -> Iterator[Params]:
        """The weights after 0, 1, ..., ``steps`` inner steps on mini-batches of ``(x, y)``, detached (no meta-gradient is needed)."""
        rule = self.rule()
        current = {n: p.detach().requires_grad_() for n, p in params.items()}
        state = rule.init(current)
        yield current
        for step, chosen in enumerate(minibatch_indices(len(x), batch, steps, generator)):
            batch_x, batch_y = (x, y) if chosen is None else (x[chosen.to(x.device)], y[chosen.to(y.device)])
            with torch.enable_grad():  # a caller evaluating under torch.no_grad() still adapts
                current, state = inner_step(forward, current, batch_x, batch_y, objective, rule, step, state, first_order=True)
            current = {n: p.detach().requires_grad_() for n, p in current.items()}
            state = {key: {n: t.detach() for n, t in part.items()} for key, part in state.items()}
            yield current

    @staticmethod
    def task_generator(episode: Episode) -> torch.Generator:
        """The generator of one task's mini-batches, seeded by the task's own images: the draws depend on the task
        alone (whose order the run's seed fixes), not on which thread runs it first (``tasks_at_once``)."""
        return torch.Generator().manual_seed(zlib.crc32(episode.support_x.detach().cpu().numpy().tobytes()))

    def task_direction(self, forward: Forward, params: Params, episode: Episode, objective: Objective) -> tuple[Params, Metrics]:
        """theta - theta' for one task, and the adapted weights' query metrics."""
        *_, adapted = self.adaptation(forward, params, episode.support_x, episode.support_y, objective, self.inner_steps, self.inner_batch,
                                      self.task_generator(episode))
        with torch.no_grad():
            _, metrics = objective(forward(adapted, episode.query_x), episode.query_y)
            names = list(params)
            direction = torch._foreach_sub([params[n] for n in names], [adapted[n] for n in names])
        return dict(zip(names, direction)), metrics

    def meta_gradient(self, forward: Forward, params: Params, episodes: EpisodeBatch, objective: Objective) -> tuple[Params, Metrics]:
        """theta - theta' summed over the episodes (the loop averages it over the meta-batch)."""
        results = [self.task_direction(forward, params, episode, objective) for episode in episodes]
        return sum_each([direction for direction, _ in results]), stack_metrics([metrics for _, metrics in results])

    def evaluate(self, forward: Forward, params: Params, episodes: EpisodeBatch, objective: Objective,
                 score_every: Optional[int] = 1) -> dict[int, Metrics]:
        """Query metrics after the scored steps (:func:`scored_steps`) of ``test_inner_steps`` on the support set."""
        return each_episode_by_step(self.task_evaluate, forward, params, episodes, objective, score_every)

    def task_evaluate(self, forward: Forward, params: Params, episode: Episode, objective: Objective,
                      score_every: Optional[int] = 1) -> dict[int, Metrics]:
        return scored(self.adaptations(forward, params, episode.support_x, episode.support_y, objective), episode.query_x, episode.query_y,
                      objective, scored_steps(self.test_inner_steps, score_every))

    def adaptations(self, forward: Forward, params: Params, support_x: Tensor, support_y: Tensor, objective: Objective) -> Iterator[Predictor]:
        """The weights after 0, 1, ..., ``test_inner_steps`` steps on mini-batches of ``test_inner_batch`` support examples."""
        # A fixed generator: a task's mini-batches, hence its predictions, do not depend on what ran before.
        generator = torch.Generator().manual_seed(0)
        for adapted in self.adaptation(forward, params, support_x, support_y, objective, self.test_inner_steps, self.test_inner_batch, generator):
            yield predictor(forward, adapted)


register_algorithm("reptile", ReptileConfig, Reptile)
