"""The inner loop of the optimization-based algorithms: one ``adapt`` for MAML, ANIL, Meta-SGD, MAML++ and Reptile.

What varies between them are arguments, not copies of the loop:

- which parameters adapt (``adapted``: ANIL's head, MAML++'s weights without batch norm);
- the update rule (:class:`SGD` with a learning rate per step, per parameter tensor or per element for
  Meta-SGD and MAML++'s learned rates; :class:`Adam` with beta1 = 0 for Reptile);
- tensors the network uses at a given step without adapting them (``fixed_at``: MAML++'s per-step
  batch-norm weights and biases);
- whether the inner gradients are differentiated again (``first_order``).

Everything is a pure function of parameter dicts: nothing here mutates a module.
"""
from __future__ import annotations

import abc
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, Optional, Protocol, Union

import torch
from torch import Tensor

from maml_cli.algorithms.base import (AlgorithmDefaults, Forward, Metrics, Params, Predictor, each_episode, each_episode_by_step, scored,
                                      scored_steps)
from maml_cli.models import batched_over_tasks, differentiated_twice
from maml_cli.tasks import Episode, EpisodeBatch, Objective

# The learning rate of parameter ``name`` at inner step ``step`` (0-based): a number, or a tensor that
# broadcasts against the parameter (Meta-SGD's per-element rates), differentiable when meta-learned.
StepSize = Callable[[int, str], Union[float, Tensor]]
# Optimizer state carried from one inner step to the next (Adam's moments), keyed like the parameters.
InnerState = dict[str, Params]
# Tensors the network uses at an inner step without adapting them (MAML++'s batch-norm row of that step).
FixedAt = Callable[[int], Params]


class InnerOptimizer(Protocol):
    """An update rule of the inner loop, written functionally: parameters and gradients in, new parameters out."""

    def init(self, params: Params) -> InnerState:
        """The state before the first step (empty for SGD)."""
        ...

    def update(self, step: int, params: Params, grads: Params, state: InnerState) -> tuple[Params, InnerState]:
        """The parameters after inner step ``step`` (0-based), and the state for the next."""
        ...


@dataclass(frozen=True)
class SGD:
    """Plain gradient descent, theta <- theta - lr * g, with ``lr`` a number or a :data:`StepSize`.

    A learned ``lr`` (Meta-SGD, MAML++) stays in the graph, so the meta-gradient reaches it.
    """

    lr: Union[float, StepSize]

    def init(self, params: Params) -> InnerState:
        return {}

    def update(self, step: int, params: Params, grads: Params, state: InnerState) -> tuple[Params, InnerState]:
        names = list(params)
        weights, gradients = [params[n] for n in names], [grads[n] for n in names]
        # Multi-tensor (foreach) operations: on a GPU a handful of launches per step for all the tensors, not two per tensor.
        if not callable(self.lr):
            return dict(zip(names, torch._foreach_add(weights, gradients, alpha=-self.lr))), state
        rates = [self.lr(step, n) for n in names]
        if all(isinstance(rate, Tensor) for rate in rates):
            return dict(zip(names, torch._foreach_sub(weights, torch._foreach_mul(gradients, rates)))), state
        return {n: p - rate * g for n, p, g, rate in zip(names, weights, gradients, rates)}, state


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba 2015) as a pure function; Reptile's inner optimizer uses ``beta1 = 0`` (Nichol et al. 2018).

    The state starts empty for every task (see the Reptile module for why).
    """

    lr: float
    beta1: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-8

    @property
    def first_moment(self) -> bool:
        """Whether a first moment is carried between steps: with beta1 = 0 it is the gradient itself."""
        return self.beta1 != 0

    def init(self, params: Params) -> InnerState:
        first = {n: torch.zeros_like(p) for n, p in params.items()} if self.first_moment else {}
        return {"m": first, "v": {n: torch.zeros_like(p) for n, p in params.items()}}

    def update(self, step: int, params: Params, grads: Params, state: InnerState) -> tuple[Params, InnerState]:
        t = step + 1
        names = list(params)
        gradients = [grads[n] for n in names]
        # Multi-tensor (foreach) operations, as torch.optim.Adam takes on a GPU: a few launches per step for all the tensors.
        if not self.first_moment:
            m = gradients  # beta1 * m + (1 - beta1) * g, exactly
        else:
            m = torch._foreach_add(torch._foreach_mul([state["m"][n] for n in names], self.beta1), gradients, alpha=1 - self.beta1)
        v = torch._foreach_addcmul(torch._foreach_mul([state["v"][n] for n in names], self.beta2), gradients, gradients, value=1 - self.beta2)
        # torch.optim.Adam's form: epsilon is added to the bias-corrected second moment's root.
        m_scale, v_scale = 1 / (1 - self.beta1 ** t), 1 / (1 - self.beta2 ** t)
        denominators = torch._foreach_add(torch._foreach_sqrt(torch._foreach_mul(v, v_scale)), self.eps)
        updated = torch._foreach_addcdiv([params[n] for n in names], m, denominators, value=-self.lr * m_scale)
        return dict(zip(names, updated)), {"m": dict(zip(names, m)) if self.first_moment else {}, "v": dict(zip(names, v))}


def as_optimizer(rule: Union[float, InnerOptimizer]) -> InnerOptimizer:
    """A number is plain SGD at that rate (MAML's ``inner_lr``)."""
    return SGD(float(rule)) if isinstance(rule, (int, float)) else rule


def inner_step(forward: Forward, params: Params, x: Tensor, y: Tensor, objective: Objective, rule: InnerOptimizer, step: int,
               state: InnerState, adapted: Optional[Collection[str]] = None, fixed_at: Optional[FixedAt] = None,
               first_order: bool = False) -> tuple[Params, InnerState]:
    """One inner step on ``(x, y)``: the gradient of the loss with respect to the ``adapted`` parameters (all when
    None), turned into new parameters by ``rule``. The other parameters pass through unchanged.

    Returns:
        All parameters (the adapted ones updated) and the rule's state for the next step.
    """
    names = [n for n in params if adapted is None or n in adapted]
    current = params if fixed_at is None else {**params, **fixed_at(step)}
    with nullcontext() if first_order else differentiated_twice():
        loss, _ = objective(forward(current, x), y, metrics=False)
    # A stack of tasks (``batch_tasks``) gives one loss per task: the gradient of their sum with respect to the
    # stacked parameters is each task's own gradient, since no task's loss depends on another's parameters.
    grads = torch.autograd.grad(loss if loss.dim() == 0 else loss.sum(), [params[n] for n in names], create_graph=not first_order)
    updated, state = rule.update(step, {n: params[n] for n in names}, dict(zip(names, grads)), state)
    return {**params, **updated}, state


def adapt(
    forward: Forward,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    objective: Objective,
    inner_lr: Union[float, InnerOptimizer],
    inner_steps: int,
    first_order: bool = False,
    adapted: Optional[Collection[str]] = None,
    fixed_at: Optional[FixedAt] = None,
) -> Params:
    """Take ``inner_steps`` steps of the inner loop on the support set (MAML's, and every variant's).

    Args:
        forward: ``forward(params, x)`` evaluates the network with ``params``.
        params: the starting (meta-)parameters.
        support_x, support_y: the support set.
        objective: ``objective(predictions, targets) -> (loss, metrics)``.
        inner_lr: a step size (plain SGD, MAML) or an :class:`InnerOptimizer` (learned rates, Adam).
        inner_steps: number of steps; 0 returns ``params`` unchanged.
        first_order: treat the inner gradients as constants, so the meta-gradient skips the
            second-order terms (first-order MAML).
        adapted: names of the parameters that adapt (all when None); the others are used as they are.
        fixed_at: tensors the network uses at each step without adapting them (MAML++'s batch norm).

    Returns:
        The adapted parameters, differentiable with respect to ``params`` (and to learned rates).
    """
    rule = as_optimizer(inner_lr)
    state = rule.init({n: p for n, p in params.items() if adapted is None or n in adapted})
    for step in range(inner_steps):
        params, state = inner_step(forward, params, support_x, support_y, objective, rule, step, state, adapted, fixed_at, first_order)
    return params


def adaptation_path(forward: Forward, params: Params, support_x: Tensor, support_y: Tensor, objective: Objective,
                    inner_lr: Union[float, InnerOptimizer], inner_steps: int, adapted: Optional[Collection[str]] = None,
                    fixed_at: Optional[FixedAt] = None) -> Iterator[Params]:
    """The parameters after 0, 1, ..., ``inner_steps`` steps, for evaluation: no meta-gradient is kept, so each
    step's graph is freed before the next (the update is the same as :func:`adapt`'s at first order)."""
    rule = as_optimizer(inner_lr)
    current = {n: p.detach().requires_grad_() for n, p in params.items()}
    state = rule.init({n: p for n, p in current.items() if adapted is None or n in adapted})
    yield current
    for step in range(inner_steps):
        with torch.enable_grad():  # a caller evaluating under torch.no_grad() still adapts
            current, state = inner_step(forward, current, support_x, support_y, objective, rule, step, state, adapted, fixed_at,
                                        first_order=True)
        current = {n: p.detach().requires_grad_() for n, p in current.items()}
        state = {key: {n: t.detach() for n, t in part.items()} for key, part in state.items()}
        yield current


def predictors_by_step(forward: Forward, params: Params, support_x: Tensor, support_y: Tensor, objective: Objective,
                       inner_lr: Union[float, InnerOptimizer], inner_steps: int, adapted: Optional[Collection[str]] = None,
                       fixed_at: Optional[FixedAt] = None) -> Iterator[Predictor]:
    """Predictors of the queries after 0, 1, ..., ``inner_steps`` inner steps on the support set (evaluation and use of a
    trained model, no meta-gradient), each step taken as the iterator advances.

    After k steps the query pass uses ``fixed_at`` of the last step taken (k - 1; step 0's before any),
    as the support pass of that step did.
    """
    for k, current in enumerate(adaptation_path(forward, params, support_x, support_y, objective, inner_lr, inner_steps, adapted, fixed_at)):
        if fixed_at is not None:
            current = {**current, **fixed_at(max(k - 1, 0))}
        yield predictor(forward, current)


def over_tasks(forward: Forward) -> Forward:
    """``forward`` for a stack of tasks: parameters of shape ``(tasks, *shape)`` and inputs ``(tasks, n, *item)``, each
    task's inputs through the network with that task's parameters, in one ``torch.func.vmap`` (convolutions become
    grouped convolutions: a few large kernels for the whole meta-batch instead of small ones per task)."""

    def batched(params: Params, x: Tensor, *rest: str) -> Tensor:
        with batched_over_tasks():
            return torch.func.vmap(lambda task_params, task_x: forward(task_params, task_x, *rest))(params, x)

    return batched


def stacked_for_tasks(params: Params, tasks: int) -> Params:
    """Each parameter repeated for ``tasks`` tasks along a new first dimension, as a view: gradients reaching the
    copies add up on the shared tensor, which is the meta-gradient summed over the tasks."""
    return {n: p.expand(tasks, *p.shape) for n, p in params.items()}


def predictor(forward: Forward, params: Params) -> Predictor:
    """``predict(query_x)``: the network with ``params``, without a graph."""

    def predict(query_x: Tensor) -> Tensor:
        with torch.no_grad():
            return forward(params, query_x)

    return predict


class TaskByTaskInnerLoop(AlgorithmDefaults, abc.ABC):
    """What MAML, ANIL, Meta-SGD and MAML++ share: a classifier, an inner loop whose mathematics is per task (each
    task's inner loop differentiates its own graph, and conv4 with batch statistics normalises the support and the
    query set each on its own), the run's episode shape, and the per-task ``task_loss`` and ``adaptations`` each of
    them writes. By default the tasks are computed one per call, which lets the loop free each task's graph at once.

    With ``batch_tasks`` the same ``task_loss`` and ``adaptations`` run once for the whole stack of episodes a call
    receives (up to ``tasks_per_call``): the parameters repeated per task (:func:`stacked_for_tasks`), the network evaluated per task under
    ``vmap`` (:func:`over_tasks`), the objective giving one loss per task. The mathematics is the task-by-task
    path's (tests compare the two in float64); what changes is the number of kernels, which is what a step costs on
    a GPU. An algorithm whose ``task_loss`` indexes or reduces across what would become the task dimension (MAML++'s
    per-step rows and step-weighted losses) does not offer it.

    Args:
        inner_lr: step size of the inner loop (where learned rates start).
        inner_steps: inner steps during meta-training.
        test_inner_steps: inner steps at meta-validation and meta-test; metrics are reported after the scored ones.
        first_order: drop the second-order terms of the meta-gradient.
        batch_tasks: compute the episodes of a call together instead of one task after another.
        tasks_per_call: with ``batch_tasks``, the most episodes a call receives (the loops hand a meta-batch, or a
            rank's share of it, at meta-training, and stacks of this many at evaluation); ``None``: any number (the
            loops' own evaluation stacks). The build passes the run's ``meta_batch_size``, so that evaluation, whose
            tasks each hold less than a training task, never holds more tasks at once than a training step.
    """

    network = "classifier"
    inner_loop = True
    outer = "loss"

    def __init__(self, inner_lr: float, inner_steps: int, test_inner_steps: int, first_order: bool = False,
                 batch_tasks: bool = False, tasks_per_call: Optional[int] = None) -> None:
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.test_inner_steps = test_inner_steps
        self.first_order = first_order
        self.batch_tasks = batch_tasks
        self.episodes_per_call: Optional[int] = tasks_per_call if batch_tasks else 1

    def episode_shape(self, split: str, way: int, shot: int, query: int) -> tuple[int, int, int]:
        """Trained and scored on the run's own episode shape (the head has ``way`` outputs)."""
        return way, shot, query

    @abc.abstractmethod
    def task_loss(self, forward: Forward, params: Params, episode: Episode, objective: Objective) -> tuple[Tensor, Metrics]:
        """The differentiable meta-training loss of one task, and its metrics."""

    @abc.abstractmethod
    def adaptations(self, forward: Forward, params: Params, support_x: Tensor, support_y: Tensor, objective: Objective) -> Iterator[Predictor]:
        """Predictors of a task's queries after 0, 1, ..., ``test_inner_steps`` inner steps on its support set."""

    def task_evaluate(self, forward: Forward, params: Params, episode: Episode, objective: Objective,
                      score_every: Optional[int] = 1) -> dict[int, Metrics]:
        """One task's query metrics after the :func:`scored_steps` of its ``test_inner_steps`` (those of :meth:`adaptations`)."""
        return scored(self.adaptations(forward, params, episode.support_x, episode.support_y, objective), episode.query_x, episode.query_y,
                      objective, scored_steps(self.test_inner_steps, score_every))

    def meta_loss(self, forward: Forward, params: Params, episodes: EpisodeBatch, objective: Objective) -> tuple[Tensor, Metrics]:
        """:meth:`task_loss` of each episode (of all of them at once with ``batch_tasks``)."""
        if self.batch_tasks:
            return self.task_loss(*as_one_task(forward, params, episodes), objective)
        return each_episode(self.task_loss, forward, params, episodes, objective)

    def evaluate(self, forward: Forward, params: Params, episodes: EpisodeBatch, objective: Objective,
                 score_every: Optional[int] = 1) -> dict[int, Metrics]:
        """Query metrics of each episode after the scored inner steps (:meth:`task_evaluate`; all episodes at once with
        ``batch_tasks``)."""
        if self.batch_tasks:
            return self.task_evaluate(*as_one_task(forward, params, episodes), objective, score_every)
        return each_episode_by_step(self.task_evaluate, forward, params, episodes, objective, score_every)


def as_one_task(forward: Forward, params: Params, episodes: EpisodeBatch) -> tuple[Forward, Params, Episode]:
    """A stack of episodes as the arguments of a per-task method (``task_loss``, ``task_evaluate``): the network under
    :func:`over_tasks`, the parameters repeated per task, and the episodes' tensors with their leading task dimension,
    which the objective (one value per task) carries through."""
    return over_tasks(forward), stacked_for_tasks(params, len(episodes)), Episode(episodes.support_x, episodes.support_y,
                                                                                  episodes.query_x, episodes.query_y)
