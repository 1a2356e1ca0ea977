"""A picture of one or more runs: `jaxscale-plot WORKDIR [WORKDIR ...] --out FILE.png`.

Six panels from each workdir's metrics.jsonl, against steps or epochs (`--x epoch`): loss,
train and eval accuracy, the global batch size, the learning rate, the loss scale and training
throughput; several runs are overlaid and labelled with their workdir names, e.g. a large-batch
run beside its baseline. Needs matplotlib: `pip install 'jaxscale[plot]'`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

PANELS = (  # (title, [(split, field, label suffix)], y scale)
    ("loss", [("train", "loss", "train"), ("eval", "loss", "eval")], "log"),
    ("accuracy", [("train", "accuracy", "train"), ("eval", "accuracy", "eval")], "linear"),
    ("global batch size", [("train", "global_batch_size", "")], "log"),
    ("learning rate", [("train", "learning_rate", "")], "linear"),
    ("loss scale", [("train", "loss_scale", "")], "log"),
    ("examples/s", [("train", "examples_per_sec", "")], "linear"),
)


class PlotError(Exception):
  """A workdir or option that cannot be plotted; the message names it."""


def read_events(workdir: str) -> list[dict]:
  """The events of `workdir`'s metrics.jsonl (a line being written is skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isdir(workdir):
    raise PlotError(f"workdir {workdir!r} does not exist")
  if not os.path.isfile(path):
    raise PlotError(f"workdir {workdir!r} has no metrics.jsonl (no step logged yet?)")
  events = []
  with open(path) as f:
    for line in f:
      try:
        events.append(json.loads(line))
      except ValueError:
        continue
  if not events:
    raise PlotError(f"{path} holds no events yet")
  return events


def series(events: list[dict], split: str, field: str, x: str) -> tuple[list, list]:
  """(xs, ys) of `field` in the events of `split`, a repeated step keeping its last value
  (a resumed run logs the steps after its checkpoint again)."""
  points = {}
  for e in events:
    value = e.get(field)
    if e.get("split") == split and isinstance(value, (int, float)):
      points[e["step"]] = (e[x], value)
  ordered = [points[step] for step in sorted(points)]
  return [p[0] for p in ordered], [p[1] for p in ordered]


def plot(workdirs: list[str], out: str, x: str = "step") -> str:
  """Draws the runs of `workdirs` into `out` (PNG); returns its path."""
  runs = {w: read_events(w) for w in workdirs}  # every workdir checked before drawing
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise PlotError("matplotlib is not installed; pip install 'jaxscale[plot]'") from None
  fig, axes = plt.subplots(2, 3, figsize=(15, 8))
  for ax, (title, lines, scale) in zip(axes.flat, PANELS):
    for (workdir, events), color in zip(runs.items(), plt.rcParams["axes.prop_cycle"]):
      name = os.path.basename(os.path.normpath(workdir))
      for split, field, suffix in lines:
        xs, ys = series(events, split, field, x)
        if xs:
          style = dict(marker="o", ms=3) if split == "eval" else {}
          ax.plot(xs, ys, color=color["color"], ls="--" if split == "eval" else "-",
                  label=f"{name} {suffix}".strip(), **style)
    ax.set_title(title)
    ax.set_xlabel(x)
    if scale == "log" and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
      ax.set_yscale("log")
    if ax.get_lines():
      ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="jaxscale-plot", description=__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR")
  parser.add_argument("--out", required=True, help="the PNG file to write")
  parser.add_argument("--x", choices=("step", "epoch"), default="step")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    print(plot(args.workdirs, args.out, args.x))
  except (PlotError, OSError) as e:
    print(f"jaxscale-plot: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
