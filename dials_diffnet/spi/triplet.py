"""Triplet loss with online mining inside a batch (Schroff et al. 2015, FaceNet).

L = max(d_p - d_n + alpha, 0), d = Euclidean distance between L2-normalised
embeddings (so 0 <= d <= 2 and alpha is in those units).

Mining, for every anchor-positive pair (a, p) of the batch:
  semihard: the closest negative that is still farther than the positive
            (d_p < d_n, ideally d_n < d_p + alpha: it still gives a loss); when every
            negative is closer than the positive, the farthest negative (the least
            hard one), so training never starts by collapsing onto the hardest.
  hard:     per anchor, its farthest positive and closest negative ("batch hard").
"""

from __future__ import annotations

import torch


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    sq = (embeddings[:, None, :] - embeddings[None, :, :]).pow(2).sum(-1)
    return torch.sqrt(sq.clamp_min(1e-12))


def triplet_loss(anchor, positive, negative, margin: float) -> torch.Tensor:
    """Mean of max(|a - p| - |a - n| + margin, 0) over the rows."""
    d_p = (anchor - positive).norm(dim=1)
    d_n = (anchor - negative).norm(dim=1)
    return torch.relu(d_p - d_n + margin).mean()


def mine_triplets(distances: torch.Tensor, labels: torch.Tensor, margin: float, strategy: str = "semihard"):
    """(anchor, positive, negative) index tensors chosen from a batch's distance matrix."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive_pair = same & ~eye
    negative = ~same
    if strategy == "hard":
        anchors = torch.nonzero(positive_pair.any(1) & negative.any(1)).flatten()
        pos = distances.masked_fill(~positive_pair, -1.0).argmax(1)[anchors]
        neg = distances.masked_fill(~negative, float("inf")).argmin(1)[anchors]
        return anchors, pos, neg
    if strategy != "semihard":
        raise ValueError(f"unknown mining strategy {strategy!r}")
    a, p = torch.nonzero(positive_pair, as_tuple=True)
    keep = negative[a].any(1)
    a, p = a[keep], p[keep]
    d_ap = distances[a, p][:, None]
    d_an = distances[a]  # (pairs, batch)
    farther = negative[a] & (d_an > d_ap)
    closest_farther = d_an.masked_fill(~farther, float("inf")).argmin(1)
    farthest = d_an.masked_fill(~negative[a], -1.0).argmax(1)
    n = torch.where(farther.any(1), closest_farther, farthest)
    return a, p, n


def batch_triplet_loss(embeddings, labels, margin: float, strategy: str = "semihard") -> torch.Tensor:
    a, p, n = mine_triplets(pairwise_distances(embeddings).detach(), labels, margin, strategy)
    if len(a) == 0:
        return embeddings.sum() * 0.0
    return triplet_loss(embeddings[a], embeddings[p], embeddings[n], margin)
