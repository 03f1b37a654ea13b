"""The main job: execute every notebook in order, headless, with papermill.

    python -m trm_utils.run_all --name main [-p key value ...]

Writes the executed notebooks, figures and result files to ``runs/<name>/`` and prints a
summary per method (mean Dice over the grid, relative gain over vanilla, spread over seeds).
Parameters given with ``-p`` are injected into every notebook that declares them.
"""
from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import pandas as pd

from .utils import REPO_ROOT, atomic_write_json, atomic_write_text

NOTEBOOKS = ["01_leep", "02_pixel_leep", "03_risk_maps", "04_weighted_finetuning", "05_few_shot", "06_transfer_cell",
             "07_reproduce_paper"]


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run_notebooks(name: str, params: dict, notebooks=NOTEBOOKS, runs_dir=None, log=print) -> dict:
    """Execute ``notebooks`` with papermill into ``runs_dir/name``; returns seconds per notebook."""
    import papermill as pm

    out = Path(runs_dir or REPO_ROOT / "runs") / name
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    for nb in notebooks:
        src = REPO_ROOT / "notebooks" / f"{nb}.ipynb"
        declared = {p for p in pm.inspect_notebook(str(src))}
        p = {k: v for k, v in params.items() if k in declared}
        p["output_dir"] = str(out / nb)
        t0 = time.perf_counter()
        log(f"[{time.strftime('%H:%M:%S')}] {nb} ...")
        pm.execute_notebook(str(src), str(out / f"{nb}.ipynb"), parameters=p, cwd=str(REPO_ROOT / "notebooks"),
                            kernel_name="python3", progress_bar=False)
        timings[nb] = round(time.perf_counter() - t0, 1)
        log(f"[{time.strftime('%H:%M:%S')}] {nb} done in {timings[nb]:.0f} s")
    return timings


def summary_text(out: Path) -> str:
    """The per-method summary of notebook 04 (and the few-shot gains of notebook 05)."""
    lines = []
    d4 = out / "04_weighted_finetuning"
    for f in sorted(d4.glob("summary_*.csv")):
        s = pd.read_csv(f).set_index("method")
        lines.append(f"{f.stem.replace('summary_', '')}: mean Dice over the grid (seeds: n={int(s.n_seeds.iloc[0])}), "
                     f"{int(s.n_cells.iloc[0])} cell" + ("s" if int(s.n_cells.iloc[0]) != 1 else ""))
        lines.append(f"  {'method':<15}{'dice':>8}{'± std':>9}{'gain vs vanilla':>17}{'cells won':>11}")
        for m, r in s.iterrows():
            lines.append(f"  {m:<15}{r.dice_mean:>8.4f}{r.dice_std:>9.4f}{r.gain_pct:>+16.2f}%{int(r.cells_won):>11}")
    f5 = out / "05_few_shot" / "fewshot_summary.csv"
    if f5.exists():
        s = pd.read_csv(f5)
        lines.append("few-shot (vanilla vs TRM, mean over targets ± std over seeds)")
        for r in s.itertuples():
            lines.append(f"  {int(r.n_slices):>4} slices: vanilla {r.vanilla:.4f} ± {r.vanilla_std:.4f}  "
                         f"TRM {r.trm:.4f} ± {r.trm_std:.4f}  ({r.gain_pct:+.2f}%)")
    f7 = out / "07_reproduce_paper" / "report" / "report.md"
    if f7.exists():
        text = f7.read_text()
        if "## Headline" in text:
            lines.append("the paper's tables from the sweep read by notebook 07 (see its report.md):")
            block = text.split("## Headline", 1)[1].split("```")[1]
            lines += ["  " + ln for ln in block.strip().splitlines()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="main", help="run name: results go to runs/<name>/")
    ap.add_argument("--runs-dir", default=None, help="parent folder of the run (default <repo>/runs)")
    ap.add_argument("--notebooks", default=",".join(NOTEBOOKS), help="comma-separated notebook names")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="inject a parameter into every notebook that declares it (Python literal)")
    args = ap.parse_args(argv)
    params = {"show_progress": False, **{k: _literal(v) for k, v in args.parameter}}
    out = Path(args.runs_dir or REPO_ROOT / "runs") / args.name
    t0 = time.perf_counter()
    timings = run_notebooks(args.name, params, args.notebooks.split(","), args.runs_dir)
    total = time.perf_counter() - t0
    text = summary_text(out)
    report = f"main job '{args.name}': {len(timings)} notebooks in {total / 60:.1f} min\n" + \
             "\n".join(f"  {k}: {v:.0f} s" for k, v in timings.items()) + "\n" + text + "\n"
    atomic_write_text(out / "summary.txt", report)
    atomic_write_json(out / "timings.json", {"notebooks": timings, "total_seconds": round(total, 1), "parameters": params})
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
