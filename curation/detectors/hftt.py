"""HFTT: trainable embeddings in CLIP's joint space, trained on text only (algorithms.md, "HFTT").

The classifier is W = [task embeddings | normalize(P)]; the world corpus is labelled "trainable"
and the task texts "task", with a focal-weighted loss. Training runs on cached text embeddings.

Speed: the task columns of W are frozen, so the log-sum-exp over the K task columns of every task
row and every corpus row is computed once; each step only recomputes the M trainable columns
(K=1000, M=10: ~100x fewer multiply-adds per step than the plain formulation, same loss).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from curation.detectors.base import Detector, as_float_tensor
from curation.text.templates import HFTT_WORLD_TEMPLATE, fill, resolve_templates

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


def _loss_from_lse(task_lse_task, task_lse_train, world_lse_task, world_lse_train, focal: float):
    """The HFTT loss from the log-sum-exps over task (K) and trainable (M) columns.

    L = 0.5 * mean_u(-log p_task(u)) + 0.5 * sum_x w_x * (-log p_train(x)),
    w_x = a_x / sum(a), a_x = (1 - p_train(x))^focal without gradient.
    """
    import torch

    task_nll = (torch.logaddexp(task_lse_task, task_lse_train) - task_lse_task).mean()
    world_log_p_train = world_lse_train - torch.logaddexp(world_lse_task, world_lse_train)
    alpha = (1.0 - world_log_p_train.detach().exp()).clamp_min(0.0) ** focal
    weights = alpha / alpha.sum().clamp_min(torch.finfo(alpha.dtype).tiny)
    return 0.5 * task_nll + 0.5 * (weights * -world_log_p_train).sum()


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
    return _loss_from_lse(
        torch.logsumexp(task_logits[:, :k], dim=1), torch.logsumexp(task_logits[:, k:], dim=1),
        torch.logsumexp(world_logits[:, :k], dim=1), torch.logsumexp(world_logits[:, k:], dim=1), focal)


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


def train_trainable(task_rows, world, task_emb, n_trainable: int = 10, temperature: float = 0.01,
                    focal: float = 1.0, lr: float = 1.0, momentum: float = 0.9, batch_size: int = 256,
                    epochs: int = 1, seed: int = 0, max_steps: int | None = None) -> "torch.Tensor":
    """Train P [M, d] with SGD on cached embeddings, task log-sum-exps precomputed once.

    Returns the raw (unnormalised) trainable embeddings, as the reference stores them.
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
    for _ in range(epochs):
        for batch in torch.randperm(len(world), generator=generator).split(batch_size):
            columns = _normalize(trainable)
            loss = _loss_from_lse(task_lse_task, torch.logsumexp(task_rows @ columns.T / temperature, 1),
                                  world_lse_task[batch], torch.logsumexp(world[batch] @ columns.T / temperature, 1),
                                  focal)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return trainable.detach()
        schedule.step()
    return trainable.detach()


class HFTT(Detector):
    """HFTT detector. With side="wanted" the unwanted score is p_train (out-of-distribution mass);
    with side="unwanted" (task texts describe the concept to remove) it is p_task."""

    kind = "hftt"
    params = ("templates", "n_trainable", "temperature", "focal", "lr", "momentum", "batch_size",
              "epochs", "seed")

    def __init__(self, task_texts: Sequence[str], side: str = "wanted", name: str | None = None,
                 threshold: float | None = None, templates: str | Sequence[str] = "imagenet80",
                 n_trainable: int = 10, temperature: float = 0.01, focal: float = 1.0, lr: float = 1.0,
                 momentum: float = 0.9, batch_size: int = 256, epochs: int = 1, seed: int = 0):
        super().__init__(task_texts, side, name, threshold)
        self.templates = templates if isinstance(templates, str) else list(templates)
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
        task_emb = task_embeddings(per_template)
        task_rows = _normalize(task_emb.new_tensor(per_template).flatten(0, 1))
        self.task_emb = task_emb.float()
        self.trainable = train_trainable(
            task_rows, world, task_emb, self.n_trainable, self.temperature, self.focal, self.lr,
            self.momentum, self.batch_size, self.epochs, self.seed).float()
        self.model_identity_ = model_identity
        return self

    def _tensors(self):
        return {"task_emb": self.task_emb, "trainable": self.trainable}

    def _score(self, image_emb, state):
        p_train = trainable_mass(image_emb, state["task_emb"], state["trainable"], self.temperature)
        return p_train if self.side == "wanted" else 1.0 - p_train
