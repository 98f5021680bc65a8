#!/usr/bin/env python
"""Time conv4 with two batch-norm kernels and two memory layouts, on this machine.

Usage: python scripts/bench_conv4_layout.py [--threads 2] [--repeats 7] [--parts kernels,layouts,chunks]

Part 1, the batch-norm kernel (contiguous layout): median seconds for a ProtoNet-sized batch
(60-way 1-shot 5-query: 360 images, head-less conv4, forward+backward) and for the MAML
meta-gradients of 8 tasks of 5-way 1-shot 15-query (1 inner step, second order), with batch
normalisation written from mean, variance and rsqrt, and with ``F.batch_norm``.

Part 2, the layout, by batch size: milliseconds for a plain forward+backward and for a
second-order MAML step on the same batch (forward, gradient with ``create_graph``, forward
with the adapted weights, backward through both), contiguous and channels-last (both passes
channels-last here: no :func:`~maml_cli.models.differentiated_twice` mark). This is the
measurement behind ``Conv4(channels_last=True)`` and :func:`maml_cli.models.differentiated_twice`.

Part 3, embedding in chunks: milliseconds for a forward+backward of a head-less conv4 with per-example batch norm
(what ``algo=lstm`` embeds with) over the 800 images of a 16-episode meta-batch of Santoro et al.'s 5 classes x 10
presentations (the bench's ``lstm_5w``), in one call and in chunks of a few sizes (channels-last, as on the CPU). This is the measurement behind
``maml_cli.build.CPU_EMBEDDING_CHUNK``.

The figures quoted in ``maml_cli.models`` and docs/performance.md come from this script;
only ratios within one run mean anything on a shared machine.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from maml_cli.algorithms.maml import MAML
from maml_cli.loop import functional_forward
from maml_cli.models import BatchNormMode, BatchStatNorm, Conv4
from maml_cli.tasks import Episode, classification_objective


class ElementaryBatchNorm(BatchStatNorm):
    """The same normalisation written from mean, variance and rsqrt (exact under vmap)."""

    def forward(self, x):
        dims = [0, 2, 3]
        mean, var = x.mean(dim=dims, keepdim=True), x.var(dim=dims, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def median_seconds(step, repeats: int) -> float:
    times = []
    for _ in range(repeats + 2):  # the first two calls warm up
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[repeats // 2]


def conv4(out_features: int, elementary: bool = False, channels_last: bool = False) -> Conv4:
    torch.manual_seed(0)
    model = Conv4(1, out_features, channels_last=channels_last)
    if elementary:
        for i, layer in enumerate(model.features):
            if isinstance(layer, BatchStatNorm):
                model.features[i] = ElementaryBatchNorm(layer.weight.numel())
    return model


def batch_norm_kernels(repeats: int) -> None:
    images = torch.rand(360, 1, 28, 28)
    episodes = [Episode(torch.rand(5, 1, 28, 28), torch.arange(5), torch.rand(75, 1, 28, 28), torch.arange(5).repeat_interleave(15))
                for _ in range(8)]
    maml = MAML(inner_lr=0.4, inner_steps=1, test_inner_steps=1)
    print(f"{'batch norm':<14} {'ProtoNet 360 images (s)':>24} {'MAML 8 tasks (s)':>17}")
    for elementary in (True, False):
        embed, classifier = conv4(0, elementary), conv4(5, elementary)
        forward, params = functional_forward(classifier), dict(classifier.named_parameters())

        def protonet_step():
            embed(images).pow(2).mean().backward()

        def maml_step():
            for episode in episodes:
                maml.meta_loss(forward, params, episode, classification_objective)[0].backward()

        print(f"{'elementary' if elementary else 'F.batch_norm':<14} {median_seconds(protonet_step, repeats):>24.3f} "
              f"{median_seconds(maml_step, repeats):>17.3f}")


def layouts(repeats: int) -> None:
    print(f"{'images':>6} {'fwd+bwd contiguous':>19} {'channels-last':>14} {'2nd-order contiguous':>21} {'channels-last':>14}  (ms)")
    for n in (5, 20, 75, 100):
        x, y = torch.rand(n, 1, 28, 28), torch.arange(n) % 5
        row = []
        for channels_last in (False, True):
            model = conv4(5, channels_last=channels_last)
            forward, params = functional_forward(model), dict(model.named_parameters())

            def plain():
                F.cross_entropy(model(x), y).backward()

            def second_order():
                loss = F.cross_entropy(forward(params, x), y)
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
                adapted = {name: p - 0.1 * g for (name, p), g in zip(params.items(), grads)}
                F.cross_entropy(forward(adapted, x), y).backward()

            row.append((1e3 * median_seconds(plain, repeats), 1e3 * median_seconds(second_order, repeats)))
        print(f"{n:>6} {row[0][0]:>19.1f} {row[1][0]:>14.1f} {row[0][1]:>21.1f} {row[1][1]:>14.1f}")


def embedding_chunks(repeats: int) -> None:
    images = torch.rand(800, 1, 28, 28)
    torch.manual_seed(0)
    embed = Conv4(1, 0, batch_norm=BatchNormMode.example, channels_last=True)
    times = {}
    for chunk in (None, 16, 32, 64, 128, 256):
        def step():
            parts = images.split(chunk) if chunk else [images]
            torch.cat([embed(part) for part in parts]).pow(2).mean().backward()

        times[chunk] = 1e3 * median_seconds(step, repeats)
    print(f"{'chunk':>6} {'fwd+bwd of 800 images (ms)':>27} {'/ one call':>11}")
    for chunk, ms in times.items():
        print(f"{chunk or 'all':>6} {ms:>27.1f} {ms / times[None]:>11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parts = {"kernels": batch_norm_kernels, "layouts": layouts, "chunks": embedding_chunks}
    parser.add_argument("--parts", default=",".join(parts), help=f"which parts to run, of {','.join(parts)}")
    args = parser.parse_args()
    chosen = args.parts.split(",")
    if unknown := set(chosen) - set(parts):
        parser.error(f"--parts: {', '.join(sorted(unknown))} not among {', '.join(parts)}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    for i, name in enumerate(chosen):
        if i:
            print()
        parts[name](args.repeats)


if __name__ == "__main__":
    main()
