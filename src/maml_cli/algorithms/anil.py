"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020).

MAML with the inner loop restricted to the head: the body (conv4's four blocks) is learned by the
outer loop alone. Since the body does not change during adaptation, each task's support and query
features are computed once and the inner steps run on the head only, which is where ANIL's speed
comes from. The meta-gradient still reaches the body through those features, at second order
through the head's inner updates (``first_order=true`` drops those terms, as in first-order MAML).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from maml_cli.algorithms.base import Forward, Metrics, Params, Predictor
from maml_cli.algorithms.inner import TaskByTaskInnerLoop, adapt, predictors_by_step
from maml_cli.algorithms.registry import InnerLoopConfig, register_algorithm
from maml_cli.tasks import Episode, Objective

HEAD = "head."


@dataclass
class ANILConfig(InnerLoopConfig):
    _target_: str = "maml_cli.algorithms.anil.ANIL"
    first_order: bool = False
    batch_tasks: Optional[bool] = None  # None: on CUDA (build.default_batch_tasks)


def split_head(params: Params) -> tuple[Params, Params]:
    """``(body, head)``: a classifier's parameters without and with the ``head.`` prefix."""
    return {n: p for n, p in params.items() if not n.startswith(HEAD)}, {n: p for n, p in params.items() if n.startswith(HEAD)}


def last_input_cache(compute: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``compute`` without a graph, remembering its last input and output: the predictors of every inner step
    share one query set's body features instead of computing them again."""
    last: list[tuple[Tensor, Tensor]] = []

    def cached(x: Tensor) -> Tensor:
        if not last or last[0][0] is not x:
            with torch.no_grad():
                last[:] = [(x, compute(x))]
        return last[0][1]

    return cached


class ANIL(TaskByTaskInnerLoop):
    """ANIL: MAML whose inner loop adapts the classifier's head on features computed once per task.

    Args:
        inner_lr: step size of the head's inner loop.
        inner_steps: inner steps during meta-training.
        test_inner_steps: inner steps at meta-validation and meta-test (metrics after the scored ones).
        first_order: drop the second-order terms of the meta-gradient.
        batch_tasks, tasks_per_call: compute the tasks of a call together (see :class:`TaskByTaskInnerLoop`).

    Example:
        >>> anil = ANIL(inner_lr=0.4, inner_steps=1, test_inner_steps=3)
        >>> losses, metrics = anil.meta_loss(forward, params, EpisodeBatch.stack([episode]), classification_objective)
    """


    @staticmethod
    def head_forward(forward: Forward) -> Forward:
        """``forward(head_params, features)``: the head alone (the body's parameters are not needed)."""
        return lambda head, features: forward(head, features, "head")

    def features(self, forward: Forward, body: Params, episode: Episode) -> tuple[Tensor, Tensor]:
        """Support and query features, each set through the body on its own (batch statistics per set, as MAML's forward)."""
        return forward(body, episode.support_x, "body"), forward(body, episode.query_x, "body")

    def task_loss(self, forward: Forward, params: Params, episode: Episode, objective: Objective) -> tuple[Tensor, Metrics]:
        """Adapt the head on the support features, then score the query features with the adapted head."""
        body, head = split_head(params)
        support_features, query_features = self.features(forward, body, episode)
        head_forward = self.head_forward(forward)
        adapted = adapt(head_forward, head, support_features, episode.support_y, objective, self.inner_lr, self.inner_steps, self.first_order)
        return objective(head_forward(adapted, query_features), episode.query_y)

    def adaptations(self, forward: Forward, params: Params, support_x: Tensor, support_y: Tensor, objective: Objective) -> Iterator[Predictor]:
        """The head after 0, 1, ..., ``test_inner_steps`` steps on the support features; a query set's features are
        computed once and reused by every step's predictor."""
        body, head = split_head({n: p.detach() for n, p in params.items()})
        with torch.no_grad():
            support_features = forward(body, support_x, "body")
        query_features = last_input_cache(lambda query_x: forward(body, query_x, "body"))
        for predict_head in predictors_by_step(self.head_forward(forward), head, support_features, support_y, objective, self.inner_lr,
                                               self.test_inner_steps):
            yield lambda query_x, predict_head=predict_head: predict_head(query_features(query_x))


register_algorithm("anil", ANILConfig, ANIL)
