"""Vision Transformer (Dosovitskiy et al. 2021) in Flax Linen, after big_vision.

Pre-LayerNorm encoder, class token, learned position embedding, no dropout.
The position embedding is sized at init from the input, so any image size
divisible by the patch size works (the same size must then be used throughout).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

dense_init = nn.initializers.xavier_uniform()


class Attention(nn.Module):
  """Multi-head self-attention with the softmax in float32 for stability; `causal` lets each
  position attend only to itself and earlier ones (a decoder). Without `use_bias` the
  projections have no biases (the key's bias has no effect on the output, so its gradient is
  zero but for rounding, which Adam-like optimizers would amplify into steps)."""
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  causal: bool = False
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    width = x.shape[-1]
    head_dim = width // self.num_heads
    dense = functools.partial(nn.DenseGeneral, kernel_init=dense_init, dtype=self.dtype,
                              param_dtype=self.param_dtype, use_bias=self.use_bias)
    qkv = dense((3, self.num_heads, head_dim), name="qkv")(x)  # [b, n, 3, h, d]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim**-0.5, k,
                        preferred_element_type=jnp.float32)
    if self.causal:
      n = x.shape[1]
      logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return dense(width, axis=(-2, -1), name="out")(y)


class EncoderBlock(nn.Module):
  """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  causal: bool = False
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    # LayerNorm computed (and returned) in float32; the next dense casts to `dtype`.
    norm = functools.partial(nn.LayerNorm, dtype=jnp.float32, param_dtype=self.param_dtype)
    dense = functools.partial(nn.Dense, kernel_init=dense_init, dtype=self.dtype,
                              param_dtype=self.param_dtype, use_bias=self.use_bias)
    x = x + Attention(self.num_heads, self.dtype, self.param_dtype, self.causal,
                      self.use_bias)(norm()(x))
    y = dense(self.mlp_dim)(norm()(x))
    y = dense(x.shape[-1])(nn.gelu(y))
    return x + y


class ViT(nn.Module):
  """ViT classifier returning float32 logits `[batch, num_classes]`.

  Attributes:
    num_classes: size of the classifier output.
    patch_size: side of the square patches; must divide the image size.
    width: token dimension.
    depth: number of encoder blocks.
    num_heads: attention heads per block.
    mlp_ratio: MLP hidden size as a multiple of `width`.
    dtype: compute dtype of dense layers and activations.
    param_dtype: dtype of the parameters (LayerNorm included).
  """
  num_classes: int
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train  # No dropout or batch statistics; kept so all models are called alike.
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"image size {x.shape[1:3]} is not divisible by patch_size {p}")
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, name="embedding")(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c), self.param_dtype)
    x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)).astype(x.dtype), x], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, h * w + 1, c),
                     self.param_dtype)
    x = x + pos.astype(x.dtype)

    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_ratio * c, self.dtype, self.param_dtype,
                       name=f"block{i}")(x)
    x = nn.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name="norm")(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="head")(x[:, 0])
    return jnp.asarray(x, jnp.float32)


VITS: dict[str, Callable[..., ViT]] = {
    "vit_ti16": functools.partial(ViT, patch_size=16, width=192, depth=12, num_heads=3),
    "vit_s16": functools.partial(ViT, patch_size=16, width=384, depth=12, num_heads=6),
    "vit_b16": functools.partial(ViT, patch_size=16, width=768, depth=12, num_heads=12),
}
