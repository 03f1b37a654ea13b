"""The memory model of ``finetune_cell``'s run groups against measured peaks.

    python benchmarks/memory_model.py [--presets tutorial,paper] [--groups 1,2,4] [--out runs/bench/memory.json]

For each preset's U-Net and image size and each group size, one subprocess builds a source model
and random slices, resets its peak memory (CPU: the peak resident size ``VmHWM``, reset through
``/proc/self/clear_refs``, with every allocation past 128 kB its own mapping; CUDA: the peak
allocated memory), fine-tunes one cell of ``group`` runs for 2 iterations with a held-out pass,
and reports the growth of the peak; ``memory.cell_memory`` predicts it. The ratio
measured / predicted is printed per configuration (the target: within 20 %).
``tests/test_batched.py`` runs both presets at group sizes 1 and 4 (tutorial) or 2 (paper).

Slices per preset are a small stand-in for a FeTS cell (the peak of a group does not depend on how
many slices there are unless the encoder outputs are cached, which the model counts per slice).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: (base channels, depth, image size, training slices, held-out slices, cache budget MB) per preset:
#: the tutorial's cell caches its encoder outputs, the paper's recomputes them (28 MB a slice).
CONFIGS = {
    "tutorial": {"base": 8, "depth": 3, "size": 64, "n_train": 1200, "n_eval": 300, "cache_mb": 2048},
    "paper": {"base": 64, "depth": 4, "size": 240, "n_train": 48, "n_eval": 12, "cache_mb": 0},
}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss() -> int:
    """Reset this process's peak resident size to its current one (Linux: ``clear_refs`` 5) and return
    the current size in bytes; elsewhere the peak so far (``ru_maxrss``), an upper bound of the baseline."""
    import resource

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS") * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    import resource

    try:
        return _status_kb("VmHWM") * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(preset: str, group: int, batch: int, device: str, classes: int = 4) -> dict:
    import torch

    from trm_utils import memory as MEM
    from trm_utils.batched import finetune_cell
    from trm_utils.unet import UNet2D
    from trm_utils.utils import get_device

    c = CONFIGS[preset]
    dev = get_device(device)
    # warm-up: the runtime's one-off costs (kernels, thread pools, autograd engine) are not the cell's
    tiny = UNet2D(1, classes, 4, 2).to(dev)
    finetune_cell(tiny, (torch.randn(4, 1, 16, 16), torch.randint(0, classes, (4, 16, 16))), [("vanilla", 0)],
                  iterations=2, batch_size=2, eval_data=(torch.randn(2, 1, 16, 16), torch.randint(0, classes, (2, 16, 16))),
                  eval_every=2, show_progress=False, device=dev)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    src = UNet2D(1, classes, c["base"], c["depth"]).to(dev).eval()
    x = torch.randn(c["n_train"], 1, c["size"], c["size"], generator=g)
    y = torch.randint(0, classes, (c["n_train"], c["size"], c["size"]), generator=g)
    ex = torch.randn(c["n_eval"], 1, c["size"], c["size"], generator=g)
    ey = torch.randint(0, classes, (c["n_eval"], c["size"], c["size"]), generator=g)
    runs = [("vanilla", s) for s in range(group)]
    kw = dict(iterations=2, lr=1e-3, batch_size=batch, eval_data=(ex, ey), eval_every=2, show_progress=False,
              cache_budget_mb=c["cache_mb"], group_size=group, device=dev, memory_budget_mb=10**7)
    cached = MEM.cache_fits(src, c["n_train"] + c["n_eval"], c["size"], c["size"], c["cache_mb"])
    pred = MEM.cell_memory(src, c["size"], c["size"], batch, group, (c["n_train"] + c["n_eval"]) if cached else 0,
                         classes, c["n_eval"])
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.max_memory_allocated(dev)
    else:
        before = _reset_peak_rss()
    hist = finetune_cell(src, (x, y), runs, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(dev) - before
    else:
        peak = _peak_rss() - before
    return {"preset": preset, "group": group, "batch": batch, "device": dev.type, "cached": bool(hist[0]["encoder_cached"]),
            "measured_mb": peak / 2**20, "predicted_mb": pred["peak"] / 2**20, "ratio": peak / pred["peak"],
            "predicted": {k: v / 2**20 for k, v in pred.items() if k != "group_size"}}


def measure(preset: str, group: int, batch: int = 8, device: str = "auto", timeout: int = 600) -> dict:
    """``_child`` in a fresh process (a process's peak memory only ever grows)."""
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.memory_model import _child; "
            f"print('RESULT', json.dumps(_child({preset!r}, {int(group)}, {int(batch)}, {device!r})))")
    # every allocation past 128 kB is its own mapping, returned to the system when freed: the peak
    # resident size then follows what is alive (glibc's adaptive threshold otherwise makes it depend on
    # the order in which threads freed earlier blocks)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=str(REPO),
                       env=env)
    if r.returncode != 0:
        raise RuntimeError(f"memory measurement {preset} group {group} failed: {r.stderr.strip().splitlines()[-1:]}")
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    from trm_utils.utils import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tutorial,paper")
    ap.add_argument("--groups", default="1,2,4")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rows = []
    for p in a.presets.split(","):
        for g in (int(x) for x in a.groups.split(",")):
            r = measure(p, g, a.batch, a.device)
            rows.append(r)
            print(f"{p:9s} group {g:2d} ({r['device']}, encoder {'cached' if r['cached'] else 'recomputed'}): "
                  f"measured {r['measured_mb']:8.1f} MB, predicted {r['predicted_mb']:8.1f} MB, "
                  f"measured/predicted {r['ratio']:.2f}", flush=True)
    if a.out:
        atomic_write_json(a.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
