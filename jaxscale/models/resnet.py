"""ResNet v1.5 (He et al. 2016) in Flax Linen, after the Flax ImageNet example.

v1.5: in the bottleneck block the stride sits on the 3x3 conv, not the first 1x1.
The ImageNet family (resnet18 ... resnet200) uses widths 64/128/256/512; the
CIFAR family (resnet8 ... resnet56, 6n+2 layers) uses 3 stages of widths
16/32/64 and always the small stem.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any
Dtype = Any

# He init for convs feeding ReLUs; fan_out as in torchvision and the Flax example.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34 and the CIFAR ResNets)."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: tuple[int, int] = (1, 1)
  zero_init_last_bn: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=_last_scale_init(self.zero_init_last_bn))(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand x4 (ResNet-50 and up)."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: tuple[int, int] = (1, 1)
  zero_init_last_bn: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    residual = x
    y = self.conv(self.filters, (1, 1))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3), self.strides)(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=_last_scale_init(self.zero_init_last_bn))(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


def _last_scale_init(zero: bool) -> Callable[..., Any]:
  # Zero-init makes each block start as the identity (Goyal et al. 2017).
  return nn.initializers.zeros if zero else nn.initializers.ones


class ResNet(nn.Module):
  """ResNet v1.5 returning float32 logits `[batch, num_classes]`.

  Attributes:
    stage_sizes: number of blocks in each stage; stage i has width
      `num_filters * 2**i` and stride 2 except the first.
    block_cls: `BasicBlock` or `BottleneckBlock`.
    num_classes: size of the classifier output.
    num_filters: width of the stem and of the first stage.
    stem: "imagenet" (7x7/2 conv + 3x3/2 max pool) or "small" (3x3/1 conv,
      no pool, for 28x28 / 32x32 images).
    dtype: compute dtype of convs, dense layers and activations.
    param_dtype: dtype of the parameters.
    bn_momentum: the momentum of every `nn.BatchNorm` (jaxscale makes their batch
      statistics cross-replica when it trains the model: `models/contract.py`).
    zero_init_last_bn: init the last BN scale of each block to zero.
  """
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  num_filters: int = 64
  stem: str = "imagenet"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9
  zero_init_last_bn: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    conv = functools.partial(nn.Conv, use_bias=False, padding="SAME", kernel_init=conv_init,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    # Flax computes BN statistics in float32 whatever `dtype`, and keeps
    # batch_stats float32 (force_float32_reductions).
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype,
                             param_dtype=self.param_dtype)

    if self.stem == "imagenet":
      x = conv(self.num_filters, (7, 7), (2, 2), name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    elif self.stem == "small":
      x = conv(self.num_filters, (3, 3), name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
    else:
      raise ValueError(f"stem must be 'imagenet' or 'small', got {self.stem!r}")

    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(self.num_filters * 2**i, conv=conv, norm=norm, strides=strides,
                           zero_init_last_bn=self.zero_init_last_bn)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return jnp.asarray(x, jnp.float32)


def _cifar(n: int) -> Callable[..., ResNet]:
  """6n+2-layer CIFAR ResNet: 3 stages of n basic blocks, widths 16/32/64."""
  return functools.partial(ResNet, stage_sizes=(n, n, n), block_cls=BasicBlock,
                           num_filters=16, stem="small")


RESNETS: dict[str, Callable[..., ResNet]] = {
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock),
    "resnet34": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock),
    "resnet50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock),
    "resnet101": functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=BottleneckBlock),
    "resnet152": functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=BottleneckBlock),
    "resnet200": functools.partial(ResNet, stage_sizes=(3, 24, 36, 3), block_cls=BottleneckBlock),
    "resnet8": _cifar(1),
    "resnet20": _cifar(3),
    "resnet32": _cifar(5),
    "resnet56": _cifar(9),
}
