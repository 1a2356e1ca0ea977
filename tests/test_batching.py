"""Batch schedules (stages, ramp, adaptive) and the gradient noise scale estimate."""
import ml_collections
import numpy as np
import pytest

from jaxscale import batching, noise_scale
from jaxscale.config import ConfigError


def schedule_config(spec, *, initial=128, ramp=False, maximum=0, accum=1, max_per_device=0):
  return ml_collections.ConfigDict(dict(batch_schedule=spec, global_batch_size=initial,
                                        batch_ramp=ramp, max_global_batch_size=maximum,
                                        grad_accum_steps=accum,
                                        max_per_device_batch=max_per_device))


def test_constant_without_schedule():
  s = batching.create(schedule_config(""), num_examples=1000, num_devices=8)
  assert [s.size_at(p) for p in (0, 999, 10**6)] == [128, 128, 128]


def test_stages_change_at_their_epochs():
  s = batching.create(schedule_config("0:64,2:128,3.5:256"), 1000, num_devices=8)
  assert [s.size_at(p) for p in (0, 1999, 2000, 3499, 3500, 9999)] == [64, 64, 128, 128, 256, 256]
  assert s.distinct_sizes() == [64, 128, 256]


def test_linear_ramp_between_points_rounded_to_the_multiple():
  s = batching.create(schedule_config("0:64,4:320", ramp=True), 1000, num_devices=8)
  assert s.size_at(0) == 64
  assert s.size_at(1000) == 128  # a quarter of the way: 64 + 256 / 4
  assert s.size_at(1500) == 160  # 64 + 256 * 0.375 = 160
  assert s.size_at(1100) == 128  # 134.4 rounds down to a multiple of 8
  assert s.size_at(4000) == s.size_at(9000) == 320


def test_adaptive_doubles_when_noise_scale_exceeds_the_batch_up_to_the_maximum():
  s = batching.create(schedule_config("adaptive", initial=64, maximum=256), 1000, num_devices=8)
  assert s.size_at(0) == 64
  assert not s.observe_noise_scale(50.0) and s.size_at(10) == 64
  assert s.observe_noise_scale(100.0) and s.size_at(10) == 128
  assert s.observe_noise_scale(1e9) and s.size_at(10) == 256
  assert not s.observe_noise_scale(1e9) and s.size_at(10) == 256  # at the maximum
  restored = batching.create(schedule_config("adaptive", initial=64, maximum=256), 1000, 8)
  restored.restore(s.state())
  assert restored.size_at(0) == 256
  assert s.distinct_sizes() == [64, 128, 256]


@pytest.mark.parametrize("spec, message", [
    ("0:64,0:128", "stage start epochs must increase, got [0.0, 0.0]"),
    ("0:64,3:128,2:256", "stage start epochs must increase"),
    ("1:64", "the first stage must start at epoch 0"),
    ("0:60", "batch size 60 of stage '0:60' is not a positive multiple of 8"),
    ("0:64,1:-8", "is not a positive multiple of 8"),
    ("0:64:2", "stage '0:64:2' is not start_epoch:global_batch_size"),
    ("fast", "stage 'fast' is not start_epoch:global_batch_size; expected '', 'adaptive'"),
])
def test_bad_schedules_are_refused_naming_the_key(spec, message):
  with pytest.raises(ConfigError, match="config key 'batch_schedule'") as info:
    batching.create(schedule_config(spec), 1000, num_devices=8)
  assert message in str(info.value)


def test_adaptive_needs_a_valid_maximum():
  with pytest.raises(ConfigError, match="config key 'max_global_batch_size'"):
    batching.create(schedule_config("adaptive", initial=128, maximum=100), 1000, num_devices=8)


@pytest.mark.parametrize("per_device, accum, max_per_device, expected", [
    (32, 1, 0, 1),  # neither key: no accumulation
    (32, 4, 0, 4),  # explicit
    (32, 1, 8, 4),  # automatic: the fewest micro-batches of at most 8
    (32, 1, 10, 4),  # 32 / 3 is no whole micro-batch: 4 of 8
    (32, 1, 32, 1),
    (32, 1, 64, 1),
    (12, 1, 5, 3),  # 12 = 3 x 4
    (13, 1, 4, 13),  # a prime: micro-batches of 1
])
def test_accum_steps_resolution(per_device, accum, max_per_device, expected):
  assert batching.accum_steps(per_device, accum, max_per_device) == expected


@pytest.mark.parametrize("args, message", [
    ((32, 3, 0), "config key 'grad_accum_steps': 3 does not divide the per-device batch of 32"),
    ((32, 0, 0), "config key 'grad_accum_steps' must be >= 1, got 0"),
    ((32, 1, -1), "config key 'max_per_device_batch' must be >= 0 (0: no limit), got -1"),
    ((32, 2, 8), "config keys 'grad_accum_steps' (2) and 'max_per_device_batch' (8): set one, "
                 "not both"),
])
def test_accum_steps_errors_are_one_line_naming_the_keys(args, message):
  with pytest.raises(ConfigError) as info:
    batching.accum_steps(*args)
  assert str(info.value) == message


def test_explicit_accumulation_makes_every_size_a_multiple_of_devices_times_k():
  ramp = batching.create(schedule_config("0:64,4:320", ramp=True, accum=2), 1000, num_devices=8)
  assert ramp.multiple == 16
  assert ramp.size_at(1100) == 128 and ramp.size_at(1600) == 160  # 166.4 -> 160
  assert all(ramp.size_at(p) % 16 == 0 for p in range(0, 5000, 37))
  automatic = batching.create(schedule_config("0:64,4:320", max_per_device=4), 1000, 8)
  assert automatic.multiple == 8  # k follows each size, so any per-device batch will do


@pytest.mark.parametrize("config, message", [
    (schedule_config("", initial=112, accum=3),
     "config key 'global_batch_size': 112 is not a multiple of 24 (8 data-parallel devices x "
     "grad_accum_steps 3)"),
    (schedule_config("0:64,1:136", accum=2),
     "config key 'batch_schedule': batch size 136 of stage '1:136' is not a positive multiple "
     "of 16 (8 data-parallel devices x grad_accum_steps 2)"),
    (schedule_config("adaptive", initial=64, maximum=200, accum=2),
     "config key 'max_global_batch_size': 200 must be >= global_batch_size (64) and divisible "
     "by 16"),
    (schedule_config("", accum=0), "config key 'grad_accum_steps' must be >= 1, got 0"),
    (schedule_config("", accum=2, max_per_device=8),
     "config keys 'grad_accum_steps' (2) and 'max_per_device_batch' (8): set one, not both"),
])
def test_sizes_that_accumulation_cannot_split_are_refused(config, message):
  with pytest.raises(ConfigError) as info:
    batching.create(config, 1000, num_devices=8)
  assert str(info.value) == message


def test_noise_scale_estimate_matches_the_closed_form():
  """Per-example gradients g ~ N(G, sigma^2 I) in d dims: B_simple = d sigma^2 / |G|^2."""
  rng = np.random.default_rng(0)
  d, sigma, small, devices = 50, 2.0, 16, 8
  true_g = rng.normal(size=d)
  expected = d * sigma**2 / float(true_g @ true_g)
  noise = noise_scale.NoiseScale(decay=0.999)
  for _ in range(3000):
    per_example = true_g + sigma * rng.normal(size=(devices, small, d))
    local = per_example.mean(axis=1)  # each device's gradient over its b examples
    small_sq = float(np.mean(np.sum(local**2, axis=1)))
    big_sq = float(np.sum(local.mean(axis=0) ** 2))  # the all-reduced gradient over B = 8b
    noise.update(*noise_scale.noise_scale_terms(small_sq, big_sq, small, small * devices))
  assert noise.value == pytest.approx(expected, rel=0.1)
  with pytest.raises(ValueError):
    noise_scale.noise_scale_terms(1.0, 1.0, 16, 16)
