"""scripts/bench.py: maml-cli's meta-gradient equals the plain loop's, and the check would catch one that does not."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("impl", ["maml-cli", "maml-cli:tasks_at_once=2", "maml-cli:episodes_per_call=1", "maml-cli:batch_tasks=true"])
@pytest.mark.parametrize("setting", ["a", "b", "c", "protonet_60w5s", "lstm_5w", "anil_b", "metasgd_a", "mamlpp_5w", "reptile_5w"])
def test_maml_cli_meta_gradient_equals_the_plain_loop_in_float64(bench, setting, impl):
    tiny = bench.QUICK[setting]
    if tiny.meta_batch < 2 and impl != "maml-cli":
        pytest.skip("one task per meta-batch")
    if impl.endswith("episodes_per_call=1") and tiny.algo != "lstm":
        pytest.skip("already one episode per call")
    if impl.endswith("batch_tasks=true") and tiny.algo not in ("maml", "anil", "metasgd"):
        pytest.skip("algo.batch_tasks is for MAML, ANIL and Meta-SGD")
    reference = bench.meta_gradient(tiny, "loop", torch.device("cpu"), None)
    ours = bench.meta_gradient(tiny, impl, torch.device("cpu"), None)
    assert reference.dtype == torch.float64 and reference.norm() > 0
    assert float((ours - reference).norm() / reference.norm()) < (tiny.grad_tolerance or 1e-12)


@pytest.mark.parametrize("setting", ["anil_a", "anil_b"])
def test_anil_with_the_body_run_at_every_step_has_anils_meta_gradient(bench, setting):
    # The bench's measure of what ANIL's reuse of the body's features saves is only fair if it computes the same thing.
    tiny = bench.QUICK[setting]
    reference = bench.meta_gradient(tiny, "loop", torch.device("cpu"), None)
    recomputed = bench.meta_gradient(tiny, bench.BODY_PER_STEP, torch.device("cpu"), None)
    assert float((recomputed - reference).norm() / reference.norm()) < 1e-12
    with pytest.raises(bench.Skip):
        bench.MAKERS[bench.BODY_PER_STEP](bench.QUICK["a"])


def test_the_reptile_check_catches_an_inner_adam_with_momentum(bench):
    # The looser bound for Reptile still fails an inner optimizer that is not the paper's (beta1 = 0.9 instead of 0).
    tiny = bench.QUICK["reptile_5w"]
    reference = bench.meta_gradient(tiny, "loop", torch.device("cpu"), None)
    model, episodes = bench.make_model(tiny, torch.float64, torch.device("cpu")), bench.make_episodes(tiny, torch.float64, torch.device("cpu"))
    reptile = bench.Reptile(tiny.inner_lr, tiny.inner_steps, 0, adam_beta1=0.9, inner_batch=tiny.inner_batch)
    bench.accumulate_meta_gradient(reptile, model, episodes, bench.classification_objective)
    assert float((bench.flat_grad(model) - reference).norm() / reference.norm()) > 1e-3


@pytest.mark.parametrize("setting", ["a", "c", "protonet_60w5s"])
def test_the_timed_float32_path_agrees_with_the_loop(bench, setting):
    # float64 convolutions take other kernels than the channels-last float32 ones that are timed.
    tiny = bench.QUICK[setting]
    reference = bench.meta_gradient(tiny, "loop", torch.device("cpu"), None, torch.float32)
    ours = bench.meta_gradient(tiny, "maml-cli", torch.device("cpu"), None, torch.float32)
    assert float((ours - reference).norm() / reference.norm()) < 1e-4


def test_higher_agrees_with_the_loop_when_installed(bench):
    pytest.importorskip("higher")
    for name in ("b", "c"):
        tiny = bench.QUICK[name]
        reference = bench.meta_gradient(tiny, "loop", torch.device("cpu"), None)
        theirs = bench.meta_gradient(tiny, "higher", torch.device("cpu"), None)
        assert float((theirs - reference).norm() / reference.norm()) < 1e-12


@pytest.mark.parametrize("setting", ["a", "b", "c", "anil_a", "anil_b", "metasgd_a", "mamlpp_5w", "reptile_5w", "maml_mini"])
def test_maml_cli_dispatches_about_the_operators_of_the_plain_loop(bench, setting):
    # A launch-bound step on a GPU takes the time of the kernels it launches. Beyond the loop's, maml-cli may dispatch
    # only what the loop leaves out: the query metrics (argmax, comparison, cast, mean) and conv4's channels-last copies
    # on a CPU per task, and the metric totals once per step. Per-tensor inner updates and per-task stacks exceed this.
    tiny = bench.QUICK[setting]
    ours = bench.operators_per_step(tiny, "maml-cli", torch.device("cpu"), torch.float64)
    loop = bench.operators_per_step(tiny, "loop", torch.device("cpu"), torch.float64)
    assert loop > 100 and ours <= loop + 8 * tiny.meta_batch + 16, (ours, loop)


def test_the_operator_count_sees_every_operator_but_views(bench):
    with bench.OperatorCount() as count:
        x = torch.ones(3, 4)
        (x * 2).view(12).sum().t()
    assert (count.operators, count.views) == (3, 2)


def test_the_check_catches_a_wrong_meta_gradient(bench, monkeypatch):
    # First-order gradients passed off as second-order ones: the row must say so.
    second_order = bench.QUICK["a"]
    monkeypatch.setitem(bench.MAKERS, "maml-cli", lambda setting: bench.step_loop(bench.Setting(**{**setting.__dict__, "first_order": True})))
    rows = bench.time_setting(second_order, ["maml-cli", "loop"], torch.device("cpu"), torch.float32, steps=1, warmup=0, check_tasks=None)
    assert rows[0]["impl"] == "maml-cli" and rows[0]["grad_rel_diff"] > 1e-3
    assert rows[1]["grad_rel_diff"] == 0
    assert not bench.print_table(rows, bench.QUICK, tolerance=1e-9)


def test_quick_run_passes_and_writes_the_json_rows(bench, tmp_path):
    out = tmp_path / "bench.json"
    # One thread: beside other jobs, two threads per process oversubscribe 2 cores and these tiny steps slow fivefold.
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())
    assert {row["setting"] for row in rows} == set(bench.QUICK)
    for row in rows:
        assert {"setting", "impl", "seconds_per_step", "tasks_per_second", "peak_mib", "operators_per_step", "grad_rel_diff"} <= row.keys()
        if row.get("skipped"):
            continue
        assert row["seconds_per_step"] > 0 and row["tasks_per_second"] > 0
        assert row["operators_per_step"] is None if row["impl"] == "maml-cli:tasks_at_once=2" else row["operators_per_step"] > 0
        if row["impl"] != "fwd+bwd":
            assert row["grad_rel_diff"] < max(1e-9, bench.QUICK[row["setting"]].grad_tolerance or 0)
    assert any(row["impl"] == "maml-cli" and 0 < row["data_fraction"] < 1 for row in rows)
    assert "learn2learn" in done.stdout  # listed, run or skipped with its reason, never a failure


def test_unknown_setting_is_an_error_naming_the_choices():
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--settings", "z"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown setting 'z'" in done.stderr and "protonet_60w5s" in done.stderr
