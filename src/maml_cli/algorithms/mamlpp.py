"""MAML++ (Antoniou, Edwards & Storkey, ICLR 2019, "How to train your MAML").

MAML with five changes, each a switch so that an ablation is a sweep (``maml-train -m algo.msl=true,false``):

- ``msl``, multi-step loss: the query loss after every inner step counts, with weights that start
  equal and anneal toward the last step over ``msl_iterations`` (then only the last step counts);
- ``lslr``, learned per-layer per-step inner learning rates: one rate per parameter tensor and step,
  meta-learned (off: every rate stays at ``inner_lr``);
- ``bnwb``, per-step batch-norm weights and biases: each normalisation layer has a scale and shift for
  every inner step, used by that step's passes and learned by the outer loop only (the inner loop
  never adapts normalisation parameters, as in the paper);
- ``first_order_iterations``, derivative-order annealing: first order for the first part of training,
  second order after;
- ``cosine_outer_lr``: the outer rate follows a cosine from ``outer_lr`` down to ``min_outer_lr``.

The step weights anneal at every iteration, where the authors' code changes them once per epoch of 500
iterations (``msl_iterations=5000`` is their 10 epochs). The per-step rates and normalisation weights
live beside the network as submodules (``inner_lrs``, ``step_norms``); evaluation with more inner
steps than training reuses the last step's.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from maml_cli.algorithms.base import Forward, Metrics, OuterSchedule, Params, Predictor, attach_meta_parameters, split_meta_parameters
from maml_cli.algorithms.inner import FixedAt, SGD, TaskByTaskInnerLoop, inner_step, predictors_by_step
from maml_cli.algorithms.registry import InnerLoopConfig, at_least, register_algorithm
from maml_cli.errors import UserError
from maml_cli.models import BatchStatNorm
from maml_cli.tasks import Episode, Objective

RATES = "inner_lrs"
NORMS = "step_norms"


@dataclass
class MAMLPlusPlusConfig(InnerLoopConfig):
    _target_: str = "maml_cli.algorithms.mamlpp.MAMLPlusPlus"
    msl: bool = True
    msl_iterations: int = at_least(0, 5000)
    lslr: bool = True
    bnwb: bool = True
    first_order: bool = False
    first_order_iterations: int = at_least(0, 0)
    cosine_outer_lr: bool = True
    min_outer_lr: float = at_least(0, 1e-5)


def msl_weights(steps: int, iteration: int, msl_iterations: int) -> Tensor:
    """The multi-step loss weights of steps 1..``steps`` at ``iteration``: equal (1/N) at the start; the earlier
    steps' weights shrink linearly to a floor of 0.03/N at ``msl_iterations`` while the last step's grows, keeping
    the sum at one (Antoniou et al.'s schedule, with the authors' floor)."""
    done = min(iteration / msl_iterations, 1.0) if msl_iterations > 0 else 1.0
    floor = 0.03 / steps
    earlier = max((1 - done) / steps, floor)
    last = min(1 / steps + (steps - 1) * done / steps, 1 - (steps - 1) * floor)
    return torch.tensor([earlier] * (steps - 1) + [last], dtype=torch.float64)


def norm_parameter_names(network: nn.Module) -> list[str]:
    """The scale and shift of every normalisation layer of ``network``."""
    return [f"{module}.{leaf}" for module, layer in network.named_modules() if isinstance(layer, BatchStatNorm) for leaf in ("weight", "bias")]


class MAMLPlusPlus(TaskByTaskInnerLoop):
    """MAML++: MAML with multi-step loss, learned per-step rates, per-step batch norm and annealed schedules.

    Args:
        inner_lr: the inner learning rate, and where the learned rates start (0.1 in the paper's Omniglot runs).
        inner_steps: inner steps during meta-training (5); the per-step tensors have one row per step.
        test_inner_steps: inner steps at evaluation; steps past ``inner_steps`` reuse the last step's rates and weights.
        msl, msl_iterations: the multi-step loss and the iterations over which its weights anneal.
        lslr: learn the per-layer per-step rates (off: they stay at ``inner_lr``).
        bnwb: per-step batch-norm weights and biases.
        first_order: first order throughout.
        first_order_iterations: first order for this many iterations, then second order (0: second order from the start).
        cosine_outer_lr, min_outer_lr: anneal the outer rate by a cosine to ``min_outer_lr`` over the run.

    Example:
        >>> mamlpp = MAMLPlusPlus(inner_lr=0.1, inner_steps=5, test_inner_steps=5)
        >>> network = mamlpp.attach(network)
        >>> losses, metrics = mamlpp.at_iteration(0, 50000).meta_loss(forward, params, batch, classification_objective)
    """

    def __init__(self, inner_lr: float, inner_steps: int, test_inner_steps: int, msl: bool = True, msl_iterations: int = 5000,
                 lslr: bool = True, bnwb: bool = True, first_order: bool = False, first_order_iterations: int = 0,
                 cosine_outer_lr: bool = True, min_outer_lr: float = 1e-5) -> None:
        if inner_steps < 1:
            raise UserError(f"algo=mamlpp needs inner_steps of at least 1 (got {inner_steps}): its per-step rates and weights "
                            f"have one row per inner step.")
        super().__init__(inner_lr, inner_steps, test_inner_steps, first_order)
        self.msl, self.msl_iterations = msl, msl_iterations
        self.lslr, self.bnwb = lslr, bnwb
        self.first_order_iterations = first_order_iterations
        self.min_outer_lr = min_outer_lr
        self.outer_lr_schedule: Optional[OuterSchedule] = self.cosine_outer_lr if cosine_outer_lr else None
        self.iteration = 0  # set by at_iteration; 0 outside meta-training

    def cosine_outer_lr(self, base_lr: float, iteration: int, iterations: int) -> float:
        """The outer rate at ``iteration``: a half cosine from ``base_lr`` to ``min_outer_lr`` over ``iterations``."""
        return self.min_outer_lr + (base_lr - self.min_outer_lr) * (1 + math.cos(math.pi * iteration / max(iterations, 1))) / 2

    def at_iteration(self, iteration: int, iterations: int) -> "MAMLPlusPlus":
        current = copy.copy(self)
        current.iteration = iteration
        return current

    def attach(self, network: nn.Module) -> nn.Module:
        """``network`` with ``inner_lrs`` (one rate per step for each parameter the inner loop adapts: all but the
        normalisation layers'; learned when ``lslr``) and, when ``bnwb``, ``step_norms`` (each normalisation layer's
        scale and shift repeated for every step)."""
        norms = set(norm_parameter_names(network))
        own = dict(network.named_parameters())
        rates = {n: torch.full((self.inner_steps,), float(self.inner_lr), dtype=p.dtype) for n, p in own.items() if n not in norms}
        attach_meta_parameters(network, RATES, rates)
        for rate in network.get_submodule(RATES).parameters():
            rate.requires_grad_(self.lslr)
        if self.bnwb:
            attach_meta_parameters(network, NORMS, {n: own[n].detach().repeat(self.inner_steps, 1) for n in sorted(norms)})
        return network

    def parts(self, params: Params) -> tuple[Params, SGD, Optional[FixedAt], list[str]]:
        """The network's weights, the inner update rule, the per-step normalisation weights, and the adapted names."""
        weights, rates = split_meta_parameters(params, RATES)
        weights, norms = split_meta_parameters(weights, NORMS)
        last = self.inner_steps - 1
        rule = SGD(lambda step, name: rates[name][min(step, last)])
        fixed_at = (lambda step: {n: rows[min(step, last)] for n, rows in norms.items()}) if norms else None
        return weights, rule, fixed_at, list(rates)

    def task_loss(self, forward: Forward, params: Params, episode: Episode, objective: Objective) -> tuple[Tensor, Metrics]:
        """The (multi-step) query loss of one task; metrics after the last step."""
        weights, rule, fixed_at, adapted = self.parts(params)
        first_order = self.first_order or self.iteration < self.first_order_iterations
        multi_step = self.msl and self.iteration < self.msl_iterations
        state = rule.init(weights)
        step_losses = []
        for step in range(self.inner_steps):
            weights, state = inner_step(forward, weights, episode.support_x, episode.support_y, objective, rule, step, state, adapted,
                                        fixed_at, first_order)
            if multi_step or step == self.inner_steps - 1:
                current = weights if fixed_at is None else {**weights, **fixed_at(step)}
                loss, metrics = objective(forward(current, episode.query_x), episode.query_y, metrics=step == self.inner_steps - 1)
                step_losses.append(loss)
        if not multi_step:
            return step_losses[-1], metrics
        step_weights = msl_weights(self.inner_steps, self.iteration, self.msl_iterations).to(step_losses[-1])
        return (torch.stack(step_losses) * step_weights).sum(), metrics

    def adaptations(self, forward: Forward, params: Params, support_x: Tensor, support_y: Tensor, objective: Objective) -> Iterator[Predictor]:
        weights, rule, fixed_at, adapted = self.parts({n: p.detach() for n, p in params.items()})
        return predictors_by_step(forward, weights, support_x, support_y, objective, rule, self.test_inner_steps, adapted, fixed_at)


register_algorithm("mamlpp", MAMLPlusPlusConfig, MAMLPlusPlus)
