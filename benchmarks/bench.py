"""Speed and memory of pixel-LEEP and risk-weighted fine-tuning, as ratios measured side by side.

    python benchmarks/bench.py [--fast] [--out runs/bench/bench.json]

Every figure is the median of several repetitions after a warm-up, with its spread
(min-max); every ratio compares two things measured in this same run. Targets:

* pixel-LEEP (``PixelLEEP``, both passes) >= 20x faster than the classic LEEP recipe applied to
  the flattened pixels (a loop over target classes for the joint and a per-sample gather for
  the score, as public LEEP code does it), on >= 1M pixels;
* pixel-LEEP <= 5% of the time of the source U-Net forward pass that produces the same
  probabilities; the two transferability maps (eq. 4) reported the same way, each as a fraction of
  that forward pass: the per-image map (the per-pixel terms of pixel-LEEP, ``PixelLEEP``'s two
  passes) and the dataset-level map (``maps.PatchLEEP``'s two passes, at the preset's patch);
* streaming memory flat: peak RSS over 16x as many batches <= 1.1x that over 1x;
* a TRM fine-tuning step (static risk map) <= 1.05x a vanilla step on the same batches;
* one tutorial transfer cell (4 methods x 3 seeds, the same iterations and held-out curve) fine-
  tuned by ``finetune_cell`` >= 3x faster than the per-run ``finetune`` loop
  (``cell_speedup_vs_per_run``; the aim, never reached on 2 CPU cores: the floor is 1x, never
  slower); the same ratio for the paper's U-Net over a few iterations (>= 1x; the runs grouped as
  ``memory.plan_group_size`` decides),
  and the achieved convolution throughput (GFLOP/s) beside a dense matrix product's, this
  machine's practical peak, are reported.

What else might lift the tutorial cell, each measured here and kept only where it pays:

* ``torch.compile`` (inductor) of the batched step's per-run work, the compile time counted over a
  tutorial cell's iterations (``compile``; not in the engine while it does not pay);
* the thread split between runs on the CPU: the cell in one process with every thread, with one
  thread, and split over 2 processes of one thread each (``thread_split``; the budget check and the
  sweep run their jobs that way, ``--workers``);
* bf16 autocast (``precision="bf16"``), timed where the processor has native BF16; whether the
  held-out Dice stays within the spread over seeds is ``benchmarks/gpu_check.py``'s question.
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

import copy  # noqa: E402

from trm_utils import PatchLEEP, PixelLEEP, UNet2D, finetune, freeze_encoder, method_loss, transferability_maps  # noqa: E402
from trm_utils.losses import class_weights  # noqa: E402
from trm_utils.maps import LossMaps  # noqa: E402
from trm_utils.batched import EncoderCache, bf16_native, decode, encode, finetune_cell, use_channels_last  # noqa: E402
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


def interleaved(fns: dict, reps: int, sync=None, per: int = 1) -> dict:
    """Time each of ``fns`` (name -> callable) ``reps`` times, interleaved: repetition r starts at
    the r-th function, so drift on a shared machine falls on every contender alike. Seconds per
    call divided by ``per``, summarised as ``timeit`` does."""
    names = list(fns)
    times = {k: [] for k in names}
    for r in range(reps):
        for k in names[r % len(names):] + names[: r % len(names)]:
            if sync:
                sync()
            t0 = time.perf_counter()
            fns[k]()
            if sync:
                sync()
            times[k].append((time.perf_counter() - t0) / per)
    return {k: {"median": statistics.median(t), "min": min(t), "max": max(t), "reps": reps} for k, t in times.items()}


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


def streaming_dataset_map(probs, labels, batch: int, patch: int) -> torch.Tensor:
    """The dataset-level map (eq. 4) in its two streamed passes, as the training code computes it."""
    est = PatchLEEP(probs.shape[1], int(labels.max()) + 1, patch)
    for s in range(0, len(probs), batch):
        est.update(probs[s:s + batch], labels[s:s + batch])
    for s in range(0, len(probs), batch):
        est.score_update(probs[s:s + batch], labels[s:s + batch])
    return est.map()


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
    t = -h * 0.69  # a transferability map in [-log 2, 0] (trs_map weighs by exp(-T))
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
                loss = method_loss(method, model(x), y, hardness=h, class_weight=cw, tmap=t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        run()  # warm-up
        runners[method] = run
    return interleaved({m: runners[m] for m in methods}, reps, sync, per=steps)


def conv_macs(model: UNet2D, size: int) -> dict:
    """Multiply-adds of the convolutions of one image's forward pass: encoder and decoder+head."""
    macs = {"n": 0}

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.ConvTranspose2d):
            macs["n"] += inp[0].numel() * mod.out_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            macs["n"] += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    model = model.eval()
    with torch.no_grad():
        x = torch.zeros(1, 1, size, size, device=next(model.parameters()).device)
        levels = encode(model, x)
        enc = macs["n"]
        decode(model, levels)
    for h in handles:
        h.remove()
    return {"encoder": enc, "decoder": macs["n"] - enc}


def matmul_gflops(device, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of a dense float32 matrix product: the practical peak the convolutions are compared with."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    t = timeit(lambda: a @ b, reps, sync=sync)
    return 2 * n**3 / t["median"] / 1e9


def _cell_setup(cfg: dict, size: int, n_train: int, n_eval: int, seeds) -> tuple:
    """A tutorial-like transfer cell on random data, the same in every process: the source U-Net,
    the training slices, the held-out slices (2 "subjects"), a dataset-level map and the runs
    (4 methods x ``seeds``)."""
    g = torch.Generator().manual_seed(0)
    train = (torch.randn(n_train, 1, size, size, generator=g), (torch.rand(n_train, size, size, generator=g) > 0.7).long())

    class Eval:  # held-out slices from 2 "subjects", as the grid evaluates them
        images = torch.randn(n_eval, 1, size, size, generator=g)
        labels = (torch.rand(n_eval, size, size, generator=g) > 0.7).long()
        subject_ids = [i % 2 for i in range(n_eval)]
        num_classes = 2

    ev = Eval() if n_eval else None
    hard = torch.rand(size, size, generator=g)  # one dataset-level map, as the default reading has
    maps = LossMaps("dataset", -0.69 * hard, hard, n_train)
    torch.manual_seed(0)
    src = UNet2D(1, 2, cfg["base_channels"], cfg["depth"])
    runs = [(m, s) for m in ("vanilla", "class_weight", "trs_map", "trm") for s in seeds]
    return src, train, ev, maps, runs


def cell_times(cfg: dict, size: int, n_train: int, n_eval: int, iterations: int, eval_every, seeds, reps: int,
               device, precisions=("fp32",)) -> dict:
    """Seconds for one transfer cell's runs (4 methods x ``seeds``): the per-run ``finetune`` loop
    against ``finetune_cell``, interleaved per repetition, on the same random data."""
    src, train, ev, maps, runs = _cell_setup(cfg, size, n_train, n_eval, seeds)
    src = src.to(device)
    kw = dict(maps=maps, iterations=iterations, lr=1e-3, batch_size=cfg["batch_size"], eval_data=ev,
              eval_every=eval_every, device=device, show_progress=False)

    def per_run():
        for m, s in runs:
            finetune(copy.deepcopy(src), train, m, seed=s, **kw)

    fns = {"per_run": per_run}
    group = {}
    for p in precisions:
        fns[p] = lambda p=p: group.setdefault(p, finetune_cell(src, train, runs, precision=p, **kw)[0])
    out = interleaved(fns, reps, torch.cuda.synchronize if device.type == "cuda" else None)
    macs = conv_macs(copy.deepcopy(src), size)
    steps = len(runs) * iterations
    # work actually done per training step: per run, encoder forward + decoder forward and backward
    # (weight and input gradients, about twice the forward); batched, the decoder only (encoder cached)
    flops = {"per_run": 2 * steps * cfg["batch_size"] * (macs["encoder"] + 3 * macs["decoder"]),
             "batched": 2 * steps * cfg["batch_size"] * 3 * macs["decoder"]}
    return {"runs": len(runs), "iterations": iterations, "image_size": size, "n_train": n_train, "n_eval": n_eval,
            "group_size": group["fp32"]["group_size"], "channels_last": group["fp32"]["channels_last"],
            "seconds": out, "conv_macs_per_image": macs,
            "speedup": {p: out["per_run"]["median"] / out[p]["median"] for p in precisions},
            "gflops": {"per_run": flops["per_run"] / out["per_run"]["median"] / 1e9,
                       **{p: flops["batched"] / out[p]["median"] / 1e9 for p in precisions}}}


def _split_worker(args) -> float:
    """One process of the thread split: 1 thread, its share of the cell's runs (``_cell_setup``'s)."""
    cfg, size, n_train, n_eval, iterations, eval_every, seeds, part, parts = args
    torch.set_num_threads(1)
    src, train, ev, maps, runs = _cell_setup(cfg, size, n_train, n_eval, seeds)
    t0 = time.perf_counter()
    finetune_cell(src, train, runs[part::parts], maps=maps, iterations=iterations, lr=1e-3, batch_size=cfg["batch_size"],
                  eval_data=ev, eval_every=eval_every, device="cpu", show_progress=False)
    return time.perf_counter() - t0


def thread_split(cfg: dict, size: int, n_train: int, n_eval: int, iterations: int, eval_every, seeds, reps: int) -> dict:
    """The thread split between runs, on the CPU: one cell's runs in one process with every thread
    (``finetune_cell`` as the notebooks call it), in one process with 1 thread, and split over
    ``parts`` = min(2, threads) processes of 1 thread each (each its share of the runs; the wall time
    counts starting the processes). Same runs, same numbers (each run is independent of the others)."""
    import multiprocessing as mp

    threads = torch.get_num_threads()
    parts = max(1, min(2, threads))
    src, train, ev, maps, runs = _cell_setup(cfg, size, n_train, n_eval, seeds)
    kw = dict(maps=maps, iterations=iterations, lr=1e-3, batch_size=cfg["batch_size"], eval_data=ev,
              eval_every=eval_every, device="cpu", show_progress=False)
    args = [(cfg, size, n_train, n_eval, iterations, eval_every, seeds, k, parts) for k in range(parts)]

    def one_process(n):
        torch.set_num_threads(n)
        try:
            finetune_cell(src, train, runs, **kw)
        finally:
            torch.set_num_threads(threads)

    def split():
        with mp.get_context("spawn").Pool(parts) as pool:
            inner.append(max(pool.map(_split_worker, args)))

    inner = []
    fns = {f"one_process_{threads}_threads": lambda: one_process(threads), "one_process_1_thread": lambda: one_process(1),
           f"split_{parts}x1_thread": split}
    out = interleaved(fns, reps)
    base = out[f"one_process_{threads}_threads"]["median"]
    return {"runs": len(runs), "iterations": iterations, "threads": threads, "parts": parts, "seconds": out,
            "split_compute_seconds": statistics.median(inner),
            "speedup_split_vs_one_process": base / out[f"split_{parts}x1_thread"]["median"],
            "speedup_threads_vs_1_thread": out["one_process_1_thread"]["median"] / base}


def compile_times(cfg: dict, size: int, n_train: int, seeds, steps: int, cell_iterations: int, device,
                  backend: str = "inductor") -> dict:
    """``torch.compile`` of the batched step's per-run work (decoder, head, loss) against eager, on
    the same batches: the compile time (the first two steps, less two eager steps) and the steady
    seconds per step of each, and what compiling buys a cell of ``cell_iterations`` iterations,
    compile time counted: eager x iterations / (compile + compiled x iterations). The engine keeps
    eager unless this ratio exceeds 1 (``finetune_cell`` has no compile option: on 2 CPU cores it
    did not pay). ``backend="eager"`` (``--fast``) only traces: it checks the code path in seconds
    where inductor's C++ compilation takes minutes."""
    src, train, _, maps, runs = _cell_setup(cfg, size, n_train, 0, seeds)
    src = src.to(device)
    images, labels = train[0], train[1].to(device)
    fmt = torch.channels_last if use_channels_last(src, device) else torch.contiguous_format  # as finetune_cell
    cache = EncoderCache(copy.deepcopy(src).eval(), images, device, True, channels_last=fmt == torch.channels_last)
    mp_ = maps.to(device)
    cw = class_weights(torch.bincount(train[1].reshape(-1), minlength=2)).to(device)

    def step_fn(model, levels, y, method, h, t):
        return method_loss(method, decode(model, levels), y, hardness=h, tmap=t, class_weight=cw)

    def make():
        ms = [freeze_encoder(copy.deepcopy(src)).to(device, memory_format=fmt).train() for _ in runs]
        opt = torch.optim.Adam([p for m in ms for p in m.parameters() if p.requires_grad], lr=1e-3, foreach=True)
        return ms, opt

    def run(fn, ms, opt, n):
        g = torch.Generator().manual_seed(0)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            losses = []
            for m, (method, _) in zip(ms, runs):
                idx = torch.randint(0, images.shape[0], (cfg["batch_size"],), generator=g).to(device)
                t, h = mp_.batch(idx)
                losses.append(fn(m, cache.get(idx), labels[idx], method, h, t))
            opt.zero_grad(set_to_none=True)
            torch.stack(losses).sum().backward()
            opt.step()
        sync()
        return time.perf_counter() - t0

    out = {"runs": len(runs), "steps": steps, "cell_iterations": cell_iterations, "backend": backend}
    ms, opt = make()
    run(step_fn, ms, opt, 2)
    first_eager = run(step_fn, ms, opt, 2)
    eager = run(step_fn, ms, opt, steps) / steps
    try:
        torch.compiler.reset()
        cfn = torch.compile(step_fn, backend=backend)
        ms, opt = make()
        first = run(cfn, ms, opt, 2)
        compiled = run(cfn, ms, opt, steps) / steps
    except Exception as e:  # noqa: BLE001 - no C++ compiler, an unsupported op: recorded, not fatal
        out.update(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", eager_seconds_per_step=eager)
        return out
    comp = max(0.0, first - first_eager)
    out.update(eager_seconds_per_step=eager, compiled_seconds_per_step=compiled, compile_seconds=comp,
               steady_speedup=eager / compiled,
               cell_speedup=eager * cell_iterations / (comp + compiled * cell_iterations))
    return out


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
        k = cfg["map_patch"]
        t_dmap = timeit(lambda: streaming_dataset_map(p_f, l_f, 8, k), reps, sync=sync)
        fwd[preset] = {"pixels": n_f * s_f * s_f, "forward_seconds": t_fwd, "pixel_leep_seconds": t_leep,
                       "fraction": t_leep["median"] / t_fwd["median"], "map_patch": k,
                       "dataset_map_seconds": t_dmap,
                       "map_fraction": {"image": t_leep["median"] / t_fwd["median"],
                                        "dataset": t_dmap["median"] / t_fwd["median"]}}
    res["forward"] = fwd
    res["map_cost_fraction_of_forward"] = {p: v["map_fraction"] for p, v in fwd.items()}
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
    t_ref = timeit(lambda: transferability_maps(model, data, ("dataset",), t_cfg["map_patch"], 2, device=device), reps,
                   sync=sync)
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

    # 7. one transfer cell, every run at once (finetune_cell) against the per-run loop
    precisions = ("fp32", "bf16") if bf16_native() else ("fp32",)
    res["bf16_native"] = bf16_native()
    res["matmul_gflops"] = matmul_gflops(device, 512 if fast else 2048)
    t_cell = cell_times(t_cfg, size_t, 16 if fast else 140, 8 if fast else 60, 4 if fast else 50, 2 if fast else 25,
                        (0, 1, 2), 1 if fast else 3, device, precisions)
    res["cell"] = t_cell
    res["cell_speedup_vs_per_run"] = t_cell["speedup"]["fp32"]
    if not bf16_native():  # a short look at what bf16 autocast costs where it is emulated
        src, train, _, maps, runs = _cell_setup(t_cfg, size_t, 16 if fast else 140, 0, (0,))
        kw = dict(maps=maps, iterations=2 if fast else 5, lr=1e-3, batch_size=t_cfg["batch_size"], device=device,
                  show_progress=False)
        t16 = timeit(lambda: finetune_cell(src, train, runs, precision="bf16", **kw), 1 if fast else 2)
        t32 = timeit(lambda: finetune_cell(src, train, runs, precision="fp32", **kw), 1 if fast else 2)
        res["bf16_emulated_slowdown"] = t16["median"] / t32["median"]
    p_cfg = PRESETS["paper"]
    p_size = 32 if fast else (p_cfg["image_size"]["iseg2019"] if device.type == "cuda" else 128)
    res["cell_paper"] = cell_times(p_cfg, p_size, 8, 0, 1 if fast else 2, None, (0,), 1 if fast else 2, device, ("fp32",))
    res["cell_speedup_vs_per_run_paper"] = res["cell_paper"]["speedup"]["fp32"]

    # 8. what else might lift the tutorial cell: torch.compile of the step, the thread split between runs
    res["compile"] = compile_times(t_cfg, size_t, 16 if fast else 140, (0,) if fast else (0, 1, 2), 2 if fast else 20,
                                   t_cfg["iterations"]["iseg2019"], device, "eager" if fast else "inductor")
    if device.type == "cpu":
        res["thread_split"] = thread_split(t_cfg, size_t, 16 if fast else 140, 8 if fast else 60, 4 if fast else 50,
                                           2 if fast else 25, (0, 1, 2), 1 if fast else 3)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, res)

    def line(name, value, target, ok):
        print(f"{name:<44}{value:>12}   target {target:<10} {'met' if ok else 'MISSED'}")

    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads{' (FAST: sizes too small to mean anything)' if fast else ''}")
    line(f"pixel-LEEP speed-up vs naive ({n_pix / 1e6:.2f}M px)", f"{res['pixel_leep_speedup_vs_naive']:.1f}x", ">= 20x",
         res["pixel_leep_speedup_vs_naive"] >= 20)
    line("pixel-LEEP / forward pass (paper U-Net)", f"{100 * fwd['paper']['fraction']:.2f}%", "<= 5%", fwd["paper"]["fraction"] <= 0.05)
    line("pixel-LEEP / forward pass (tutorial U-Net)", f"{100 * fwd['tutorial']['fraction']:.2f}%", "(info)", True)
    for p, v in fwd.items():
        f = v["map_fraction"]
        print(f"  maps / forward pass ({p} U-Net, {v['pixels'] / 1e6:.2f}M px): per-image map {100 * f['image']:.2f}%, "
              f"dataset-level map (patch {v['map_patch']}) {100 * f['dataset']:.2f}%")
    line("peak memory 16x / 1x batches", f"{res['pixel_leep_memory_growth_16x']:.3f}x", "<= 1.1x", res["pixel_leep_memory_growth_16x"] <= 1.1)
    line("TRM step / vanilla step", f"{res['trm_step_ratio_vs_vanilla']:.3f}x", "<= 1.05x", res["trm_step_ratio_vs_vanilla"] <= 1.05)
    for m, r in res["step_ratio_vs_vanilla"].items():
        s = step[m]
        print(f"  {m:<13} {1000 * s['median']:7.2f} ms/step (min {1000 * s['min']:.2f}, max {1000 * s['max']:.2f})  {r:.3f}x vanilla")
    print(f"  refresh of the maps ({n_train} slices): {t_ref['median']:.3f} s = {res['refresh_cost_in_vanilla_steps']:.1f} vanilla steps")
    for p, v in thr.items():
        print(f"  throughput {p:<9} ({v['image_size']}px, batch {v['batch_size']}): "
              + ", ".join(f"{m} {ips:.1f} img/s" for m, ips in v["images_per_s"].items()))
    c, cp = res["cell"], res["cell_paper"]
    line(f"cell of {c['runs']} runs: batched vs per-run", f"{res['cell_speedup_vs_per_run']:.2f}x", ">= 1x (3x aim)",
         res["cell_speedup_vs_per_run"] >= 1)
    for k, v in c["seconds"].items():
        print(f"  {k:<8} {v['median']:7.2f} s (min {v['min']:.2f}, max {v['max']:.2f}) for {c['runs']} runs x "
              f"{c['iterations']} iterations, {c['gflops'][k]:.1f} GFLOP/s in convolutions")
    if "bf16" in c["speedup"]:
        print(f"  bf16 autocast: {c['speedup']['bf16']:.2f}x the per-run loop")
    else:
        print(f"  bf16 autocast: no native BF16 here; {res['bf16_emulated_slowdown']:.1f}x slower than float32 "
              f"(4 runs, a few iterations): precision='auto' keeps float32")
    line(f"paper U-Net cell ({cp['runs']} runs, {cp['image_size']}px)", f"{res['cell_speedup_vs_per_run_paper']:.2f}x",
         ">= 1x", res["cell_speedup_vs_per_run_paper"] >= 1)
    print(f"  groups of {cp['group_size']} run(s) (tutorial: {c['group_size']}; memory.plan_group_size's rule); "
          f"channels-last {cp['channels_last']} (tutorial: {c['channels_last']}; batched.use_channels_last's rule)")
    k = res["compile"]
    if "error" in k:
        print(f"  torch.compile of the step: unavailable here ({k['error']})")
    else:
        print(f"  torch.compile ({k['backend']}) of the step ({k['runs']} runs): {1000 * k['eager_seconds_per_step']:.0f} ms eager, "
              f"{1000 * k['compiled_seconds_per_step']:.0f} ms compiled ({k['steady_speedup']:.2f}x), compile "
              f"{k['compile_seconds']:.1f} s: {k['cell_speedup']:.2f}x for a {k['cell_iterations']}-iteration cell "
              f"({'pays' if k['cell_speedup'] > 1 else 'does not pay: the engine stays eager'})")
    if "thread_split" in res:
        t = res["thread_split"]
        sec = t["seconds"]
        print(f"  thread split ({t['runs']} runs, {t['iterations']} its): " + ", ".join(
            f"{k} {v['median']:.1f} s" for k, v in sec.items())
            + f"; split {t['speedup_split_vs_one_process']:.2f}x one process, {t['threads']} threads "
              f"{t['speedup_threads_vs_1_thread']:.2f}x 1 thread")
    print(f"  dense float32 matrix product: {res['matmul_gflops']:.0f} GFLOP/s (this machine's practical peak)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
