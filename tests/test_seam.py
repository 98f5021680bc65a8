"""The algorithm seam: every algorithm is one module, one conf/algo YAML and its tests, found by the same code path."""
import dataclasses
from pathlib import Path

import pytest

from maml_cli import config
from maml_cli.algorithms.registry import InnerLoopConfig, registered_algorithms
from maml_cli.build import INNER_LOOP_KEYS, check_inner_loop_overrides, has_inner_loop
from maml_cli.errors import UserError
from test_config import compose_config

config.register()
ALGO_YAMLS = sorted(p.stem for p in (Path(config.config_dir()) / "algo").glob("*.yaml"))
REGISTERED = registered_algorithms()


def test_every_algo_yaml_has_a_registered_algorithm_and_every_algorithm_a_yaml():
    assert ALGO_YAMLS == sorted(REGISTERED)
    for name in ALGO_YAMLS:
        assert f"/schema/algo/{name}@_here_" in (Path(config.config_dir()) / "algo" / f"{name}.yaml").read_text()


@pytest.mark.parametrize("name", ALGO_YAMLS)
def test_each_algorithm_declares_its_contract_and_its_schema_agrees(name):
    entry = REGISTERED[name]
    target = next(f.default for f in dataclasses.fields(entry.schema) if f.name == "_target_")
    assert target == f"{entry.algorithm.__module__}.{entry.algorithm.__qualname__}"
    # An inner loop is declared by the class and carried by the schema's top-level keys, or neither.
    assert entry.inner_loop == issubclass(entry.schema, InnerLoopConfig)
    assert entry.algorithm.outer in ("loss", "gradient")
    assert callable(getattr(entry.algorithm, "meta_loss" if entry.algorithm.outer == "loss" else "meta_gradient", None))
    assert entry.algorithm.network in ("classifier", "embedding", "recurrent")


@pytest.mark.parametrize("name", ALGO_YAMLS)
def test_inner_loop_keys_apply_exactly_to_the_algorithms_that_declare_an_inner_loop(name):
    cfg = compose_config([f"algo={name}"])
    assert has_inner_loop(cfg) == REGISTERED[name].inner_loop
    if REGISTERED[name].inner_loop:
        check_inner_loop_overrides(cfg, ["inner_steps=3"])
        assert compose_config([f"algo={name}", "inner_steps=3"]).algo.inner_steps == 3  # read through from the top level
    else:
        for key in INNER_LOOP_KEYS:
            with pytest.raises(UserError, match=f"{key} does not apply to algo="):
                check_inner_loop_overrides(cfg, [f"{key}=3"])


def test_a_sweep_over_an_inner_loop_key_is_refused_for_the_swept_algorithms_without_one():
    without = sorted(n for n, e in REGISTERED.items() if not e.inner_loop)
    with_loop = sorted(n for n, e in REGISTERED.items() if e.inner_loop)
    sweep = [f"algo={','.join(with_loop + without[:1])}", "inner_steps=1,3"]
    with pytest.raises(UserError, match=f"does not apply to algo={without[0]}"):
        check_inner_loop_overrides(compose_config([f"algo={with_loop[0]}", "inner_steps=1"]), ["inner_steps=1"], sweep)
    check_inner_loop_overrides(compose_config([f"algo={with_loop[0]}", "inner_steps=1"]), ["inner_steps=1"],
                               [f"algo={','.join(with_loop)}", "inner_steps=1,3"])


def test_a_sweep_over_presets_is_judged_by_the_presets_algorithms_before_its_first_member():
    # experiment=maml_...,protonet_...: the members are MAML and ProtoNet, so a swept inner-loop key is refused in
    # the first (MAML) member, before anything trains; a single value is meant for the MAML member and accepted.
    sweep = ["experiment=maml_omniglot_5w1s,protonet_omniglot_5w1s", "inner_steps=1,3"]
    first = compose_config(["experiment=maml_omniglot_5w1s", "inner_steps=1"])
    with pytest.raises(UserError, match="does not apply to algo=protonet"):
        check_inner_loop_overrides(first, ["experiment=maml_omniglot_5w1s", "inner_steps=1"], sweep)
    check_inner_loop_overrides(first, ["experiment=maml_omniglot_5w1s", "test_inner_steps=5"],
                               ["experiment=maml_omniglot_5w1s,protonet_omniglot_5w1s", "test_inner_steps=5"])
    check_inner_loop_overrides(first, ["experiment=maml_omniglot_5w1s", "inner_steps=1"],
                               ["experiment=maml_omniglot_5w1s,anil_omniglot_5w1s", "inner_steps=1,3"])


@pytest.mark.parametrize("name", sorted(n for n, e in REGISTERED.items() if e.inner_loop))
def test_each_inner_loop_algorithm_runs_on_sinusoid_regression(name):
    # The MLP's last layer is its head (ANIL), it has no normalisation layers (MAML++'s per-step batch norm is then empty).
    from test_config import _instantiate_all

    _instantiate_all(compose_config([f"algo={name}", "dataset=sinusoid", "test_inner_steps=2"]))


def test_an_mlp_checkpoint_from_before_the_body_head_split_still_loads():
    # Runs saved before ANIL needed a head of its own held one Sequential, ``net``, whose last Linear was the head.
    import torch
    from torch import nn

    from maml_cli.models import MLP

    torch.manual_seed(0)
    old = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    state = {f"net.{k}": v for k, v in old.state_dict().items()}
    model = MLP(1, 1, (40, 40))
    model.load_state_dict(state)
    x = torch.linspace(-5, 5, 7)[:, None]
    torch.testing.assert_close(model(x), old(x))
    torch.testing.assert_close(model(model(x, "body"), "head"), old(x))
