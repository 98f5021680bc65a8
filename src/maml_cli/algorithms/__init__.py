"""Meta-learning algorithms.

The contract the loops and entry points rely on is :class:`~maml_cli.algorithms.base.Algorithm`:
an algorithm says which network it needs (``network``), the shape of its episodes
(``episode_shape``), how many episodes it takes per call (``episodes_per_call``), and
computes per-episode losses (``meta_loss``) and metrics by adaptation step
(``evaluate``) over a stack of episodes. The training and evaluation loops in
:mod:`maml_cli.loop` serve every algorithm.
"""
from maml_cli.algorithms.base import Algorithm
from maml_cli.algorithms.lstm import RecurrentMetaLearner
from maml_cli.algorithms.maml import MAML, adapt
from maml_cli.algorithms.protonet import ProtoNet

__all__ = ["Algorithm", "MAML", "ProtoNet", "RecurrentMetaLearner", "adapt"]
