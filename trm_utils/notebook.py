"""What every notebook does first: resolve parameters, pick the device, make the data, and
save figures and tables into the run's output folder (so headless runs leave results)."""
from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from . import experiments as E
from . import tables as TB
from . import presets as P
from .utils import atomic_write_bytes, atomic_write_json, get_device, resolve_path, seed_everything


def in_colab() -> bool:
    return "google.colab" in sys.modules


@dataclass
class Context:
    """The derived values of a notebook's parameters."""

    cfg: dict
    device: object
    out_dir: Path
    data: dict
    seeds: list
    show_progress: bool
    preset: str
    retrain_sources: bool = False
    saved: list = field(default_factory=list)

    def source(self, name: str, root, task: str, cache_dir=None, quiet: bool = False, sources_dir=None):
        """The source U-Net for ``task`` (``experiments.source_model``): the carried one where its
        identity matches, else trained here (always, with ``retrain_sources=True``); prints the one
        line that says which and why; ``sources_dir``: a sweep's own carried sources, and nothing else
        (``experiments.source_model``'s ``sources_only``). Returns ``(model, info)``."""
        model, info = E.source_model(name, root, task, self.cfg, device=self.device, cache_dir=cache_dir,
                                     show_progress=self.show_progress, retrain=self.retrain_sources,
                                     sources_dir=sources_dir, sources_only=sources_dir is not None)
        if not quiet:
            print(f"source {task}: {info['status']}: {info['reason']}")
        return model, info

    def families(self, tissue_sources=None, tissue_targets=None, tumour_sources=None, tumour_targets=None,
                 all_targets: bool = False) -> dict:
        """{family: (dataset name, root, sources, targets)} from the notebooks' task-list
        parameters (None: the preset's grid; ``all_targets``: every task as a target)."""
        lists = {"tissue": (tissue_sources, tissue_targets), "tumour": (tumour_sources, tumour_targets)}
        return {fam: (name, root, *P.family_tasks(name, self.preset, *lists[fam], all_targets=all_targets))
                for fam, (name, root) in self.data.items()}

    def save_fig(self, fig, name: str, dpi: int = 110) -> Path:
        """Save ``fig`` as PNG in the output folder (written atomically)."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        path = atomic_write_bytes(self.out_dir / f"{name}.png", buf.getvalue())
        self.saved.append(path.name)
        return path

    def save_table(self, df: pd.DataFrame, name: str, index: bool = False) -> Path:
        path = TB.write_csv(df.reset_index() if index else df, self.out_dir / f"{name}.csv")
        self.saved.append(path.name)
        return path

    def save_json(self, obj, name: str) -> Path:
        path = atomic_write_json(self.out_dir / f"{name}.json", obj)
        self.saved.append(path.name)
        return path


def setup(dataset="phantom", data_dir="data", output_dir="runs/notebook", preset="tutorial", seeds=(0,),
          device="auto", iterations=None, show_progress=True, seed=0, need_data=True, retrain_sources=False,
          **overrides) -> Context:
    """Check the parameters, seed everything, make (or find) the data, create ``output_dir``.

    ``need_data=False`` skips the data (notebook 01 makes its own toy problem). ``retrain_sources``:
    train the source models here instead of loading the carried ones (``Context.source``)."""
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed, e.g. seeds = [0]")
    cfg = P.get_preset(preset, iterations=iterations, **overrides)
    dev = get_device(device)
    seed_everything(int(seed))
    out = resolve_path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = E.resolve_datasets(dataset, data_dir, preset, seed=0) if need_data else {}
    plt.rcParams.update({"figure.dpi": 90, "image.interpolation": "nearest"})
    its = cfg["iterations"]
    if isinstance(its, dict):  # a per-dataset budget: the datasets this notebook uses
        names = [name for name, _ in data.values()] or list(its)
        its = ", ".join(f"{n} {its[n]}" for n in names if n in its)
    print(f"device: {dev} | preset: {preset} | fine-tuning iterations: {its} | seeds: {list(seeds)}")
    for fam, (name, root) in data.items():
        print(f"{fam} data: {name} under {root}")
    print(f"outputs: {out}")
    if retrain_sources:
        print("retrain_sources=True: the source models are trained here (or taken from this checkout's cache), "
              "not loaded from results/sources/")
    return Context(cfg, dev, out, data, [int(s) for s in seeds], bool(show_progress), preset, bool(retrain_sources))
