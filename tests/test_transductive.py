"""Non-transductive evaluation (``maml-eval transductive=false``): each query scored in one batch with its task's support set
and no other query, for every algorithm, on the steps its own evaluation scores."""
import pytest
import torch

from maml_cli.algorithms.base import evaluate_one_query_at_a_time, one_query_at_a_time
from maml_cli.algorithms.registry import registered_algorithms
from maml_cli.build import build_algorithm, build_model, build_tasks
from maml_cli.learner import dataset_inputs
from maml_cli.loop import evaluate, functional_forward
from maml_cli.tasks import Episode, EpisodeBatch, classification_objective
from test_config import compose_config

REGISTERED = registered_algorithms()
# Found through the registry, not listed; the LSTM's network must give each example an output of its own.
ALGORITHMS = sorted(REGISTERED)
MIXING = sorted(n for n, e in REGISTERED.items() if not e.algorithm.per_example_network)
WAY, SHOT, QUERY = 3, 2, 3


def built(name, batch_norm):
    """The algorithm as a run of it builds it, on Omniglot-shaped inputs, with a small conv4 in float64."""
    overrides = [f"algo={name}", f"way={WAY}", f"shot={SHOT}", f"query={QUERY}", "model.hidden=4", f"model.batch_norm={batch_norm}"]
    if REGISTERED[name].inner_loop:
        overrides += ["inner_lr=0.4", "inner_steps=1", "test_inner_steps=3"]
    cfg = compose_config(overrides)
    algorithm = build_algorithm(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, dataset_inputs(cfg), algorithm).double()
    return algorithm, functional_forward(model), dict(model.named_parameters()), model


def episodes(tasks=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(WAY)
    return [Episode(torch.rand(WAY * SHOT, 1, 28, 28, generator=g, dtype=torch.float64), labels.repeat_interleave(SHOT),
                    torch.rand(WAY * QUERY, 1, 28, 28, generator=g, dtype=torch.float64), labels.repeat_interleave(QUERY))
            for _ in range(tasks)]


@pytest.mark.parametrize("name", ALGORITHMS)
def test_one_query_at_a_time_scores_as_the_algorithms_own_evaluation_where_queries_never_meet(name):
    # With each image normalised on its own a query's output cannot depend on the other queries, so the two paths must
    # agree on every scored step and metric: the non-transductive path adapts, steps and scores as evaluate does.
    algorithm, forward, params, model = built(name, "example")
    assert not model.mixes_examples
    batch = EpisodeBatch.stack(episodes())
    for score_every in (1, 2, None):
        expected = algorithm.evaluate(forward, params, batch, classification_objective, score_every)
        got = evaluate_one_query_at_a_time(algorithm, forward, params, batch, classification_objective, score_every)
        assert list(got) == list(expected), (score_every, list(got), list(expected))
        for step, metrics in expected.items():
            assert set(got[step]) == set(metrics)
            for metric, values in metrics.items():
                torch.testing.assert_close(got[step][metric], values, rtol=1e-9, atol=1e-12)
    if REGISTERED[name].inner_loop:
        assert list(got) == [3] and list(evaluate_one_query_at_a_time(algorithm, forward, params, batch, classification_objective, 2)) == [0, 2, 3]


@pytest.mark.parametrize("name", MIXING)
def test_with_batch_statistics_a_query_scored_alone_depends_on_the_support_set_and_itself_not_the_other_queries(name):
    algorithm, forward, params, model = built(name, "batch")
    assert model.mixes_examples
    episode = episodes(tasks=1)[0]
    others = episode.query_x.clone()
    others[1:] = torch.rand(others[1:].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    batch_sizes = []

    def counting(params, x, *rest):
        batch_sizes.append(len(x))
        return forward(params, x, *rest)

    def outputs(query_x, transductive):
        *_, predict = algorithm.adaptations(counting, params, episode.support_x, episode.support_y, classification_objective)
        if transductive:
            return predict(query_x)
        batch_sizes.clear()  # the inner steps' batches
        scores = one_query_at_a_time(predict, episode.support_x, algorithm.queries_with_support)(query_x)
        # The support set and one query, each time (ANIL's body and head are two calls on the same rows).
        assert set(batch_sizes) == {WAY * SHOT + 1} and len(batch_sizes) % len(query_x) == 0, batch_sizes
        return scores

    alone = outputs(episode.query_x, transductive=False)
    assert alone.shape == (WAY * QUERY, WAY)
    torch.testing.assert_close(outputs(others, transductive=False)[0], alone[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outputs(episode.query_x[:1], transductive=False)[0], alone[0], rtol=1e-12, atol=1e-12)
    # Transductively the same query's output moves with the others: this is what the mode removes.
    assert not torch.allclose(outputs(others, transductive=True)[0], outputs(episode.query_x, transductive=True)[0], rtol=1e-6)
    assert not torch.allclose(alone, outputs(episode.query_x, transductive=True), rtol=1e-6)


def test_before_any_inner_step_a_query_alone_is_the_last_row_of_the_network_on_the_support_set_and_it():
    algorithm, forward, params, _ = built("maml", "batch")
    episode = episodes(tasks=1)[0]
    first = next(iter(algorithm.adaptations(forward, params, episode.support_x, episode.support_y, classification_objective)))
    alone = one_query_at_a_time(first, episode.support_x, algorithm.queries_with_support)(episode.query_x)
    with torch.no_grad():
        by_hand = torch.stack([forward(params, torch.cat([episode.support_x, query[None]]))[-1] for query in episode.query_x])
    torch.testing.assert_close(alone, by_hand, rtol=0, atol=0)


def test_the_evaluation_loop_scores_the_same_episodes_either_way():
    # Sinusoid regression through the MLP, whose examples never meet: both ways must give the same numbers, which they
    # can only if they draw the same episodes from eval_seed (and score the same steps).
    cfg = compose_config(["dataset=sinusoid", "test_inner_steps=2", "model.hidden=[8,8]"])
    algorithm = build_algorithm(cfg)
    tasks = build_tasks(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, tasks, algorithm)
    sampler = tasks.sampler("test", int(cfg.way), int(cfg.shot), int(cfg.query), torch.device("cpu"))
    together, alone = (evaluate(algorithm, model, sampler, tasks.kind, 7, 3, torch.device("cpu"), transductive=transductive)
                       for transductive in (True, False))
    assert list(together) == list(alone) == [0, 1, 2]
    for step in together:
        for metric, (mean, ci) in together[step].items():
            assert alone[step][metric] == pytest.approx((mean, ci), rel=1e-5)
    other_seed = evaluate(algorithm, model, sampler, tasks.kind, 7, 4, torch.device("cpu"), transductive=False)
    assert other_seed[2]["mse"][0] != pytest.approx(alone[2]["mse"][0], rel=1e-5)  # the episodes, not the model, set the numbers
