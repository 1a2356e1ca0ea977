"""A decoder-only Transformer language model (GPT-style) in Flax Linen, byte-level by default.

Token and learned position embeddings, pre-LayerNorm causal self-attention blocks (the ViT
encoder block of `vit.py` with a causal mask and, as in LLaMA, no biases in its projections), a
final LayerNorm and a linear head over the vocabulary. Trained with `task='language_model'`: position t predicts token t + 1.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxscale.models.vit import EncoderBlock, dense_init

Dtype = Any


class Transformer(nn.Module):
  """Causal Transformer returning float32 logits `[batch, length, vocab_size]`.

  Attributes:
    vocab_size: tokens (256 for bytes).
    max_length: the longest input; sizes the position embedding.
    width: token dimension.
    depth: number of blocks.
    num_heads: attention heads per block.
    mlp_ratio: MLP hidden size as a multiple of `width`.
    dtype: compute dtype of dense layers and activations.
    param_dtype: dtype of the parameters.
  """
  vocab_size: int = 256
  max_length: int = 256
  width: int = 256
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
    length = tokens.shape[1]
    if length > self.max_length:
      raise ValueError(f"input length {length} exceeds max_length {self.max_length}")
    embed = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                     param_dtype=self.param_dtype, name="embedding")
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1, self.max_length, self.width), self.param_dtype)
    x = (embed(tokens) + pos[:, :length]).astype(self.dtype)
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_ratio * self.width, self.dtype, self.param_dtype,
                       causal=True, use_bias=False, name=f"block{i}")(x)
    x = nn.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name="norm")(x)
    logits = nn.Dense(self.vocab_size, kernel_init=dense_init, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="head")(x)
    return jnp.asarray(logits, jnp.float32)


TRANSFORMERS: dict[str, Callable[..., Transformer]] = {
    "transformer_tiny": functools.partial(Transformer, width=128, depth=2, num_heads=4),
    "transformer_small": functools.partial(Transformer, width=256, depth=4, num_heads=4),
    "transformer_base": functools.partial(Transformer, width=768, depth=12, num_heads=12),
}
