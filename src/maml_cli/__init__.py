"""maml-cli: a command-line experiment runner for meta-learning.

From Python, :func:`load` a trained meta-learner and apply it to new few-shot tasks (:mod:`maml_cli.learner`).
"""

from maml_cli.learner import AdaptedLearner, Learner, load

__all__ = ["AdaptedLearner", "Learner", "load"]
__version__ = "0.1.0"
