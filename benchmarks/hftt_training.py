"""HFTT training on cached embeddings: frozen-task-column precompute vs the plain formulation.

Both variants see the same embeddings and the same trainable state. The plain formulation computes
all K + M logits of all K*T task rows every step (what the reference does, minus re-encoding the
corpus); it is timed over a few steps and extrapolated to the epoch. The loss difference is
measured on identical parameters along the fast run's trajectory.

    python benchmarks/hftt_training.py [--classes 1000 --templates 80 --trainable 10 --corpus 370000]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from _common import peak_rss_mb, write
from curation.detectors.hftt import _lse, frozen_task_loss, hftt_loss, task_embeddings, train_trainable


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--templates", type=int, default=80)
    parser.add_argument("--trainable", type=int, default=10)
    parser.add_argument("--corpus", type=int, default=370_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--plain-steps", type=int, default=3)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    per_template = F.normalize(torch.randn(args.classes, args.templates, args.dim, generator=gen), dim=-1)
    world = F.normalize(torch.randn(args.corpus, args.dim, generator=gen), dim=-1)
    task_emb = task_embeddings(per_template)
    rows = per_template.flatten(0, 1)
    steps = -(-args.corpus // 256)

    start = time.perf_counter()
    trained = train_trainable(rows, world, task_emb, n_trainable=args.trainable)
    fast_epoch_s = time.perf_counter() - start

    trainable = torch.randn(args.trainable, args.dim, generator=gen).requires_grad_()
    start = time.perf_counter()
    for step in range(args.plain_steps):
        batch = world[step * 256:(step + 1) * 256]
        hftt_loss(rows, batch, task_emb, trainable).backward()
    plain_step_s = (time.perf_counter() - start) / args.plain_steps

    loss_diffs, grad_diffs = [], []
    task_lse = _lse(rows, task_emb, 0.01)
    for params in (trainable.detach(), trained):
        batch = world[:256]
        plain_params, fast_params = params.clone().requires_grad_(), params.clone().requires_grad_()
        plain = hftt_loss(rows, batch, task_emb, plain_params)
        fast = frozen_task_loss(rows, task_lse, batch, _lse(batch, task_emb, 0.01), fast_params)
        plain.backward()
        fast.backward()
        loss_diffs.append(abs(fast.item() - plain.item()))
        grad_diffs.append((fast_params.grad - plain_params.grad).abs().max().item())

    write("hftt_training", {
        "config": vars(args) | {"steps_per_epoch": steps, "batch_size": 256},
        "fast_epoch_s": round(fast_epoch_s, 2),
        "plain_step_s": round(plain_step_s, 3),
        "plain_epoch_s_extrapolated": round(plain_step_s * steps, 1),
        "speedup": round(plain_step_s * steps / fast_epoch_s, 1),
        "max_loss_abs_diff": max(loss_diffs),
        "max_grad_abs_diff": max(grad_diffs),
        "peak_rss_mb": round(peak_rss_mb()),
    })


if __name__ == "__main__":
    main()
