"""Held-out curves of one small grid at a chosen budget, with each run's status (flat / overfit /
rising, ``trm_utils.budget.run_status``): a free-form look at a budget before the budget check
(``benchmarks/budget_check.py``, the gate) is run on it.

    python benchmarks/budget_curves.py tumour 14-FLAIR,14-T2 18-FLAIR --iterations 1200 --lr-decay 0.67 --eval-every 50
    python benchmarks/budget_curves.py tissue WM-T2,WM-T1 GM-T2 --iterations 600 --eval-every 50
    python benchmarks/budget_curves.py tissue CSF-T1 WM-T1 --iterations 600 --sizes 100,25 --methods vanilla,trm

Every other setting is the tutorial preset's (``--source-iterations`` changes the source models'
budget, which trains and caches new ones). Prints, per grid, the runs still rising and the
mean Dice per source and method; writes each grid (one row per run, with its curve) to
``--out``. Seeds 0, 1, 2. A 2-cell tissue grid at 600 iterations takes about 5 minutes on 2 CPU
cores, a 2-cell tumour grid at 1200 about 10.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trm_utils import experiments as E  # noqa: E402
from trm_utils import budget as B  # noqa: E402
from trm_utils import tables as TB  # noqa: E402
from trm_utils import presets as P  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", choices=["tissue", "tumour"])
    ap.add_argument("sources", help="comma-separated source tasks")
    ap.add_argument("targets", help="comma-separated target tasks")
    ap.add_argument("--iterations", type=int, required=True)
    ap.add_argument("--lr-decay", type=float, default=0.5)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--source-iterations", type=int, default=None)
    ap.add_argument("--methods", default=",".join(P.CORE_METHODS))
    ap.add_argument("--sizes", default="", help="few-shot sizes, comma-separated (default: every training slice)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--out", default=str(REPO / "runs" / "budget"))
    a = ap.parse_args(argv)
    name, root = E.resolve_datasets("phantom", a.data_dir, "tutorial")[a.family]
    cfg = P.for_dataset(P.get_preset("tutorial"), name)
    cfg.update(iterations=a.iterations, lr_decay=a.lr_decay, eval_every=a.eval_every)
    if a.source_iterations:
        cfg["source_iterations"] = a.source_iterations
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in [int(s) for s in a.sizes.split(",")] if a.sizes else [None]:
        t0 = time.perf_counter()
        df = E.run_grid(name, root, a.sources.split(","), a.targets.split(","), a.methods.split(","),
                        [int(s) for s in a.seeds.split(",")], cfg, max_slices=n, log=None)
        tag = f"{a.family}_{a.targets.replace(',', '-')}_{a.iterations}it_decay{a.lr_decay}" + (f"_{n}slices" if n else "")
        TB.write_csv(df, out / f"{tag}.csv")
        st = B.status_table(df)
        print(f"{tag}: {time.perf_counter() - t0:.0f} s; run status: {B.status_line(B.status_counts(st))}")
        if (st.status == "rising").any():
            print(st[st.status == "rising"].round(3).to_string(index=False))
        print(df.groupby(["source", "method"]).dice.agg(["mean", "std"]).unstack("method").round(4).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
