"""Uncertainty from several softmax predictions (Monte-Carlo samples and/or folds), as the predictor writes
it: running statistics whose memory does not grow with the number of members."""
from __future__ import annotations

import torch


class UncertaintyAccumulator:
    """Running uncertainty statistics over members (MC samples and/or folds) of a softmax prediction.

    Memory stays that of three maps however many members are added (sum of p, sum of p², sum of entropies).
    ``add(probs)`` takes one member's probabilities with the classes at ``class_dim`` (e.g. (K, ...));
    :meth:`result` returns the keys of :func:`mc_uncertainty`. Natural logarithms.
    """

    def __init__(self, class_dim: int = 0):
        self.class_dim, self.n = class_dim, 0
        self._sum = self._sum_sq = self._sum_entropy = None

    def add(self, probs: torch.Tensor) -> None:
        probs = probs.float()
        entropy = -torch.xlogy(probs, probs).sum(self.class_dim)
        if self.n == 0:
            self._sum, self._sum_sq, self._sum_entropy = probs.clone(), probs.square(), entropy
        else:
            self._sum += probs
            self._sum_sq += probs.square()
            self._sum_entropy += entropy
        self.n += 1

    def result(self) -> dict[str, torch.Tensor]:
        if self.n == 0:
            raise ValueError("UncertaintyAccumulator: no member was added")
        mean = self._sum / self.n
        entropy = -torch.xlogy(mean, mean).sum(self.class_dim)
        expected_entropy = self._sum_entropy / self.n
        return {"mean": mean, "entropy": entropy, "expected_entropy": expected_entropy,
                "mutual_information": (entropy - expected_entropy).clamp_min(0),
                "variance": (self._sum_sq / self.n - mean.square()).clamp_min(0)}


def mc_uncertainty(probs: torch.Tensor, class_dim: int = 1) -> dict[str, torch.Tensor]:
    """Uncertainty from N stochastic softmax outputs.

    probs: (N, K, ...) (or any shape with samples first and the classes at ``class_dim``, e.g.
    (N, B, K, H, W) with ``class_dim=2``). Natural logarithms. Returns (sample axis removed):

    * ``mean`` (K, ...): mean probability (the prediction);
    * ``entropy`` (...): predictive entropy H[mean] (total uncertainty);
    * ``expected_entropy`` (...): mean of the samples' entropies (aleatoric part);
    * ``mutual_information`` (...): entropy − expected_entropy ≥ 0 (epistemic part);
    * ``variance`` (K, ...): per-class variance over the samples (population, divides by N).
    """
    if class_dim < 0:
        class_dim += probs.ndim
    acc = UncertaintyAccumulator(class_dim - 1)
    for member in probs:
        acc.add(member)
    return acc.result()
