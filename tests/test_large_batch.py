"""Batch growth in the trainer, and the records' recipes built and run at tiny size."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale import config as config_lib, models, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(config, **overrides):
  config.update({"dataset": "synthetic", "image_size": 8, "synthetic_num_classes": 10,
                 "synthetic_num_train_examples": 64, "synthetic_num_eval_examples": 16,
                 "eval_batch_size": 16, "log_every_steps": 1, "progress_bar": "off",
                 "checkpoint_async": False, **overrides})
  return config


def events(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [e for e in map(json.loads, lines) if e["split"] == "train"]


def test_stages_change_batch_and_learning_rate_with_exact_accounting(tmp_path):
  config = tiny(config_lib.defaults(), global_batch_size=16, batch_schedule="0:16,1:32",
                num_epochs=2.0, lr_scaling="linear", reference_batch_size=16,
                learning_rate=0.05)
  config.lr_schedule.name = "constant"
  config.lr_schedule.warmup_epochs = 0.0
  train.run(config, str(tmp_path))
  logged = events(tmp_path)
  # 64 examples per epoch: 4 steps of 16, then 2 of 32; every example once per epoch.
  assert [e["global_batch_size"] for e in logged] == [16, 16, 16, 16, 32, 32]
  assert [e["epoch"] for e in logged] == [0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
  rates = {e["global_batch_size"]: e["learning_rate"] for e in logged}
  assert rates[32] == pytest.approx(2 * rates[16]) and rates[16] == pytest.approx(0.05)


def test_adaptive_growth_follows_the_noise_scale(tmp_path):
  config = tiny(config_lib.defaults(), global_batch_size=16, batch_schedule="adaptive",
                max_global_batch_size=64, num_epochs=3.0)
  train.run(config, str(tmp_path))
  logged = events(tmp_path)
  sizes = [e["global_batch_size"] for e in logged]
  assert all("noise_scale" in e for e in logged)
  assert sizes == sorted(sizes) and set(sizes) <= {16, 32, 64}
  # Random labels: gradient noise dominates, so the estimate exceeds 16 and the batch grows.
  assert sizes[-1] > 16
  assert logged[-1]["epoch"] >= 3.0


RECIPES = {
    "goyal_sgd_8k.py": ("resnet50", 25_557_032, "resnet8"),
    "fujitsu_lars_81k.py": ("resnet50", 25_557_032, "resnet8"),
    "sony_batch_control.py": ("resnet50", 25_557_032, "resnet8"),
    "mlperf_lars.py": ("resnet50", 25_557_032, "resnet8"),
    "vit_s16_lamb.py": ("vit_s16", 22_050_664, "vit_ti16"),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_builds_and_trains_one_step_at_tiny_size(recipe, tmp_path, capsys):
  name, params, small = RECIPES[recipe]
  config = config_lib.load(os.path.join(ROOT, "configs", recipe))
  assert config.model == name
  # The recipe's real model, counted without computing anything.
  model = models.create_model(name, num_classes=1000, stem="imagenet")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == params
  # Everything else of the recipe (optimizer, schedule, precision, batch schedule) at tiny size,
  # with precise BN in every recipe's precision (ViT has no BatchNorm: refused there).
  vit = small.startswith("vit")
  overrides = {"model": small, "global_batch_size": 16, "num_train_steps": 2,
               "image_size": 32 if vit else 8, "precise_bn_batches": 0 if vit else 2}
  if config.batch_schedule:
    overrides["batch_schedule"] = "0:16,0.25:32"
  config_lib.validate(config, jax.device_count())
  result = train.run(tiny(config, **overrides), str(tmp_path))
  assert np.isfinite(result["loss"]) and result["num_examples"] == 16
  if vit:
    with pytest.raises(config_lib.ConfigError, match=f"config key 'precise_bn_batches': model "
                                                     f"'{small}' has no BatchNorm"):
      train.run(tiny(config, **{**overrides, "precise_bn_batches": 2}), str(tmp_path / "p"))
  else:
    assert "precise BN: statistics from 2 batches" in capsys.readouterr().err


BENCHMARK = os.path.join(ROOT, "benchmarks", "large_batch.py")


def _benchmark():
  import importlib.util
  spec = importlib.util.spec_from_file_location("large_batch_benchmark", BENCHMARK)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_benchmark_normalizes_batchnorm_over_128_examples_at_every_size():
  bench = _benchmark()
  runs = {(r["method"], r["global_batch_size"]): r
          for r in bench.plan(["sgd", "lars_growth"], [128, 4096], [1.0], 8.0)}
  assert ("lars_growth", 128) not in runs  # growth only for large batches
  assert runs[("sgd", 128)]["devices"] == 1
  assert runs[("sgd", 4096)]["devices"] == 32  # 128 examples per device, one BN group each
  assert runs[("lars_growth", 4096)]["devices"] == 16  # of the first stage, 2,048
  assert runs[("lars_growth", 4096)]["overrides"]["batch_schedule"] == "0:2048,2.66667:4096"
  assert all(r["overrides"]["bn_group_size"] == 1 for r in runs.values())
  growth = bench.plan(["lamb_growth"], [8192], [1.0], 24.0, powers=(1.0, 2.0))
  assert [bench.decay_power(r) for r in growth] == [1.0, 2.0]  # a sweep, recorded per run
  assert [r["overrides"]["lr_schedule.power"] for r in growth] == [1.0, 2.0]
  assert growth[0]["overrides"]["optimizer.name"] == "lamb"
  assert growth[0]["overrides"]["batch_schedule"] == "0:4096,8:8192"
  assert growth[0]["devices"] == 32
  micro = bench.plan(["lars"], [4096], [2.0], 8.0, "micro-batches")[0]
  assert micro["devices"] == 1 and micro["overrides"]["max_per_device_batch"] == 128
  assert micro["overrides"]["learning_rate"] == 8.0
  for run in [*runs.values(), *growth, micro]:  # each config is one the trainer accepts
    config = config_lib.load(bench.QUICKSTART, [f"{k}={v}" for k, v in run["overrides"].items()])
    config_lib.validate(config, run["devices"])


def test_benchmark_report_keeps_the_best_rate_per_cell(tmp_path):
  bench = _benchmark()
  results = [{"method": "sgd", "global_batch_size": 128, "lr_factor": 1.0, "epochs": 8.0,
              "accuracy": 0.9, "peak_lr": 0.2},
             {"method": "lars", "global_batch_size": 4096, "lr_factor": 1.0, "epochs": 8.0,
              "accuracy": 0.85, "peak_lr": 4.0},
             {"method": "lars", "global_batch_size": 4096, "lr_factor": 2.0, "epochs": 8.0,
              "accuracy": 0.87, "peak_lr": 8.0},
             {"method": "lars", "global_batch_size": 8192, "lr_factor": 1.0, "epochs": 8.0,
              "error": "exit 1: boom"}]
  table = bench.report(results, str(tmp_path))
  assert "baseline: sgd at batch 128, 90.00%" in table
  assert "| 4,096 | 14.6 | - | 87.00% (8) |" in table
  assert "1 runs failed: lars 8192 x1: exit 1: boom" in table
  assert "decay power" not in table  # one power: not repeated in every cell
  results.append({**results[1], "accuracy": 0.88, "overrides": {"lr_schedule.power": 1.0}})
  table = bench.report(results, str(tmp_path))
  assert "| 4,096 | 14.6 | - | 88.00% (4, power 1) |" in table
  assert "baseline: sgd at batch 128, 90.00%" in table
  rerun = {k: v for k, v in results[3].items() if k != "error"}
  results.append({**rerun, "accuracy": 0.8, "peak_lr": 5.66})
  table = bench.report(results, str(tmp_path))
  assert "failed" not in table  # the rerun of the same sweep point supersedes the failure
  assert "| 8,192 | 7.3 | - | 80.00% (5.66, power 2) |" in table


def test_benchmark_reports_time_to_accuracy_from_eval_curves(tmp_path):
  bench = _benchmark()
  baseline = {"method": "sgd", "global_batch_size": 128, "lr_factor": 1.0, "epochs": 4.0,
              "accuracy": 0.93, "peak_lr": 0.2,
              "evals": [[1, 469, 0.88, 60.0, 2.0], [2, 938, 0.915, 120.0, 4.0],
                        [3, 1407, 0.925, 180.0, 6.0], [4, 1875, 0.93, 240.0, 8.0]]}
  large = {"method": "lamb", "global_batch_size": 4096, "lr_factor": 1.0, "epochs": 4.0,
           "accuracy": 0.912, "peak_lr": 0.04,
           "evals": [[1, 15, 0.70, 30.0, 1.0], [2, 30, 0.905, 60.0, 2.0],
                     [3, 44, 0.911, 90.0, 3.0], [4, 59, 0.912, 120.0, 4.0]]}
  table = bench.report([baseline, large], str(tmp_path))
  assert "within 1 and 2 points of the baseline's final 93.00%" in table
  assert "| sgd 128 (x1) | 93.00% | 3.0 (1,407) | 2.0 (938) | 116 s |" in table
  assert "| lamb 4,096 (x1) | 91.20% | not reached | 3.0 (44) | 87 s |" in table
  assert os.path.exists(tmp_path / "large_batch_curves.png")


def test_benchmark_says_a_killed_run_may_have_run_out_of_memory(tmp_path, monkeypatch):
  bench = _benchmark()
  killed = subprocess.CompletedProcess([], -9, "", "step 70 epoch 11.06 loss 0.5837")
  monkeypatch.setattr(bench.subprocess, "run", lambda *args, **kwargs: killed)
  result = bench.train({"devices": 8, "overrides": {}}, str(tmp_path), [], timeout=0)
  assert result["error"] == "exit -9 (SIGKILL: out of memory?): step 70 epoch 11.06 loss 0.5837"


def _run_benchmark(*argv: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, BENCHMARK, *argv], capture_output=True, text=True,
                        timeout=120)


@pytest.mark.parametrize("argv, message", [
    (["--config.lr_schedule.power=1"], "--config.lr_schedule.power is set per run"),
    (["--epoch", "3"], "unrecognized argument --epoch"),  # no prefix matching: a typo runs nothing
    (["--sizes", "4096,8k"], "argument --sizes: '4096,8k': invalid literal for int()"),
    (["--methods", "lamb,lasr"], "argument --methods: 'lamb,lasr': unknown method 'lasr'; known:"),
])
def test_benchmark_rejects_flags_that_would_mislabel_its_runs(argv, message):
  proc = _run_benchmark("--methods", "lamb", "--sizes", "4096", *argv)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_benchmark_report_without_results_names_the_file(tmp_path):
  proc = _run_benchmark("--report", "--out-dir", str(tmp_path))
  assert proc.returncode == 2, proc.stderr
  assert f"{tmp_path}/large_batch.jsonl: no results to report" in proc.stderr
