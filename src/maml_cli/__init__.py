"""maml-cli: a command-line experiment runner for meta-learning."""

__version__ = "0.1.0"
