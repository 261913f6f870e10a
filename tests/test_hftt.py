import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from curation.detectors.hftt import HFTT, hftt_loss, task_embeddings, train_trainable, trainable_mass


def reference_loss(task_rows, world, task_emb, trainable, temperature=0.01, focal=1.0):
    """The reference code's formulation: probabilities summed over columns, weighted mean."""
    weights = torch.cat([task_emb, F.normalize(trainable, dim=-1)])
    k = len(task_emb)
    p_rows = torch.softmax(task_rows @ weights.T / temperature, 1)
    p_world = torch.softmax(world @ weights.T / temperature, 1)
    p_task = p_rows[:, :k].sum(1)
    p_train = p_world[:, k:].sum(1)
    alpha = (1 - p_train.detach()) ** focal
    return 0.5 * (-p_task.log()).mean() + 0.5 * ((alpha / alpha.sum()) * -p_train.log()).sum()


def unit(rng, *shape):
    return F.normalize(torch.from_numpy(rng.standard_normal(shape)), dim=-1)


def test_task_embeddings_normalise_average_normalise():
    per_template = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    out = task_embeddings(per_template)
    assert torch.allclose(out, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]))


def test_loss_hand_checked_two_dimensional_case():
    task_emb = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    trainable = torch.tensor([[0.0, 3.0]], dtype=torch.float64)  # normalised inside to [0, 1]
    rows = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    world = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    e = math.e
    nll_easy, nll_hard = math.log(1 + 1 / e), math.log(1 + e)
    a_easy, a_hard = 1 / (1 + e), e / (1 + e)  # 1 - p_train
    world_term = (a_easy * nll_easy + a_hard * nll_hard) / (a_easy + a_hard)
    expected = 0.5 * nll_easy + 0.5 * world_term
    loss = hftt_loss(rows, world, task_emb, trainable, temperature=1.0, focal=1.0)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert loss.dtype == torch.float64


@pytest.mark.parametrize("focal", [0.0, 1.0, 2.0])
def test_loss_equals_reference_formulation(focal):
    rng = np.random.default_rng(1)
    rows, world, task_emb = unit(rng, 30, 16), unit(rng, 12, 16), unit(rng, 6, 16)
    trainable = torch.from_numpy(rng.standard_normal((4, 16)))
    ours = hftt_loss(rows, world, task_emb, trainable, temperature=0.05, focal=focal)
    assert ours.item() == pytest.approx(reference_loss(rows, world, task_emb, trainable, 0.05, focal).item(), rel=1e-10)


def test_loss_is_differentiable_in_trainable_through_normalisation():
    rng = np.random.default_rng(2)
    trainable = torch.from_numpy(rng.standard_normal((3, 8))).requires_grad_()
    loss = hftt_loss(unit(rng, 10, 8), unit(rng, 5, 8), unit(rng, 2, 8), trainable)
    loss.backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0
    # scaling a column does not change the loss: its gradient is orthogonal to it
    assert torch.allclose((trainable.grad * trainable.detach()).sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-9)


def test_fast_training_matches_plain_loss_steps():
    """Precomputed task log-sum-exps + M columns per step == the plain loss, step by step."""
    rng = np.random.default_rng(3)
    per_template = unit(rng, 5, 4, 16)
    task_emb = task_embeddings(per_template)
    rows, world = per_template.flatten(0, 1), unit(rng, 100, 16)
    fast = train_trainable(rows, world, task_emb, n_trainable=3, batch_size=16, seed=7, max_steps=5, temperature=0.05)

    generator = torch.Generator().manual_seed(7)
    trainable = torch.randn(3, 16, generator=generator, dtype=torch.float64).requires_grad_()
    optimizer = torch.optim.SGD([trainable], lr=1.0, momentum=0.9)
    for batch in torch.randperm(100, generator=generator).split(16)[:5]:
        loss = hftt_loss(rows, world[batch], task_emb, trainable, temperature=0.05)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.allclose(fast, trainable.detach(), atol=1e-9)


def test_trainable_mass_is_softmax_mass_on_trainable_columns():
    rng = np.random.default_rng(4)
    images, task_emb, trainable = unit(rng, 7, 8), unit(rng, 3, 8), torch.from_numpy(rng.standard_normal((2, 8)))
    weights = torch.cat([task_emb, F.normalize(trainable, dim=-1)])
    expected = torch.softmax(images @ weights.T / 0.01, 1)[:, 3:].sum(1)
    assert torch.allclose(trainable_mass(images, task_emb, trainable), expected, atol=1e-12)
    assert trainable_mass(images.float().numpy(), task_emb.numpy(), trainable.numpy()).dtype == torch.float32


def test_training_separates_task_texts_from_world():
    """After training, task rows put little mass on the trainable columns and world rows a lot."""
    rng = np.random.default_rng(5)
    centre = unit(rng, 1, 32)
    per_template = F.normalize(centre[:, None] + 0.3 * unit(rng, 4, 8, 32), dim=-1)
    world = unit(rng, 2000, 32)
    detector = HFTT(["a", "b", "c", "d"], side="wanted", templates=["{}"], n_trainable=4)
    detector.fit_embeddings(per_template, world, "synthetic")
    task_like = F.normalize(centre + 0.3 * unit(rng, 50, 32), dim=-1)
    assert detector.score(task_like).mean() < 0.3
    assert detector.score(unit(rng, 50, 32)).mean() > 0.7


def test_side_unwanted_flips_the_score():
    rng = np.random.default_rng(6)
    per_template, world, images = unit(rng, 2, 3, 8), unit(rng, 50, 8), unit(rng, 5, 8)
    wanted = HFTT(["x", "y"], side="wanted", templates=["{}"]).fit_embeddings(per_template, world, "m")
    unwanted = HFTT(["x", "y"], side="unwanted", templates=["{}"]).fit_embeddings(per_template, world, "m")
    assert np.allclose(wanted.score(images) + unwanted.score(images), 1.0)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="per_template"):
        task_embeddings(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="world_batch has dimension 4"):
        hftt_loss(torch.zeros(2, 8), torch.zeros(2, 4), torch.zeros(1, 8), torch.ones(1, 8))
