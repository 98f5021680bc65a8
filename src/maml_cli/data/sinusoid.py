"""Sinusoid regression (Finn et al. 2017, section 5.1), generated on the fly."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from maml_cli.data.base import VectorInputs
from maml_cli.data.registry import register_dataset
from maml_cli.errors import EpisodeError
from maml_cli.tasks import REGRESSION, Episode


class SinusoidSampler:
    """Episodes of y = A sin(x - phase) with A, phase and x drawn uniformly.

    Args:
        shot, query: support and query points per task.
        amplitude, phase, x_range: (low, high) of the uniform distributions.
        device: where the episodes are put.
    """

    def __init__(self, shot: int, query: int, amplitude: tuple[float, float], phase: tuple[float, float],
                 x_range: tuple[float, float], device: torch.device | str = "cpu") -> None:
        self.shot, self.query = shot, query
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self.device = torch.device(device)

    def sample(self, generator: torch.Generator) -> Episode:
        amplitude = _uniform(self.amplitude, (), generator)
        phase = _uniform(self.phase, (), generator)
        x = _uniform(self.x_range, (self.shot + self.query, 1), generator)
        y = amplitude * torch.sin(x - phase)
        x, y = x.to(self.device), y.to(self.device)
        return Episode(x[: self.shot], y[: self.shot], x[self.shot :], y[self.shot :])


def _uniform(bounds: tuple[float, float], shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=generator)


class SinusoidTasks:
    """The sinusoid task family: amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5], MSE.

    Needs no files. Every split draws from the same distribution; splits differ
    only by the generator their episodes are drawn from.
    """

    kind = REGRESSION
    in_features = 1

    def __init__(self, amplitude_min: float = 0.1, amplitude_max: float = 5.0, phase_min: float = 0.0,
                 phase_max: float = math.pi, x_min: float = -5.0, x_max: float = 5.0) -> None:
        if not (amplitude_min <= amplitude_max and phase_min <= phase_max and x_min < x_max):
            raise EpisodeError("sinusoid ranges must have low <= high (amplitude, phase) and x_min < x_max.")
        self.amplitude = (amplitude_min, amplitude_max)
        self.phase = (phase_min, phase_max)
        self.x_range = (x_min, x_max)
        self.split_name = "none (tasks generated on the fly)"

    def describe(self) -> dict[str, int]:
        """Nothing to count: every split draws from the same distribution."""
        return {}

    def class_names(self) -> dict[str, list[str]]:
        """No classes: every split draws from the same distribution."""
        return {}

    def sampler(self, split: str, way: int, shot: int, query: int, device: torch.device | str = "cpu") -> SinusoidSampler:
        """An episode sampler; ``way`` must be 1 because a regression task has no classes."""
        if way != 1:
            raise EpisodeError(f"dataset=sinusoid is regression and has no classes: way must be 1 (got way={way}).")
        if shot < 1 or query < 0:
            raise EpisodeError(f"shot must be at least 1 and query at least 0 (got shot={shot}, query={query}).")
        return SinusoidSampler(shot, query, self.amplitude, self.phase, self.x_range, device)


@dataclass
class SinusoidConfig:
    _target_: str = "maml_cli.data.sinusoid.SinusoidTasks"
    amplitude_min: float = 0.1
    amplitude_max: float = 5.0
    phase_min: float = 0.0
    phase_max: float = math.pi
    x_min: float = -5.0
    x_max: float = 5.0


register_dataset("sinusoid", SinusoidConfig, SinusoidTasks, lambda node: VectorInputs(SinusoidTasks.in_features))
