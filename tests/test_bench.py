"""Smoke check of the benchmark script: it runs and writes the keys the issue names (no timing asserts)."""
import json
import numbers
import subprocess
import sys

import numpy as np
import pytest
import torch

from trm_utils import REPO_ROOT, pixel_leep

from benchmarks.bench import naive_pixel_leep

KEYS = ["pixel_leep_speedup_vs_naive", "pixel_leep_fraction_of_forward", "pixel_leep_memory_growth_16x",
        "trm_step_ratio_vs_vanilla", "cell_speedup_vs_per_run", "cell_speedup_vs_per_run_paper", "matmul_gflops"]


def test_naive_baseline_computes_the_same_score():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 4, 8, 8, generator=g), 1).double()
    labels = torch.randint(0, 3, (3, 8, 8), generator=g)
    assert naive_pixel_leep(probs, labels) == pytest.approx(pixel_leep(probs, labels), abs=1e-9)


def test_bench_fast_writes_all_keys(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "benchmarks/bench.py", "--fast", "--out", str(out)], capture_output=True,
                       text=True, timeout=600, cwd=str(REPO_ROOT))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    for k in KEYS:
        assert isinstance(res[k], numbers.Number) and np.isfinite(res[k]) and res[k] > 0, k
    assert set(res["step_ratio_vs_vanilla"]) == {"vanilla", "class_weight", "trs_map", "trm", "fg_only", "exp_only"}
    assert "target" in r.stdout and "TRM step / vanilla step" in r.stdout
    for preset in ("tutorial", "paper"):
        f = res["map_cost_fraction_of_forward"][preset]
        assert f["image"] > 0 and f["dataset"] > 0
    assert "dataset-level map (patch" in r.stdout
    k = res["compile"]  # traced by the eager backend under --fast; an error is recorded, never raised
    assert k["backend"] == "eager" and ("error" in k or (k["compiled_seconds_per_step"] > 0 and k["cell_speedup"] > 0))
    assert res["bf16_native"] or res["bf16_emulated_slowdown"] > 0
    t = res["thread_split"]
    assert t["runs"] == 12 and len(t["seconds"]) == 3 and t["speedup_split_vs_one_process"] > 0
    assert "torch.compile (eager) of the step" in r.stdout and "thread split" in r.stdout


def test_gpu_check_runs_small_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py --small: every group size timed, the FeTS cell run by both engines
    (their Dice agree), the estimates written."""
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--small", "--device", "cpu", "--data-dir",
                        str(tmp_path / "data"), "--out", str(out)], capture_output=True, text=True, timeout=600,
                       cwd=str(REPO_ROOT))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [s["group"] for s in res["steps"]] == [1, 2, "auto"]
    for s in res["steps"]:
        assert s["seconds_per_iteration_per_run"] > 0 and s["predicted_mb"] > 0 and s["group_size_used"] == s["runs"]
    assert isinstance(res["layout"]["rule_is_faster"], bool) and res["layout"]["other_seconds_per_iteration_per_run"] > 0
    cell = res["fets_cell"]
    assert set(cell["runs"]) == {"vanilla", "trm"} and cell["max_dice_difference"] < 1e-4
    for m in ("vanilla", "trm"):  # bf16 against fp32 over 3 seeds (the verdict is the data's, not asserted)
        b = cell["bf16"][m]
        assert 0 <= b["bf16_mean"] <= 1 and b["fp32_std"] >= 0 and isinstance(b["within_seed_spread"], bool)
    assert "bf16 autocast" in r.stdout
    assert res["estimates"]["seconds_per_5000_iterations_per_run"] > 0
    assert res["estimates"]["runs_per_group_15gb"] >= 1
    assert "FeTS cell 14-FLAIR -> 18-FLAIR" in r.stdout
