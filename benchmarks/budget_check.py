"""The budget check, the gate for every reported table: is the tutorial budget long enough?

    python benchmarks/budget_check.py tissue      # about 15 min on 2 CPU cores
    python benchmarks/budget_check.py tumour      # about 20 min
    python benchmarks/budget_check.py fewshot     # about 8 min
    python benchmarks/budget_check.py fewshot --budget 1600 --skip-sources   # a candidate budget
    python benchmarks/budget_check.py tumour --lr 3e-3 --methods vanilla,trm --skip-sources   # a partial probe

The rule (decided before any measurement; ``trm_utils.budget``): a family's tutorial budget T is
accepted when the same grid (the main job's cells, methods and seeds) run at 2T with the same
schedule shape (the learning rate decays over the same fraction of the run; the held-out Dice is
read as often relative to the run) changes no method's mean Dice by more than 0.01 and no method's
relative gain over vanilla by more than 1 percentage point. The sources get the same check on
their held-out Dice on their own task (T_s against 2T_s); a tumour source must also reach 0.35.

Writes, under ``--out`` (default ``results/calibration``):

* ``<family>_budget_check.csv``: per method, both budgets' mean Dice (std over seeds), gain, the
  changes, the per-run status counts (flat / overfit / rising / below 0.05) at each budget, and
  the verdict (``ok`` per method, ``accepted`` for the family);
* ``<family>_sources_budget_check.csv``: per source, its held-out Dice at T_s and 2T_s, status,
  the change and the verdict;
* ``<family>_budget_runs.csv``: every run at both budgets, with its curve (for the status table);
* ``<family>_budget_check.json``: the grid check's command, settings, seconds, threads, CPU, the
  source models it used (carried or trained here) and its verdict; ``<family>_sources_budget_check.json``
  the same for the source check.

``--carry`` commits the sources trained at T_s to ``results/sources/`` once the source check
accepts T_s (``trm_utils.checks.carry_sources``; ``trm_utils.sources`` says what a carried source is).

``--budget T`` checks a candidate budget (a whole multiple of the preset's) against 2T and writes
``<family>_T<budget>_budget_check.*`` beside the preset's own check, which notebooks 04 and 05 keep
reading: a candidate is evidence for changing the preset, not a change of it. ``--lr X`` checks a
candidate fine-tuning learning rate (files ``..._lr<X>_*``); ``--methods a,b`` runs a subset of the
family's methods (files ``..._partial_*``): a partial check can fail a candidate (a method that moves
fails the full check too) but never accept one.

Notebooks 04 and 05 print the committed files with the command that reproduces them. Runs use the
tutorial preset's sources (trained once and cached, as the main job does); the 2T_s sources are
cached too.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from trm_utils import budget as B  # noqa: E402
from trm_utils import experiments as E  # noqa: E402
from trm_utils import checks as C  # noqa: E402
from trm_utils import tables as TB  # noqa: E402
from trm_utils import presets as P  # noqa: E402
from trm_utils.utils import atomic_write_json, machine_info  # noqa: E402


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", choices=list(B.FAMILIES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--preset", default="tutorial", help="tutorial (the budgets the main job uses) or smoke (tests)")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--out", default=str(REPO / "results" / "calibration"))
    ap.add_argument("--factor", type=int, default=2, help="the longer budget is factor x T (the rule says 2)")
    ap.add_argument("--skip-sources", action="store_true", help="only the fine-tuning grid")
    ap.add_argument("--workers", type=int, default=None,
                    help="grid jobs side by side on the CPU (default: one per core, at most 4; 1: one after another)")
    ap.add_argument("--skip-grid", action="store_true", help="only the sources")
    ap.add_argument("--budget", type=int, default=None,
                    help="check this candidate fine-tuning budget T (a whole multiple of the preset's) against 2T; "
                         "files <family>_T<budget>_* (the preset's own check is left as it is)")
    ap.add_argument("--lr", type=float, default=None,
                    help="check the grid with this candidate fine-tuning learning rate (the sources keep theirs); files "
                         "<family>[_T<budget>]_lr<lr>_*")
    ap.add_argument("--carry", action="store_true",
                    help="after the source check, commit the sources trained at T_s to results/sources/ (only when "
                         "the check accepts T_s; trm_utils.checks.carry_sources)")
    ap.add_argument("--reuse-t", default=None, metavar="RUNS_CSV",
                    help="take this check's T runs from an earlier check's runs file whose 2T is this T (a doubling "
                         "series trains each budget once; same sources and settings, else an error)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated subset of the family's methods: a partial check (a failure fails the full "
                         "check; a pass does not pass it); files ..._partial_*")
    a = ap.parse_args(argv)
    try:
        base = B.budget_multiple(a.family, a.preset, a.budget)
        cfg = B.budget_cfg(a.family, a.preset, base, lr=a.lr)
        methods = B.check_methods(a.family, a.methods.split(",") if a.methods else None)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    partial = B.is_partial(a.family, methods)
    # what makes this a candidate check: (file-name part, words for the log)
    parts = [*([(f"T{a.budget}", f"budget {a.budget}")] if base > 1 else []),
             *([(f"lr{a.lr:g}", f"lr {a.lr:g}")] if a.lr else []),
             *([("partial", f"methods {a.methods} only (partial)")] if partial else [])]
    stem = "_".join([a.family, *(p for p, _ in parts)])
    seeds = [int(s) for s in a.seeds.split(",")]
    t0 = time.perf_counter()
    out = Path(a.out)
    fam = B.FAMILIES[a.family]
    meta = {"command": "python benchmarks/budget_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "family": a.family, "preset": a.preset, "seeds": seeds, "factor": a.factor, "commit": _commit(),
            "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "settings": fam, "budget": cfg["iterations"],
            "lr": cfg["lr"], "methods": methods,
            "cpu": machine_info()["cpu"]}
    name, sources, _ = B.family_tasks(a.family, a.preset)
    root = C.family_root(a.family, a.preset, a.data_dir)
    if not a.skip_sources:
        ts = time.perf_counter()
        src = C.check_sources(a.family, a.preset, a.data_dir, factor=a.factor, log=print)
        TB.write_csv(src, out / f"{stem}_sources_budget_check.csv")
        smeta = {**meta, "seconds": round(time.perf_counter() - ts, 1), "accepted": bool(src.ok.all()),
                 "source_iterations": int(src.iterations_T.iloc[0])}
        for k in ("budget", "lr", "methods", "seeds"):  # the fine-tuning grid's settings: not this check's
            smeta.pop(k)
        atomic_write_json(out / f"{stem}_sources_budget_check.json", smeta)
        print(src.round(4).to_string(index=False))
    if a.carry:
        try:
            carried = C.carry_sources(a.family, a.preset, a.data_dir, check_folder=out)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"carried: {', '.join(str(p) for p in carried)}")
    if not a.skip_grid:
        # which model each source was: the carried one (its identity matched) or one trained in this checkout
        meta["sources_used"] = {s: E.source_choice(name, root, s, P.get_preset(a.preset))[2] for s in sources}
        tg = time.perf_counter()
        reuse = pd.read_csv(a.reuse_t) if a.reuse_t else None
        try:
            table, runs = C.check_grid(a.family, a.preset, a.data_dir, seeds, factor=a.factor, log=print,
                                       workers=a.workers, budget=a.budget, lr=a.lr, methods=methods, reuse_t=reuse)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if a.reuse_t:
            meta["reused_t_from"] = str(a.reuse_t)
        TB.write_csv(table, out / f"{stem}_budget_check.csv")
        TB.write_csv(runs, out / f"{stem}_budget_runs.csv")
        meta["grid_seconds"] = round(time.perf_counter() - tg, 1)
        meta["grid_accepted"] = bool(table.accepted.iloc[0])  # always False for a partial check
        if partial:
            meta["partial"] = True
        print(table.round(4).to_string(index=False))
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(out / f"{stem}_budget_check.json", meta)
    if not parts:
        print(B.verdict_text(a.family, out))
    else:
        print(f"{a.family} candidate {', '.join(w for _, w in parts)}: files {out / stem}_*; "
              f"the preset's own check is unchanged")
        if not a.skip_grid:
            print("\n".join(B.grid_verdict_lines(a.family, table)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
