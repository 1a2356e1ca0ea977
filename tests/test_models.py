"""Tests of the model zoo: parameter counts, dtypes, BN options, errors."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale import models
from jaxscale.errors import ConfigError
from jaxscale.models import MODELS, BasicBlock, BottleneckBlock, ResNet, create_model

X = jnp.asarray(np.random.RandomState(0).randn(8, 32, 32, 3), jnp.float32)


def abstract_params(model: nn.Module, size: int) -> int:
  """Counts parameters without computing anything (eval_shape)."""
  init = functools.partial(model.init, train=False)
  variables = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("name, expected", [
    ("resnet18", 11_689_512),
    ("resnet34", 21_797_672),
    ("resnet50", 25_557_032),
    ("resnet101", 44_549_160),
    ("resnet152", 60_192_808),
    ("resnet200", 64_673_832),
    ("vit_s16", 22_050_664),
])
def test_param_counts(name, expected):
  assert abstract_params(create_model(name, num_classes=1000), 224) == expected


def test_cifar_resnets_always_use_small_stem():
  for name, n in [("resnet8", 1), ("resnet20", 3), ("resnet32", 5), ("resnet56", 9)]:
    model = create_model(name, num_classes=10, stem="imagenet")
    assert model.stem == "small" and model.num_filters == 16
    assert model.stage_sizes == (n, n, n)  # 6n + 2 layers
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), X)
  assert variables["params"]["conv_init"]["kernel"].shape == (3, 3, 3, 16)


def test_resnet50_imagenet_stem_and_v1_5_strides():
  model = create_model("resnet50", num_classes=1000)
  x = jnp.zeros((1, 224, 224, 3))
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  apply = functools.partial(model.apply, train=False, capture_intermediates=True,
                            mutable=["intermediates"])
  _, state = jax.eval_shape(apply, variables, x)

  def shape(*path):
    return functools.reduce(lambda d, k: d[k], path, state["intermediates"])["__call__"][0].shape

  assert shape("conv_init") == (1, 112, 112, 64)
  assert shape("BottleneckBlock_0") == (1, 56, 56, 256)  # after the 3x3/2 max pool
  # v1.5: the first block of stage 2 strides on its 3x3 conv, not on the first 1x1.
  assert shape("BottleneckBlock_3", "Conv_0") == (1, 56, 56, 128)
  assert shape("BottleneckBlock_3", "Conv_1") == (1, 28, 28, 128)
  assert shape("BottleneckBlock_15") == (1, 7, 7, 2048)


@pytest.mark.parametrize("name, stem", [("resnet8", "small"), ("resnet18", "imagenet"),
                                        ("resnet18", "small"), ("resnet50", "imagenet"),
                                        ("vit_ti16", "imagenet")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_shapes_and_dtypes(name, stem, dtype):
  # Shapes and dtypes only: eval_shape traces the model without computing it.
  model = create_model(name, num_classes=10, stem=stem, dtype=dtype)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), X)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["params"]))

  train = functools.partial(model.apply, train=True, mutable=["batch_stats"])
  logits, new_state = jax.eval_shape(train, variables, X)
  assert logits.shape == (8, 10) and logits.dtype == jnp.float32
  if name.startswith("vit"):
    # No batch_stats, but the trainer's call still works and returns nothing to update.
    assert "batch_stats" not in variables and not new_state.get("batch_stats")
  else:
    assert jax.tree.structure(new_state["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state["batch_stats"]))

  logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, X)
  assert logits.shape == (8, 10) and logits.dtype == jnp.float32


def test_bfloat16_compute_keeps_batch_stats_float32():
  model = create_model("resnet8", num_classes=10, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)

  @jax.jit
  def init_and_train(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return variables, model.apply(variables, x, train=True,
                                  mutable=["batch_stats", "intermediates"],
                                  capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Conv))

  variables, (logits, state) = init_and_train(X)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(variables["params"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["batch_stats"]))
  assert logits.shape == (8, 10) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["batch_stats"]))
  conv_outputs = jax.tree.leaves(state["intermediates"])
  assert len(conv_outputs) == 1 + 3 * 2 + 2  # stem, 2 per block, 2 projections
  assert all(x.dtype == jnp.bfloat16 for x in conv_outputs)


def test_vit_bfloat16_runs_and_keeps_trainer_calling_convention():
  model = create_model("vit_ti16", num_classes=10, dtype=jnp.bfloat16)

  @jax.jit
  def init_and_train(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return model.apply(variables, x, train=True, mutable=["batch_stats"])

  logits, state = init_and_train(X)
  assert logits.shape == (8, 10) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all() and not state.get("batch_stats")


def test_vit_bfloat16_layernorm_params_follow_param_dtype():
  model = create_model("vit_ti16", num_classes=10, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), X)
  assert variables["params"]["norm"]["scale"].dtype == jnp.bfloat16
  assert variables["params"]["pos_embedding"].shape == (1, 2 * 2 + 1, 192)


def test_vit_rejects_image_size_not_divisible_by_patch():
  model = create_model("vit_ti16", num_classes=10)
  with pytest.raises(ValueError, match="not divisible by patch_size 16"):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), X[:, :30])


def _bn_scales(params) -> dict[str, np.ndarray]:
  # Convs have no bias and Dense no scale, so every 'scale' belongs to a BatchNorm.
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat
          if jax.tree_util.keystr(path).endswith("['scale']")}


@pytest.mark.parametrize("block_cls, last_bn", [(BasicBlock, "BatchNorm_1"),
                                                (BottleneckBlock, "BatchNorm_2")])
@pytest.mark.parametrize("zero_init", [False, True])
def test_zero_init_last_bn(block_cls, last_bn, zero_init):
  model = ResNet(stage_sizes=(2, 1), block_cls=block_cls, num_classes=10, num_filters=8,
                 stem="small", zero_init_last_bn=zero_init)
  scales = _bn_scales(model.init(jax.random.key(0), X, train=False)["params"])
  # stem + 3 blocks x (2 or 3) + projections (where width or stride changes)
  assert len(scales) == (8 if block_cls is BasicBlock else 12)
  for path, scale in scales.items():
    is_last = f"['{last_bn}']" in path
    np.testing.assert_array_equal(scale, 0.0 if (zero_init and is_last) else 1.0, err_msg=path)
  assert sum(f"['{last_bn}']" in path for path in scales) == 3  # one per block


def test_create_model_passes_options():
  model = create_model("resnet8", num_classes=10, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                       bn_momentum=0.5, zero_init_last_bn=True)
  assert (model.num_classes, model.dtype, model.param_dtype) == (10, jnp.bfloat16, jnp.bfloat16)
  assert model.bn_momentum == 0.5 and model.zero_init_last_bn


def test_unknown_model_and_bad_stem():
  with pytest.raises(ConfigError, match=r"^config key 'model': unknown model 'foo'; known: "
                     r"resnet101, resnet152, resnet18, .*vit_b16, vit_s16, vit_ti16$") as info:
    create_model("foo", num_classes=10)
  assert "\n" not in str(info.value)
  assert all(name in str(info.value) for name in MODELS)
  with pytest.raises(ConfigError, match=r"^config key 'stem': unknown stem 'tiny'; known: auto, "
                                        r"imagenet, small$"):
    create_model("resnet18", num_classes=10, stem="tiny")


def test_options_irrelevant_to_vit_are_ignored():
  model = create_model("vit_ti16", num_classes=10, stem="small", bn_momentum=0.5,
                       zero_init_last_bn=True)
  assert model.patch_size == 16 and model.width == 192


def test_cross_replica_batch_norm_matches_single_device():
  """jaxscale's control of BatchNorm (models/contract.py): the global statistics under pmap."""
  n = jax.local_device_count()
  assert n == 8
  x = jnp.asarray(np.random.RandomState(1).randn(n * 2, 8, 8, 3), jnp.float32)
  model = models.build("resnet8", {"num_classes": 10})
  variables = model.init(jax.random.key(0), x)

  def train(batch_norm):
    return lambda v, x: model.apply(v, x, train=True, batch_norm=batch_norm)

  logits, state = jax.jit(train(models.BatchNorm()))(variables, x)
  p_logits, p_state = jax.pmap(train(models.BatchNorm("data")), axis_name="data",
                               in_axes=(None, 0))(variables, x.reshape(n, 2, 8, 8, 3))

  np.testing.assert_allclose(p_logits.reshape(n * 2, 10), logits, rtol=1e-4, atol=1e-4)
  for got, want in zip(jax.tree.leaves(p_state), jax.tree.leaves(state)):
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-4, atol=1e-5)
  # Sanity: per-replica statistics alone would differ from the global ones.
  _, local = jax.jit(train(models.BatchNorm()))(variables, x[:2])
  assert not np.allclose(local["bn_init"]["mean"], state["bn_init"]["mean"], atol=1e-5)


def test_transformer_is_causal():
  """Changing token t changes no logit before position t."""
  model = create_model("transformer_tiny", num_classes=256, max_length=16)
  tokens = jnp.arange(16, dtype=jnp.int32)[None] % 256
  variables = model.init(jax.random.key(0), tokens)
  logits = model.apply(variables, tokens)
  changed = model.apply(variables, tokens.at[0, 9].set(200))
  assert logits.shape == (1, 16, 256)
  np.testing.assert_allclose(changed[0, :9], logits[0, :9], rtol=1e-6, atol=1e-6)
  assert not np.allclose(changed[0, 9:], logits[0, 9:], atol=1e-4)
