"""The gradient noise scale B_simple (McCandlish et al., "An Empirical Model of Large-Batch
Training", arXiv 1812.06162), measured from gradient norms the train step already computes.

B_simple = tr(Sigma) / |G|^2 predicts the largest useful batch: far below it, a step on B
examples makes little more progress than one on B_simple. The trainer logs it and
`batch_schedule='adaptive'` grows the batch while it exceeds the current one.
"""
from __future__ import annotations

import dataclasses


def noise_scale_terms(small_sq_norm: float, big_sq_norm: float, small_batch: int,
                      big_batch: int) -> tuple[float, float]:
  """Unbiased estimates of |G|^2 and tr(Sigma) from gradient norms at two batch sizes.

  McCandlish et al. (arXiv 1812.06162, appendix A.1): with |G_b|^2 the squared norm of a
  gradient over b examples (here: each device's local gradient, averaged over devices) and
  |G_B|^2 that of the all-reduced gradient over B examples,
    |G|^2    ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)
  and B_simple = tr(Sigma) / |G|^2. Each estimate is noisy: average them separately over
  steps (`NoiseScale`) before taking the ratio.
  """
  if big_batch <= small_batch:
    raise ValueError(f"needs two batch sizes, got b={small_batch}, B={big_batch}")
  g2 = (big_batch * big_sq_norm - small_batch * small_sq_norm) / (big_batch - small_batch)
  trace = (small_sq_norm - big_sq_norm) / (1 / small_batch - 1 / big_batch)
  return g2, trace


@dataclasses.dataclass
class NoiseScale:
  """Exponential moving averages of |G|^2 and tr(Sigma); B_simple is their ratio.

  Both averages start at 0 with the same decay, so their ratio needs no bias correction.
  """
  decay: float = 0.95
  g2: float = 0.0
  trace: float = 0.0

  def update(self, g2: float, trace: float) -> float:
    self.g2 = self.decay * self.g2 + (1 - self.decay) * g2
    self.trace = self.decay * self.trace + (1 - self.decay) * trace
    return self.value

  @property
  def value(self) -> float:
    """B_simple, or inf while |G|^2 is not yet positive."""
    return self.trace / self.g2 if self.g2 > 0 else float("inf")
