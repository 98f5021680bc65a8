"""The algorithm contract: what the training and evaluation loops may call, written down once."""
from __future__ import annotations

from typing import Callable, Collection, Iterator, Literal, Optional, Protocol, Union

import torch
from torch import Tensor, nn

from maml_cli.tasks import Episode, EpisodeBatch, Objective, stack

Params = dict[str, Tensor]
# forward(params, *inputs): the network evaluated with ``params`` instead of its own parameters. Its inputs
# and outputs depend on the network an algorithm asks for (``Algorithm.network``), hence the open signature.
Forward = Callable[..., Tensor | tuple[Tensor, tuple[Tensor, Tensor]]]
Metrics = dict[str, Tensor]
Network = Literal["classifier", "embedding", "recurrent"]
# schedule(base_lr, iteration, iterations) -> the outer learning rate at ``iteration`` (0-based).
OuterSchedule = Callable[[float, int, int], float]
# predict(query_x) -> the outputs for one task's queries, ``(n_query, outputs)``: a score per class of the task (in
# label order) or the regression value. Computed without a graph.
Predictor = Callable[[Tensor], Tensor]


class _AlgorithmCommon(Protocol):
    """What every algorithm declares and does, whatever its outer update (see :data:`Algorithm`).

    Attributes:
        network: what the build makes from ``model``: ``"classifier"`` (the backbone with a head of
            ``way`` outputs, 1 for regression; its last layer is the submodule ``head``), ``"embedding"``
            (the backbone without a head) or ``"recurrent"`` (the head-less backbone wrapped by the
            algorithm's ``make_network``).
        episodes_per_call: how many episodes of a meta-batch (or of an evaluation) ``meta_loss``
            and ``evaluate`` receive at once. ``None``: as many as there are (the loops cap
            evaluation chunks), for algorithms that compute a stack of episodes in one pass; ``1``:
            one at a time, for algorithms whose per-task path is fastest or whose network must
            see one episode per call (conv4 with batch statistics normalises over the whole batch
            it is given); another number: at most that many (MAML's family with ``batch_tasks``:
            a meta-batch, its tasks under ``vmap``).
        per_example_network: True when the algorithm puts several examples of one task through the
            network in one call and needs each example's output to depend on that example alone
            (the LSTM embeds a whole sequence at once; with batch statistics a later image would
            change an earlier step). The build then refuses a model that mixes examples.
        grad_clip: the meta-training loop clips the meta-gradient's norm to this; ``None``: no clipping.
        inner_loop: True when the algorithm adapts to a task by inner optimisation steps: the top-level
            ``inner_lr``, ``inner_steps`` and ``test_inner_steps`` apply to it (its schema derives from
            :class:`~maml_cli.algorithms.registry.InnerLoopConfig`), and so does ``score_every`` (which steps
            evaluation scores); typing them for an algorithm without one is refused.
        outer_lr_schedule: the outer learning rate the algorithm's own recipe prescribes,
            ``schedule(base_lr, iteration, iterations) -> lr`` (Reptile's linear annealing, MAML++'s cosine);
            ``None``: the optimizer's rate, or the run's ``scheduler``.
        queries_with_support: True when a predictor of ``adaptations`` puts the task's support set through the
            network in the same call as the queries it is given (ProtoNet embeds them in one batch; the LSTM reads
            the support sequence first); False when the queries go through on their own (MAML's family).
            :func:`one_query_at_a_time` needs to know which.
    """

    network: Network
    episodes_per_call: Optional[int]
    per_example_network: bool
    grad_clip: Optional[float]
    inner_loop: bool
    outer_lr_schedule: Optional[OuterSchedule]
    queries_with_support: bool

    def episode_shape(self, split: str, way: int, shot: int, query: int) -> tuple[int, int, int]:
        """``(way, shot, query)`` of the episodes of ``split`` (``train``, ``val``, ``test``) for a run's ``way``, ``shot``, ``query``."""
        ...

    def attach(self, network: nn.Module) -> nn.Module:
        """The network the loops train and checkpoints hold: ``network`` itself, or with the algorithm's own
        meta-learned tensors added as a submodule (Meta-SGD's rates), which the outer optimizer then learns too."""
        ...

    def at_iteration(self, iteration: int, iterations: int) -> "Algorithm":
        """The algorithm as it trains at meta-training iteration ``iteration`` (0-based) of ``iterations``:
        itself, or a copy with its annealed settings (MAML++'s step weights and derivative order)."""
        ...

    def evaluate(self, forward: Forward, params: Params, episodes: EpisodeBatch, objective: Objective,
                 score_every: Optional[int] = 1) -> dict[int, Metrics]:
        """Query metrics of each episode, ``(len(episodes),)`` per metric, keyed by the inner steps taken before
        scoring: the steps of :func:`scored_steps` (``score_every``; the last one always) for an algorithm with an
        inner loop, ``{0: ...}`` for one that does not adapt by gradient steps (which ignores ``score_every``)."""
        ...

    def adaptations(self, forward: Forward, params: Params, support_x: Tensor, support_y: Tensor, objective: Objective) -> Iterator[Predictor]:
        """One task given by its support set, adapted to: a predictor of its queries after 0, 1, ..., ``test_inner_steps``
        inner steps (a single one for an algorithm without an inner loop), each step taken as the iterator advances.
        This is how a trained model meets a new task (:mod:`maml_cli.learner`); ``evaluate`` computes the same
        predictions, with every query's label known.

        Raises:
            UserError: the algorithm, as configured, has no way to predict a query from a support set (the LSTM's
                ``sequence`` protocol scores every step of one labelled sequence).
        """
        ...


class LossAlgorithm(_AlgorithmCommon, Protocol):
    """An algorithm whose meta-gradient is the gradient of a loss: the loop backpropagates ``meta_loss``."""

    outer: Literal["loss"]

    def meta_loss(self, forward: Forward, params: Params, episodes: EpisodeBatch, objective: Objective) -> tuple[Tensor, Metrics]:
        """The differentiable meta-training loss of each episode, ``(len(episodes),)``, and per-episode metrics of the same shape."""
        ...


class GradientAlgorithm(_AlgorithmCommon, Protocol):
    """An algorithm that supplies its outer direction itself: Reptile's theta - theta' is the gradient of no loss
    the loop could backpropagate."""

    outer: Literal["gradient"]

    def meta_gradient(self, forward: Forward, params: Params, episodes: EpisodeBatch, objective: Objective) -> tuple[Params, Metrics]:
        """The outer direction summed over the episodes, one tensor per parameter (the loop averages over the
        meta-batch and hands it to the optimizer as the gradient), and per-episode metrics of shape ``(len(episodes),)``."""
        ...


# A meta-learning algorithm as :mod:`maml_cli.loop` and the entry points use it; ``outer`` tells the two kinds apart.
Algorithm = Union[LossAlgorithm, GradientAlgorithm]


class AlgorithmDefaults:
    """What most algorithms declare: no meta-parameters beside the network, nothing annealed, no clipping."""

    per_example_network = False
    grad_clip: Optional[float] = None
    outer_lr_schedule: Optional[OuterSchedule] = None
    queries_with_support = False

    def attach(self, network: nn.Module) -> nn.Module:
        return network

    def at_iteration(self, iteration: int, iterations: int) -> "Algorithm":
        return self  # type: ignore[return-value]


def meta_parameter_key(name: str) -> str:
    """A network parameter's name as a key of a ``ParameterDict`` (which refuses dots): ``head.weight`` -> ``head/weight``."""
    return name.replace(".", "/")


def attach_meta_parameters(network: nn.Module, submodule: str, tensors: dict[str, Tensor]) -> nn.Module:
    """Add ``tensors`` (keyed by the network parameter each belongs to) to ``network`` as the ``ParameterDict``
    ``submodule``: they are then meta-parameters like the network's own, learned by the outer optimizer and
    saved in checkpoints, and the network's own parameter names do not change."""
    if isinstance(network, nn.Sequential):  # its forward would call every submodule, the added one too
        raise TypeError(f"cannot add {submodule} to an nn.Sequential network; wrap it in a module of its own")
    network.add_module(submodule, nn.ParameterDict({meta_parameter_key(n): nn.Parameter(t) for n, t in tensors.items()}))
    return network


def split_meta_parameters(params: Params, submodule: str) -> tuple[Params, Params]:
    """``params`` split into the network's own and those of ``submodule`` (keyed back by network parameter name)."""
    prefix = submodule + "."
    own = {n: p for n, p in params.items() if not n.startswith(prefix)}
    meta = {n[len(prefix):].replace("/", "."): p for n, p in params.items() if n.startswith(prefix)}
    return own, meta


def each_episode(task_loss: Callable[[Forward, Params, Episode, Objective], tuple[Tensor, Metrics]], forward: Forward,
                 params: Params, episodes: EpisodeBatch, objective: Objective) -> tuple[Tensor, Metrics]:
    """``meta_loss`` of an algorithm that works one task at a time: ``task_loss`` of each episode, stacked."""
    results = [task_loss(forward, params, episode, objective) for episode in episodes]
    return stack([loss for loss, _ in results]), stack_metrics([metrics for _, metrics in results])


def each_episode_by_step(task_evaluate: Callable[[Forward, Params, Episode, Objective, Optional[int]], dict[int, Metrics]],
                         forward: Forward, params: Params, episodes: EpisodeBatch, objective: Objective,
                         score_every: Optional[int]) -> dict[int, Metrics]:
    """``evaluate`` of an algorithm that works one task at a time: ``task_evaluate`` (metrics after each scored
    adaptation step) of each episode, stacked step by step."""
    per_episode = [task_evaluate(forward, params, episode, objective, score_every) for episode in episodes]
    return {k: stack_metrics([steps[k] for steps in per_episode]) for k in per_episode[0]}


def scored_steps(last_step: int, score_every: Optional[int]) -> set[int]:
    """The inner steps after which evaluation scores the query set: 0, ``score_every``, 2 ``score_every``, ... and
    ``last_step``; only ``last_step`` when ``score_every`` is None (meta-validation, which reads that one alone).

    Raises:
        ValueError: ``score_every`` is below 1.
    """
    if score_every is None:
        return {last_step}
    if score_every < 1:
        raise ValueError(f"score_every must be 1 or more (got {score_every})")
    return {*range(0, last_step + 1, score_every), last_step}


def scored(predictors: Iterator[Predictor], query_x: Tensor, query_y: Tensor, objective: Objective,
           steps: Collection[int]) -> dict[int, Metrics]:
    """One task's query metrics after each of ``steps`` inner steps, keyed by step. Every predictor of
    :meth:`adaptations` is drawn, since drawing the next one takes the next step; only those of ``steps`` predict,
    because scoring the query set costs more than a step on the support set."""
    return {k: objective(predict(query_x), query_y)[1] for k, predict in enumerate(predictors) if k in steps}


def one_query_at_a_time(predict: Predictor, support_x: Tensor, queries_with_support: bool) -> Predictor:
    """``predict`` made non-transductive (Nichol et al. 2018, section 4): each query goes through the network in one
    batch with the task's support set and no other query, so that a network with batch statistics gives it an output
    that depends on the support set and that query alone, not on how many queries the episode holds or which.

    One call of ``predict`` per query: as many passes as queries (a ``vmap`` over the queries was slower on a 2-core CPU,
    docs/results.md), and for ANIL a pass of the body per query and scored step, where its transductive predictors share
    one pass of the query set.

    Args:
        queries_with_support: the algorithm's predictor puts the support set in the queries' batch itself
            (:attr:`_AlgorithmCommon.queries_with_support`), so each query is given to it alone; otherwise each
            query is put through after the support set and its output is the batch's last row.
    """

    def predict_each(query_x: Tensor) -> Tensor:
        alone = [query_x[i:i + 1] for i in range(len(query_x))]
        if queries_with_support:
            return torch.cat([predict(query) for query in alone])
        return torch.cat([predict(torch.cat([support_x, query]))[-1:] for query in alone])

    return predict_each


def evaluate_one_query_at_a_time(algorithm: "Algorithm", forward: Forward, params: Params, episodes: EpisodeBatch,
                                 objective: Objective, score_every: Optional[int] = 1) -> dict[int, Metrics]:
    """``algorithm.evaluate`` with each query predicted non-transductively (:func:`one_query_at_a_time`): each episode
    adapted to by ``algorithm.adaptations``, its queries scored after the same steps as ``evaluate`` scores
    (:func:`scored_steps` of the last step ``adaptations`` takes; step 0 alone for an algorithm without an inner loop)."""
    scored_steps(0, score_every)  # refuses a score_every below 1 before any work

    def task_evaluate(forward: Forward, params: Params, episode: Episode, objective: Objective, every: Optional[int]) -> dict[int, Metrics]:
        # The last step is known only when the predictors run out (the contract does not expose it), so the steps of
        # scored_steps are chosen as they come: each multiple of ``every``, then the last if it was not one.
        metrics: dict[int, Metrics] = {}
        predictors = algorithm.adaptations(forward, params, episode.support_x, episode.support_y, objective)
        for step, predict in enumerate(predictors):
            last_step, predict_alone = step, one_query_at_a_time(predict, episode.support_x, algorithm.queries_with_support)
            if every is not None and step % every == 0:
                metrics[step] = objective(predict_alone(episode.query_x), episode.query_y)[1]
        if last_step not in metrics:
            metrics[last_step] = objective(predict_alone(episode.query_x), episode.query_y)[1]
        return metrics

    return each_episode_by_step(task_evaluate, forward, params, episodes, objective, score_every)


def stack_metrics(per_episode: list[Metrics]) -> Metrics:
    """``[{"accuracy": a0}, {"accuracy": a1}]`` -> ``{"accuracy": tensor([a0, a1])}``."""
    return {name: stack([metrics[name] for metrics in per_episode]) for name in per_episode[0]}


def sum_each(per_episode: list[Params]) -> Params:
    """The sum over episodes of tensors keyed alike (Reptile's directions), in multi-tensor operations."""
    names = list(per_episode[0])
    total = [per_episode[0][n] for n in names]
    for tensors in per_episode[1:]:
        total = torch._foreach_add(total, [tensors[n] for n in names])
    return dict(zip(names, total))
