"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017).

The inner loop is a pure function of a parameter dict: the support loss is
differentiated with respect to the parameters and one dict comprehension takes a
gradient step. The same :func:`adapt` runs at meta-training and at meta-test.
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import Iterator, Optional

from torch import Tensor

from maml_cli.algorithms.base import Forward, Metrics, Params, Predictor
from maml_cli.algorithms.inner import TaskByTaskInnerLoop, adapt, predictors_by_step
from maml_cli.algorithms.registry import InnerLoopConfig, register_algorithm
from maml_cli.tasks import Episode, Objective

__all__ = ["MAML", "MAMLConfig", "adapt"]


@dataclass
class MAMLConfig(InnerLoopConfig):
    _target_: str = "maml_cli.algorithms.maml.MAML"
    first_order: bool = False
    batch_tasks: Optional[bool] = None  # None: on CUDA (build.default_batch_tasks)


class MAML(TaskByTaskInnerLoop):
    """MAML: meta-learn an initialisation from which a few gradient steps fit a task.

    Args:
        inner_lr: step size of the inner loop (alpha in the paper).
        inner_steps: inner steps during meta-training.
        test_inner_steps: inner steps at meta-validation and meta-test; :meth:`evaluate` reports metrics after
            those of 0, 1, ..., ``test_inner_steps`` its ``score_every`` selects.
        first_order: drop the second-order terms of the meta-gradient (FOMAML).
        batch_tasks, tasks_per_call: compute the tasks of a call together (see :class:`TaskByTaskInnerLoop`).

    Example:
        >>> maml = MAML(inner_lr=0.4, inner_steps=1, test_inner_steps=3)
        >>> losses, metrics = maml.meta_loss(forward, params, EpisodeBatch.stack([episode]), classification_objective)
        >>> losses.sum().backward()  # meta-gradient lands on params
    """

    def task_loss(self, forward: Forward, params: Params, episode: Episode, objective: Objective) -> tuple[Tensor, Metrics]:
        """Adapt on the support set, then score the adapted parameters on the query set."""
        adapted = adapt(forward, params, episode.support_x, episode.support_y, objective, self.inner_lr, self.inner_steps, self.first_order)
        return objective(forward(adapted, episode.query_x), episode.query_y)

    def adaptations(self, forward: Forward, params: Params, support_x: Tensor, support_y: Tensor, objective: Objective) -> Iterator[Predictor]:
        """The network after 0, 1, ..., ``test_inner_steps`` inner steps on the support set (no meta-gradient)."""
        return predictors_by_step(forward, params, support_x, support_y, objective, self.inner_lr, self.test_inner_steps)


register_algorithm("maml", MAMLConfig, MAML)
