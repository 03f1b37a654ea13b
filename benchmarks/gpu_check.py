"""One command for whoever has a GPU: what the paper preset costs there, and that both engines agree.

    python benchmarks/gpu_check.py                     # the paper preset; under 8 minutes on one GPU
    python benchmarks/gpu_check.py --small             # seconds on a CPU (the test suite runs this)

Writes one JSON (default ``runs/bench/gpu_check.json``) and prints a summary:

1. **Step time and peak memory per group size** (1, 2, 4, 8 and the automatic one for a FeTS cell's
   15 runs; the automatic one again in the other memory layout than ``batched.use_channels_last``'s): the paper's
   U-Net (base 64, depth 4) at 240 px, batch 8, 4 classes, random slices, the encoder recomputed
   per batch as at the paper's scale; seconds per iteration per run (median of the timed
   iterations after a warm-up), the peak memory measured (CUDA: ``max_memory_allocated`` less what
   was allocated before; on a CPU ``benchmarks/memory_model.py`` measures it) and the memory model's prediction
   (``memory.cell_memory``), and the automatic group size for this device's free memory.
2. **One FeTS cell, both engines, both precisions**: a source pre-trained on the phantom's 14-FLAIR
   task, then ``vanilla`` and ``trm`` (seeds 0, 1, 2) fine-tuned on 18-FLAIR for ``--iterations`` by
   the batched engine (``finetune_cell``, automatic groups) and, for seed 0, by the per-run loop
   (``finetune``): the held-out Dice of each path (they should agree to float tolerance) and the
   seconds of each; then the batched engine again with bf16 autocast: each method's mean Dice
   against the float32 mean and its spread over the seeds (where bf16 holds, it is within it).
3. **Estimates**: seconds per 5000 iterations per run at the automatic group size, and the memory
   model's runs per group on a 15 GB (Colab T4) and an 80 GB GPU.

Nothing is downloaded: the FeTS cell uses the embedded phantom (written under ``--data-dir``).
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from trm_utils import memory as MEM  # noqa: E402
from trm_utils import experiments as E  # noqa: E402
from trm_utils import presets as P  # noqa: E402
from trm_utils.batched import finetune_cell  # noqa: E402
from trm_utils.train import finetune, train_source  # noqa: E402
from trm_utils.unet import UNet2D  # noqa: E402
from trm_utils.utils import atomic_write_json, get_device, seed_everything  # noqa: E402

PAPER = {"preset": "paper", "base": 64, "depth": 4, "size": 240, "batch": 8, "iterations": 300, "source_iterations": 300,
         "timed": 10, "groups": [1, 2, 4, 8], "cell_runs": 15, "phantom": "tutorial"}
SMALL = {"preset": "smoke", "base": 4, "depth": 2, "size": 32, "batch": 4, "iterations": 4, "source_iterations": 4,
         "timed": 2, "groups": [1, 2], "cell_runs": 3, "phantom": "smoke"}




def step_times(c: dict, dev, group, n_slices: int = 64, classes: int = 4, channels_last="auto") -> dict:
    """Seconds per iteration per run and peak memory of ``group`` runs trained together."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_slices, 1, c["size"], c["size"], generator=g)
    y = torch.randint(0, classes, (n_slices, c["size"], c["size"]), generator=g)
    torch.manual_seed(0)
    src = UNet2D(1, classes, c["base"], c["depth"]).to(dev)
    mem = lambda k: MEM.cell_memory(src, c["size"], c["size"], c["batch"], k, 0, classes)  # noqa: E731
    budget = MEM.memory_budget(dev)
    n = c["cell_runs"] if group == "auto" else int(group)  # auto: as many of a FeTS cell's runs as fit
    k = MEM.plan_group_size(n, mem, budget, dev, group)
    runs = [("vanilla", s) for s in range(k)]
    kw = dict(lr=1e-4, batch_size=c["batch"], device=dev, show_progress=False, cache_budget_mb=0, group_size=k,
              channels_last=channels_last)
    finetune_cell(src, (x, y), runs, iterations=2, **kw)  # warm-up (kernels, allocator)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    t0 = time.perf_counter()
    h = finetune_cell(src, (x, y), runs, iterations=c["timed"], **kw)
    peak = None  # on the CPU a process's peak only grows: benchmarks/memory_model.py measures it, one process each
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = (torch.cuda.max_memory_allocated(dev) - before) / 2**20
    sec = time.perf_counter() - t0
    return {"group": group, "runs": k, "seconds_per_iteration_per_run": sec / c["timed"] / k,
            "peak_mb": peak, "predicted_mb": mem(k)["peak"] / 2**20, "budget_mb": budget / 2**20,
            "group_size_used": h[0]["group_size"], "channels_last": h[0]["channels_last"]}


def fets_cell(c: dict, dev, data_dir) -> dict:
    """A source on 14-FLAIR, then vanilla and trm on 18-FLAIR by both engines."""
    cfg = P.get_preset(c["preset"])
    cfg["image_size"] = {k: c["size"] for k in cfg["image_size"]}
    cfg["base_channels"], cfg["depth"], cfg["batch_size"] = c["base"], c["depth"], c["batch"]
    root = E.resolve_datasets("phantom", data_dir, c["phantom"])["tumour"][1]
    src_train = E.load_task("fets2021", root, "14-FLAIR", "train", cfg)
    train = E.load_task("fets2021", root, "18-FLAIR", "train", cfg)
    test = E.load_task("fets2021", root, "18-FLAIR", "test", cfg)
    seed_everything(0)
    src = E.new_unet("fets2021", cfg)
    t0 = time.perf_counter()
    train_source(src, src_train, c["source_iterations"], 1e-3, c["batch"], device=dev, show_progress=False)
    t_src = time.perf_counter() - t0
    its = c["iterations"]
    kw = dict(iterations=its, lr=1e-3, batch_size=c["batch"], eval_data=test, eval_every=its, device=dev,
              show_progress=False, lr_decay=0.5)
    seeds = c.get("seeds", (0, 1, 2))
    runs = [(m, s) for m in ("vanilla", "trm") for s in seeds]
    t0 = time.perf_counter()
    hb = finetune_cell(src, train, runs, **kw)
    t_b = time.perf_counter() - t0
    out = {"source_iterations": c["source_iterations"], "source_seconds": t_src, "iterations": its,
           "train_slices": len(train), "test_slices": len(test), "batched_seconds": t_b,
           "group_size": hb[0]["group_size"], "seeds": list(seeds), "runs": {}}
    t0 = time.perf_counter()
    for (m, s), h in zip(runs, hb):  # the per-run loop on the first seed: both engines must agree
        if s == seeds[0]:
            r = finetune(copy.deepcopy(src), train, m, seed=s, **kw)
            out["runs"][m] = {"batched_dice": h["eval"][-1]["dice"], "per_run_dice": r["eval"][-1]["dice"]}
    out["per_run_seconds"] = time.perf_counter() - t0
    out["max_dice_difference"] = max(abs(v["batched_dice"] - v["per_run_dice"]) for v in out["runs"].values())
    # bf16 autocast of the decoder (finetune_cell's precision="bf16"): does the held-out Dice stay
    # within the spread over seeds? Per method: the fp32 mean and std over seeds, the bf16 mean.
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 0):  # T4 and older: no bf16 units
        out["bf16"] = {"skipped": "no native bf16 on this GPU (compute capability < 8.0)"}
        return out
    t0 = time.perf_counter()
    h16 = finetune_cell(src, train, runs, precision="bf16", **kw)
    out["bf16_seconds"] = time.perf_counter() - t0
    prec = {}
    for m in ("vanilla", "trm"):
        d32 = [h["eval"][-1]["dice"] for (mm, _), h in zip(runs, hb) if mm == m]
        d16 = [h["eval"][-1]["dice"] for (mm, _), h in zip(runs, h16) if mm == m]
        mean32, mean16 = statistics.mean(d32), statistics.mean(d16)
        std32 = statistics.stdev(d32) if len(d32) > 1 else 0.0
        prec[m] = {"fp32_mean": mean32, "fp32_std": std32, "bf16_mean": mean16, "difference": mean16 - mean32,
                   "within_seed_spread": abs(mean16 - mean32) <= std32}
    out["bf16"] = prec
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="a small U-Net at 32 px: checks the script on a CPU")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--iterations", type=int, default=None, help="fine-tuning iterations of the FeTS cell")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "gpu_check.json"))
    a = ap.parse_args(argv)
    c = dict(SMALL if a.small else PAPER)
    if a.iterations:
        c["iterations"] = a.iterations
    dev = get_device(a.device)
    t0 = time.perf_counter()
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "config": c, "steps": []}
    if dev.type == "cuda":
        res["gpu_memory_mb"] = torch.cuda.get_device_properties(dev).total_memory / 2**20
    for g in c["groups"] + ["auto"]:
        try:
            r = step_times(c, dev, g)
        except MemoryError as e:  # the model says it does not fit: recorded, not run
            r = {"group": g, "error": str(e)}
        res["steps"].append(r)
        print(f"group {g!s:>4}: " + (r["error"] if "error" in r else
              f"{r['runs']} runs, {1000 * r['seconds_per_iteration_per_run']:.1f} ms/iteration/run, peak "
              + (f"{r['peak_mb']:.0f} MB" if r["peak_mb"] is not None else "(CPU: see memory_model.py)")
              + f" (model {r['predicted_mb']:.0f} MB)"), flush=True)
    # the memory layout: the automatic group in the layout batched.use_channels_last does not pick
    auto = next((r for r in res["steps"] if r["group"] == "auto" and "error" not in r), None)
    if auto:
        r = step_times(c, dev, "auto", channels_last=not auto["channels_last"])
        res["layout"] = {"rule_channels_last": auto["channels_last"],
                         "rule_seconds_per_iteration_per_run": auto["seconds_per_iteration_per_run"],
                         "other_seconds_per_iteration_per_run": r["seconds_per_iteration_per_run"],
                         "rule_is_faster": auto["seconds_per_iteration_per_run"] <= r["seconds_per_iteration_per_run"]}
        print(f"memory layout: channels-last {auto['channels_last']} (the rule) "
              f"{1000 * auto['seconds_per_iteration_per_run']:.1f} ms/iteration/run, the other "
              f"{1000 * r['seconds_per_iteration_per_run']:.1f}", flush=True)
    res["fets_cell"] = fets_cell(c, dev, a.data_dir)
    f = res["fets_cell"]
    print(f"FeTS cell 14-FLAIR -> 18-FLAIR ({f['iterations']} iterations, groups of {f['group_size']}): "
          + ", ".join(f"{m} batched {v['batched_dice']:.4f} / per-run {v['per_run_dice']:.4f}" for m, v in f["runs"].items())
          + f"; batched {f['batched_seconds']:.1f} s ({len(f['seeds'])} seeds), per-run {f['per_run_seconds']:.1f} s (seed "
          f"{f['seeds'][0]})", flush=True)
    if "skipped" in f["bf16"]:
        print(f"bf16 autocast: skipped ({f['bf16']['skipped']})")
    else:
        print(f"bf16 autocast ({f['bf16_seconds']:.1f} s): " + ", ".join(
            f"{m} {v['bf16_mean']:.4f} vs fp32 {v['fp32_mean']:.4f} +- {v['fp32_std']:.4f} "
            f"({'within' if v['within_seed_spread'] else 'OUTSIDE'} the spread over seeds)" for m, v in f["bf16"].items()),
            flush=True)
    est = {}
    if auto:
        est["seconds_per_5000_iterations_per_run"] = 5000 * auto["seconds_per_iteration_per_run"]
    net = UNet2D(1, 4, c["base"], c["depth"])
    mem = lambda k: MEM.cell_memory(net, c["size"], c["size"], c["batch"], k, 0, 4, 1700)  # noqa: E731
    for gb in (15, 80):  # the memory model on a GPU of that size (free memory = 0.97 x the nominal size)
        budget = int(0.9 * 0.97 * gb * 2**30 - MEM.CUDA_MARGIN_MB * 2**20)
        try:
            est[f"runs_per_group_{gb}gb"] = MEM.plan_group_size(15, mem, budget, torch.device("cuda"))
        except MemoryError:
            est[f"runs_per_group_{gb}gb"] = 0
    res["estimates"] = est
    res["seconds"] = time.perf_counter() - t0
    atomic_write_json(a.out, res)
    print(f"estimates: {est}; {res['seconds']:.0f} s in all; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
