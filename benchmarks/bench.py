"""Speed and memory of pixel-LEEP and risk-weighted fine-tuning, as ratios measured side by side.

    python benchmarks/bench.py [--fast] [--out runs/bench/bench.json]

Every figure is the median of several repetitions after a warm-up, with its spread
(min-max); every ratio compares two things measured in this same run. Targets:

* pixel-LEEP (``PixelLEEP``, both passes) >= 20x faster than the classic LEEP recipe applied to
  the flattened pixels (a loop over target classes for the joint and a per-sample gather for
  the score, as public LEEP code does it), on >= 1M pixels;
* pixel-LEEP <= 5% of the time of the source U-Net forward pass that produces the same
  probabilities;
* streaming memory flat: peak RSS over 16x as many batches <= 1.1x that over 1x;
* a TRM fine-tuning step (static risk map) <= 1.05x a vanilla step on the same batches.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trm_utils import PixelLEEP, UNet2D, freeze_encoder, method_loss, transferability  # noqa: E402
from trm_utils.experiments import PRESETS  # noqa: E402
from trm_utils.utils import atomic_write_json, get_device  # noqa: E402


def timeit(fn, reps: int, warmup: int = 1, sync=None) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "reps": reps}


def naive_pixel_leep(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The classic LEEP recipe on flattened pixels: per-class loop for the joint, per-sample gather."""
    theta = probs.permute(0, 2, 3, 1).reshape(-1, probs.shape[1]).numpy()
    y = labels.reshape(-1).numpy()
    n, c_s = theta.shape
    c_t = int(y.max()) + 1
    joint = np.zeros((c_t, c_s))
    for k in range(c_t):
        joint[k] = theta[y == k].sum(axis=0) / n
    cond = joint / joint.sum(axis=0, keepdims=True)
    eep = theta @ cond.T
    total = 0.0
    for i in range(n):  # per-sample gather
        total += np.log(eep[i, y[i]])
    return total / n


def streaming_pixel_leep(probs, labels, batch: int) -> float:
    est = PixelLEEP(probs.shape[1], int(labels.max()) + 1)
    for s in range(0, len(probs), batch):
        est.update(probs[s:s + batch], labels[s:s + batch])
    for s in range(0, len(probs), batch):
        est.score_update(probs[s:s + batch], labels[s:s + batch])
    return est.score()


def make_probs(n_img, size, c_s=4, c_t=4, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n_img, c_s, size, size, generator=g), 1).to(device)
    labels = torch.randint(0, c_t, (n_img, size, size), generator=g).to(device)
    return probs, labels


MEMORY_CHILD = r"""
import sys, torch
sys.path.insert(0, {repo!r})
from trm_utils import PixelLEEP
n_batches, size = {n}, {size}
g = torch.Generator().manual_seed(0)
probs = torch.softmax(torch.randn(8, 4, size, size, generator=g), 1)
labels = torch.randint(0, 4, (8, size, size), generator=g)
est = PixelLEEP(4, 4)
for _ in range(n_batches):
    est.update(probs, labels)
for _ in range(n_batches):
    est.score_update(probs, labels)
print(est.score())
"""


def peak_rss_mb(n_batches: int, size: int) -> float:
    """Peak resident memory (MB) of a fresh process streaming ``n_batches`` batches."""
    proc = subprocess.Popen([sys.executable, "-c", MEMORY_CHILD.format(repo=str(REPO), n=n_batches, size=size)],
                            stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"memory child exited with status {status}")
    return usage.ru_maxrss / 1024.0


def finetune_step_times(cfg: dict, size: int, batch: int, reps: int, steps: int, device) -> dict:
    """Median time of one fine-tuning step per method on the same batches (frozen encoder).

    The methods are interleaved within each repetition (round-robin, order rotated), so a slow
    drift of the machine's speed hits every method alike instead of the one measured last.
    """
    torch.manual_seed(0)
    x = torch.randn(batch, 1, size, size, device=device)
    y = torch.randint(0, 2, (batch, size, size), device=device)
    h = torch.rand(batch, size, size, device=device)
    cw = torch.tensor([0.6, 3.0], device=device)
    base = UNet2D(1, 2, cfg["base_channels"], cfg["depth"]).to(device)
    freeze_encoder(base)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    methods = ["vanilla", "class_weight", "trs_map", "trm", "fg_only", "exp_only"]
    runners = {}
    for method in methods:
        model = UNet2D(1, 2, cfg["base_channels"], cfg["depth"]).to(device)
        model.load_state_dict(base.state_dict())
        freeze_encoder(model)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def run(method=method, model=model, opt=opt):
            for _ in range(steps):
                loss = method_loss(method, model(x), y, hardness=h, class_weight=cw)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        run()  # warm-up
        runners[method] = run
    times = {m: [] for m in methods}
    for r in range(reps):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for m in order:
            if sync:
                sync()
            t0 = time.perf_counter()
            runners[m]()
            if sync:
                sync()
            times[m].append((time.perf_counter() - t0) / steps)
    return {m: {"median": statistics.median(t), "min": min(t), "max": max(t), "reps": reps} for m, t in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="tiny sizes: checks the script runs (numbers meaningless)")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "bench.json"))
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = get_device(args.device)
    fast = args.fast
    reps = 2 if fast else 5
    res = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(), "fast": fast}
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    # 1. pixel-LEEP against the naive recipe, on >= 1M pixels (64 images of 128 x 128)
    n_img, size = (4, 32) if fast else (64, 128)
    probs, labels = make_probs(n_img, size)
    n_pix = labels.numel()
    ours = timeit(lambda: streaming_pixel_leep(probs, labels, 16), reps)
    naive = timeit(lambda: naive_pixel_leep(probs, labels), 1 if fast else 3)
    assert abs(streaming_pixel_leep(probs, labels, 16) - naive_pixel_leep(probs, labels)) < 1e-4
    res["pixels"] = n_pix
    res["pixel_leep_seconds"] = ours
    res["naive_seconds"] = naive
    res["pixel_leep_pixels_per_s"] = n_pix / ours["median"]
    res["naive_pixels_per_s"] = n_pix / naive["median"]
    res["pixel_leep_speedup_vs_naive"] = naive["median"] / ours["median"]

    # 2. pixel-LEEP against the forward pass producing the same probabilities
    fwd = {}
    for preset in ("tutorial", "paper"):
        cfg = PRESETS[preset]
        n_f, s_f = (2, 32) if fast else ((16, 128) if preset == "paper" else (64, 128))
        model = UNet2D(1, 4, cfg["base_channels"], cfg["depth"]).to(device).eval()
        x = torch.randn(n_f, 1, s_f, s_f, device=device)
        p_f, l_f = make_probs(n_f, s_f, device=device)

        @torch.no_grad()
        def forward():
            for s in range(0, n_f, 8):
                torch.softmax(model(x[s:s + 8]), 1)

        t_fwd = timeit(forward, 2 if (fast or preset == "paper") else reps, sync=sync)
        t_leep = timeit(lambda: streaming_pixel_leep(p_f, l_f, 8), reps, sync=sync)
        fwd[preset] = {"pixels": n_f * s_f * s_f, "forward_seconds": t_fwd, "pixel_leep_seconds": t_leep,
                       "fraction": t_leep["median"] / t_fwd["median"]}
    res["forward"] = fwd
    res["pixel_leep_fraction_of_forward"] = fwd["paper"]["fraction"]
    res["pixel_leep_fraction_of_forward_tutorial_unet"] = fwd["tutorial"]["fraction"]

    # 3. memory: streaming over 1x, 4x, 16x as many batches, each in a fresh process
    m_size = 32 if fast else 128
    mem = {k: peak_rss_mb(k, m_size) for k in (1, 4, 16)}
    res["memory_peak_rss_mb"] = mem
    res["pixel_leep_memory_growth_16x"] = mem[16] / mem[1]

    # 4. fine-tuning step per method against vanilla (tutorial preset, same batches)
    t_cfg = PRESETS["tutorial"]
    steps = 2 if fast else 10
    size_t = 32 if fast else t_cfg["image_size"]["iseg2019"]
    step = finetune_step_times(t_cfg, size_t, t_cfg["batch_size"], 2 if fast else 9, steps, device)
    res["finetune_step_seconds"] = step
    res["step_ratio_vs_vanilla"] = {m: v["median"] / step["vanilla"]["median"] for m, v in step.items()}
    res["trm_step_ratio_vs_vanilla"] = res["step_ratio_vs_vanilla"]["trm"]

    # 5. the refresh option: one recomputation of the maps on a tutorial-sized training set
    n_train = 16 if fast else 140
    model = UNet2D(1, 2, t_cfg["base_channels"], t_cfg["depth"]).to(device)
    data = (torch.randn(n_train, 1, size_t, size_t), torch.randint(0, 2, (n_train, size_t, size_t)))
    t_ref = timeit(lambda: transferability(model, data, 2, device=device), reps, sync=sync)
    res["refresh_seconds"] = t_ref
    res["refresh_cost_in_vanilla_steps"] = t_ref["median"] / step["vanilla"]["median"]

    # 6. fine-tuning throughput (images/s) for the presets on this device
    thr = {}
    for preset in ("tutorial", "paper"):
        cfg = PRESETS[preset]
        s_p = 32 if fast else cfg["image_size"]["iseg2019"]
        n_steps = 1 if (fast or preset == "paper") else 10
        t = finetune_step_times(cfg, s_p, cfg["batch_size"], 1 if preset == "paper" else reps, n_steps, device)
        thr[preset] = {"image_size": s_p, "batch_size": cfg["batch_size"],
                       "images_per_s": {m: cfg["batch_size"] / t[m]["median"] for m in ("vanilla", "trm")}}
    res["finetune_throughput"] = thr

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, res)

    def line(name, value, target, ok):
        print(f"{name:<44}{value:>12}   target {target:<10} {'met' if ok else 'MISSED'}")

    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads{' (FAST: sizes too small to mean anything)' if fast else ''}")
    line(f"pixel-LEEP speed-up vs naive ({n_pix / 1e6:.2f}M px)", f"{res['pixel_leep_speedup_vs_naive']:.1f}x", ">= 20x",
         res["pixel_leep_speedup_vs_naive"] >= 20)
    line("pixel-LEEP / forward pass (paper U-Net)", f"{100 * fwd['paper']['fraction']:.2f}%", "<= 5%", fwd["paper"]["fraction"] <= 0.05)
    line("pixel-LEEP / forward pass (tutorial U-Net)", f"{100 * fwd['tutorial']['fraction']:.2f}%", "(info)", True)
    line("peak memory 16x / 1x batches", f"{res['pixel_leep_memory_growth_16x']:.3f}x", "<= 1.1x", res["pixel_leep_memory_growth_16x"] <= 1.1)
    line("TRM step / vanilla step", f"{res['trm_step_ratio_vs_vanilla']:.3f}x", "<= 1.05x", res["trm_step_ratio_vs_vanilla"] <= 1.05)
    for m, r in res["step_ratio_vs_vanilla"].items():
        s = step[m]
        print(f"  {m:<13} {1000 * s['median']:7.2f} ms/step (min {1000 * s['min']:.2f}, max {1000 * s['max']:.2f})  {r:.3f}x vanilla")
    print(f"  refresh of the maps ({n_train} slices): {t_ref['median']:.3f} s = {res['refresh_cost_in_vanilla_steps']:.1f} vanilla steps")
    for p, v in thr.items():
        print(f"  throughput {p:<9} ({v['image_size']}px, batch {v['batch_size']}): "
              + ", ".join(f"{m} {ips:.1f} img/s" for m, ips in v["images_per_s"].items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
