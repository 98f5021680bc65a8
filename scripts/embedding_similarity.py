#!/usr/bin/env python
"""How alike a freshly initialised conv4 makes the embeddings of Omniglot characters: the measurement behind the
LSTM's centring (``algo.centre``, docs/results.md, "What made it learn").

Usage:
    python scripts/embedding_similarity.py --data-root DIR [--split vinyals --split-dir DIR] [--episodes 50]
        [--way 20] [--shot 5] [--seeds 0,1,2]

For each initialisation seed, a head-less conv4 with per-example batch norm (what ``algo=lstm`` embeds with) embeds
the support sets of ``--episodes`` meta-training episodes; the script prints the mean cosine similarity of the
embeddings of two drawings of the same character and of two different characters, as they come and after centring
each episode on its mean (what the LSTM reads with ``algo.centre=true``).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from maml_cli.data.omniglot import OmniglotTasks
from maml_cli.models import BatchNormMode, Conv4


def similarities(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cosine similarity of the pairs of one class and of the pairs of two classes (an embedding with itself left out)."""
    unit = F.normalize(embeddings, dim=1)
    cosine = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    itself = torch.eye(len(labels), dtype=torch.bool)
    return cosine[same & ~itself].mean().item(), cosine[~same].mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="data_root holding omniglot-py/ (as maml-train's data_root)")
    parser.add_argument("--split", default="random", choices=["random", "lake", "vinyals"])
    parser.add_argument("--split-dir", help="the folder of train.txt, val.txt, test.txt for --split vinyals")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--way", type=int, default=20)
    parser.add_argument("--shot", type=int, default=5)
    parser.add_argument("--seeds", default="0,1,2", help="conv4 initialisation seeds")
    args = parser.parse_args()
    if args.shot < 2:
        parser.error("--shot must be at least 2: the similarity of one character's drawings needs two of them")
    torch.set_num_threads(1)
    tasks = OmniglotTasks(args.data_root, split=args.split, split_dir=args.split_dir, download=False)
    sampler = tasks.sampler("train", args.way, args.shot, 1)
    generator = torch.Generator().manual_seed(0)
    episodes = [sampler.sample(generator) for _ in range(args.episodes)]
    print(f"{args.episodes} meta-training episodes of {args.way}-way {args.shot}-shot, split {tasks.split_name}; "
          f"mean cosine similarity of the embeddings of a head-less conv4 (per-example batch norm) at initialisation")
    print(f"{'seed':>4} {'same character':>15} {'two characters':>15} {'centred: same':>14} {'centred: two':>13}")
    for seed in (int(s) for s in args.seeds.split(",")):
        torch.manual_seed(seed)
        embed = Conv4(1, 0, batch_norm=BatchNormMode.example).eval()
        raw, centred = [], []
        with torch.no_grad():
            for episode in episodes:
                embeddings = embed(episode.support_x)
                raw.append(similarities(embeddings, episode.support_y))
                centred.append(similarities(embeddings - embeddings.mean(dim=0), episode.support_y))
        (same, two), (centred_same, centred_two) = (torch.tensor(pairs).mean(dim=0).tolist() for pairs in (raw, centred))
        print(f"{seed:>4} {same:>15.3f} {two:>15.3f} {centred_same:>14.3f} {centred_two:>13.3f}")


if __name__ == "__main__":
    main()
