"""jaxscale: data-parallel training of Flax models across a device mesh."""

__version__ = "0.1.0"
