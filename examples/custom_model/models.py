"""A model of your own, outside jaxscale: plain Flax Linen, with its own BatchNorm.

jaxscale finds it by import path (`config.model = "models:SmallCNN"`): the config file's
directory is on sys.path. Nothing here knows about devices: jaxscale makes the BatchNorm
statistics cross-replica and passes `num_classes` and `dtype` because the module has them.
"""
import flax.linen as nn
import jax.numpy as jnp


class SmallCNN(nn.Module):
  num_classes: int = 10
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for width in (32, 64):
      x = nn.Conv(width, (3, 3), dtype=self.dtype)(x)
      x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)
