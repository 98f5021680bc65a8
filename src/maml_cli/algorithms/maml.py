"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017).

The inner loop is a pure function of a parameter dict: the support loss is
differentiated with respect to the parameters and one dict comprehension takes a
gradient step. The same :func:`adapt` runs at meta-training and at meta-test.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from maml_cli.algorithms.base import Forward, Metrics, Params, each_episode, stack_metrics
from maml_cli.models import differentiated_twice
from maml_cli.tasks import Episode, EpisodeBatch, Objective


def adapt(
    forward: Forward,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    objective: Objective,
    inner_lr: float,
    inner_steps: int,
    first_order: bool = False,
) -> Params:
    """Take ``inner_steps`` steps of gradient descent on the support loss.

    Args:
        forward: ``forward(params, x)`` evaluates the network with ``params``.
        params: the starting (meta-)parameters.
        support_x, support_y: the support set.
        objective: ``objective(predictions, targets) -> (loss, metrics)``.
        inner_lr: step size of the inner loop.
        inner_steps: number of steps; 0 returns ``params`` unchanged.
        first_order: if true the inner gradients are treated as constants, so the
            meta-gradient skips the second-order terms (first-order MAML).

    Returns:
        The adapted parameters, differentiable with respect to ``params``.
    """
    for _ in range(inner_steps):
        with nullcontext() if first_order else differentiated_twice():
            support_loss, _ = objective(forward(params, support_x), support_y)
        grads = torch.autograd.grad(support_loss, tuple(params.values()), create_graph=not first_order)
        params = {name: p - inner_lr * g for (name, p), g in zip(params.items(), grads)}
    return params


class MAML:
    """MAML: meta-learn an initialisation from which a few gradient steps fit a task.

    Args:
        inner_lr: step size of the inner loop (alpha in the paper).
        inner_steps: inner steps during meta-training.
        test_inner_steps: inner steps at meta-validation and meta-test; metrics are
            reported after each of 0, 1, ..., ``test_inner_steps`` steps.
        first_order: drop the second-order terms of the meta-gradient (FOMAML).

    Example:
        >>> maml = MAML(inner_lr=0.4, inner_steps=1, test_inner_steps=3)
        >>> losses, metrics = maml.meta_loss(forward, params, EpisodeBatch.stack([episode]), classification_objective)
        >>> losses.sum().backward()  # meta-gradient lands on params
    """

    network = "classifier"
    # Each task's inner loop differentiates its own graph; batching tasks with vmap was slower on CPU
    # (docs/performance.md), and one task per call lets the loop free each task's graph at once.
    episodes_per_call = 1
    per_example_network = False
    grad_clip = None

    def __init__(self, inner_lr: float, inner_steps: int, test_inner_steps: int, first_order: bool = False) -> None:
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.test_inner_steps = test_inner_steps
        self.first_order = first_order

    def episode_shape(self, split: str, way: int, shot: int, query: int) -> tuple[int, int, int]:
        """MAML trains and is scored on the run's own episode shape (its head has ``way`` outputs)."""
        return way, shot, query

    def task_loss(self, forward: Forward, params: Params, episode: Episode, objective: Objective) -> tuple[Tensor, Metrics]:
        """Adapt on the support set, then score the adapted parameters on the query set."""
        adapted = adapt(forward, params, episode.support_x, episode.support_y, objective, self.inner_lr, self.inner_steps, self.first_order)
        return objective(forward(adapted, episode.query_x), episode.query_y)

    def meta_loss(self, forward: Forward, params: Params, episodes: EpisodeBatch, objective: Objective) -> tuple[Tensor, Metrics]:
        """:meth:`task_loss` of each episode."""
        return each_episode(self.task_loss, forward, params, episodes, objective)

    def evaluate(self, forward: Forward, params: Params, episodes: EpisodeBatch, objective: Objective) -> list[Metrics]:
        """Query metrics of each episode after 0, 1, ..., ``test_inner_steps`` inner steps."""
        per_episode = [self.task_evaluate(forward, params, episode, objective) for episode in episodes]
        return [stack_metrics([steps[step] for steps in per_episode]) for step in range(self.test_inner_steps + 1)]

    def task_evaluate(self, forward: Forward, params: Params, episode: Episode, objective: Objective) -> list[Metrics]:
        """Query metrics after 0, 1, ..., ``test_inner_steps`` inner steps (no meta-gradient)."""
        adapted = {name: p.detach().requires_grad_() for name, p in params.items()}
        per_step = []
        for step in range(self.test_inner_steps + 1):
            if step > 0:
                adapted = adapt(forward, adapted, episode.support_x, episode.support_y, objective, self.inner_lr, 1, first_order=True)
                adapted = {name: p.detach().requires_grad_() for name, p in adapted.items()}
            with torch.no_grad():
                _, metrics = objective(forward(adapted, episode.query_x), episode.query_y)
            per_step.append(metrics)
        return per_step
