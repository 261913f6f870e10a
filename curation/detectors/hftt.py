"""HFTT: trainable embeddings in CLIP's joint space, trained on text only (algorithms.md, "HFTT").

The classifier is W = [task embeddings | normalize(P)]; the world corpus is labelled "trainable"
and the task texts "task", with a focal-weighted loss. Training runs on cached text embeddings.

Speed: the task columns of W are frozen, so the log-sum-exp over the K task columns of every task
row and every corpus row is computed once; each step only recomputes the M trainable columns
(K=1000, M=10: ~100x fewer multiply-adds per step than the plain formulation, same loss).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

from curation.detectors.base import Detector, as_float_tensor
from curation.progress import Progress
from curation.text.templates import HFTT_WORLD_TEMPLATE, checked_templates, fill, resolve_templates

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from curation.text.corpora import WordCorpus

_CHUNK_ROWS = 16384


def _normalize(x: "torch.Tensor") -> "torch.Tensor":
    import torch.nn.functional as F

    return F.normalize(x, dim=-1)


def task_embeddings(per_template) -> "torch.Tensor":
    """Per-template features [K, T, d] -> class embeddings [K, d]: normalise, average, normalise."""
    import torch

    per_template = torch.as_tensor(per_template)
    if per_template.ndim != 3:
        raise ValueError(f"per_template must have shape [K, T, d], got {tuple(per_template.shape)}")
    return _normalize(_normalize(per_template).mean(dim=1))


def _lse(rows: "torch.Tensor", columns: "torch.Tensor", temperature: float) -> "torch.Tensor":
    """log-sum-exp over columns of rows @ columns.T / T, in row chunks to bound memory."""
    import torch

    return torch.cat([torch.logsumexp(chunk @ columns.T / temperature, dim=1)
                      for chunk in rows.split(_CHUNK_ROWS)])


def _task_nll(lse_task, lse_train):
    """mean over task rows of -log p_task, from log-sum-exps over task and trainable columns."""
    import torch

    return (torch.logaddexp(lse_task, lse_train) - lse_task).mean()


def _world_nll(lse_task, lse_train, focal: float):
    """sum_x w_x * -log p_train(x), w_x = a_x / sum(a), a_x = (1 - p_train(x))^focal, no gradient in w."""
    import torch

    log_p_train = lse_train - torch.logaddexp(lse_task, lse_train)
    alpha = (1.0 - log_p_train.detach().exp()).clamp_min(0.0) ** focal
    weights = alpha / alpha.sum().clamp_min(torch.finfo(alpha.dtype).tiny)
    return (weights * -log_p_train).sum()


def _frozen_task_nll():
    """`_task_nll` over all task rows with the task log-sum-exps frozen, gradient in closed form.

    d(-log p_task(u)) / d logit_um = p_train(u) * softmax_m(logits_u), so the backward pass is one
    [M, N] x [N, d] product: no autograd graph over the [N, M] intermediates (~30% of a step).
    """
    import torch

    class FrozenTaskNLL(torch.autograd.Function):
        @staticmethod
        def forward(ctx, columns, rows, lse_task, temperature):
            logits = (rows @ columns.T).div_(temperature)
            lse_train = torch.logsumexp(logits, dim=1)
            loss = _task_nll(lse_task, lse_train)
            coefficients = logits.sub_(lse_train[:, None]).exp_().mul_(torch.sigmoid(lse_train - lse_task)[:, None])
            ctx.save_for_backward(coefficients, rows)
            ctx.scale = 1.0 / (temperature * len(rows))
            return loss

        @staticmethod
        def backward(ctx, grad):
            coefficients, rows = ctx.saved_tensors
            return (coefficients.T @ rows).mul_(grad * ctx.scale), None, None, None

    return FrozenTaskNLL


def hftt_loss(task_rows, world_batch, task_emb, trainable, temperature: float = 0.01, focal: float = 1.0):
    """The reference HFTT loss, computed the straightforward way (all K + M logits of every row).

    task_rows [N, d], world_batch [B, d], task_emb [K, d], trainable [M, d] raw (normalised here;
    the gradient flows through the normalisation). Returns a scalar tensor.
    """
    import torch

    task_rows = as_float_tensor(task_rows, "task_rows")
    dim = task_rows.shape[1]
    world_batch = as_float_tensor(world_batch, "world_batch", dim)
    task_emb = as_float_tensor(task_emb, "task_emb", dim)
    trainable = torch.as_tensor(trainable)
    weights = torch.cat([task_emb, _normalize(trainable)])
    k = task_emb.shape[0]
    task_logits = task_rows @ weights.T / temperature
    world_logits = world_batch @ weights.T / temperature
    task_nll = _task_nll(torch.logsumexp(task_logits[:, :k], dim=1), torch.logsumexp(task_logits[:, k:], dim=1))
    world_nll = _world_nll(torch.logsumexp(world_logits[:, :k], dim=1),
                           torch.logsumexp(world_logits[:, k:], dim=1), focal)
    return 0.5 * task_nll + 0.5 * world_nll


def trainable_mass(image_emb, task_emb, trainable, temperature: float = 0.01) -> "torch.Tensor":
    """p_train per image [B]: softmax mass on the trainable columns (the OOD-ness)."""
    import torch

    image_emb = as_float_tensor(image_emb, "image_emb")
    dim = image_emb.shape[1]
    task_emb = as_float_tensor(task_emb, "task_emb", dim).to(image_emb.dtype)
    trainable = _normalize(as_float_tensor(trainable, "trainable", dim).to(image_emb.dtype))
    lse_task = _lse(image_emb, task_emb, temperature)
    lse_train = _lse(image_emb, trainable, temperature)
    return (lse_train - torch.logaddexp(lse_task, lse_train)).exp()


def frozen_task_loss(task_rows, task_lse_task, world_batch, world_lse_task, trainable,
                     temperature: float = 0.01, focal: float = 1.0):
    """`hftt_loss` given the precomputed task-column log-sum-exps of the task rows and the world batch."""
    import torch

    columns = _normalize(trainable)
    world_lse_train = torch.logsumexp(world_batch @ columns.T / temperature, dim=1)
    return (0.5 * _frozen_task_nll().apply(columns, task_rows, task_lse_task, temperature)
            + 0.5 * _world_nll(world_lse_task, world_lse_train, focal))


def train_trainable(task_rows, world, task_emb, n_trainable: int = 10, temperature: float = 0.01,
                    focal: float = 1.0, lr: float = 1.0, momentum: float = 0.9, batch_size: int = 256,
                    epochs: int = 1, seed: int = 0, max_steps: int | None = None,
                    on_step: Callable[[int, "torch.Tensor"], None] | None = None) -> "torch.Tensor":
    """Train P [M, d] with SGD on cached embeddings, task log-sum-exps precomputed once.

    `on_step(epoch, loss)` is called after every optimiser step (epoch from 0; the loss a detached
    scalar tensor, so a caller that does not print it costs no device sync). Returns the raw
    (unnormalised) trainable embeddings, as the reference stores them.
    """
    import torch

    task_rows = as_float_tensor(task_rows, "task_rows")
    dim, dtype = task_rows.shape[1], task_rows.dtype
    world = as_float_tensor(world, "world", dim).to(dtype)
    task_emb = as_float_tensor(task_emb, "task_emb", dim).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    trainable = torch.randn(n_trainable, dim, generator=generator, dtype=dtype).requires_grad_()
    optimizer = torch.optim.SGD([trainable], lr=lr, momentum=momentum)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    with torch.no_grad():
        task_lse_task = _lse(task_rows, task_emb, temperature)
        world_lse_task = _lse(world, task_emb, temperature)
    steps = 0
    for epoch in range(epochs):
        for batch in torch.randperm(len(world), generator=generator).split(batch_size):
            loss = frozen_task_loss(task_rows, task_lse_task, world[batch], world_lse_task[batch],
                                    trainable, temperature, focal)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step(epoch, loss.detach())
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return trainable.detach()
        schedule.step()
    return trainable.detach()


class _EpochLoss:
    """`train_trainable`'s `on_step` for a progress reporter: the epoch and its mean loss so far
    (one batch's loss jumps by 4x between steps). The sum stays a tensor on the training device:
    no sync per step, only when a line is printed."""

    def __init__(self, progress: Progress, epochs: int):
        self.progress, self.epochs = progress, epochs
        self.epoch, self.total, self.steps = -1, 0.0, 0

    def __call__(self, epoch: int, loss: "torch.Tensor") -> None:
        if epoch != self.epoch:
            self.epoch, self.total, self.steps = epoch, 0.0, 0
        self.total, self.steps = self.total + loss, self.steps + 1
        self.progress.update(1, epoch=f"{epoch + 1}/{self.epochs}", mean_loss=self.total / self.steps)


class HFTT(Detector):
    """HFTT detector. With side="wanted" the unwanted score is p_train (out-of-distribution mass);
    with side="unwanted" (task texts describe the concept to remove) it is p_task."""

    kind = "hftt"
    corpus_kind = "word_list"
    params = ("templates", "n_trainable", "temperature", "focal", "lr", "momentum", "batch_size",
              "epochs", "seed")

    def __init__(self, task_texts: Sequence[str], side: str = "wanted", name: str | None = None,
                 threshold: float | None = None, templates: str | Sequence[str] = "imagenet80",
                 n_trainable: int = 10, temperature: float = 0.01, focal: float = 1.0, lr: float = 1.0,
                 momentum: float = 0.9, batch_size: int = 256, epochs: int = 1, seed: int = 0):
        super().__init__(task_texts, side, name, threshold)
        self.templates = checked_templates(templates)
        self.n_trainable, self.temperature, self.focal = n_trainable, temperature, focal
        self.lr, self.momentum, self.batch_size, self.epochs, self.seed = lr, momentum, batch_size, epochs, seed
        if n_trainable < 1:
            raise ValueError(f"n_trainable must be >= 1, got {n_trainable}")

    def fit(self, encoder, corpus: "WordCorpus") -> "HFTT":
        """Encode task texts x templates and the world corpus with `encoder`, then train."""
        templates = resolve_templates(self.templates)
        prompts = [template.format(text) for text in self.task_texts for template in templates]
        per_template = as_float_tensor(encoder.encode_text(prompts), "task prompts")
        world = encoder.encode_text(fill(HFTT_WORLD_TEMPLATE, corpus.words))
        self.fit_embeddings(per_template.reshape(len(self.task_texts), len(templates), -1), world,
                            encoder.identity)
        self.provenance_ = {"corpus": corpus.provenance(), "n_templates": len(templates)}
        return self

    def fit_embeddings(self, per_template, world, model_identity: str) -> "HFTT":
        """Train from text embeddings of `model_identity`: per-template task features [K, T, d],
        corpus features [n, d]."""
        import torch

        task_emb = task_embeddings(per_template)
        task_rows = _normalize(torch.as_tensor(per_template).flatten(0, 1))
        self.task_emb = task_emb.float()
        steps = self.epochs * math.ceil(len(world) / self.batch_size)
        with Progress(f"training HFTT detector {self.name!r}", steps, "steps", epoch=f"1/{self.epochs}") as progress:
            self.trainable = train_trainable(
                task_rows, world, task_emb, self.n_trainable, self.temperature, self.focal, self.lr,
                self.momentum, self.batch_size, self.epochs, self.seed,
                on_step=_EpochLoss(progress, self.epochs)).float()
        self.model_identity_ = model_identity
        return self

    def _tensors(self):
        return {"task_emb": self.task_emb, "trainable": self.trainable}

    def _score(self, image_emb, state):
        p_train = trainable_mass(image_emb, state["task_emb"], state["trainable"], self.temperature)
        return p_train if self.side == "wanted" else 1.0 - p_train
