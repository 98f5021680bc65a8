"""Meta-learning algorithms.

An algorithm is an object with two methods over a functional model
(``forward(params, *inputs)``), its parameter dict, an :class:`~maml_cli.tasks.Episode`
and an objective:

- ``meta_loss(forward, params, episode, objective) -> (loss, metrics)``: the
  differentiable loss of one task at meta-training;
- ``evaluate(forward, params, episode, objective) -> list[metrics]``: query
  metrics at meta-test, one entry per adaptation step (a single entry for
  algorithms that do not adapt by gradient steps);

and two facts the entry points use to build its network and its episodes:

- ``network``: ``"classifier"`` (the backbone with a head of ``way`` outputs),
  ``"embedding"`` (the backbone without a head) or ``"recurrent"`` (the
  backbone without a head, wrapped by ``make_network``);
- ``episode_shape(split, way, shot, query) -> (way, shot, query)``: the episodes
  it trains and is scored on.

The training and evaluation loops in :mod:`maml_cli.loop` serve every algorithm.
"""
from maml_cli.algorithms.lstm import RecurrentMetaLearner
from maml_cli.algorithms.maml import MAML, adapt
from maml_cli.algorithms.protonet import ProtoNet

__all__ = ["MAML", "ProtoNet", "RecurrentMetaLearner", "adapt"]
