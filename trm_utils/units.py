"""A sweep's unit on disk and how it runs: its folder and status, the parameters notebook 06 runs it
with, ``run_unit`` (papermill), and the executors that run many (a local pool, or a SLURM job array
through submitit). ``sweep`` plans the units and names them; this module runs them.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

import papermill as pm
from tqdm.auto import tqdm

from .utils import REPO_ROOT, atomic_write_json, available_cpus, machine_info

UNIT_NOTEBOOK = REPO_ROOT / "notebooks" / "06_transfer_cell.ipynb"
#: Version of what a unit's hash covers. 1: the data named by folder path and file times (a
#: regenerated phantom or a moved copy made every finished unit look new); 2: by their content.
HASH_FORMAT = 2


class SweepError(ValueError):
    """A sweep asked for something that cannot be run; the message says what to do instead."""


def unit_dir(out: Path, unit, h: str) -> Path:
    """A unit's folder: ``OUT/units/<unit>-<hash>``."""
    return Path(out) / "units" / f"{unit.uid}-{h}"


def unit_status(path: Path) -> str:
    """done / failed / todo (never started, or killed before it finished)."""
    f = Path(path) / "unit.json"
    if not f.exists():
        return "todo"
    st = json.loads(f.read_text()).get("status")
    return "done" if st == "done" and (Path(path) / "result.csv").exists() else ("failed" if st == "failed" else "todo")


def unit_spec(out: Path, unit, settings, cfg: dict, h: str, device="auto", num_threads=0,
              cache_dir=None, kernel_name="python3", data: Optional[str] = None, code: Optional[str] = None,
              sources_dir=None, source: Optional[str] = None) -> dict:
    """Everything a worker needs to run ``unit`` (plain data: it crosses process and job boundaries),
    with ``cfg``, the resolved preset its hash ``h`` was computed from, (``data``, ``code``) the data
    signature and code version in that hash, recorded in ``unit.json``, and ``sources_dir`` /
    ``source``: the sweep's carried sources and the SHA-256 of the unit's (None: a sweep without them)."""
    return {"uid": unit.uid, "hash": h, "dir": str(unit_dir(out, unit, h)), "unit": asdict(unit),
            "settings": asdict(settings), "cfg": cfg, "device": device, "num_threads": int(num_threads),
            "cache_dir": str(cache_dir) if cache_dir else None, "kernel_name": kernel_name,
            "data": data, "code": code, "sources_dir": str(sources_dir) if sources_dir else None, "source": source}


def unit_parameters(spec: dict) -> dict:
    """The parameters notebook 06 runs a unit with (what ``unit.json`` records)."""
    u, s = spec["unit"], spec["settings"]
    return {"dataset": s["dataset"], "data_dir": s["data_dir"], "preset": s["preset"], "family": u["family"],
            "source": u["source"], "target": u["target"], "n_slices": u["n_slices"], "methods": list(u["methods"]),
            "seeds": list(u["seeds"]), "iterations": spec["cfg"]["iterations"],
            # the preset as resolved (and hashed) when the sweep was planned, every key of it: the
            # unit runs exactly what its hash names, even if the preset's defaults change later
            "overrides": {k: v for k, v in spec["cfg"].items() if k != "iterations"}, "output_dir": spec["dir"],
            "device": spec["device"], "num_threads": spec["num_threads"], "cache_dir": spec["cache_dir"],
            "show_progress": False, **({"sources_dir": spec["sources_dir"]} if spec.get("sources_dir") else {})}


def _one_line(err: BaseException) -> str:
    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    text = f"{ename}: {evalue}" if ename else f"{type(err).__name__}: {err}"
    return " ".join(str(text).split())[:500]


def run_unit(spec: dict) -> dict:
    """Run one unit: papermill-execute notebook 06 into the unit's folder, then mark it done.

    Skips a unit already done. The executed notebook is written under a temporary name and
    renamed when it finished; ``unit.json`` comes last (atomically), so a unit killed part-way
    is simply run again. A failure is recorded (``status: failed`` and a one-line error) and
    returned, never raised: one bad unit does not stop a sweep.
    """
    d = Path(spec["dir"])
    if unit_status(d) == "done":
        return {"uid": spec["uid"], "status": "skipped", "seconds": 0.0}
    d.mkdir(parents=True, exist_ok=True)
    u, s = spec["unit"], spec["settings"]
    params = unit_parameters(spec)
    tmp_nb = d / f".{spec['uid']}.running.ipynb"
    t0 = time.perf_counter()
    record = {"uid": spec["uid"], "hash": spec["hash"], "hash_format": HASH_FORMAT, "data_signature": spec.get("data"),
              "code_version": spec.get("code"), "source_sha256": spec.get("source"), "unit": u, "settings": s,
              "parameters": params,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": os.uname().nodename, "machine": machine_info()}
    try:
        (d / "result.csv").unlink(missing_ok=True)
        pm.execute_notebook(str(UNIT_NOTEBOOK), str(tmp_nb), parameters=params, cwd=str(REPO_ROOT / "notebooks"),
                            kernel_name=spec["kernel_name"], progress_bar=False)
        if not (d / "result.csv").exists():
            raise RuntimeError(f"the notebook finished without writing {d / 'result.csv'}")
        os.replace(tmp_nb, d / f"{spec['uid']}.ipynb")
        record.update(status="done", seconds=round(time.perf_counter() - t0, 1))
    except Exception as err:  # recorded, not raised: the sweep goes on
        if tmp_nb.exists():
            os.replace(tmp_nb, d / f"{spec['uid']}.failed.ipynb")
        record.update(status="failed", seconds=round(time.perf_counter() - t0, 1), error=_one_line(err),
                      traceback=traceback.format_exc()[-4000:])
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    atomic_write_json(d / "unit.json", record)
    return {"uid": spec["uid"], "status": record["status"], "seconds": record["seconds"], "error": record.get("error")}


class UnitJob:
    """``run_unit`` as a submitit job that is requeued when SLURM stops it (time limit or
    preemption): the requeued job runs the unit again from its files (a finished unit is skipped)."""

    def __call__(self, spec: dict) -> dict:
        return run_unit(spec)

    def checkpoint(self, spec: dict):
        import submitit  # optional: only a SLURM sweep needs it (environment.yml has it; pip install submitit)

        return submitit.helpers.DelayedSubmission(UnitJob(), spec)


# ----------------------------------------------------------------------------- executors

def default_workers() -> int:
    """One worker per 4 available cores, at least 1 (each worker's torch gets its share of the cores)."""
    return max(1, available_cpus() // 4)


def run_local(specs: list, workers: int = 1, progress: bool = True, log=print) -> list:
    """Run ``specs`` one after another (``workers=1``) or in a bounded pool of processes."""
    results = []
    bar = tqdm(total=len(specs), desc="units", unit="unit", disable=not progress)
    if workers <= 1:
        for spec in specs:
            bar.set_postfix_str(spec["uid"])
            results.append(run_unit(spec))
            _log_result(results[-1], log)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_unit, spec) for spec in specs]
            for fut in as_completed(futures):
                results.append(fut.result())
                _log_result(results[-1], log)
                bar.update()
    bar.close()
    return results


def _log_result(r: dict, log) -> None:
    if log and r["status"] != "skipped":
        log(f"  {r['uid']}: {r['status']} in {r['seconds']:.0f} s" + (f" ({r['error']})" if r.get("error") else ""))


def slurm_executor(folder, cluster: Optional[str] = None, partition=None, time_min: int = 120, gpus_per_job: int = 0,
                   cpus_per_job: int = 4, mem_gb: int = 16, array_parallelism: int = 8, name: str = "trm-sweep"):
    """A submitit executor for the units, or (``name="trm-sources"``) for the sweep's source training
    (``cluster="local"`` gives submitit's LocalExecutor, for tests only: it starts every job at once)."""
    try:
        import submitit  # optional: only a SLURM sweep needs it
    except ImportError:
        raise SweepError("the slurm executor needs submitit: pip install submitit (it is in environment.yml)") from None
    if cluster is None and shutil.which("sbatch") is None:
        raise SweepError("the slurm executor needs SLURM's sbatch on PATH (run on the cluster's login node), "
                         "or use --executor local")
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    ex.update_parameters(timeout_min=int(time_min), cpus_per_task=int(cpus_per_job), mem_gb=int(mem_gb),
                         gpus_per_node=int(gpus_per_job), name=name)
    if ex.cluster == "slurm":
        ex.update_parameters(slurm_array_parallelism=int(array_parallelism),
                             **({"slurm_partition": partition} if partition else {}))
    return ex


def run_submitit(specs: list, executor, progress: bool = True, log=print) -> list:
    """Submit one job per unit (a SLURM job array) and wait; results are read from the unit files."""
    if not specs:
        return []
    jobs = executor.map_array(UnitJob(), specs)
    if log:
        log(f"submitted {len(jobs)} jobs ({jobs[0].job_id.split('_')[0]}); logs under {executor.folder}")
    bar = tqdm(total=len(jobs), desc="units", unit="unit", disable=not progress)
    results = []
    for spec, job in zip(specs, jobs):
        try:
            results.append(job.result())
        except Exception as err:  # the job itself died (not a unit failure, which run_unit records)
            results.append({"uid": spec["uid"], "status": "failed", "seconds": 0.0, "error": _one_line(err)})
        _log_result(results[-1], log)
        bar.update()
    bar.close()
    return results
