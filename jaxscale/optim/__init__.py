"""Optimizer components for large-batch training, in optax's conventions.

* `masks`: which leaves get weight decay and trust-ratio adaptation.
* `lars_lamb`: `lars`, `lamb` and the LARS trust-ratio transformation.
* `schedules`: warmup + decay schedules, batch-size scaling of the rate.
* `build`: optimizers and schedules from `ml_collections` configs.

Everything here is usable without the rest of jaxscale.
"""
from jaxscale.optim.build import (
    DEFAULT_EPS,
    OPTIMIZERS,
    SCHEDULES,
    build_optimizer,
    build_schedule,
    default_optimizer_config,
    default_schedule_config,
)
from jaxscale.optim.lars_lamb import lamb, lars, scale_by_lars_trust_ratio, scale_by_trust_ratio
from jaxscale.optim.masks import (
    MaskOrFn,
    default_decay_mask,
    default_decay_predicate,
    mask_from_patterns,
    mask_from_predicate,
    path_str,
)
from jaxscale.optim.schedules import (
    LR_SCALING_RULES,
    constant,
    scale_learning_rate,
    warmup_constant,
    warmup_cosine,
    warmup_piecewise,
    warmup_polynomial,
)

__all__ = [
    "DEFAULT_EPS",
    "LR_SCALING_RULES",
    "MaskOrFn",
    "OPTIMIZERS",
    "SCHEDULES",
    "build_optimizer",
    "build_schedule",
    "constant",
    "default_decay_mask",
    "default_decay_predicate",
    "default_optimizer_config",
    "default_schedule_config",
    "lamb",
    "lars",
    "mask_from_patterns",
    "mask_from_predicate",
    "path_str",
    "scale_by_lars_trust_ratio",
    "scale_by_trust_ratio",
    "scale_learning_rate",
    "warmup_constant",
    "warmup_cosine",
    "warmup_piecewise",
    "warmup_polynomial",
]
