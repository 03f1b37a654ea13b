"""Show how the phantom is calibrated: vanilla fine-tuning Dice against the paper's range, and
the gap between same-modality and cross-modality sources (the negative transfer TRM targets).

    python benchmarks/calibrate_phantom.py [--preset tutorial] [--seeds 0 1 2] [--iterations 1000]

Fine-tunes long enough for the held-out curves to flatten (lr 1e-3, 1000 iterations by default,
each run's status from ``budget.run_status``), so the Dice it reports are where
the runs end, not how fast they learn. Prints one line per (source, target) and a verdict per
family; writes runs/calibration/calibration_<families>.csv and .json. About 20 minutes on 2 CPU cores.
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
from trm_utils import presets as P  # noqa: E402
from trm_utils.utils import atomic_write_json  # noqa: E402

#: target -> (same-modality source, cross-modality source); same task family, so modality is the difference
PAIRS = {
    "tissue": {"GM-T1": ("WM-T1", "WM-T2"), "GM-T2": ("WM-T2", "WM-T1")},
    "tumour": {"18-FLAIR": ("14-FLAIR", "14-T2"), "13-T1": ("14-T1", "14-FLAIR")},
}
PAPER_RANGE = {"tissue": (0.83, 0.95), "tumour": (0.30, 0.55)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tutorial")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-decay", type=float, default=None,
                    help="final fraction of the run over which the learning rate decays (default: constant)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--methods", nargs="+", default=["vanilla", "trm"])
    ap.add_argument("--families", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--out", default=str(REPO / "runs" / "calibration"))
    args = ap.parse_args(argv)
    cfg = P.get_preset(args.preset, iterations=args.iterations, lr=args.lr, eval_every=args.eval_every)
    cfg["lr_decay"] = args.lr_decay
    sets = E.resolve_datasets("phantom", args.data_dir, args.preset)
    t0 = time.perf_counter()
    frames, verdict = [], {}
    for fam, pairs in PAIRS.items():
        if fam not in args.families:
            continue
        name, root = sets[fam]
        for target, (same, cross) in pairs.items():
            df = E.run_grid(name, root, [same, cross], [target], args.methods, args.seeds, cfg, log=None)
            df["modality"] = ["same" if s == same else "cross" for s in df.source]
            st = B.status_table(df)
            df["status"], df["rise"], df["drop"] = st.status.values, st.rise.values, st["drop"].values
            frames.append(df)
            for r in df.itertuples():
                if r.status == "rising":
                    print(f"  still rising: {r.source} -> {r.target} {r.method} seed {r.seed}: final {r.dice:.3f}, "
                          f"smoothed rise {r.rise:.3f} over the last third")
            if "trm" in args.methods:
                t = df.groupby(["source", "method"]).dice.mean().unstack("method")
                print("   " + "  ".join(f"{s}: vanilla {t.loc[s, 'vanilla']:.3f} trm {t.loc[s, 'trm']:.3f}" for s in t.index))
            df = df[df.method == "vanilla"]
            m = df.groupby("source").dice.agg(["mean", "std"])
            print(f"{fam:<7}{target:>9}: same-modality {same:>9} {m.loc[same, 'mean']:.3f} ± {m.loc[same, 'std']:.3f}   "
                  f"cross-modality {cross:>9} {m.loc[cross, 'mean']:.3f} ± {m.loc[cross, 'std']:.3f}")
        import pandas as pd

        fam_all = pd.concat([f for f in frames if f.dataset.iloc[0] == name])
        fam_df = fam_all[fam_all.method == "vanilla"]
        by = fam_df.groupby("modality").dice.mean()
        lo, hi = PAPER_RANGE[fam]
        mean = float(fam_df.dice.mean())
        verdict[fam] = {"vanilla_dice_mean": mean, "paper_range": [lo, hi], "in_range": lo <= mean <= hi,
                        "same_modality": float(by["same"]), "cross_modality": float(by["cross"]),
                        "cross_minus_same": float(by["cross"] - by["same"]),
                        "vanilla_dice_std_over_seeds": float(fam_df.groupby("seed").dice.mean().std()),
                        "runs_status": fam_all.status.value_counts().to_dict(),
                        "by_method": fam_all.groupby("method").dice.mean().round(4).to_dict()}
        print(f"{fam}: vanilla Dice {mean:.3f} (paper's range {lo}-{hi}: {'inside' if lo <= mean <= hi else 'OUTSIDE'}); "
              f"same-modality {by['same']:.3f} vs cross-modality {by['cross']:.3f} ({by['cross'] - by['same']:+.3f})")
    import pandas as pd

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.concat(frames).to_csv(out / f"calibration_{'_'.join(args.families)}.csv", index=False)
    verdict["seeds"], verdict["preset"], verdict["seconds"] = args.seeds, args.preset, time.perf_counter() - t0
    verdict["iterations"], verdict["lr"], verdict["lr_decay"] = args.iterations, args.lr, args.lr_decay
    atomic_write_json(out / f"calibration_{'_'.join(args.families)}.json", verdict)
    print(f"{time.perf_counter() - t0:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
