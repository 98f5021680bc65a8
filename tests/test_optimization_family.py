"""ANIL, Meta-SGD, Reptile and MAML++: each meta-gradient against finite differences or its hand-written definition, in float64."""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from maml_cli.algorithms.anil import ANIL
from maml_cli.algorithms.inner import Adam, adapt
from maml_cli.algorithms.mamlpp import MAMLPlusPlus, msl_weights
from maml_cli.algorithms.maml import MAML
from maml_cli.algorithms.metasgd import MetaSGD
from maml_cli.algorithms.reptile import Reptile, minibatch_indices
from maml_cli.loop import accumulate_meta_gradient, functional_forward
from maml_cli.models import BatchStatNorm
from maml_cli.tasks import Episode, EpisodeBatch, classification_objective


class TinyClassifier(nn.Module):
    """A body (linear, batch statistics, tanh: smooth, so central differences are accurate) and a head, run apart like conv4."""

    def __init__(self, features=3, hidden=5, way=3):
        super().__init__()
        # No bias before the normalisation, which would cancel it: its gradient would be rounding noise, which Adam
        # (Reptile's inner optimizer) scales up to full steps.
        self.features = nn.Sequential(nn.Linear(features, hidden, bias=False), BatchStatNorm(hidden), nn.Tanh())
        self.head = nn.Linear(hidden, way)

    def forward(self, x, part="all"):
        if part == "head":
            return self.head(x)
        h = self.features(x)
        return h if part == "body" else self.head(h)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return TinyClassifier().double()


def tiny_episode(seed=1, way=3, shot=2, query=3, features=3):
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.randn(way * shot, features, generator=g, dtype=torch.float64), torch.arange(way).repeat_interleave(shot),
                   torch.randn(way * query, features, generator=g, dtype=torch.float64), torch.arange(way).repeat_interleave(query))


def loss_of(algorithm, model, params, episode):
    losses, _ = algorithm.meta_loss(functional_forward(model), params, EpisodeBatch.stack([episode]), classification_objective)
    return losses[0]


def analytic_gradient(algorithm, model, episode):
    params = dict(model.named_parameters())
    learned = [n for n, p in params.items() if p.requires_grad]
    grads = dict(zip(learned, torch.autograd.grad(loss_of(algorithm, model, params, episode), [params[n] for n in learned], allow_unused=True)))
    return {n: grads.get(n) for n in params}


def central_differences(algorithm, model, episode, names, eps=1e-6):
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = {}
    for name in names:
        grad = torch.zeros_like(base[name])
        for i in range(grad.numel()):
            values = []
            for sign in (1, -1):
                shifted = {k: v.clone().requires_grad_() for k, v in base.items()}
                with torch.no_grad():
                    shifted[name].view(-1)[i] += sign * eps
                values.append(loss_of(algorithm, model, shifted, episode).item())
            grad.view(-1)[i] = (values[0] - values[1]) / (2 * eps)
        grads[name] = grad
    return grads


# -- ANIL --------------------------------------------------------------------------------------

@pytest.mark.parametrize("first_order", [False, True])
def test_anil_gradient_equals_maml_with_the_body_inner_update_removed(first_order):
    model, episode = tiny_model(), tiny_episode()
    anil = ANIL(inner_lr=0.5, inner_steps=2, test_inner_steps=2, first_order=first_order)
    ours = analytic_gradient(anil, model, episode)
    # MAML's own inner loop, told to adapt the head alone, over the whole network's forward.
    forward, params = functional_forward(model), dict(model.named_parameters())
    adapted = adapt(forward, params, episode.support_x, episode.support_y, classification_objective, 0.5, 2, first_order,
                    adapted={"head.weight", "head.bias"})
    reference = dict(zip(params, torch.autograd.grad(classification_objective(forward(adapted, episode.query_x), episode.query_y)[0],
                                                     tuple(params.values()))))
    for name in params:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-10, atol=1e-12, msg=name)
    # ... and it is not MAML's: the body's inner update matters.
    maml = analytic_gradient(MAML(0.5, 2, 2, first_order), model, episode)
    assert not torch.allclose(maml["features.0.weight"], ours["features.0.weight"], atol=1e-6)


def test_anil_meta_gradient_equals_central_differences():
    model, episode = tiny_model(), tiny_episode()
    anil = ANIL(inner_lr=0.5, inner_steps=2, test_inner_steps=2)
    analytic = analytic_gradient(anil, model, episode)
    numeric = central_differences(anil, model, episode, [n for n, _ in model.named_parameters()])
    for name in numeric:
        torch.testing.assert_close(analytic[name], numeric[name], rtol=1e-6, atol=1e-8, msg=name)


def test_anil_evaluation_reports_each_head_step_and_adapting_helps_on_the_support_set():
    model, episode = tiny_model(), tiny_episode()
    anil = ANIL(inner_lr=0.5, inner_steps=1, test_inner_steps=4)
    train_as_query = Episode(episode.support_x, episode.support_y, episode.support_x, episode.support_y)
    steps = anil.evaluate(functional_forward(model), dict(model.named_parameters()), EpisodeBatch.stack([train_as_query]), classification_objective)
    assert list(steps) == [0, 1, 2, 3, 4]
    assert steps[4]["loss"][0] < steps[0]["loss"][0]


# -- Meta-SGD ----------------------------------------------------------------------------------

def test_metasgd_gradient_with_respect_to_its_rates_and_weights_equals_central_differences():
    model, episode = tiny_model(), tiny_episode()
    metasgd = MetaSGD(inner_lr=0.3, inner_steps=2, test_inner_steps=2)
    model = metasgd.attach(model)
    with torch.no_grad():  # rates that differ element by element, as after some meta-training
        for rate in model.inner_lrs.parameters():
            rate.mul_(torch.rand(rate.shape, generator=torch.Generator().manual_seed(3), dtype=rate.dtype) + 0.5)
    analytic = analytic_gradient(metasgd, model, episode)
    names = ["inner_lrs.features/0/weight", "inner_lrs.head/bias", "features.1.bias", "head.weight"]
    numeric = central_differences(metasgd, model, episode, names)
    for name in names:
        assert analytic[name].abs().sum() > 0
        torch.testing.assert_close(analytic[name], numeric[name], rtol=1e-6, atol=1e-8, msg=name)


def test_metasgd_rates_are_one_per_element_start_at_inner_lr_and_travel_with_the_state_dict():
    model = MetaSGD(inner_lr=0.3, inner_steps=1, test_inner_steps=1).attach(tiny_model())
    own = {n: p for n, p in model.named_parameters() if not n.startswith("inner_lrs.")}
    rates = dict(model.inner_lrs.named_parameters())
    assert {n.replace("/", ".") for n in rates} == set(own)
    assert all(rates[n.replace(".", "/")].shape == p.shape and torch.all(rates[n.replace(".", "/")] == 0.3) for n, p in own.items())
    with torch.no_grad():
        model.inner_lrs["head/bias"].fill_(0.7)
    restored = MetaSGD(inner_lr=0.3, inner_steps=1, test_inner_steps=1).attach(tiny_model(seed=5))
    restored.load_state_dict(model.state_dict())
    assert torch.all(restored.inner_lrs["head/bias"] == 0.7)


# -- Reptile -----------------------------------------------------------------------------------

def adapted_by_hand(model, episode, steps, lr):
    """theta' from torch.optim.Adam (beta1 = 0) on a copy of the model, the task's whole training set per step."""
    copy_ = copy.deepcopy(model)
    optimizer = torch.optim.Adam(copy_.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
    for _ in range(steps):
        optimizer.zero_grad()
        classification_objective(copy_(episode.support_x), episode.support_y)[0].backward()
        optimizer.step()
    return dict(copy_.named_parameters())


def test_reptile_direction_is_theta_minus_adapted_theta_for_one_task_and_the_mean_over_a_meta_batch():
    model = tiny_model()
    episodes = [tiny_episode(seed=s) for s in (1, 2, 3)]
    reptile = Reptile(inner_lr=0.01, inner_steps=4, test_inner_steps=4, final_outer_lr=None)
    params = dict(model.named_parameters())
    direction, _ = reptile.meta_gradient(functional_forward(model), params, EpisodeBatch.stack(episodes[:1]), classification_objective)
    by_hand = adapted_by_hand(model, episodes[0], 4, 0.01)
    for name, p in params.items():
        torch.testing.assert_close(direction[name], p.detach() - by_hand[name].detach(), rtol=1e-9, atol=1e-12, msg=name)

    accumulate_meta_gradient(reptile, model, episodes, classification_objective)
    mean_adapted = {n: torch.stack([adapted_by_hand(model, e, 4, 0.01)[n].detach() for e in episodes]).mean(0) for n in params}
    before = {n: p.detach().clone() for n, p in params.items()}
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    for name, p in model.named_parameters():
        # theta <- theta + epsilon * (mean theta' - theta)
        torch.testing.assert_close(p.detach(), before[name] + 0.5 * (mean_adapted[name] - before[name]), rtol=1e-9, atol=1e-12, msg=name)


def test_reptile_anneals_its_outer_step_linearly_to_the_final_rate():
    reptile = Reptile(inner_lr=1e-3, inner_steps=1, test_inner_steps=1, final_outer_lr=0.0)
    assert [reptile.outer_lr_schedule(1.0, i, 100) for i in (0, 50, 99)] == [1.0, 0.5, pytest.approx(0.01)]
    assert Reptile(inner_lr=1e-3, inner_steps=1, test_inner_steps=1, final_outer_lr=None).outer_lr_schedule is None


def test_reptile_minibatches_cover_every_example_before_any_repeats():
    batches = minibatch_indices(10, 4, 5, torch.Generator().manual_seed(0))
    flat = torch.cat(batches).tolist()
    assert all(len(b) == 4 for b in batches) and sorted(flat[:8]) == sorted(set(flat[:8])) and set(flat[:10]) == set(range(10))
    assert minibatch_indices(10, None, 3) == [None] * 3 and minibatch_indices(10, 10, 2) == [None] * 2


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_reptile_inner_adam_matches_torch_adam(beta1):
    # Two tensors of different shapes, as the multi-tensor update takes them; beta1 = 0 (the paper's) carries no first moment.
    torch.manual_seed(0)
    params = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    references = {n: p.clone().requires_grad_() for n, p in params.items()}
    optimizer = torch.optim.Adam(references.values(), lr=0.1, betas=(beta1, 0.999), eps=1e-8)
    rule = Adam(0.1, beta1=beta1)
    ours, state = dict(params), rule.init(params)
    for step in range(3):
        grads = {n: (step + 1) * torch.randn_like(p) - 1 for n, p in params.items()}
        ours, state = rule.update(step, ours, grads, state)
        for n, reference in references.items():
            reference.grad = grads[n].clone()
        optimizer.step()
    for n, reference in references.items():
        torch.testing.assert_close(ours[n], reference.detach(), rtol=1e-12, atol=1e-14)


# -- MAML++ ------------------------------------------------------------------------------------

def test_msl_weights_start_equal_anneal_toward_the_last_step_and_sum_to_one():
    torch.testing.assert_close(msl_weights(5, 0, 1000), torch.full((5,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(msl_weights(5, 500, 1000), torch.tensor([0.1, 0.1, 0.1, 0.1, 0.6], dtype=torch.float64))
    end = msl_weights(5, 1000, 1000)
    torch.testing.assert_close(end, torch.tensor([0.006] * 4 + [0.976], dtype=torch.float64))  # the authors' floor, 0.03 / N
    for iteration in (0, 123, 999):
        assert float(msl_weights(5, iteration, 1000).sum()) == pytest.approx(1.0)


def mamlpp_by_hand(model, episode, lrs, norm_rows, weights, steps, create_graph=True):
    """MAML++'s task loss written out: at step k the norm layer uses row k and every adapted tensor its rate k;
    the query after step k uses row k too; the losses are weighted by ``weights``."""
    own = {n: p for n, p in model.named_parameters() if n not in ("features.1.weight", "features.1.bias") and "/" not in n
           and not n.startswith(("inner_lrs", "step_norms"))}
    total = 0
    for k in range(steps):
        norm = {"features.1.weight": norm_rows["weight"][k], "features.1.bias": norm_rows["bias"][k]}
        loss = classification_objective(functional_call(model, {**own, **norm}, (episode.support_x,)), episode.support_y)[0]
        grads = torch.autograd.grad(loss, tuple(own.values()), create_graph=create_graph)
        own = {n: p - lrs[n][k] * g for (n, p), g in zip(own.items(), grads)}
        total = total + weights[k] * classification_objective(functional_call(model, {**own, **norm}, (episode.query_x,)), episode.query_y)[0]
    return total


def distinct_rows(model, generator_seed=4):
    """Per-step rates and batch-norm rows made to differ from step to step, so that a wrong row would show."""
    g = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for p in (*model.inner_lrs.parameters(), *model.step_norms.parameters()):
            p.add_(0.3 * torch.rand(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("iteration,expected_weights", [(0, [0.5, 0.5]), (50, [0.25, 0.75]), (100, [0.0, 1.0])])
def test_mamlpp_task_loss_uses_each_steps_rate_and_batch_norm_row_and_the_annealed_step_weights(iteration, expected_weights):
    mamlpp = MAMLPlusPlus(inner_lr=0.4, inner_steps=2, test_inner_steps=2, msl_iterations=100)
    model = mamlpp.attach(tiny_model())
    distinct_rows(model)
    episode = tiny_episode()
    rates = {n.replace("/", "."): r for n, r in model.inner_lrs.named_parameters()}
    rows = {"weight": model.step_norms["features/1/weight"], "bias": model.step_norms["features/1/bias"]}
    ours = loss_of(mamlpp.at_iteration(iteration, 1000), model, dict(model.named_parameters()), episode)
    expected = mamlpp_by_hand(model, episode, rates, rows, expected_weights, 2)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_mamlpp_meta_gradient_equals_central_differences_for_weights_rates_and_per_step_norms():
    mamlpp = MAMLPlusPlus(inner_lr=0.4, inner_steps=2, test_inner_steps=2, msl_iterations=100)
    model = mamlpp.attach(tiny_model())
    distinct_rows(model)
    episode, at = tiny_episode(), mamlpp.at_iteration(30, 1000)
    analytic = analytic_gradient(at, model, episode)
    names = ["features.0.weight", "head.bias", "inner_lrs.features/0/weight", "inner_lrs.head/weight",
             "step_norms.features/1/weight", "step_norms.features/1/bias"]
    numeric = central_differences(at, model, episode, names)
    for name in names:
        assert analytic[name].abs().sum() > 0, name
        torch.testing.assert_close(analytic[name], numeric[name], rtol=1e-6, atol=1e-8, msg=name)
    # The network's own normalisation parameters are replaced by the per-step rows: they get no gradient.
    assert analytic["features.1.weight"] is None


def test_mamlpp_is_first_order_for_first_order_iterations_then_second_order():
    mamlpp = MAMLPlusPlus(inner_lr=0.4, inner_steps=2, test_inner_steps=2, msl=False, first_order_iterations=10)
    first_only = MAMLPlusPlus(inner_lr=0.4, inner_steps=2, test_inner_steps=2, msl=False, first_order=True)
    second_only = MAMLPlusPlus(inner_lr=0.4, inner_steps=2, test_inner_steps=2, msl=False)
    model, episode = mamlpp.attach(tiny_model()), tiny_episode()
    early, late = analytic_gradient(mamlpp.at_iteration(9, 100), model, episode), analytic_gradient(mamlpp.at_iteration(10, 100), model, episode)
    first, second = analytic_gradient(first_only, model, episode), analytic_gradient(second_only, model, episode)
    for name in early:
        if early[name] is None:
            continue
        torch.testing.assert_close(early[name], first[name], rtol=1e-12, atol=1e-14, msg=name)
        torch.testing.assert_close(late[name], second[name], rtol=1e-12, atol=1e-14, msg=name)
    assert not torch.allclose(first["features.0.weight"], second["features.0.weight"], atol=1e-8)


def test_mamlpp_switches_off_give_maml_when_the_network_has_no_normalisation():
    torch.manual_seed(0)
    model = TinyClassifier()
    model.features = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
    model = model.double()
    plain = MAMLPlusPlus(inner_lr=0.4, inner_steps=2, test_inner_steps=2, msl=False, lslr=False, bnwb=False, cosine_outer_lr=False)
    plain_model = plain.attach(copy.deepcopy(model))
    episode = tiny_episode()
    ours = analytic_gradient(plain, plain_model, episode)
    maml = analytic_gradient(MAML(0.4, 2, 2), model, episode)
    for name, grad in maml.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-12, atol=1e-14, msg=name)
    assert all(g is None for n, g in ours.items() if n.startswith("inner_lrs."))  # lslr=false: the rates are not learned
    assert plain.outer_lr_schedule is None


def test_mamlpp_cosine_outer_rate():
    mamlpp = MAMLPlusPlus(inner_lr=0.1, inner_steps=1, test_inner_steps=1, min_outer_lr=1e-5)
    assert mamlpp.outer_lr_schedule(1e-3, 0, 100) == pytest.approx(1e-3)
    assert mamlpp.outer_lr_schedule(1e-3, 50, 100) == pytest.approx((1e-3 + 1e-5) / 2)
    assert mamlpp.outer_lr_schedule(1e-3, 100, 100) == pytest.approx(1e-5)


def test_mamlpp_evaluation_reuses_the_last_steps_rows_past_the_trained_steps():
    mamlpp = MAMLPlusPlus(inner_lr=0.4, inner_steps=2, test_inner_steps=4)
    model = mamlpp.attach(tiny_model())
    episode = tiny_episode()
    steps = mamlpp.evaluate(functional_forward(model), dict(model.named_parameters()), EpisodeBatch.stack([episode]), classification_objective)
    assert list(steps) == [0, 1, 2, 3, 4] and all(torch.isfinite(s["loss"]).all() for s in steps.values())
