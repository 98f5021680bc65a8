#!/usr/bin/env python
"""Time maml-cli's meta-training step against the libraries a researcher would otherwise use.

Usage:
    python scripts/bench.py                      # every setting, CPU, float32 timings
    python scripts/bench.py --quick              # tiny settings: the correctness check in a few seconds (CI)
    python scripts/bench.py --device cuda --settings a,b --json bench.json
    python scripts/bench.py --startup --data-root ~/.cache/maml-cli   # seconds from launch to the first step

For each setting and implementation it prints the median seconds per meta-step, tasks per
second, peak memory, how many times slower the implementation is than maml-cli, the operators
one meta-step dispatches (views apart: on a GPU each of the others launches at least one kernel,
and a launch-bound step's time follows their number), and the relative difference of its
meta-gradient from the plain loop's, computed in float64 on the same tasks from the same
initialisation. The script exits with status 1 if a meta-gradient
differs from the loop's by more than ``--tolerance``.

Implementations (``impl`` in the JSON rows):
    maml-cli     ``maml_cli.loop.accumulate_meta_gradient``, the code ``maml-train`` runs, with conv4 in the
                 memory layout ``maml-train`` chooses (``maml_cli.build.default_channels_last``), the tasks one
                 at a time (on CUDA ``maml-train`` batches MAML's, ANIL's and Meta-SGD's by default: the row below).
    maml-cli:tasks_at_once=2
                 the same with ``tasks_at_once=2``: two tasks at a time, each on half the cores.
    maml-cli:episodes_per_call=1
                 the same, one episode per call to the algorithm, for algorithms that otherwise compute the
                 whole meta-batch in one pass (the LSTM): the path such an algorithm took before batching.
    maml-cli:batch_tasks=true
                 the same with ``algo.batch_tasks=true``: the meta-batch's tasks in one ``vmap`` (MAML, ANIL,
                 Meta-SGD; skipped for the others).
    loop         a plain ``torch.func.functional_call`` loop over tasks, written out here: the reference.
    higher       ``higher.innerloop_ctx`` (``pip install -e ".[bench]"``); skipped with a note if missing.
    learn2learn  ``learn2learn.algorithms.MAML``, when importable (its PyPI package does not build on
                 Python 3.11 as published); skipped with a note if missing.
    fwd+bwd      the same network's plain forward and backward over the same images, one task per batch
                 (the LSTM: the whole meta-batch in one batch), in maml-cli's layout: the floor a meta-learning
                 step is measured against (no meta-gradient).

Every implementation gets the same conv4 (``maml_cli.models.Conv4``: 3x3 convolution, batch
normalisation on batch statistics, ReLU, 2x2 max-pooling, 64 filters) and the same tasks.
maml-cli's data time is measured separately: drawing the meta-batch with the episode sampler
``maml-train`` uses, from an Omniglot-sized tensor of images held on the device.

The implementations' steps are timed interleaved in one process, so that a change in the
machine's load falls on all of them alike: only ratios within one run mean anything on a
shared machine. Peak memory is measured for each row in a process of its own (with
``--quick``, in this process: indicative only).
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from maml_cli.algorithms.anil import ANIL
from maml_cli.algorithms.lstm import RecurrentMetaLearner
from maml_cli.algorithms.maml import MAML
from maml_cli.algorithms.mamlpp import MAMLPlusPlus, msl_weights
from maml_cli.algorithms.metasgd import MetaSGD
from maml_cli.algorithms.protonet import ProtoNet
from maml_cli.algorithms.reptile import Reptile
from maml_cli.build import CPU_EMBEDDING_CHUNK, default_channels_last
from maml_cli.data.episodes import ClassImageSampler
from maml_cli.data.store import ImageStore, StoreSampler, write_store_rows
from maml_cli.loop import TaskThreads, accumulate_meta_gradient
from maml_cli.models import Conv4
from maml_cli.tasks import Episode, classification_objective

TWO_AT_ONCE = "maml-cli:tasks_at_once=2"
ONE_PER_CALL = "maml-cli:episodes_per_call=1"
BATCHED = "maml-cli:batch_tasks=true"
BODY_PER_STEP = "loop:body_per_step"
IMPLS = ("maml-cli", TWO_AT_ONCE, ONE_PER_CALL, BATCHED, "loop", BODY_PER_STEP, "higher", "learn2learn", "fwd+bwd")


@dataclass(frozen=True)
class Setting:
    """One benchmark setting: an algorithm and the shape of its meta-batch."""

    name: str
    algo: str  # maml | anil | metasgd | mamlpp | reptile | protonet | lstm
    way: int
    shot: int
    query: int
    meta_batch: int
    inner_steps: int = 0
    first_order: bool = False
    hidden: int = 64
    inner_lr: float = 0.4
    lstm_hidden: int = 200
    inner_batch: int | None = None  # reptile: examples per inner step (None: the whole training set)
    # The float64 check's bound when it must be looser than --tolerance: Adam (Reptile's inner optimizer) steps by
    # g / sqrt(v), which does not shrink with |g|, so a rounding difference in a gradient element near Adam's epsilon
    # (conv4's biases before batch norm have true gradient zero) becomes a difference of the step itself.
    grad_tolerance: float | None = None
    channels: int = 1
    image_size: int = 28
    # Draw the data from a memory-mapped image store on disk of miniImageNet's training size (64 x 600 images),
    # as maml-train does for the image datasets other than Omniglot, instead of from a tensor on the device.
    store: bool = False

    def describe(self) -> str:
        if self.algo == "lstm":
            shape = f"{self.way}-way x {self.shot} presentations"
        else:
            shape = f"{self.way}-way {self.shot}-shot {self.query}-query"
        extra = ""
        if self.algo in GRADIENT_STEP_ALGOS:
            extra = f", {self.inner_steps} step{'s' * (self.inner_steps != 1)}"
            extra += f", {'first' if self.first_order else 'second'} order" if self.algo != "reptile" else f", inner batch {self.inner_batch or 'all'}"
        images = f", {self.image_size}x{self.image_size}x{self.channels} from an image store" if self.store else ""
        return f"{self.algo} {shape}, meta-batch {self.meta_batch}{extra}{images}"


# Algorithms with an inner loop of gradient steps on a classifier (conv4 with a head).
GRADIENT_STEP_ALGOS = ("maml", "anil", "metasgd", "mamlpp", "reptile")


SETTINGS = {
    "a": Setting("a", "maml", 5, 1, 15, 32, inner_steps=1),
    "b": Setting("b", "maml", 20, 1, 5, 16, inner_steps=5),
    "c": Setting("c", "maml", 5, 1, 15, 32, inner_steps=1, first_order=True),
    "protonet_60w5s": Setting("protonet_60w5s", "protonet", 60, 5, 5, 1),
    "protonet_5w1s": Setting("protonet_5w1s", "protonet", 5, 1, 15, 1),
    "lstm_5w": Setting("lstm_5w", "lstm", 5, 10, 0, 16),
    # The optimization family at its presets' shapes: ANIL beside a and b (its speed is the head-only inner loop).
    "anil_a": Setting("anil_a", "anil", 5, 1, 15, 32, inner_steps=1),
    "anil_b": Setting("anil_b", "anil", 20, 1, 5, 16, inner_steps=5),
    "metasgd_a": Setting("metasgd_a", "metasgd", 5, 1, 15, 32, inner_steps=1),
    "mamlpp_5w": Setting("mamlpp_5w", "mamlpp", 5, 1, 1, 8, inner_steps=5, inner_lr=0.1),
    "reptile_5w": Setting("reptile_5w", "reptile", 5, 10, 1, 5, inner_steps=5, inner_lr=1e-3, inner_batch=10, grad_tolerance=1e-6),
    # miniImageNet's shapes, the data read from an image store: Finn et al.'s MAML and Snell et al.'s training episodes.
    "maml_mini": Setting("maml_mini", "maml", 5, 1, 15, 4, inner_steps=5, hidden=32, inner_lr=0.01, channels=3, image_size=84, store=True),
    "protonet_mini": Setting("protonet_mini", "protonet", 30, 1, 15, 1, channels=3, image_size=84, store=True),
}
# The same settings shrunk until a meta-step takes milliseconds: what CI and the tests run.
QUICK = {
    "a": Setting("a", "maml", 5, 1, 2, 3, inner_steps=1, hidden=8),
    "b": Setting("b", "maml", 20, 1, 1, 2, inner_steps=5, hidden=8),
    "c": Setting("c", "maml", 5, 1, 2, 3, inner_steps=1, first_order=True, hidden=8),
    "protonet_60w5s": Setting("protonet_60w5s", "protonet", 10, 2, 2, 1, hidden=8),
    "protonet_5w1s": Setting("protonet_5w1s", "protonet", 5, 1, 2, 1, hidden=8),
    "lstm_5w": Setting("lstm_5w", "lstm", 3, 3, 0, 2, hidden=8, lstm_hidden=8),
    "anil_a": Setting("anil_a", "anil", 5, 1, 2, 3, inner_steps=1, hidden=8),
    "anil_b": Setting("anil_b", "anil", 20, 1, 1, 2, inner_steps=5, hidden=8),
    "metasgd_a": Setting("metasgd_a", "metasgd", 5, 1, 2, 3, inner_steps=1, hidden=8),
    "mamlpp_5w": Setting("mamlpp_5w", "mamlpp", 5, 1, 1, 2, inner_steps=3, hidden=8, inner_lr=0.1),
    "reptile_5w": Setting("reptile_5w", "reptile", 3, 4, 1, 2, inner_steps=3, hidden=8, inner_lr=1e-3, inner_batch=5, grad_tolerance=1e-6),
    "maml_mini": Setting("maml_mini", "maml", 3, 1, 2, 2, inner_steps=2, hidden=8, inner_lr=0.01, channels=3, image_size=16, store=True),
    "protonet_mini": Setting("protonet_mini", "protonet", 5, 1, 2, 1, hidden=8, channels=3, image_size=16, store=True),
}
# Omniglot's meta-training split as maml-train holds it: 1,100 characters x 4 rotations, 20 images each.
DATA_CLASSES, DATA_IMAGES = 4400, 20


class Skip(Exception):
    """An implementation that is not installed or does not apply to a setting."""


# -- the network and the tasks ---------------------------------------------------------------

def make_model(setting: Setting, dtype: torch.dtype, device: torch.device, seed: int = 0, impl: str = "loop") -> torch.nn.Module:
    """conv4 (under the LSTM for ``lstm``): maml-cli's and fwd+bwd's in the memory layout (and, under the LSTM, the
    embedding chunks) ``maml-train`` would choose, the others contiguous and in one call."""
    torch.manual_seed(seed)
    channels_last = (impl.startswith("maml-cli") or impl == "fwd+bwd") and default_channels_last(device)
    if setting.algo in GRADIENT_STEP_ALGOS:
        # Meta-SGD's and MAML++'s own meta-parameters (rates, per-step norms) are added here for every implementation.
        model = algorithm(setting).attach(Conv4(setting.channels, setting.way, hidden=setting.hidden, image_size=setting.image_size,
                                                channels_last=channels_last))
        with torch.no_grad():  # rates and rows that differ by element and step, as after some meta-training
            for name, p in model.named_parameters():
                if name.startswith(("inner_lrs.", "step_norms.")):
                    p.mul_(1 + 0.2 * torch.rand(p.shape))
    elif setting.algo == "protonet":
        model = Conv4(setting.channels, 0, hidden=setting.hidden, image_size=setting.image_size, channels_last=channels_last)
    else:
        backbone = Conv4(1, 0, hidden=setting.hidden, batch_norm="example", channels_last=channels_last)
        chunk = CPU_EMBEDDING_CHUNK if (impl.startswith("maml-cli") or impl == "fwd+bwd") and device.type == "cpu" else None
        model = RecurrentMetaLearner(protocol="sequence", presentations=setting.shot, hidden_size=setting.lstm_hidden, centre=True).make_network(
            backbone, 28 * 28, label_size=setting.way, out_features=setting.way, embedding_chunk=chunk)
    return model.to(device=device, dtype=dtype)


def make_sampler(setting: Setting, device: torch.device, seed: int = 0, classes: int = DATA_CLASSES) -> ClassImageSampler | StoreSampler:
    if setting.store:
        return store_sampler(setting, device, seed)
    images = torch.randint(0, 256, (classes, DATA_IMAGES, 1, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    return ClassImageSampler(images.to(device), setting.way, setting.shot, setting.query, "benchmark data")


# miniImageNet's meta-training split as an image store holds it: 64 classes x 600 images.
STORE_CLASSES, STORE_IMAGES = 64, 600
_STORES: dict[tuple[int, int], ImageStore] = {}


def store_sampler(setting: Setting, device: torch.device, seed: int = 0) -> StoreSampler:
    """Episodes read from an image store in a temporary folder (written once per image shape and run): random pixels
    in the file layout ``maml-train`` decodes a dataset into, read row by row as training reads them."""
    key = (setting.channels, setting.image_size)
    if key not in _STORES:
        folder = Path(tempfile.mkdtemp(prefix="maml-cli-bench-store-")) / "store"
        classes, images = (STORE_CLASSES, STORE_IMAGES) if setting.image_size >= 84 else (2 * setting.way, 8)
        rng = np.random.default_rng(seed)
        names = [f"class{c}" for c in range(classes)]
        write_store_rows(folder, names, [images] * classes, (rng.integers(0, 256, (images, setting.channels, setting.image_size,
                                                                                    setting.image_size), dtype=np.uint8) for _ in names))
        _STORES[key] = ImageStore(folder)
    store = _STORES[key]
    return StoreSampler(store, store.offsets[:-1], store.counts, setting.way, setting.shot, setting.query, "benchmark store", device)


def make_episodes(setting: Setting, dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[Episode]:
    sampler = make_sampler(setting, torch.device("cpu"), seed, classes=2 * setting.way)
    generator = torch.Generator().manual_seed(seed)
    episodes = []
    for _ in range(setting.meta_batch):
        e = sampler.sample(generator)
        episodes.append(Episode(e.support_x.to(device, dtype), e.support_y.to(device), e.query_x.to(device, dtype), e.query_y.to(device)))
    return episodes


def algorithm(setting: Setting, batch_tasks: bool = False) -> Any:
    if setting.algo == "maml":
        return MAML(setting.inner_lr, setting.inner_steps, 0, setting.first_order, batch_tasks)
    if setting.algo == "anil":
        return ANIL(setting.inner_lr, setting.inner_steps, 0, setting.first_order, batch_tasks)
    if setting.algo == "metasgd":
        return MetaSGD(setting.inner_lr, setting.inner_steps, 0, setting.first_order, batch_tasks)
    if batch_tasks:
        raise Skip("algo.batch_tasks is for MAML, ANIL and Meta-SGD")
    if setting.algo == "mamlpp":
        # Part-way through the multi-step loss's annealing, so every step's weight counts.
        return MAMLPlusPlus(setting.inner_lr, setting.inner_steps, 0, msl_iterations=MAMLPP_MSL_ITERATIONS).at_iteration(MAMLPP_ITERATION, 10**6)
    if setting.algo == "reptile":
        return Reptile(setting.inner_lr, setting.inner_steps, 0, inner_batch=setting.inner_batch)
    if setting.algo == "protonet":
        return ProtoNet(train_way=setting.way, train_shot=setting.shot, train_query=setting.query)
    return RecurrentMetaLearner(protocol="sequence", presentations=setting.shot, hidden_size=setting.lstm_hidden, centre=True)


MAMLPP_MSL_ITERATIONS, MAMLPP_ITERATION = 1000, 300


# -- the implementations: each returns step(model, episodes), which leaves the meta-gradient in .grad

def step_maml_cli(setting: Setting) -> Callable:
    algo = algorithm(setting)
    return lambda model, episodes: accumulate_meta_gradient(algo, model, episodes, classification_objective)


def step_maml_cli_two_at_once(setting: Setting) -> Callable:
    if setting.meta_batch < 2:
        raise Skip("one task per meta-batch")
    algo = algorithm(setting)
    threads: dict[int, TaskThreads] = {}

    def step(model, episodes):
        if id(model) not in threads:
            threads[id(model)] = TaskThreads(model, 2)
        return accumulate_meta_gradient(algo, model, episodes, classification_objective, threads[id(model)])
    return step


def step_maml_cli_one_per_call(setting: Setting) -> Callable:
    algo = algorithm(setting)
    if algo.episodes_per_call == 1:
        raise Skip("maml-cli already takes one episode per call")
    algo.episodes_per_call = 1
    return lambda model, episodes: accumulate_meta_gradient(algo, model, episodes, classification_objective)


def step_maml_cli_batched(setting: Setting) -> Callable:
    algo = algorithm(setting, batch_tasks=True)
    return lambda model, episodes: accumulate_meta_gradient(algo, model, episodes, classification_objective)


def loop_anil(setting: Setting) -> Callable:
    """The head adapted by hand on features computed once per task."""
    def step(model, episodes):
        for e in episodes:
            support_features, query_features = model(e.support_x, "body"), model(e.query_x, "body")
            weight, bias = model.head.weight, model.head.bias
            for _ in range(setting.inner_steps):
                support_loss = F.cross_entropy(F.linear(support_features, weight, bias), e.support_y)
                grad_w, grad_b = torch.autograd.grad(support_loss, (weight, bias), create_graph=not setting.first_order)
                weight, bias = weight - setting.inner_lr * grad_w, bias - setting.inner_lr * grad_b
            (F.cross_entropy(F.linear(query_features, weight, bias), e.query_y) / len(episodes)).backward()
    return step


def step_body_per_step(setting: Setting) -> Callable:
    """ANIL without its reuse: the head adapted as in :func:`loop_anil`, but every inner step and the query pass run the
    whole network (the body unchanged), as MAML's loop does with the body's update left out. The same meta-gradient, so
    its time against the loop's is what computing the body's features once per task saves."""
    if setting.algo != "anil":
        raise Skip("ANIL only")
    return whole_network_loop(setting, adapts=lambda name: name.startswith("head."))


def whole_network_loop(setting: Setting, adapts: Callable[[str], bool] = lambda name: True) -> Callable:
    """MAML's plain loop: every inner step and the query pass run the whole network through ``functional_call``, and
    the parameters ``adapts`` names take the inner steps (all of them for MAML)."""
    def step(model, episodes):
        params = dict(model.named_parameters())
        for e in episodes:
            fast = {name: p for name, p in params.items() if adapts(name)}
            for _ in range(setting.inner_steps):
                support_loss = F.cross_entropy(functional_call(model, {**params, **fast}, (e.support_x,)), e.support_y)
                grads = torch.autograd.grad(support_loss, list(fast.values()), create_graph=not setting.first_order)
                fast = {name: p - setting.inner_lr * g for (name, p), g in zip(fast.items(), grads)}
            query_loss = F.cross_entropy(functional_call(model, {**params, **fast}, (e.query_x,)), e.query_y)
            (query_loss / len(episodes)).backward()
    return step


def loop_metasgd(setting: Setting) -> Callable:
    """Every element's own rate, read from the network's ``inner_lrs``."""
    def step(model, episodes):
        params = {n: p for n, p in model.named_parameters() if not n.startswith("inner_lrs.")}
        rates = {n: model.inner_lrs[n.replace(".", "/")] for n in params}
        for e in episodes:
            fast = params
            for _ in range(setting.inner_steps):
                support_loss = F.cross_entropy(functional_call(model, fast, (e.support_x,)), e.support_y)
                grads = torch.autograd.grad(support_loss, list(fast.values()), create_graph=not setting.first_order)
                fast = {n: p - rates[n] * g for (n, p), g in zip(fast.items(), grads)}
            (F.cross_entropy(functional_call(model, fast, (e.query_x,)), e.query_y) / len(episodes)).backward()
    return step


def loop_mamlpp(setting: Setting) -> Callable:
    """Step k: rate k of each adapted tensor, batch-norm row k for its support and query passes, the query losses
    weighted by the multi-step loss weights."""
    weights = msl_weights(setting.inner_steps, MAMLPP_ITERATION, MAMLPP_MSL_ITERATIONS)

    def step(model, episodes):
        norms = {n.replace("/", "."): rows for n, rows in model.step_norms.items()}
        params = {n: p for n, p in model.named_parameters() if not n.startswith(("inner_lrs.", "step_norms.")) and n not in norms}
        rates = {n: model.inner_lrs[n.replace(".", "/")] for n in params}
        for e in episodes:
            fast, total = params, 0
            for k in range(setting.inner_steps):
                row = {n: rows[k] for n, rows in norms.items()}
                support_loss = F.cross_entropy(functional_call(model, {**fast, **row}, (e.support_x,)), e.support_y)
                grads = torch.autograd.grad(support_loss, list(fast.values()), create_graph=True)
                fast = {n: p - rates[n][k] * g for (n, p), g in zip(fast.items(), grads)}
                total = total + float(weights[k]) * F.cross_entropy(functional_call(model, {**fast, **row}, (e.query_x,)), e.query_y)
            (total / len(episodes)).backward()
    return step


def loop_reptile(setting: Setting) -> Callable:
    """torch.optim.Adam (beta1 = 0) on a copy of the network per task, mini-batches drawn as openai/supervised-reptile
    does (without replacement, reshuffled when used up); the gradient handed on is the mean of theta - theta'."""
    import copy

    def step(model, episodes):
        directions = []
        for e in episodes:
            task_model = copy.deepcopy(model)
            # foreach=True: the multi-tensor update torch.optim.Adam takes by default on a GPU, on every device.
            inner = torch.optim.Adam(task_model.parameters(), lr=setting.inner_lr, betas=(0.0, 0.999), foreach=True)
            order: list[int] = []
            # The draws are seeded by the task's images (CRC-32 of their bytes), as maml-cli's Reptile does.
            draws = torch.Generator().manual_seed(zlib.crc32(e.support_x.detach().cpu().numpy().tobytes()))
            for _ in range(setting.inner_steps):
                chosen = slice(None)
                if setting.inner_batch and setting.inner_batch < len(e.support_x):
                    if len(order) < setting.inner_batch:
                        order += torch.randperm(len(e.support_x), generator=draws).tolist()
                    chosen, order = order[: setting.inner_batch], order[setting.inner_batch:]
                inner.zero_grad()
                F.cross_entropy(task_model(e.support_x[chosen]), e.support_y[chosen]).backward()
                inner.step()
            directions.append([p.detach() - q.detach() for p, q in zip(model.parameters(), task_model.parameters())])
        for p, *per_task in zip(model.parameters(), *directions):
            p.grad = torch.stack(per_task).mean(dim=0)
    return step


def step_loop(setting: Setting) -> Callable:
    if setting.algo in LOOPS:
        return LOOPS[setting.algo](setting)
    if setting.algo == "maml":
        return whole_network_loop(setting)
    if setting.algo == "protonet":
        def step(model, episodes):
            for e in episodes:
                embeddings = model(torch.cat([e.support_x, e.query_x]))
                support, query = embeddings[: len(e.support_x)], embeddings[len(e.support_x):]
                centres = torch.stack([support[e.support_y == k].mean(0) for k in range(setting.way)])
                logits = -torch.cdist(query, centres).pow(2)
                (F.cross_entropy(logits, e.query_y) / len(episodes)).backward()
    else:
        def step(model, episodes):
            for e in episodes:
                # The label's hot entry: the square root of the embedding's width (maml-cli's default label_scale).
                one_hot = F.one_hot(e.support_y, setting.way).to(e.support_x.dtype) * model.embedding.embedding_size ** 0.5
                shifted = torch.cat([torch.zeros_like(one_hot[:1]), one_hot[:-1]])
                # Each step centred on the mean embedding of the steps so far (maml-cli's default for sequence).
                outputs, _ = model(e.support_x[None], shifted[None], query_x=None, centre="running")
                (F.cross_entropy(outputs[0], e.support_y) / len(episodes)).backward()
    return step


LOOPS = {"anil": loop_anil, "metasgd": loop_metasgd, "mamlpp": loop_mamlpp, "reptile": loop_reptile}


def maml_library(setting: Setting, module: str, missing: str) -> Any:
    """A comparator library for a MAML setting; Skip (with the reason) for other algorithms or when it is missing."""
    if setting.algo != "maml":
        raise Skip("MAML only")
    try:
        return importlib.import_module(module)
    except ImportError:
        raise Skip(missing) from None


def step_higher(setting: Setting) -> Callable:
    higher = maml_library(setting, "higher", 'not installed (pip install -e ".[bench]")')

    # Gradients as constants after each step: higher's way to first-order MAML.
    detach = (lambda grads: [g.detach() for g in grads]) if setting.first_order else None

    def step(model, episodes):
        inner_opt = torch.optim.SGD(model.parameters(), lr=setting.inner_lr)
        for e in episodes:
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(setting.inner_steps):
                    diffopt.step(F.cross_entropy(fmodel(e.support_x), e.support_y), grad_callback=detach)
                (F.cross_entropy(fmodel(e.query_x), e.query_y) / len(episodes)).backward()
    return step


def step_learn2learn(setting: Setting) -> Callable:
    learn2learn = maml_library(setting, "learn2learn", "not importable (learn2learn 0.2.0 does not build from PyPI on Python 3.11 as published)")
    wrappers: dict[int, Any] = {}

    def step(model, episodes):
        maml = wrappers.setdefault(id(model), learn2learn.algorithms.MAML(model, lr=setting.inner_lr, first_order=setting.first_order))
        for e in episodes:
            learner = maml.clone()
            for _ in range(setting.inner_steps):
                learner.adapt(F.cross_entropy(learner(e.support_x), e.support_y))
            (F.cross_entropy(learner(e.query_x), e.query_y) / len(episodes)).backward()
    return step


def step_fwd_bwd(setting: Setting) -> Callable:
    def step(model, episodes):
        if setting.algo == "lstm":
            x, y = torch.stack([e.support_x for e in episodes]), torch.stack([e.support_y for e in episodes])
            outputs, _ = model(x, torch.zeros(*y.shape, setting.way, dtype=x.dtype, device=x.device), query_x=None, centre="running")
            F.cross_entropy(outputs.flatten(0, 1), y.flatten()).backward()
            return
        for e in episodes:
            if setting.algo == "protonet":
                loss = model(torch.cat([e.support_x, e.query_x])).pow(2).mean()
            else:
                loss = F.cross_entropy(model(torch.cat([e.support_x, e.query_x])), torch.cat([e.support_y, e.query_y]))
            (loss / len(episodes)).backward()
    return step


MAKERS = {"maml-cli": step_maml_cli, TWO_AT_ONCE: step_maml_cli_two_at_once, ONE_PER_CALL: step_maml_cli_one_per_call, BATCHED: step_maml_cli_batched, "loop": step_loop, BODY_PER_STEP: step_body_per_step, "higher": step_higher, "learn2learn": step_learn2learn, "fwd+bwd": step_fwd_bwd}


# -- measuring ---------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mib(field: str) -> float | None:
    """``VmRSS`` or ``VmHWM`` (peak) of this process in MiB, from /proc (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak(device: torch.device) -> float | None:
    """Start a fresh peak-memory window; returns the baseline (MiB) that peak_mib subtracts, or None if the peak cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        return None  # the peak would include everything before: report none rather than a wrong one
    return rss_mib("VmRSS")


def peak_mib(device: torch.device, baseline: float | None) -> float | None:
    if baseline is None:
        return None
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20 - baseline
    peak = rss_mib("VmHWM")
    return None if peak is None else max(peak - baseline, 0.0)


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def meta_gradient(setting: Setting, impl: str, device: torch.device, tasks: int | None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The implementation's meta-gradient (float64 unless asked) on the first ``tasks`` tasks of the meta-batch."""
    model = make_model(setting, dtype, device, impl=impl)
    episodes = make_episodes(setting, dtype, device)[:tasks]
    MAKERS[impl](setting)(model, episodes)
    return flat_grad(model)


def time_step(step: Callable, model: torch.nn.Module, episodes: list[Episode], device: torch.device) -> float:
    for p in model.parameters():
        p.grad = None
    synchronize(device)
    start = time.perf_counter()
    step(model, episodes)
    synchronize(device)
    return time.perf_counter() - start


class OperatorCount(TorchDispatchMode):
    """Counts the operators dispatched in this thread while active, those that return a view apart (a view launches no kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.operators = 0
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        else:
            self.operators += 1
        return func(*args, **(kwargs or {}))


def operators_per_step(setting: Setting, impl: str, device: torch.device, dtype: torch.dtype) -> int | None:
    """Operators other than views that one meta-step dispatches, counted at the dispatcher on a fresh model (the count
    is the same on every device, up to operators a device decomposes differently); ``None`` for an implementation whose
    tasks run in other threads, which the count does not see."""
    if impl == TWO_AT_ONCE:
        return None
    step = MAKERS[impl](setting)
    model, episodes = make_model(setting, dtype, device, impl=impl), make_episodes(setting, dtype, device)
    with OperatorCount() as count:
        step(model, episodes)
    return count.operators


def data_seconds(setting: Setting, device: torch.device, repeats: int) -> float:
    """Median seconds to draw one meta-batch the way maml-train does, from Omniglot-sized images on the device."""
    sampler, generator = make_sampler(setting, device), torch.Generator().manual_seed(1)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(setting.meta_batch):
            sampler.sample(generator).to(device)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_setting(setting: Setting, impls: list[str], device: torch.device, dtype: torch.dtype, steps: int, warmup: int,
                 check_tasks: int | None) -> list[dict[str, Any]]:
    """Rows for one setting: seconds per step with the implementations' steps interleaved, and each meta-gradient's
    relative distance from the loop's in float64.

    Interleaving (step 1 of every implementation, then step 2, ...) lets a change in the machine's load
    fall on all of them alike, so the ratios hold even when the absolute times drift.
    """
    rows, runners = {}, {}
    for impl in impls:
        rows[impl] = {"setting": setting.name, "impl": impl, "seconds_per_step": None, "tasks_per_second": None,
                      "peak_mib": None, "operators_per_step": None, "grad_rel_diff": None}
        try:
            runners[impl] = (MAKERS[impl](setting), make_model(setting, dtype, device, impl=impl), make_episodes(setting, dtype, device))
        except Skip as why:
            rows[impl]["skipped"] = str(why)
    times: dict[str, list[float]] = {impl: [] for impl in runners}
    for i in range(warmup + steps):
        order = list(runners)[i % len(runners):] + list(runners)[: i % len(runners)] if runners else []
        for impl in order:
            seconds = time_step(*runners[impl], device)
            if i >= warmup:
                times[impl].append(seconds)
    reference = meta_gradient(setting, "loop", device, check_tasks) if set(times) - {"fwd+bwd"} else None
    for impl, samples in times.items():
        seconds = sorted(samples)[len(samples) // 2]
        rows[impl].update(seconds_per_step=seconds, tasks_per_second=setting.meta_batch / seconds,
                          operators_per_step=operators_per_step(setting, impl, device, dtype))
        if impl == "maml-cli":
            rows[impl]["data_seconds"] = data_seconds(setting, device, max(steps, 3))
            rows[impl]["data_fraction"] = rows[impl]["data_seconds"] / (rows[impl]["data_seconds"] + seconds)
        if impl != "fwd+bwd":
            mine = reference if impl == "loop" else meta_gradient(setting, impl, device, check_tasks)
            rows[impl]["grad_rel_diff"] = float((mine - reference).norm() / reference.norm())
    return list(rows.values())


def peak_row(setting: Setting, impl: str, device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak memory (MiB above what the model and tasks hold) of a warm-up step and a measured one."""
    try:
        step = MAKERS[impl](setting)
    except Skip:
        return None
    model, episodes = make_model(setting, dtype, device, impl=impl), make_episodes(setting, dtype, device)
    baseline = reset_peak(device)
    for _ in range(2):
        time_step(step, model, episodes, device)
    return peak_mib(device, baseline)


def peak_isolated(args: argparse.Namespace, setting: str, impl: str) -> float | None:
    """:func:`peak_row` in a fresh process, so that no other row's memory counts."""
    command = [sys.executable, __file__, "--peak-row", setting, impl, "--device", args.device, "--dtype", args.dtype]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.quick:
        command.append("--quick")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measuring the memory of {impl} on {setting} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- start-up ------------------------------------------------------------------------------------

def startup_seconds(data_root: str, device: str) -> list[float]:
    """Seconds from launching ``maml-train`` to the start of meta-training (its log line just before the first step), twice."""
    import shutil
    import tempfile
    launcher = shutil.which("maml-train") or str(Path(sys.executable).with_name("maml-train"))
    seconds = []
    with tempfile.TemporaryDirectory() as out:
        for run in range(2):
            command = [launcher, f"data_root={data_root}", f"device={device}", "iterations=1", "val_every=1000", "val_tasks=1",
                       "test_tasks=1", "progress=false", f"hydra.run.dir={out}/run{run}"]
            start = time.perf_counter()
            with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
                for line in process.stdout:
                    if "meta-training starts" in line:
                        seconds.append(time.perf_counter() - start)
                        break
                process.kill()
            if len(seconds) <= run:
                raise SystemExit(f"maml-train did not reach its first step: {' '.join(command)}")
    return seconds


# -- the table -----------------------------------------------------------------------------------

TABLE_HEADER = f"{'setting':<16} {'impl':<28} {'s/step':>8} {'tasks/s':>8} {'peak MiB':>9} {'t/maml-cli':>10} {'ops/step':>9} {'grad rel diff':>14}  note"


def print_table(rows: list[dict[str, Any]], settings: dict[str, Setting], tolerance: float, header: bool = True) -> bool:
    ok = True
    if header:
        print(TABLE_HEADER)
    for name in dict.fromkeys(row["setting"] for row in rows):
        group = [row for row in rows if row["setting"] == name]
        print(f"-- {name}: {settings[name].describe()}")
        ours = next((row["seconds_per_step"] for row in group if row["impl"] == "maml-cli"), None)
        for row in group:
            if row.get("skipped"):
                print(f"{name:<16} {row['impl']:<28} skipped: {row['skipped']}")
                continue
            ratio = f"{row['seconds_per_step'] / ours:.2f}" if ours else "-"
            diff = row["grad_rel_diff"]
            bound = max(tolerance, settings[name].grad_tolerance or 0.0)
            verdict = "" if diff is None else ("ok" if diff <= bound else "FAIL")
            ok &= verdict != "FAIL"
            note = f"data {100 * row['data_fraction']:.1f}% of a step" if "data_fraction" in row else ""
            diff_text = "-" if diff is None else f"{diff:.1e} {verdict}"
            peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
            operators = "-" if row["operators_per_step"] is None else str(row["operators_per_step"])
            print(f"{name:<16} {row['impl']:<28} {row['seconds_per_step']:>8.3f} {row['tasks_per_second']:>8.1f} {peak:>9} "
                  f"{ratio:>10} {operators:>9} {diff_text:>14}  {note}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="dtype of the timed steps (the gradient check is always float64)")
    parser.add_argument("--steps", type=int, help="timed meta-steps per row, the median is reported (default 5, --quick 1)")
    parser.add_argument("--warmup", type=int, help="untimed meta-steps first (default 1, --quick 0)")
    parser.add_argument("--quick", action="store_true", help="tiny settings, peak memory measured in this process: a correctness check in seconds")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {','.join(SETTINGS)}")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {','.join(IMPLS)}")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--check-tasks", type=int, default=4, help="tasks of the meta-batch in the float64 gradient check (0: all)")
    parser.add_argument("--tolerance", type=float, default=1e-9, help="largest accepted relative meta-gradient difference (float64)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    parser.add_argument("--startup", action="store_true", help="measure maml-train's start-up instead (needs --data-root)")
    parser.add_argument("--data-root", help="data_root holding Omniglot, for --startup")
    parser.add_argument("--peak-row", nargs=2, metavar=("SETTING", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    # --quick is a correctness check (CI runs it): one timed step, no warm-up.
    args.steps = args.steps or (1 if args.quick else 5)
    args.warmup = (0 if args.quick else 1) if args.warmup is None else args.warmup
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.startup:
        if not args.data_root:
            parser.error("--startup needs --data-root (a data_root where maml-train finds or caches Omniglot)")
        first, second = startup_seconds(args.data_root, args.device)
        print(f"maml-train, launch to the start of meta-training: {first:.2f} s (first run), {second:.2f} s (second run)")
        return
    table = QUICK if args.quick else SETTINGS
    dtype = getattr(torch, args.dtype)
    check_tasks = args.check_tasks or None
    if args.peak_row:
        print(json.dumps(peak_row(table[args.peak_row[0]], args.peak_row[1], device, dtype)))
        return
    settings = [s for s in args.settings.split(",") if s]
    impls = [i for i in args.impls.split(",") if i]
    for name in settings:
        if name not in table:
            parser.error(f"unknown setting {name!r}; choose from {', '.join(table)}")
    for impl in impls:
        if impl not in MAKERS:
            parser.error(f"unknown implementation {impl!r}; choose from {', '.join(MAKERS)}")
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, timings in {args.dtype}, "
          f"median of {args.steps} steps after {args.warmup} warm-up{' (quick)' if args.quick else ''}")
    rows, ok = [], True
    print(TABLE_HEADER, flush=True)
    for name in settings:
        # The implementations of a setting are timed interleaved, so their rows come together; say what is under way.
        print(f"   (measuring {name}: {table[name].describe()})", flush=True)
        measured = time_setting(table[name], impls, device, dtype, args.steps, args.warmup, check_tasks)
        for row in measured:
            if not row.get("skipped"):
                # --quick measures in this process: indicative only, but fast enough for CI.
                row["peak_mib"] = peak_row(table[name], row["impl"], device, dtype) if args.quick else peak_isolated(args, name, row["impl"])
        ok &= print_table(measured, table, args.tolerance, header=False)  # each setting as soon as it is measured
        sys.stdout.flush()
        rows += measured
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if not ok:
        raise SystemExit(f"a meta-gradient differs from the plain loop's by more than {args.tolerance:g} (or a row failed)")


if __name__ == "__main__":
    main()
