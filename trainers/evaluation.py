"""What a pretrained encoder is worth: linear probe and k-NN on frozen features,
and the reconstruction loss on held-out images under a fixed mask seed."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainers.config import TrainConfig


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    was_training = model.training
    model.eval()
    feats = torch.cat([model.features(images[i:i + batch]) for i in range(0, len(images), batch)])
    model.train(was_training)
    return feats.float()


def linear_probe_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                      test_y: torch.Tensor, weight_decay: float = 1e-4, iters: int = 200) -> float:
    """Top-1 of a multinomial logistic regression on standardised features.

    Standardising plays the role of MAE's parameter-free BatchNorm before the
    probe; full-batch L-BFGS solves the convex problem in well under a second
    at probe sizes, where SGD for 90 epochs would not.
    """
    train_x, test_x = train_x.flatten(1).double(), test_x.flatten(1).double()
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    probe = nn.Linear(train_x.shape[1], classes).double()
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(train_x), train_y) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (probe(test_x).argmax(1) == test_y).double().mean().item()


@torch.no_grad()
def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
             test_y: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Weighted k-NN on cosine similarity (the vote of Wu et al. 2018, as in DINO)."""
    train_x = F.normalize(train_x.flatten(1).float(), dim=1)
    test_x = F.normalize(test_x.flatten(1).float(), dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_x))
    sims, idx = (test_x @ train_x.T).topk(k, dim=1)
    votes = torch.zeros(len(test_x), classes)
    votes.scatter_add_(1, train_y[idx], (sims / temperature).exp())
    return (votes.argmax(1) == test_y).float().mean().item()


@torch.no_grad()
def heldout_loss(model: nn.Module, images: torch.Tensor, seed: int, batch: int = 256) -> float:
    """Reconstruction loss on held-out images with masks drawn from a fixed seed,
    so that every evaluation point of every run sees the same masks."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=images.device).manual_seed(seed)
    total, n = 0.0, 0
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        loss, _, _ = model(chunk, gen)
        total += loss.item() * len(chunk)
        n += len(chunk)
    model.train(was_training)
    return total / n


def evaluate(model: nn.Module, cfg: TrainConfig, probe_train, probe_test) -> dict[str, float]:
    """All evaluation metrics; probe_* are (images, labels) pairs already on the model's device."""
    train_f = extract_features(model, probe_train[0]).cpu()
    test_f = extract_features(model, probe_test[0]).cpu()
    return {
        "probe_top1": linear_probe_top1(train_f, probe_train[1], test_f, probe_test[1]),
        "knn_top1": knn_top1(train_f, probe_train[1], test_f, probe_test[1], k=cfg.knn_k),
        "eval_loss": heldout_loss(model, probe_test[0], cfg.eval_mask_seed),
    }
