#!/usr/bin/env python
"""Time conv4 forward+backward with two batch-norm kernels and two weight layouts, on this machine.

Usage: python scripts/bench_conv4_layout.py [--threads 2] [--repeats 5]

Prints median seconds for (a) a ProtoNet-sized batch (60-way 1-shot 5-query: 360 images, head-less
conv4) and (b) MAML meta-gradients of 8 tasks of 5-way 1-shot 15-query (1 inner step, second order).
The figures quoted in the docstrings of ``maml_cli.models`` (batch-norm kernel, ``channels_last``)
come from this script; only ratios within one run mean anything on a shared machine.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from maml_cli.algorithms.maml import MAML
from maml_cli.loop import functional_forward
from maml_cli.models import BatchStatNorm, Conv4
from maml_cli.tasks import Episode, classification_objective


class ElementaryBatchNorm(BatchStatNorm):
    """The same normalisation written from mean, variance and rsqrt (exact under vmap)."""

    def forward(self, x):
        dims = [0, 2, 3]
        mean, var = x.mean(dim=dims, keepdim=True), x.var(dim=dims, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def median_seconds(step, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def conv4(out_features: int, elementary: bool, channels_last: bool) -> Conv4:
    model = Conv4(1, out_features)
    if elementary:
        for i, layer in enumerate(model.features):
            if isinstance(layer, BatchStatNorm):
                model.features[i] = ElementaryBatchNorm(layer.weight.numel())
    return model.to(memory_format=torch.channels_last) if channels_last else model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.rand(360, 1, 28, 28)
    episodes = [Episode(torch.rand(5, 1, 28, 28), torch.arange(5), torch.rand(75, 1, 28, 28), torch.arange(5).repeat_interleave(15))
                for _ in range(8)]
    maml = MAML(inner_lr=0.4, inner_steps=1, test_inner_steps=1)
    print(f"threads={args.threads}, median of {args.repeats}")
    print(f"{'batch norm':<12} {'layout':<14} {'ProtoNet 360 images':>20} {'MAML 8 tasks':>14}")
    for elementary in (True, False):
        for channels_last in (False, True):
            embed = conv4(0, elementary, channels_last)
            classifier = conv4(5, elementary, channels_last)
            forward, params = functional_forward(classifier), dict(classifier.named_parameters())

            def protonet_step():
                embed(images).pow(2).mean().backward()

            def maml_step():
                for episode in episodes:
                    maml.meta_loss(forward, params, episode, classification_objective)[0].backward()

            print(f"{'elementary' if elementary else 'F.batch_norm':<12} {'channels_last' if channels_last else 'contiguous':<14} "
                  f"{median_seconds(protonet_step, args.repeats):>20.3f} {median_seconds(maml_step, args.repeats):>14.3f}")


if __name__ == "__main__":
    main()
