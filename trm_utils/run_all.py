"""The main job: execute every notebook in order, headless, with papermill.

    python -m trm_utils.run_all --name main [-p key value ...] [--force]

Writes the executed notebooks, figures and result files to ``runs/<name>/`` and prints a
summary per method (mean Dice over the grid, relative gain over vanilla, spread over seeds).
Parameters given with ``-p`` are injected into every notebook that declares them.

**Incremental.** A notebook is re-executed only when its content stamp changed since its last
successful run in that folder (``runs/<name>/stamps.json``): a hash of the notebook's source
(``.py``), of every ``trm_utils`` module it imports (followed through the package's own imports),
of the parameters injected into it, and of the committed results it reads (``DATA_INPUTS``: the
carried source models in ``results/sources/``, the budget checks in ``results/calibration/``). The
notebooks do not read each other's outputs (the source models they share are carried with the
repository, or cached by their identity and trained when missing), so no notebook depends on another's run: a one-line change to one notebook re-executes
that notebook alone, a change to a shared module every notebook that imports it. ``--force``
(``make run FORCE=1``) re-executes all.

**Side by side.** After 01 and 02 (02 trains and caches any source model that is not carried, so
that two notebooks never train the same one at once; on the phantom every source is carried), the other
notebooks run two at a time on a machine with 2 or more cores (``--workers``), each kernel with its
share of the cores: small networks use a second thread poorly, so two kernels finish sooner than
one after the other (``run_notebooks``).

Kernels run with transport encryption where the ZMQ library supports it (CurveZMQ), which is
what ipykernel's "running over TCP without encryption" warning asks for; nothing is muted.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import jupytext
import nbformat
import pandas as pd
import papermill as pm
from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine, papermill_engines
from papermill.exceptions import strip_color
from papermill.log import logger as pm_logger
from traitlets.config import Config

from . import budget as B
from .utils import REPO_ROOT, atomic_write_json, atomic_write_text, available_cpus

NOTEBOOKS = ["01_leep", "02_pixel_leep", "03_risk_maps", "04_weighted_finetuning", "05_few_shot", "06_transfer_cell",
             "07_reproduce_paper"]


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _imported_modules(tree: ast.AST, package: str = "trm_utils", current: str = None) -> set:
    """Names of the ``package`` modules a parsed source imports (absolute, or relative inside it)."""
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == package]
            mods |= {n.split(".")[1] for n in names if "." in n} | ({"__init__"} if names else set())
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 0 and base.split(".")[0] != package:
                continue
            if node.level > 0 and current is None:
                continue
            sub = base.split(".")[1] if node.level == 0 and "." in base else (base if node.level > 0 else "")
            if node.level == 0:
                mods.add("__init__")  # importing trm_utils.x runs the package's __init__ first
            if sub:
                mods.add(sub.split(".")[0])
            else:  # from trm_utils import x / from . import x: a module or a name of __init__
                mods.add("__init__")
                mods |= {a.name for a in node.names if (REPO_ROOT / package / f"{a.name}.py").exists()}
    return mods


def module_closure(source: str, package: str = "trm_utils") -> list:
    """Every ``trm_utils`` module ``source`` imports, followed through the package's own imports."""
    todo, seen = _imported_modules(ast.parse(source), package), set()
    while todo:
        m = todo.pop()
        path = REPO_ROOT / package / f"{m}.py"
        if m in seen or not path.exists():
            continue
        seen.add(m)
        todo |= _imported_modules(ast.parse(path.read_text()), package, current=m) - seen
    return sorted(seen)


#: Committed result folders a notebook reads (their files are part of its stamp): the carried source models
#: (``results/sources``) that 02-06 load, the budget checks' verdicts printed by notebooks 02 (sources), 04 and
#: 05, and the committed tumour table notebook 04 shows.
DATA_INPUTS = {"02_pixel_leep": ("results/sources", "results/calibration"), "03_risk_maps": ("results/sources",),
               "04_weighted_finetuning": ("results/calibration", "results/sources"),
               "05_few_shot": ("results/calibration", "results/sources"), "06_transfer_cell": ("results/sources",)}


def notebook_stamp(nb: str, params: dict, nb_dir=None) -> str:
    """The content stamp of notebook ``nb`` run with ``params`` (module docstring)."""
    nb_dir = Path(nb_dir or REPO_ROOT / "notebooks")
    src = (nb_dir / f"{nb}.py") if (nb_dir / f"{nb}.py").exists() else (nb_dir / f"{nb}.ipynb")
    text = src.read_text()
    h = hashlib.sha256(text.encode())
    for m in module_closure(text):
        h.update(f"\0{m}\0".encode() + (REPO_ROOT / "trm_utils" / f"{m}.py").read_bytes())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    for d in DATA_INPUTS.get(nb, ()):  # committed results a notebook reads
        for f in sorted((REPO_ROOT / d).glob("*")):
            if f.is_file():
                h.update(f"\0{f.name}\0".encode() + f.read_bytes())
    return h.hexdigest()[:16]


def sync_from_py(nb: str, nb_dir=None, log=print) -> bool:
    """Regenerate ``nb``.ipynb from its ``.py`` (the edited source) when their cells differ, as
    ``make sync-notebooks`` does, so that the notebook executed is the one the stamp describes."""

    nb_dir = Path(nb_dir or REPO_ROOT / "notebooks")
    py, ipynb = nb_dir / f"{nb}.py", nb_dir / f"{nb}.ipynb"
    if not py.exists():
        return False
    src = jupytext.read(py)
    cells = lambda n: [(c.cell_type, c.source.strip()) for c in n.cells]  # noqa: E731
    if ipynb.exists() and cells(nbformat.read(ipynb, as_version=4)) == cells(src):
        return False
    jupytext.write(src, ipynb, fmt="ipynb")
    log(f"{nb}.ipynb regenerated from {nb}.py (edit the .py; `make sync-notebooks` does this for all)")
    return True


def kernel_config():
    """Kernel-manager settings: CurveZMQ transport encryption where pyzmq has it."""
    cfg = Config()
    try:
        import zmq  # optional: pyzmq is installed with Jupyter, CurveZMQ support is not always

        if zmq.has("curve"):
            cfg.KernelManager.transport_encryption = "auto"
    except ImportError:
        pass
    return cfg


class HeadlessClient(PapermillNotebookClient):
    """papermill's notebook client without nbclient's mirror of Output widgets.

    nbclient mirrors what a cell prints into an ipywidgets ``Output`` widget (``interactive`` draws
    into one) back to the kernel: a ``comm_msg`` sent on the shell socket while that same socket is
    awaiting the cell's ``execute_reply`` (``nbclient.output_widget.OutputWidget.sync_state``). Under
    load the send can swallow the socket's wake-up, the reply is never read, and the run hangs for
    good with the kernel idle: seen twice on notebook 03's explorer cell on 2026-12-06 (a fresh-clone
    ``make run``, ipykernel 7.4; the tests' smoke run, ipykernel 6.31; the kernel had executed the
    cell both times), jupyter/nbclient#312. Headless nobody views the widget, so nothing is mirrored:
    what the widget draws is kept as the cell's own output (the executed notebook and the book show
    the explorer's first figure as an image)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.widget_registry = {}


class HeadlessEngine(NBClientEngine):
    """papermill's default engine with ``HeadlessClient`` (registered as ``trm-headless``)."""

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None, stderr_file=None,
                                 start_timeout=60, execution_timeout=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("input_path", "timeout", "startup_timeout")}
        return HeadlessClient(nb_man, timeout=execution_timeout, startup_timeout=start_timeout, kernel_name=kernel_name,
                              log=pm_logger, log_output=log_output, stdout_file=stdout_file, stderr_file=stderr_file,
                              **kwargs).execute()


papermill_engines.register("trm-headless", HeadlessEngine)


#: Notebooks the others need first: 02 trains and caches any source model 03-06 load that is not carried
#: (with ``retrain_sources=True`` or on data without carried sources; none in the main job). The others
#: read nothing another notebook writes, so after these they may run side by side.
FIRST = ("01_leep", "02_pixel_leep")
#: The order in which the independent notebooks are handed to the workers: the longest first.
LONGEST_FIRST = ("04_weighted_finetuning", "05_few_shot", "06_transfer_cell", "03_risk_maps", "07_reproduce_paper")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def default_workers() -> int:
    """Two notebooks at once where there are at least 2 cores, else one."""
    return 2 if available_cpus() >= 2 else 1


class NotebookFailures(RuntimeError):
    """One or more notebooks of a run failed: ``failures`` maps each to its one-line reason and the
    file holding its traceback; ``not_started`` lists those never begun because one failed first."""

    def __init__(self, failures: dict, not_started: list, timings: dict):
        self.failures, self.not_started, self.timings = failures, list(not_started), timings
        super().__init__("; ".join(f"{nb}: {f['reason']}" for nb, f in failures.items()))


def _one_line_reason(exc: BaseException) -> str:
    """``ValueError: bad value (cell In [12])`` for a notebook's error, the exception's first line otherwise."""
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename is not None:  # papermill.PapermillExecutionError: the error raised inside the notebook
        where = f" (cell In [{exc.exec_count}])" if getattr(exc, "exec_count", None) else ""
        text = f"{ename}: {evalue}"
    else:
        where, text = "", f"{type(exc).__name__}: {exc}"
    first = next((ln for ln in text.strip().splitlines() if ln.strip()), text.strip())
    return first[:300] + where


def prepare_notebook(nb: str, params: dict, nb_dir: Path, out: Path, log=print) -> dict:
    """Everything about notebook ``nb`` that is decided before it runs, in the calling thread: its
    ``.ipynb`` regenerated from its ``.py`` (``sync_from_py``), the parameters it declares (papermill
    reads its ``parameters`` cell), its content stamp. ``run_notebooks`` calls this in the main thread
    for every notebook before any is handed to a worker: these steps parse Python source (``ast``),
    which CPython 3.11 does not do safely from several threads at once (python/cpython#106905: a
    spurious ``SystemError: AST constructor recursion depth mismatch``); the workers only execute."""
    sync_from_py(nb, nb_dir, log)
    src = nb_dir / f"{nb}.ipynb"
    declared = set(pm.inspect_notebook(str(src)))
    p = {k: v for k, v in params.items() if k in declared}
    p["output_dir"] = str(out / nb)
    return {"nb": nb, "src": src, "params": p, "stamp": notebook_stamp(nb, p, nb_dir)}


#: The longest a single cell may run before the notebook fails (seconds; None: no limit). The main job's
#: longest cell takes about 20 minutes on 2 CPU cores (notebook 04's grid); a cell past an hour is taken
#: for a hung kernel connection, reported as a failure rather than waited on for ever.
CELL_TIMEOUT = 3600


def run_notebooks(name: str, params: dict, notebooks=NOTEBOOKS, runs_dir=None, log=print, force: bool = True,
                  nb_dir=None, skipped: list = None, workers: int = 1, keep_going: bool = False,
                  cell_timeout: Optional[int] = CELL_TIMEOUT) -> dict:
    """Execute ``notebooks`` with papermill into ``runs_dir/name``; returns seconds per notebook.

    Every notebook is prepared (``prepare_notebook``: synced, parameters read, stamped) in the calling
    thread before any runs; the worker threads only execute. With ``force=False`` a notebook whose
    content stamp (``notebook_stamp``) matches its last successful run there is skipped; its recorded
    time is returned, the skip logged and its name appended to ``skipped`` when given.

    ``workers`` > 1: the notebooks of ``FIRST`` run first, one at a time with every core; then the
    others run ``workers`` at a time, longest first, each kernel with its share of the cores
    (``OMP_NUM_THREADS``). Small networks use 2 threads poorly: on 2 cores two 1-thread kernels did
    1.6x the work of one 2-thread kernel in the same time (measured: 12 tutorial runs x 100
    iterations, 38.7 s with 2 threads, 46.8 s with 1, 49 s each for two at once). A notebook's numbers
    depend on its thread count only through float rounding, and the count is fixed by ``workers``,
    so a run is reproducible.

    **Failures.** A notebook that raises is logged the moment it fails (name, one-line reason, the
    file ``<nb>.error.txt`` beside the executed notebook that holds the traceback) and leaves no
    stamp, so the next incremental run re-executes it. As ``make`` does, the notebooks in flight
    finish and no new one starts (``keep_going=True``, ``make run KEEP_GOING=1``: the rest run too;
    the notebooks after ``FIRST`` do not read each other's outputs). Then ``NotebookFailures`` is
    raised, listing every failure and every notebook not started. A cell running longer than
    ``cell_timeout`` seconds (``CELL_TIMEOUT``; None: no limit) fails its notebook.
    """
    nb_dir = Path(nb_dir or REPO_ROOT / "notebooks")
    out = Path(runs_dir or REPO_ROOT / "runs") / name
    out.mkdir(parents=True, exist_ok=True)
    stamps_file = out / "stamps.json"
    stamps = json.loads(stamps_file.read_text()) if stamps_file.exists() else {}
    timings, failures, not_started = {}, {}, []
    lock, stop = threading.Lock(), threading.Event()
    clock = lambda: time.strftime("%H:%M:%S")  # noqa: E731

    jobs = {}  # main thread only: the parsing steps (module docstring of prepare_notebook)
    for nb in notebooks:
        job = prepare_notebook(nb, params, nb_dir, out, log)
        done = stamps.get(nb, {})
        if not force and done.get("stamp") == job["stamp"] and (out / f"{nb}.ipynb").exists():
            timings[nb] = done.get("seconds", 0.0)
            log(f"[{clock()}] {nb}: up to date, not re-executed (ran in {timings[nb]:.0f} s)")
            if skipped is not None:
                skipped.append(nb)
        else:
            jobs[nb] = job

    def execute(job):
        nb = job["nb"]
        if stop.is_set():
            with lock:
                not_started.append(nb)
            return
        t0 = time.perf_counter()
        log(f"[{clock()}] {nb} ...")
        err_file = out / f"{nb}.error.txt"
        with lock:
            stamps.pop(nb, None)  # a failed run leaves no stamp: it is retried next time
            atomic_write_json(stamps_file, stamps)
        try:
            pm.execute_notebook(str(job["src"]), str(out / f"{nb}.ipynb"), parameters=job["params"], cwd=str(nb_dir),
                                kernel_name="python3", progress_bar=False, config=kernel_config(),
                                execution_timeout=cell_timeout, engine_name="trm-headless")
        except Exception as exc:  # noqa: BLE001 -- every failure is recorded, reported and re-raised as one
            seconds = round(time.perf_counter() - t0, 1)
            atomic_write_text(err_file, f"{nb} failed after {seconds} s ({time.strftime('%Y-%m-%d %H:%M:%S')})\n\n"
                              + strip_color(str(exc)) + "\n\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            reason = _one_line_reason(exc)
            with lock:
                failures[nb] = {"reason": reason, "traceback": str(err_file), "seconds": seconds}
                if not keep_going:
                    stop.set()
            log(f"[{clock()}] {nb} FAILED after {seconds:.0f} s: {reason}; traceback in {err_file}")
            return
        seconds = round(time.perf_counter() - t0, 1)
        err_file.unlink(missing_ok=True)  # an earlier failure's traceback no longer describes this notebook
        with lock:
            timings[nb] = seconds
            stamps[nb] = {"stamp": job["stamp"], "seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                          "workers": workers}
            atomic_write_json(stamps_file, stamps)
        log(f"[{clock()}] {nb} done in {seconds:.0f} s")

    workers = max(1, int(workers))
    first = [jobs[n] for n in notebooks if n in jobs and (workers == 1 or n in FIRST)]
    rest = [jobs[n] for n in notebooks if n in jobs and workers > 1 and n not in FIRST]
    for job in first:
        execute(job)
    if rest:
        rest.sort(key=lambda j: LONGEST_FIRST.index(j["nb"]) if j["nb"] in LONGEST_FIRST else len(LONGEST_FIRST))
        saved = {v: os.environ.get(v) for v in _THREAD_VARS}
        os.environ.update({v: str(max(1, available_cpus() // workers)) for v in _THREAD_VARS})
        try:
            with ThreadPoolExecutor(workers) as pool:
                for f in [pool.submit(execute, job) for job in rest]:
                    f.result()  # execute records failures itself; this re-raises only a defect of the runner
        finally:
            for v, old in saved.items():
                if old is None:
                    os.environ.pop(v, None)
                else:
                    os.environ[v] = old
    timings = {nb: timings[nb] for nb in notebooks if nb in timings}
    if failures:
        raise NotebookFailures({nb: failures[nb] for nb in notebooks if nb in failures},
                               [nb for nb in notebooks if nb in not_started], timings)
    return timings


def summary_text(out: Path) -> str:
    """The per-method summary of notebook 04 (and the few-shot gains of notebook 05), each run's status
    and the committed budget checks' verdicts."""
    lines = []
    d4 = out / "04_weighted_finetuning"
    for f in sorted(d4.glob("summary_*.csv")):
        s = pd.read_csv(f).set_index("method")
        lines.append(f"{f.stem.replace('summary_', '')}: mean Dice over the grid (seeds: n={int(s.n_seeds.iloc[0])}), "
                     f"{int(s.n_cells.iloc[0])} cell" + ("s" if int(s.n_cells.iloc[0]) != 1 else ""))
        lines.append(f"  {'method':<15}{'dice':>8}{'± std':>9}{'gain vs vanilla':>17}{'cells won':>11}")
        for m, r in s.iterrows():
            lines.append(f"  {m:<15}{r.dice_mean:>8.4f}{r.dice_std:>9.4f}{r.gain_pct:>+16.2f}%{int(r.cells_won):>11}")
    for f in sorted(d4.glob("status_*.csv")) + sorted((out / "05_few_shot").glob("fewshot_status.csv")):
        st = pd.read_csv(f)
        lines.append(f"{f.stem.replace('status_', '')}: run status: " + B.status_line(B.status_counts(st)))
    f5 = out / "05_few_shot" / "fewshot_summary.csv"
    if f5.exists():
        s = pd.read_csv(f5)
        lines.append("few-shot (vanilla vs TRM, mean over targets ± std over seeds)")
        for r in s.itertuples():
            lines.append(f"  {int(r.n_slices):>4} slices: vanilla {r.vanilla:.4f} ± {r.vanilla_std:.4f}  "
                         f"TRM {r.trm:.4f} ± {r.trm_std:.4f}  ({r.gain_pct:+.2f}%)")
    lines.append(f"budget checks (results/calibration, committed; {B.RULE}):")
    for fam in B.FAMILIES:
        lines += ["  " + ln for ln in B.verdict_text(fam).splitlines()]
    f7 = out / "07_reproduce_paper" / "report" / "report.md"
    if f7.exists():
        text = f7.read_text()
        if "## Headline" in text:
            lines.append("the paper's tables from the sweep read by notebook 07 (see its report.md):")
            caveat = out / "07_reproduce_paper" / "caveat.txt"
            if caveat.exists():
                lines.append(f"  NOTE: {caveat.read_text().strip()}")
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
    ap.add_argument("--force", action="store_true",
                    help="re-execute every notebook, even those whose stamp says they are up to date")
    ap.add_argument("--workers", type=int, default=default_workers(),
                    help="notebooks run side by side after 01 and 02 (default: 2 on 2 or more cores)")
    ap.add_argument("--keep-going", action="store_true",
                    help="after a notebook fails, still start the ones not yet begun (default: as make, finish "
                         "those in flight and start no new one)")
    ap.add_argument("--notebook-dir", default=None, help="folder of the notebooks (default <repo>/notebooks)")
    ap.add_argument("--cell-timeout", type=int, default=CELL_TIMEOUT,
                    help=f"seconds a cell may run before its notebook fails (default {CELL_TIMEOUT}; 0: no limit)")
    args = ap.parse_args(argv)
    params = {"show_progress": False, **{k: _literal(v) for k, v in args.parameter}}
    out = Path(args.runs_dir or REPO_ROOT / "runs") / args.name
    t0 = time.perf_counter()
    skipped = []
    try:
        timings = run_notebooks(args.name, params, args.notebooks.split(","), args.runs_dir, force=args.force,
                                skipped=skipped, workers=args.workers, keep_going=args.keep_going,
                                nb_dir=args.notebook_dir, cell_timeout=args.cell_timeout or None)
    except NotebookFailures as fail:
        total = time.perf_counter() - t0
        report = failure_report(args.name, fail, skipped, total)
        atomic_write_text(out / "summary.txt", report)
        atomic_write_json(out / "timings.json", {"notebooks": fail.timings, "total_seconds": round(total, 1),
                                                 "parameters": params, "up_to_date": skipped,
                                                 "failed": fail.failures, "not_started": fail.not_started})
        print(report, file=sys.stderr)
        return 1
    total = time.perf_counter() - t0
    text = summary_text(out)
    report = f"main job '{args.name}': {len(timings) - len(skipped)} of {len(timings)} notebooks executed in " \
             f"{total / 60:.1f} min" + (f" ({len(skipped)} up to date: make run FORCE=1 re-runs them)" if skipped else "") + \
             "\n" + "\n".join(f"  {k}: {v:.0f} s" + (" (earlier run)" if k in skipped else "")
                               for k, v in timings.items()) + "\n" + text + "\n"
    atomic_write_text(out / "summary.txt", report)
    atomic_write_json(out / "timings.json", {"notebooks": timings, "total_seconds": round(total, 1), "parameters": params,
                                             "up_to_date": skipped})
    print(report)
    return 0


def failure_report(name: str, fail: NotebookFailures, skipped: list, total: float) -> str:
    """What a failed main job prints (and writes to ``summary.txt`` in place of the tables): each
    notebook's time, each failure with its reason and traceback file, the notebooks not started."""
    lines = [f"main job '{name}' FAILED after {total / 60:.1f} min: {len(fail.failures)} notebook"
             f"{'s' if len(fail.failures) != 1 else ''} failed"
             + (f", {len(fail.not_started)} not started" if fail.not_started else "")
             + " (the next `make run` re-executes only these and any that changed)"]
    lines += [f"  {k}: {v:.0f} s" + (" (earlier run)" if k in skipped else "") for k, v in fail.timings.items()]
    lines += [f"  {nb}: FAILED after {f['seconds']:.0f} s: {f['reason']} (traceback: {f['traceback']})"
              for nb, f in fail.failures.items()]
    lines += [f"  {nb}: not started (a notebook failed before it; `make run KEEP_GOING=1` starts the rest anyway)"
              for nb in fail.not_started]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    sys.exit(main())
