"""Meta-SGD (Li, Zhou, Chen & Li 2017): MAML with a learned inner learning rate for every parameter element.

The update of the inner loop is theta' = theta - alpha * grad, with ``alpha`` a tensor of the shape of
each parameter, meta-learned together with the initialisation. The rates live beside the network
as its submodule ``inner_lrs`` (:func:`~maml_cli.algorithms.base.attach_meta_parameters`), so the
outer optimizer learns them, checkpoints hold them and ``resume`` restores them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from maml_cli.algorithms.base import Forward, Metrics, Params, Predictor, attach_meta_parameters, split_meta_parameters
from maml_cli.algorithms.inner import SGD, TaskByTaskInnerLoop, adapt, predictors_by_step
from maml_cli.algorithms.registry import InnerLoopConfig, register_algorithm
from maml_cli.tasks import Episode, Objective

RATES = "inner_lrs"


@dataclass
class MetaSGDConfig(InnerLoopConfig):
    _target_: str = "maml_cli.algorithms.metasgd.MetaSGD"
    first_order: bool = False
    batch_tasks: Optional[bool] = None  # None: on CUDA (build.default_batch_tasks)


class MetaSGD(TaskByTaskInnerLoop):
    """Meta-SGD: meta-learn an initialisation and a per-element inner learning rate.

    Args:
        inner_lr: the value every rate starts at (learn2learn's constant initialisation; Li et al.
            draw them from U[0.005, 0.1]).
        inner_steps: inner steps during meta-training (the paper takes one).
        test_inner_steps: inner steps at meta-validation and meta-test, with the learned rates.
        first_order: treat the inner gradients as constants; the rates still get their gradient,
            through ``alpha * grad``.
        batch_tasks, tasks_per_call: compute the tasks of a call together (see :class:`TaskByTaskInnerLoop`).

    Example:
        >>> metasgd = MetaSGD(inner_lr=0.4, inner_steps=1, test_inner_steps=3)
        >>> network = metasgd.attach(network)  # adds network.inner_lrs, one tensor per parameter
    """

    def attach(self, network: nn.Module) -> nn.Module:
        """``network`` with ``inner_lrs``: for each of its parameters a tensor of the same shape, filled with ``inner_lr``."""
        return attach_meta_parameters(network, RATES, {n: torch.full_like(p.detach(), self.inner_lr) for n, p in network.named_parameters()})

    @staticmethod
    def rule(rates: Params) -> SGD:
        return SGD(lambda step, name: rates[name])

    def task_loss(self, forward: Forward, params: Params, episode: Episode, objective: Objective) -> tuple[Tensor, Metrics]:
        weights, rates = split_meta_parameters(params, RATES)
        adapted = adapt(forward, weights, episode.support_x, episode.support_y, objective, self.rule(rates), self.inner_steps, self.first_order)
        return objective(forward(adapted, episode.query_x), episode.query_y)

    def adaptations(self, forward: Forward, params: Params, support_x: Tensor, support_y: Tensor, objective: Objective) -> Iterator[Predictor]:
        weights, rates = split_meta_parameters(params, RATES)
        rule = self.rule({n: r.detach() for n, r in rates.items()})
        return predictors_by_step(forward, weights, support_x, support_y, objective, rule, self.test_inner_steps)


register_algorithm("metasgd", MetaSGDConfig, MetaSGD)
