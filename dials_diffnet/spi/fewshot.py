"""Few-shot classification in a twin network's embedding space, without retraining.

A handful of labelled support patterns of a new sample (e.g. 5 single hits and
5 of each multiple) are embedded; each class is represented by its prototype,
the normalised mean of its support embeddings (Snell et al. 2017), and a query
takes the label of the nearest prototype (or, with `method="nearest"`, of the
nearest single support pattern).
"""

from __future__ import annotations

import numpy as np
import torch


class FewShotClassifier:
    def __init__(self, support_embeddings, support_labels, method: str = "prototype"):
        if method not in ("prototype", "nearest"):
            raise ValueError(f"method must be 'prototype' or 'nearest', not {method!r}")
        emb = torch.as_tensor(np.asarray(support_embeddings), dtype=torch.float32)
        labels = np.asarray(support_labels)
        if len(emb) == 0 or len(emb) != len(labels):
            raise ValueError("the support set needs at least one embedding and one label per embedding")
        self.classes = sorted(set(labels.tolist()), key=str)
        if method == "prototype":
            means = [emb[torch.as_tensor(labels == c)].mean(0) for c in self.classes]
            self.references = torch.nn.functional.normalize(torch.stack(means), dim=1)
            self.reference_labels = list(self.classes)
        else:
            self.references = emb
            self.reference_labels = labels.tolist()

    def predict(self, embeddings):
        """(labels, distances to the chosen reference) for query embeddings (N, E)."""
        q = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
        d = torch.cdist(q, self.references)
        best = d.argmin(1)
        return [self.reference_labels[i] for i in best.tolist()], d[torch.arange(len(q)), best].numpy()
