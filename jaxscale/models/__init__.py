"""Model zoo: a plain dict of constructors and `create_model`.

All models are called alike:
  variables = model.init(rng, x, train=False)
  logits, new_state = model.apply(variables, x, train=True, mutable=["batch_stats"])
  logits = model.apply(variables, x, train=False)
with `x` float NHWC and float32 logits `[batch, num_classes]`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxscale.models.resnet import RESNETS, BasicBlock, BottleneckBlock, ResNet
from jaxscale.models.vit import VITS, ViT

__all__ = ["MODELS", "auto_stem", "create_model", "ResNet", "BasicBlock", "BottleneckBlock", "ViT"]

MODELS: dict[str, Callable[..., nn.Module]] = {**RESNETS, **VITS}

STEMS = ("imagenet", "small")


def auto_stem(image_shape: tuple[int, ...]) -> str:
  """The stem for `stem='auto'`: "small" for images of at most 64 pixels a side, else
  "imagenet" (whose 4x downsampling would leave too little of a small image)."""
  return "small" if max(image_shape[:2]) <= 64 else "imagenet"


def create_model(name: str, *, num_classes: int, stem: str = "imagenet",
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 bn_momentum: float = 0.9, bn_axis_name: str | tuple[str, ...] | None = None,
                 bn_axis_index_groups: Any = None,
                 zero_init_last_bn: bool = False) -> nn.Module:
  """Builds model `name` from `MODELS`.

  Args:
    name: a key of `MODELS`, e.g. "resnet50", "resnet8", "vit_s16".
    num_classes: size of the classifier output.
    stem: "imagenet" (7x7/2 conv + max pool) or "small" (3x3/1 conv, no pool)
      for the ImageNet ResNets; the CIFAR ResNets always use "small".
    dtype: compute dtype (convs, dense layers, activations).
    param_dtype: dtype of the parameters; batch_stats stay float32.
    bn_momentum, bn_axis_name, bn_axis_index_groups: BatchNorm options;
      `bn_axis_name` gives cross-replica batch statistics.
    zero_init_last_bn: zero-init the last BN scale of each residual block.

  Options a family has no use for (BN options for ViT, `stem` for ViT and the
  CIFAR ResNets) are ignored.

  Raises:
    ValueError: unknown `name` or `stem`.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
  if stem not in STEMS:
    raise ValueError(f"unknown stem {stem!r}; known: {', '.join(STEMS)}")
  ctor = MODELS[name]
  options = dict(num_classes=num_classes, stem=stem, dtype=dtype, param_dtype=param_dtype,
                 bn_momentum=bn_momentum, bn_axis_name=bn_axis_name,
                 bn_axis_index_groups=bn_axis_index_groups,
                 zero_init_last_bn=zero_init_last_bn)
  # Pass only what the module has fields for; what the zoo entry fixes wins
  # (e.g. the CIFAR ResNets' small stem).
  fields = {f.name for f in dataclasses.fields(ctor.func)}
  return ctor(**{k: v for k, v in options.items() if k in fields and k not in ctor.keywords})
