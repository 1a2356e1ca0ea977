"""Tests for benchmarks/scaling_model.py; expected values are computed by hand here."""
import importlib.util
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling_model.py"
_spec = importlib.util.spec_from_file_location("scaling_model", SCRIPT)
sm = importlib.util.module_from_spec(_spec)
sys.modules["scaling_model"] = sm  # dataclasses resolve annotations through sys.modules
_spec.loader.exec_module(sm)

# 4 GPUs per node; intra 100 GB/s, 1 us; inter 1 GB/s, 10 us.
NET = sm.Network(gpus_per_node=4, intra_bw=1e11, inter_bw=1e9,
                 intra_latency=1e-6, inter_latency=1e-5)


def test_ring_hand_case():
    # 2 * 3/4 * 1e8 / 1e10 = 0.015 s
    net = sm.Network(gpus_per_node=4, intra_bw=1e10, inter_bw=1e9, intra_latency=0.0)
    assert sm.allreduce_time(1e8, 4, "ring", net) == pytest.approx(0.015)
    assert sm.ring_time(1e8, 4, 1e10, 0.0) == pytest.approx(0.015)


def test_flat_ring_across_nodes_uses_inter_node_bandwidth_and_latency():
    # 2*15/16 * 1e8/1e9 = 0.1875, plus 2*15 * 1e-5 = 3e-4
    assert sm.allreduce_time(1e8, 16, "ring", NET) == pytest.approx(0.1878)


def test_hierarchical_hand_case():
    # G=4, M=4: intra 2*3/4*1e8/1e11 = 1.5e-3 and 2*3*1e-6 = 6e-6;
    # inter on 1e8/4 bytes: 2*3/4*2.5e7/1e9 = 0.0375 and 2*3*1e-5 = 6e-5.
    assert sm.allreduce_time(1e8, 16, "hierarchical", NET) == pytest.approx(0.039066)


def test_hierarchical_inside_one_node_is_an_intra_node_ring():
    # N=2 <= G: 2*1/2*1e8/1e11 = 1e-3, plus 2*1*1e-6
    assert sm.allreduce_time(1e8, 2, "hierarchical", NET) == pytest.approx(1.002e-3)


def test_2d_torus_hand_cases():
    # X = 4 = G: identical to hierarchical
    assert sm.allreduce_time(1e8, 16, "2d_torus", NET, torus_x=4) == pytest.approx(0.039066)
    # X = 8 > G: rows at inter-node rates: 2*7/8*1e8/1e9 = 0.175, 14e-5;
    # columns Y=2 on 1e8/8: 2*1/2*1.25e7/1e9 = 0.0125, 2e-5.
    assert sm.allreduce_time(1e8, 16, "2d_torus", NET, torus_x=8) == pytest.approx(0.18766)


def test_default_torus_grid():
    assert sm.default_torus_x(16, 4) == 4
    assert sm.default_torus_x(2176, 4) == 32  # 32 x 68
    assert sm.default_torus_x(1088, 4) == 32  # 32 x 34


def test_invalid_inputs_raise():
    with pytest.raises(ValueError):
        sm.allreduce_time(1e8, 12, "hierarchical", sm.Network(8, 1e11, 1e9))
    with pytest.raises(ValueError):
        sm.allreduce_time(1e8, 16, "tree", NET)
    with pytest.raises(ValueError):
        sm.step_time(0.1, 0.01, overlap=1.5)


def test_gradient_bytes():
    assert sm.gradient_bytes(25_557_032, "bf16") == 51_114_064
    assert sm.gradient_bytes(25_557_032, "fp32") == 102_228_128


def test_step_time_overlap():
    assert sm.step_time(0.1, 0.03, overlap=0.0) == pytest.approx(0.13)
    assert sm.step_time(0.1, 0.03, overlap=0.5) == pytest.approx(0.115)
    assert sm.step_time(0.1, 0.03, overlap=1.0) == pytest.approx(0.1)  # all hidden
    # backward lasts 2/3 * 0.03 = 0.02 s, so at most 0.02 of 0.05 can hide
    assert sm.step_time(0.03, 0.05, overlap=1.0) == pytest.approx(0.06)


def test_device_compute_time():
    # 1000 img/s at batch 100 -> 0.1 s; t0 = 0.02 -> 0.0008 s per image
    dev = sm.Device("x", 1000.0, 100, step_overhead_s=0.02)
    assert dev.compute_time(50) == pytest.approx(0.06)
    assert dev.compute_time(100) == pytest.approx(0.1)
    assert sm.Device.from_step_time("y", 0.2, 64).images_per_sec == pytest.approx(320.0)
    with pytest.raises(ValueError):
        sm.Device("z", 1000.0, 100, step_overhead_s=0.2).compute_time(10)


def test_h200_overhead_fit_matches_hand_line():
    # endpoints of the measured sweep: 128/6222 = 20.572 ms, 512/7214 = 70.973 ms;
    # slope 50.401/384 ms per image -> t0 = 20.572 - 128 * 0.13125 = 3.77 ms
    assert sm.H200_STEP_OVERHEAD_S == pytest.approx(3.77e-3, abs=1e-4)


def _system(n, overlap=0.5, algo="hierarchical", batch=64, dataset=10_000, epochs=2):
    dev = sm.Device("d", 1000.0, 64)  # 0.064 s per step at batch 64
    return sm.System("s", n, dev, NET, algo, ((epochs, batch * n),), dtype="fp32",
                     overlap=overlap, params=25_000_000, dataset_size=dataset)


def test_predict_hand_case():
    p = sm.predict(_system(16))
    # compute 0.064; all-reduce of 1e8 bytes = 0.039066 (above); hidden 0.5 * 0.039066
    assert p.compute_s == pytest.approx(0.064)
    assert p.allreduce_s == pytest.approx(0.039066)
    assert p.step_s == pytest.approx(0.083533)
    assert p.steps == 20  # 2 epochs * ceil(10000 / 1024)
    assert p.time_to_train_s == pytest.approx(20 * 0.083533)
    assert p.efficiency == pytest.approx(0.064 / 0.083533)
    assert p.images_per_sec == pytest.approx(1024 / 0.083533)


def test_single_device_has_no_communication():
    p = sm.predict(_system(1, dataset=1_281_167, epochs=1, batch=10))
    assert p.allreduce_s == 0.0
    assert p.efficiency == 1.0
    # 10 images at 1000 img/s = 0.01 s; ceil(1281167 / 10) = 128117 steps
    assert p.time_to_train_s == pytest.approx(1281.17)


def test_full_overlap_hides_communication():
    p = sm.predict(_system(16, overlap=1.0))
    assert p.allreduce_s > 0
    assert p.step_s == pytest.approx(0.064)
    assert p.efficiency == pytest.approx(1.0)


def test_ring_efficiency_non_increasing_in_n():
    ns = list(range(1, 65)) + [128, 256, 512, 1024, 2048, 4096]
    eff = [sm.predict(_system(n, algo="ring")).efficiency for n in ns]
    assert all(b <= a + 1e-12 for a, b in zip(eff, eff[1:]))
    assert eff[0] == 1.0 and eff[-1] < 0.5


def test_historical_step_counts():
    # ceil(1281167/8192)=157, /81920 -> 16, /34816 -> 37, /69632 -> 19
    assert sm.predict(sm.SYSTEMS["goyal"]).steps == 90 * 157
    assert sm.predict(sm.SYSTEMS["fujitsu"]).steps == 90 * 16
    assert sm.predict(sm.SYSTEMS["sony"]).steps == 30 * 37 + 60 * 19


def test_faster_h200_means_shorter_time():
    slow = sm.predict(sm.h200_system(images_per_sec=6_862))
    fast = sm.predict(sm.h200_system(images_per_sec=7_199))
    assert fast.time_to_train_s < slow.time_to_train_s
    assert math.isclose(sm.h200_system().phases[0][1], 65_536)


def _run(*args):
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                         text=True, check=True, timeout=60)
    return out.stdout


def test_printed_table_names_every_system():
    out = _run()
    for name in ("Goyal", "256 P100", "Sony", "2,176 V100", "1,088 V100", "91.62%",
                 "Fujitsu", "2,048 V100", "74.7 s", "224.0 s", "2,048 H200",
                 "rel. error", "Answer:", "Assumptions:"):
        assert name in out, name


def test_markdown_and_options():
    out = _run("--markdown", "--allreduce-dtype", "fp32", "--overlap", "0",
               "--h200-images-per-sec", "7000")
    assert "|---|" in out and "| Goyal et al. 256 P100 |" in out
    assert "fp32 gradients (102.2 MB)" in out and "7,000 img/s" in out


def test_sharded_update_hand_case():
    # 25,557,032 params x 20 bytes (LARS) / 3.36e12 B/s = 0.1521 ms; sharded over 2,048: /2048.
    assert sm.update_time(sm.RESNET50_PARAMS, "lars") == pytest.approx(
        25_557_032 * 20 / 3.36e12)
    system = sm.h200_system(2_048, 16)
    step = sm.predict(system).step_s
    rep, shard, norms = sm.sharded_update_effect(system, "lars")
    assert norms == pytest.approx(2 * 11 * 5e-6)  # 2 log2(2048) inter-node latencies
    assert rep == pytest.approx(step + 25_557_032 * 20 / 3.36e12)
    assert shard == pytest.approx(step + 25_557_032 * 20 / 3.36e12 / 2_048 + norms)
    assert sm.sharded_update_effect(system, "sgd")[2] == 0.0  # no layer norms to combine
    assert sm.sharded_update_effect(system, "lamb")[0] > rep  # two moments stream more bytes
