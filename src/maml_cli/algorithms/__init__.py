"""Meta-learning algorithms.

An algorithm is an object with two methods over a functional model
(``forward(params, x)``), its parameter dict, an :class:`~maml_cli.tasks.Episode`
and an objective:

- ``meta_loss(forward, params, episode, objective) -> (loss, metrics)``: the
  differentiable loss of one task at meta-training;
- ``evaluate(forward, params, episode, objective) -> list[metrics]``: query
  metrics at meta-test, one entry per adaptation step (a single entry for
  algorithms that do not adapt by gradient steps).

The training and evaluation loops in :mod:`maml_cli.loop` serve every algorithm.
"""
from maml_cli.algorithms.maml import MAML, adapt

__all__ = ["MAML", "adapt"]
