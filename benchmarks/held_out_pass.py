"""What the held-out pass costs a sweep unit, and what caching its encoder outputs buys.

    python benchmarks/held_out_pass.py [--iterations 100] [--reps 3] [--out results/bench/held_out_pass.json]

The encoder is frozen, so the held-out slices' encoder outputs are the same at every evaluation:
``finetune_cell`` computes them once per cell (``cache_held_out=True``, the default, within the
memory budget) instead of running the encoder again at every held-out pass (``cache_held_out=False``,
the plain pass). On a tissue cell and a tumour cell of the phantom at the tutorial preset, with a
Table I / II unit's runs (5 methods x 3 seeds) and the preset's evaluation cadence, three variants
are timed side by side, interleaved, ``reps`` times each:

* ``no_eval``: fine-tuning only (no held-out pass);
* ``plain``: held-out pass every ``eval_every`` iterations, encoder recomputed at each pass;
* ``cached``: the same pass from the cached encoder outputs.

Printed per cell: seconds per run-iteration of each (median over reps), the ratio plain / cached
(per run-iteration, evaluation included), and the held-out pass's share of the fine-tuning time
(``(t - no_eval) / t``) before and after. ``plain`` and ``cached`` must give every run the same
held-out Dice at every evaluation (checked here, and in ``tests/test_batched.py``). Ratios only:
the machine's load moves all three alike because they are interleaved. One thread by default, as a
sweep's units run on the CPU (``--workers 2 --threads 1``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trm_utils import experiments as E  # noqa: E402
from trm_utils import presets as P  # noqa: E402
from trm_utils.batched import finetune_cell  # noqa: E402
from trm_utils.maps import transferability_maps  # noqa: E402
from trm_utils.utils import atomic_write_json, machine_info  # noqa: E402

CELLS = {"tissue": ("WM-T1", "CSF-T1"), "tumour": ("14-FLAIR", "13-T1")}  # first cells of Tables I / II's check samples
METHODS = ("vanilla", "class_weight", "trs_map", "trm", "trm@map=image")


def time_cell(family: str, iterations: int, reps: int, seeds=(0, 1, 2)) -> dict:
    fams = E.resolve_datasets("phantom", "data", "tutorial")
    name, root = fams[family]
    cfg = P.for_dataset(P.get_preset("tutorial"), name)
    source, target = CELLS[family]
    src, _ = E.source_model(name, root, source, cfg, device="cpu")
    train = E.load_task(name, root, target, "train", cfg)
    test = E.load_task(name, root, target, "test", cfg)
    maps = transferability_maps(src, train, ("dataset", "image"), int(cfg.get("map_patch", 1)), device="cpu")
    runs = [(P.parse_method(m)[0], s, P.parse_method(m)[1]) for m in METHODS for s in seeds]
    every = int(cfg["eval_every"])
    kw = dict(maps=maps, iterations=iterations, lr=cfg["lr"], batch_size=cfg["batch_size"], device="cpu",
              show_progress=False, lr_decay=cfg.get("lr_decay"), patch=int(cfg.get("map_patch", 1)))
    variants = {"no_eval": dict(eval_data=None, eval_every=None),
                "plain": dict(eval_data=test, eval_every=every, cache_held_out=False),
                "cached": dict(eval_data=test, eval_every=every, cache_held_out=True)}
    secs = {v: [] for v in variants}
    hists = {}
    for _ in range(reps):
        for v, extra in variants.items():  # interleaved: the machine's load falls on all three alike
            t0 = time.perf_counter()
            hists[v] = finetune_cell(src, train, runs, **kw, **extra)
            secs[v].append(time.perf_counter() - t0)
    same = all([e["dice"] for e in a["eval"]] == [e["dice"] for e in b["eval"]]
               for a, b in zip(hists["plain"], hists["cached"]))
    med = {v: sorted(s)[len(s) // 2] for v, s in secs.items()}
    per = {v: med[v] / (len(runs) * iterations) for v in med}
    return {"family": family, "cell": f"{source} -> {target}", "runs": len(runs), "iterations": iterations,
            "eval_every": every, "held_out_slices": len(test), "train_slices": len(train),
            "seconds": secs, "median_seconds": med, "ms_per_run_iteration": {v: 1e3 * x for v, x in per.items()},
            "ratio_plain_over_cached": med["plain"] / med["cached"],
            "held_out_share": {v: (med[v] - med["no_eval"]) / med[v] for v in ("plain", "cached")},
            "same_dice": same}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=100, help="fine-tuning iterations per timed cell")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cells", default="tissue,tumour")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1, as a sweep's units run: one per core)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {"machine": machine_info(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "cells": []}
    for fam in args.cells.split(","):
        r = time_cell(fam, args.iterations, args.reps)
        out["cells"].append(r)
        ms = r["ms_per_run_iteration"]
        print(f"{fam} cell {r['cell']} ({r['runs']} runs, {r['iterations']} iterations, held-out pass every "
              f"{r['eval_every']} on {r['held_out_slices']} slices): ms per run-iteration: no pass {ms['no_eval']:.2f}, "
              f"plain pass {ms['plain']:.2f}, cached pass {ms['cached']:.2f}; plain / cached "
              f"{r['ratio_plain_over_cached']:.2f}x; the held-out pass's share of fine-tuning: plain "
              f"{100 * r['held_out_share']['plain']:.1f} %, cached {100 * r['held_out_share']['cached']:.1f} %; "
              f"same Dice: {r['same_dice']}")
    if args.out:
        atomic_write_json(Path(args.out), out)
    return 0 if all(c["same_dice"] for c in out["cells"]) else 1


if __name__ == "__main__":
    sys.exit(main())
