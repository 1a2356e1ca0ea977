"""Test accuracy against global batch size on Fashion-MNIST, at a fixed epoch budget.

The records' claim at small scale: plain SGD with linear learning-rate scaling loses accuracy
as the batch grows, layer-wise adaptive rates (LARS, LAMB) and batch growth keep it. Every run
is `jaxscale.train` on the quickstart recipe (configs/quickstart.py: resnet8, Fashion-MNIST)
with the same epoch budget and schedule shape (linear warm-up over the first epoch, then
linear decay: polynomial of power 1 unless `--decay-powers` says otherwise; at 24 epochs it gave
LAMB 0.4 and 1.9 points more at 4,096 and 8,192 than MLPerf's power 2, and the baseline the
same, RESULTS.md) and precise BN over 16 batches before eval
(at 4-15 steps per epoch BatchNorm's running averages lag the weights), in its own process;
runs go `--jobs` at a time. Every run normalizes BatchNorm over 128 examples, as a cluster of
batch / 128 devices would (Goyal et al. keep 32 per GPU), so the batch size alone varies. With
`--bn-groups devices` (default, for CPUs) a run at batch B gets B / 128 host CPU devices
(XLA_FLAGS), one BN group each (many CPU devices are also the fast way to run a big batch on a
CPU, see README on accumulation); with `--bn-groups micro-batches` (for one accelerator) it runs
on one device with micro-batches of 128 (`max_per_device_batch`), which normalizes the same
ghost batches (README).

Methods; the learning rate follows the scaling rule from a reference point, and each cell is
the best of `--lr-factors` times that rate (a small sweep, reported with the rate it chose):
  sgd          SGD-Nesterov, weight decay 5e-4, linear scaling from 0.2 at batch 128
               (Goyal et al., arXiv 1706.02677)
  lars         LARS (trust coefficient 0.001, momentum 0.9, weight decay 5e-4),
               square-root scaling from 4.0 at batch 4,096 (You et al., arXiv 1708.03888)
  lamb         LAMB (weight decay 0.01), square-root scaling from 0.04 at batch 4,096
               (You et al., arXiv 1904.00962; 0.01 underfit, 0.08 did worse, RESULTS.md)
  lars_growth  lars, but half the batch for the first third of the epochs (Sony's batch-size
               control, Mikami et al., arXiv 1811.05233); the rate follows the rule per stage
  lamb_growth  lamb, with the same growth

  python benchmarks/large_batch.py --jobs 4 --bn-groups micro-batches  # one GPU: the grid
  python benchmarks/large_batch.py --sizes 128,4096 --methods sgd,lars --epochs 1   # a check
  python benchmarks/large_batch.py --report                           # table + plot from jsonl

Every run evaluates every `--eval-every-epochs` (default 1; with precise BN, as at the end) and
records the curve, so the report also gives, per run, the epoch and step at which an eval first
came within 1 and 2 points of the baseline (time to accuracy, as MLPerf and the records count it).

It appends one JSON line per run to `--out-dir`/large_batch.jsonl, then writes the table
(large_batch.md) and, when matplotlib is installed (`pip install -e '.[bench]'`), the plots
(large_batch.png; large_batch_curves.png: eval accuracy against epochs of the runs with curves).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
METHODS = ("sgd", "lars", "lamb", "lars_growth", "lamb_growth")
BN_EXAMPLES = 128  # per device, hence per BatchNorm group


def first_batch(method: str, size: int) -> int:
  """The global batch a run of `method` at `size` starts with: half of it for growth."""
  return size // 2 if method.endswith("_growth") else size


def known_method(name: str) -> str:
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
  return name


def method_overrides(method: str, size: int, lr_factor: float, epochs: float,
                     decay_power: float = 1.0) -> dict:
  """Config overrides for one run: `method` at global batch `size`."""
  common = {"num_epochs": epochs, "global_batch_size": size, "lr_schedule.name": "poly",
            "lr_schedule.power": decay_power, "lr_schedule.warmup_epochs": min(1.0, epochs / 4),
            "precise_bn_batches": 16, "bn_group_size": 1, "eval_batch_size": 1024}
  if method == "sgd":
    return {**common, "optimizer.name": "sgd", "optimizer.weight_decay": 5e-4,
            "learning_rate": 0.2 * lr_factor, "reference_batch_size": 128,
            "lr_scaling": "linear"}
  base = {"lars": {**common, "optimizer.name": "lars", "optimizer.weight_decay": 5e-4,
                   "optimizer.trust_coefficient": 0.001, "learning_rate": 4.0 * lr_factor,
                   "reference_batch_size": 4096, "lr_scaling": "sqrt"},
          "lamb": {**common, "optimizer.name": "lamb", "optimizer.weight_decay": 0.01,
                   "learning_rate": 0.04 * lr_factor, "reference_batch_size": 4096,
                   "lr_scaling": "sqrt"}}
  optimizer = known_method(method).removesuffix("_growth")
  if optimizer == method:
    return base[method]
  return {**base[optimizer],
          "batch_schedule": f"0:{first_batch(method, size)},{epochs / 3:g}:{size}"}


def train(run: dict, workdir: str, extra: list[str], timeout: float,
          eval_every_epochs: float = 1.0) -> dict:
  """One `jaxscale.train` process; returns `run` with its eval accuracy, eval curve and train
  loss."""
  args = [sys.executable, "-m", "jaxscale.train", f"--config={QUICKSTART}",
          f"--workdir={workdir}", "--config.progress_bar=off", "--config.log_every_steps=10",
          "--config.checkpoint_every_steps=0", f"--config.eval_every_epochs={eval_every_epochs}",
          *(f"--config.{k}={v}" for k, v in run["overrides"].items()), *extra]
  env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={run['devices']} "
                       + os.environ.get("XLA_FLAGS", ""))
  start = time.time()
  try:
    proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout or None)
  except subprocess.TimeoutExpired:  # one slow run must not lose the others' results
    return {**run, "wall_s": round(time.time() - start, 1),
            "error": f"no result within --timeout {timeout:g} s"}
  result = {**run, "wall_s": round(time.time() - start, 1)}
  if proc.returncode:
    # The kernel's OOM killer is the usual SIGKILL here: a 16,384 batch needs ~16 GB of host memory.
    why = " (SIGKILL: out of memory?)" if proc.returncode == -signal.SIGKILL else ""
    return {**result, "error": f"exit {proc.returncode}{why}: {proc.stderr.strip()[-500:]}"}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    events = [json.loads(line) for line in f]
  last_train = [e for e in events if e["split"] == "train"][-1]
  from jaxscale import optim
  o = run["overrides"]
  curve = [[round(e["epoch"], 4), e["step"], e["accuracy"], round(e["wall_time"], 1),
            round(e["eval_time"], 1)] for e in events if e["split"] == "eval"]
  return {**result, "accuracy": events[-1]["accuracy"], "train_loss": last_train["loss"],
          "steps": events[-1]["step"], "peak_lr": optim.scale_learning_rate(
              o["learning_rate"], o["global_batch_size"], o["reference_batch_size"],
              o["lr_scaling"]), "evals": curve}


EVAL_FIELDS = ("epoch", "step", "accuracy", "wall_time", "eval_time")  # a curve point's fields


def first_reaching(run: dict, accuracy: float) -> dict | None:
  """The first eval of `run` at or above `accuracy` (as a dict of EVAL_FIELDS), or None."""
  for point in run.get("evals", []):
    if point[2] >= accuracy:
      return dict(zip(EVAL_FIELDS, point))
  return None


def time_to_accuracy(results: list[dict], baseline: dict) -> list[str]:
  """Markdown rows: per run with an eval curve, when it first came within 1 and 2 points."""
  lines = ["| run | final accuracy | epochs (steps) to baseline - 1 | to baseline - 2 | "
           "train time to baseline - 2 |", "|---|---|---|---|---|"]
  for r in sorted((r for r in results if r.get("evals")),
                  key=lambda r: (r["global_batch_size"], r["method"])):
    cells = []
    for below in (1, 2):
      hit = first_reaching(r, baseline["accuracy"] - below / 100)
      cells.append("not reached" if hit is None else f"{hit['epoch']:.1f} ({hit['step']:,})")
    hit = first_reaching(r, baseline["accuracy"] - 0.02)
    seconds = "-" if hit is None else f"{hit['wall_time'] - hit['eval_time']:,.0f} s"
    lines.append(f"| {r['method']} {r['global_batch_size']:,} (x{r['lr_factor']:g}) | "
                 f"{100 * r['accuracy']:.2f}% | {cells[0]} | {cells[1]} | {seconds} |")
  return lines


def plan(methods: list[str], sizes: list[int], factors: list[float], epochs: float,
         bn_groups: str = "devices", powers: tuple[float, ...] = (1.0,)) -> list[dict]:
  """Every run, the first (power, factor) of every cell before any cell's second: a run cut
  short by the deadline loses sweep points, not whole cells. `bn_groups`: how BatchNorm gets
  groups of BN_EXAMPLES, "devices" (one host CPU device each) or "micro-batches" (on one
  device; a growth run keeps its first stage's devices, so its groups double with the batch).
  `powers`: the decay powers swept, like the rate factors."""
  runs = []
  for power, factor in [(p, f) for p in powers for f in factors]:
    for method in methods:
      for size in sizes:
        if method.endswith("_growth") and size < 1024:
          continue  # growth is for the large batches
        overrides = method_overrides(method, size, factor, epochs, power)
        if bn_groups == "devices":  # one device per 128 examples of the first stage
          devices = max(1, first_batch(method, size) // BN_EXAMPLES)
        else:
          devices, overrides["max_per_device_batch"] = 1, BN_EXAMPLES
        runs.append({"method": method, "global_batch_size": size, "lr_factor": factor,
                     "epochs": epochs, "devices": devices, "overrides": overrides})
  return runs


def best_per_cell(results: list[dict]) -> dict[tuple[str, int], dict]:
  best = {}
  for r in results:
    key = (r["method"], r["global_batch_size"])
    if "accuracy" in r and (key not in best or r["accuracy"] > best[key]["accuracy"]):
      best[key] = r
  return best


def decay_power(run: dict) -> float:
  """The run's decay power; 2 for runs from before the benchmark swept it."""
  return run.get("overrides", {}).get("lr_schedule.power", 2.0)


def sweep_point(run: dict) -> tuple:
  """What a run measured: a later run of the same point supersedes a failed one."""
  return run["method"], run["global_batch_size"], run["lr_factor"], decay_power(run)


def report(results: list[dict], out_dir: str) -> str:
  """The markdown table (best of the sweep per cell) and, with matplotlib, the plot."""
  best = best_per_cell(results)
  completed = {sweep_point(r) for r in results if "accuracy" in r}
  methods = [m for m in METHODS if any(k[0] == m for k in best)]
  sizes = sorted({k[1] for k in best})
  baseline = best.get(("sgd", min(sizes))) if sizes else None
  epochs = results[0]["epochs"] if results else 0
  powers = {decay_power(r) for r in results}
  lines = [f"Fashion-MNIST test accuracy, resnet8, {epochs:g} epochs at every batch size; each "
           "cell the best of its learning-rate sweep (peak rate"
           + (" and decay power" if len(powers) > 1 else "") + " in brackets); "
           + (f"baseline: sgd at batch {min(sizes)}, {100 * baseline['accuracy']:.2f}%."
              if baseline else "no baseline run."), "",
           "| global batch | steps/epoch | " + " | ".join(methods) + " |",
           "|---|---|" + "---|" * len(methods)]
  for size in sizes:
    cells = []
    for m in methods:
      r = best.get((m, size))
      power = f", power {decay_power(r):g}" if r and len(powers) > 1 else ""
      cells.append("-" if r is None else
                   f"{100 * r['accuracy']:.2f}% ({r['peak_lr']:.3g}{power})")
    lines.append(f"| {size:,} | {60000 / size:.1f} | " + " | ".join(cells) + " |")
  if baseline and any(r.get("evals") for r in results):
    lines += ["", f"Time to accuracy: the first eval (one per epoch, precise BN) within 1 and 2 "
                  f"points of the baseline's final {100 * baseline['accuracy']:.2f}%; train "
                  f"time is wall time less eval time, on this run's machine (shared 2-core CPU: "
                  f"compare epochs and steps, not seconds).", ""]
    lines += time_to_accuracy(results, baseline)
  failed = [r for r in results if "error" in r and sweep_point(r) not in completed]
  if failed:
    lines += ["", f"{len(failed)} runs failed: " + "; ".join(
        f"{r['method']} {r['global_batch_size']} x{r['lr_factor']:g}: {r['error'][-120:]}"
        for r in failed[:5])]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out_dir, "large_batch.md"), "w") as f:
    f.write(text)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return text + "\n(no plot: matplotlib is not installed)\n"
  # Left every cell, right a zoom on the goals (a diverged run squashes them in the left).
  fig, axes = plt.subplots(1, 2 if baseline else 1, figsize=(11.0, 4.0), squeeze=False)
  for ax in axes[0]:
    for m in methods:
      points = sorted((s, 100 * r["accuracy"]) for (mm, s), r in best.items() if mm == m)
      ax.plot(*zip(*points), marker="o", label=m)
    for below, style in ((1, ":"), (2, "--")) if baseline else ():  # goals at 4,096, 8,192
      ax.axhline(100 * baseline["accuracy"] - below, color="grey", ls=style, lw=1,
                 label=f"baseline - {below} point{'s' * (below > 1)}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("test accuracy (%)")
  axes[0, 0].set_ylim(bottom=max(0.0, axes[0, 0].get_ylim()[0]))
  axes[0, 0].set_title(f"Fashion-MNIST, resnet8, {epochs:g} epochs")
  axes[0, 0].legend()
  if baseline:
    zoom = 10  # points below the baseline, enough for every layer-wise cell
    axes[0, 1].set_ylim(100 * baseline["accuracy"] - zoom, 100 * baseline["accuracy"] + 1)
    axes[0, 1].set_title(f"within {zoom} points of the baseline")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "large_batch.png"), dpi=120)
  plt.close(fig)
  curves = [r for r in results if r.get("evals")]
  if curves:
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for r in curves:
      epochs, _, accuracy, *_ = zip(*r["evals"])
      ax.plot(epochs, [100 * a for a in accuracy], marker=".",
              label=f"{r['method']} {r['global_batch_size']:,}")
    for below, style in ((1, ":"), (2, "--")) if baseline else ():
      ax.axhline(100 * baseline["accuracy"] - below, color="grey", ls=style, lw=1,
                 label=f"baseline - {below} point{'s' * (below > 1)}")
    ax.set_ylim(max(0.0, 100 * baseline["accuracy"] - 15) if baseline else 0, 100)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Fashion-MNIST, resnet8: eval during training ({epochs[-1]:.0f} epochs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "large_batch_curves.png"), dpi=120)
    plt.close(fig)
  return text


def comma_list(convert):
  """An argparse type: "a,b" -> [convert(a), convert(b)], the bad item named on error."""
  def parse(text: str) -> list:
    try:
      return [convert(item) for item in text.split(",")]
    except ValueError as e:
      raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
  return parse


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  parser.add_argument("--methods", type=comma_list(known_method), default=",".join(METHODS))
  parser.add_argument("--sizes", type=comma_list(int), default="128,1024,4096,8192,16384")
  parser.add_argument("--lr-factors", type=comma_list(float), default="1,0.5,2",
                      help="multiples of each method's scaled rate, in the order they are run")
  parser.add_argument("--decay-powers", type=comma_list(float), default="1",
                      help="powers of the polynomial decay, swept like the rate factors")
  parser.add_argument("--epochs", type=float, default=6.0)
  parser.add_argument("--eval-every-epochs", type=float, default=1.0,
                      help="evals during each run, for time to accuracy (0: at the end only)")
  parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
  parser.add_argument("--bn-groups", choices=("devices", "micro-batches"), default="devices",
                      help="BatchNorm over 128 examples via host CPU devices or micro-batches")
  parser.add_argument("--deadline", type=float, default=0,
                      help="seconds: start no run after this (0: no limit)")
  parser.add_argument("--timeout", type=float, default=0,
                      help="seconds per run, 0: no limit (a CPU run of 24 epochs takes > 1 h)")
  parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
  parser.add_argument("--report", action="store_true", help="only redo table and plot")
  args, extra = parser.parse_known_args()  # extra: --config.key=value for every run
  os.makedirs(args.out_dir, exist_ok=True)
  log_path = os.path.join(args.out_dir, "large_batch.jsonl")

  if not args.report:
    runs = plan(args.methods, args.sizes, args.lr_factors, args.epochs, args.bn_groups,
                args.decay_powers)
    for e in extra:  # the jsonl must say what each run did: the sweep's keys stay the sweep's
      if not e.startswith("--config."):
        parser.error(f"unrecognized argument {e}")
      key = e.split("=", 1)[0].removeprefix("--config.")
      if any(key in run["overrides"] for run in runs):
        parser.error(f"--config.{key} is set per run by this benchmark (method_overrides); "
                     "change it there or through --lr-factors/--decay-powers")
    from jaxscale import config as config_lib, data  # convert Fashion-MNIST once, up front
    data.load_dataset(config_lib.load(QUICKSTART, [e[len("--config."):] for e in extra]))
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp, \
        concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
      def job(i: int, run: dict) -> dict | None:
        if args.deadline and time.time() - start > args.deadline:
          return None
        return train(run, os.path.join(tmp, str(i)), extra, args.timeout,
                     args.eval_every_epochs)
      futures = [pool.submit(job, i, run) for i, run in enumerate(runs)]
      for future in concurrent.futures.as_completed(futures):  # written as each one ends
        result = future.result()
        if result is not None:  # opened per line: the file may be replaced during hours of runs
          with open(log_path, "a") as log:
            log.write(json.dumps(result) + "\n")
          print(json.dumps(result), flush=True)
  if not os.path.exists(log_path):
    parser.error(f"{log_path}: no results to report; run the benchmark first")
  with open(log_path) as f:
    results = [json.loads(line) for line in f]
  print(report(results, args.out_dir))


if __name__ == "__main__":
  main()
