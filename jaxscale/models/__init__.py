"""Models: jaxscale's zoo (a plain dict of constructors) and models named by import path.

`config.model` is a zoo name (`resnet50`, `vit_s16`, `transformer_small`, ...) or an import path
`package.module:Name` naming a Linen module class, a function returning a module, or an
`nnx.Module` class; `models/contract.py` says how jaxscale calls any of them. Zoo models are
called alike:
  variables = model.init(rng, x, train=False)
  logits, new_state = model.apply(variables, x, train=True, mutable=["batch_stats"])
with `x` float NHWC images (token ids for the Transformer) and float32 logits.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from jaxscale.errors import ConfigError
from jaxscale.imports import import_object
from jaxscale.models.contract import BatchNorm, Model, check, wrap
from jaxscale.models.resnet import RESNETS, BasicBlock, BottleneckBlock, ResNet
from jaxscale.models.transformer import TRANSFORMERS, Transformer
from jaxscale.models.vit import VITS, ViT

__all__ = ["MODELS", "STEMS", "BatchNorm", "Model", "auto_stem", "build", "check",
           "create_model", "resolve", "ResNet", "BasicBlock", "BottleneckBlock", "Transformer",
           "ViT", "wrap"]

MODELS: dict[str, Callable[..., nn.Module]] = {**RESNETS, **VITS, **TRANSFORMERS}

STEMS = ("auto", "imagenet", "small")  # config key `stem`; "auto" picks by image size


def auto_stem(image_shape: tuple[int, ...]) -> str:
  """The stem for `stem='auto'`: "small" for images of at most 64 pixels a side, else
  "imagenet" (whose 4x downsampling would leave too little of a small image)."""
  return "small" if max(image_shape[:2]) <= 64 else "imagenet"


def resolve(name: str) -> Any:
  """The zoo constructor `name`, or the object its import path names."""
  if name in MODELS:
    return MODELS[name]
  if ":" in name:
    return import_object(name, "model")
  raise ConfigError(f"config key 'model': unknown model {name!r}; known: "
                    f"{', '.join(sorted(MODELS))}, or an import path 'package.module:Name'")


def build(model: Any, options: dict[str, Any], name: str | None = None) -> Model:
  """A `Model` from a zoo name, an import path, or a Linen / NNX object; `options` are passed
  where the model accepts them (see `contract.wrap`)."""
  if isinstance(model, str):
    name, model = model, resolve(model)
  return wrap(model, name or getattr(model, "__name__", type(model).__name__), options)


def create_model(name: str, *, num_classes: int, **options: Any) -> nn.Module:
  """The Linen module of zoo model `name`, built with the options its family accepts.

  Options: `stem` ("imagenet" or "small", ImageNet ResNets), `dtype`, `param_dtype`,
  `bn_momentum`, `zero_init_last_bn`; an option a family has no use for is ignored.

  Raises:
    ConfigError: unknown `name` or `stem`.
  """
  if name not in MODELS:
    raise ConfigError(f"config key 'model': unknown model {name!r}; known: "
                      f"{', '.join(sorted(MODELS))}")
  if options.get("stem", "imagenet") not in STEMS[1:]:
    raise ConfigError(f"config key 'stem': unknown stem {options['stem']!r}; known: "
                      f"{', '.join(STEMS)}")
  options = {"num_classes": num_classes, "vocab_size": num_classes, **options}
  return wrap(MODELS[name], name, options).module
