"""Sweeps: expansion, hashing, refusal of bad input, the local runner killed and resumed,
the submitit path (submitit's LocalExecutor), and the report on a smoke sweep."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trm_utils import experiments as E
from trm_utils import tables as TB
from trm_utils import presets as P
from trm_utils import report as R
from trm_utils import sweep as S
from trm_utils import units as U
from trm_utils.utils import REPO_ROOT


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    # source models of the smoke units go to a temporary cache (the kernels inherit the variable)
    old = os.environ.get("TRM_CACHE_DIR")
    os.environ["TRM_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("TRM_CACHE_DIR", None)
    else:
        os.environ["TRM_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    # the smoke phantom, generated once for this module (no network, seconds)
    d = tmp_path_factory.mktemp("sweepdata")
    return S.Settings(dataset="phantom", data_dir=str(d), preset="smoke", seeds=[0, 1])


@pytest.fixture(scope="module")
def fams(settings):
    return S.families_of(settings)


def test_expand_full_grids(settings, fams):
    t1 = S.expand("table1", settings, fams)
    t2 = S.expand("table2", settings, fams)
    t3 = S.expand("table3", settings, fams)
    assert len(t1) == 30 and len(t2) == 30  # every source on every other target (6 x 5)
    assert all(u.source != u.target for u in t1 + t2)
    assert {u.name for u in t1} == {"iseg2019"} and {u.name for u in t2} == {"fets2021"}
    # Table III: one source, the five other tissue tasks, at every few-shot size
    assert {u.source for u in t3} == {"CSF-T1"} and len({u.target for u in t3}) == 5
    assert sorted({u.n_slices for u in t3}) == sorted(S.FEWSHOT_SIZES["smoke"])
    assert all(u.methods == (*P.CORE_METHODS, "trm@map=image") and u.seeds == (0, 1) for u in t1 + t2)
    assert all(u.methods == ("vanilla", "trm", "trm@map=image") for u in t3)
    ab = S.expand("ablations", settings, fams)
    assert "trm@base=2" in ab[0].methods and any(m.startswith("trm@refresh=") for m in ab[0].methods)
    assert len({u.uid for u in t1 + t2 + t3 + ab}) == len(t1 + t2 + t3 + ab)


def test_expand_filters_and_refusals(settings, fams):
    units = S.expand("table1", settings, fams, sources=["WM-T1"], targets=["GM-T1", "GM-T2"])
    assert [(u.source, u.target) for u in units] == [("WM-T1", "GM-T1"), ("WM-T1", "GM-T2")]
    with pytest.raises(S.SweepError, match="no cell left after filtering"):
        S.expand("table1", settings, fams, sources=["GM-T1"], targets=["GM-T1"])
    with pytest.raises(S.SweepError, match="unknown study 'table9'.*table1, table2, table3, ablations"):
        S.expand("table9", settings, fams)
    with pytest.raises(S.SweepError, match="unknown source task.*CSF-T1"):
        S.expand("table1", settings, fams, sources=["XX-T1"])
    with pytest.raises(S.SweepError, match="unknown method 'vanila'"):
        S.expand("table1", settings, fams, methods=["vanila"])
    with pytest.raises(S.SweepError, match="study table2 needs tumour data"):
        S.expand("table2", settings, {"tissue": fams["tissue"]})


def test_unit_hash_covers_what_decides_the_numbers(settings, fams):
    u = S.expand("table1", settings, fams, sources=["WM-T1"], targets=["GM-T1"])[0]
    cfg, sig, code = settings.cfg(), S.data_signature(fams), S.code_version()
    h = S.unit_hash(u, cfg, sig, code)
    assert h == S.unit_hash(u, dict(cfg), dict(sig), code)  # deterministic
    assert h != S.unit_hash(u, {**cfg, "iterations": cfg["iterations"] + 1}, sig, code)
    assert h != S.unit_hash(u, cfg, {**sig, "iseg2019": "other"}, code)
    assert h != S.unit_hash(u, cfg, sig, "0" * 12)
    u2 = S.Unit(**{**u.__dict__, "seeds": (0, 1, 2)})
    assert h != S.unit_hash(u2, cfg, sig, code)


def test_data_signature_names_the_content_not_the_place_or_time(tmp_path, settings, fams):
    """The same bytes elsewhere, written later, sign the same (a phantom regenerated in a new checkout
    resumes the sweep); one changed byte or one file more does not. Files are hashed once (memo)."""
    memo = tmp_path / "memo"
    here = S.data_signature(fams, memo)
    assert set(here) == {"iseg2019", "fets2021"} and (memo / "file_hashes.json").exists()
    n_memo = len(json.loads((memo / "file_hashes.json").read_text()))
    assert S.data_signature(fams, memo) == here and len(json.loads((memo / "file_hashes.json").read_text())) == n_memo
    src = Path(fams["tissue"][1])
    copy = tmp_path / "elsewhere"
    shutil.copytree(src, copy)  # new path, new file times
    time.sleep(0.01)
    from trm_utils import data as D

    folder = Path(D.open_dataset("iseg2019", copy).folder)
    for f in folder.iterdir():
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    moved = {"tissue": ("iseg2019", str(copy))}
    assert S.data_signature(moved, memo)["iseg2019"] == here["iseg2019"]
    files = D.dataset_files(D.open_dataset("iseg2019", copy))
    assert any(f.suffix == ".hdr" for f in files) and any(f.suffix == ".img" for f in files)  # both halves of a pair
    img = next(f for f in files if f.suffix == ".img")
    b = bytearray(img.read_bytes())
    b[len(b) // 2] ^= 1
    img.write_bytes(bytes(b))
    changed = S.data_signature(moved, memo)["iseg2019"]
    assert changed != here["iseg2019"]
    (folder / "notes.csv").write_text("a,b\n")  # a top-level file (FeTS keeps its partitions there)
    assert S.data_signature(moved, memo)["iseg2019"] != changed
    fets = D.dataset_files(D.open_dataset("fets2021", fams["tumour"][1]))
    assert {"partitioning_1.csv", "partitioning_2.csv"} <= {f.name for f in fets}


def test_rekey_carries_format_1_units_over_and_leaves_the_rest(tmp_path, settings, fams):
    """A folder from before hash format 2: its finished units are renamed to their new hash when
    they ran exactly what the unit runs now; a unit that ran something else stays unfinished."""
    out = tmp_path / "sw"
    _, _, rows = S.plan(["table1"], settings, out, targets=["GM-T1"], budget_check=False)
    S.open_sweep(out, settings, ["table1"], S.planned_of(rows))
    old_dirs = []
    for i, (u, spec, _) in enumerate(rows[:3]):
        d = out / "units" / f"{u.uid}-{i:010d}"
        d.mkdir(parents=True)
        params = U.unit_parameters({**spec, "dir": str(d)})
        if i == 2:  # ran another learning rate: not this unit
            params["overrides"]["lr"] *= 2
        (d / "result.csv").write_text("method,seed,dice\nvanilla,0,0.5\n")
        (d / "unit.json").write_text(json.dumps({"uid": u.uid, "hash": f"{i:010d}", "status": "done", "unit": spec["unit"],
                                                 "settings": spec["settings"], "parameters": params}))
        old_dirs.append(d)
    logged = []
    counts = S.rekey(out, log=logged.append)
    assert counts == {"rekeyed": 2, "already": 0, "mismatched": 1}
    assert "none ran what the unit runs now" in logged[0] and rows[2][0].uid in logged[0]
    _, _, again = S.plan(["table1"], settings, out, targets=["GM-T1"], budget_check=False)
    assert [st for *_, st in again] == ["done", "done"] + ["todo"] * (len(again) - 2)
    rec = json.loads((Path(again[0][1]["dir"]) / "unit.json").read_text())
    assert rec["hash"] == again[0][1]["hash"] and rec["hash_format"] == S.HASH_FORMAT
    assert rec["rekeyed"]["from_hash"] == "0000000000" and rec["parameters"]["output_dir"] == again[0][1]["dir"]
    assert rec["data_signature"] == S.data_signature(fams)["iseg2019"]
    assert not old_dirs[0].exists() and old_dirs[2].exists()  # the mismatched folder is left as it was
    assert S.rekey(out, log=logged.append) == {"rekeyed": 0, "already": 2, "mismatched": 1}  # idempotent
    with pytest.raises(S.SweepError, match="no sweep.json"):
        S.rekey(tmp_path / "nothing")


def test_budget_check_sample_is_fixed_by_rule_and_doubles_the_budget(settings, fams):
    t1 = S.expand("table1", settings, fams)
    chk = S.check_sample("table1", t1)
    first = t1[0].target
    assert len(chk) == 5 and {u.target for u in chk} == {first} and {u.factor for u in chk} == {S.CHECK_FACTOR}
    assert [(u.source, u.target) for u in chk] == [(u.source, u.target) for u in t1 if u.target == first]
    assert all(u.uid.endswith(f"-x{S.CHECK_FACTOR}") for u in chk) and not any(u.uid.endswith("-x2") for u in t1)
    t3 = S.expand("table3", settings, fams)
    c3 = S.check_sample("table3", t3)  # two targets, every size: at least 4 cells
    assert len({u.target for u in c3}) == 2 and len(c3) == 2 * len(S.FEWSHOT_SIZES["smoke"]) >= 4
    assert S.check_sample("ablations", S.expand("ablations", settings, fams)) == []
    # the same schedule shape at 2T: budgets and evaluation interval doubled, the rest kept
    cfg = P.get_preset("tutorial")
    c2 = P.scale_budget(cfg, 2)
    assert c2["iterations"] == {k: 2 * v for k, v in cfg["iterations"].items()}
    assert c2["eval_every"] == {k: 2 * v for k, v in cfg["eval_every"].items()}
    assert c2["fewshot"] == {"iterations": 2 * cfg["fewshot"]["iterations"], "eval_every": 2 * cfg["fewshot"]["eval_every"]}
    assert {k: v for k, v in c2.items() if k not in ("iterations", "eval_every", "fewshot")} == \
        {k: v for k, v in cfg.items() if k not in ("iterations", "eval_every", "fewshot")}
    assert P.scale_budget(cfg, 1) is cfg and cfg["iterations"]["iseg2019"] == 600  # never modified in place
    # a table's own unit hashes as it did before the check existed (finished units stay finished)
    import hashlib
    from dataclasses import asdict

    u = t1[0]
    sig, code = S.data_signature(fams), S.code_version()
    old = {k: v for k, v in asdict(u).items() if k != "factor"}
    key = json.dumps({"unit": old, "cfg": cfg, "data": sig.get(u.name), "code": code, "format": S.HASH_FORMAT},
                     sort_keys=True, default=str)
    assert S.unit_hash(u, cfg, sig, code) == hashlib.sha1(key.encode()).hexdigest()[:10]
    assert S.unit_hash(chk[0], cfg, sig, code) != S.unit_hash(u, cfg, sig, code)


def test_dry_run_lists_the_budget_search(tmp_path, settings, capsys):
    args = ["run", "--study", "table1", "--dataset", "phantom", "--data-dir", settings.data_dir, "--preset", "smoke",
            "--seeds", "2", "--targets", "GM-T1", "--out", str(tmp_path / "sw"), "--threads", "1", "--dry-run"]
    assert S.main(args) == 0
    out = capsys.readouterr().out
    assert "table1     1x (5 sample units" in out and "table 5 units" in out and "table1     2x (5 sample units" in out
    assert "accepted at 1x" in out and "unit-hours" in out and " 4x " not in out
    assert S.main(args + ["--max-factor", "4"]) == 0  # the search's candidates 1, 2, 4 and the last check at 8
    out = capsys.readouterr().out
    assert all(f"table1    {k:>2}x (5 sample units" in out for k in (1, 2, 4, 8)) and "none accepted up to 4x" in out
    assert S.main(args + ["--no-budget-check"]) == 0
    assert "table1     1x (0 sample units" in capsys.readouterr().out
    assert not (tmp_path / "sw").exists()  # a dry run writes nothing
    assert S.main(args + ["--max-factor", "0"]) == 2


def _fake_runs(cells, methods, seeds, dice, iterations, curve_step=None):
    """Result rows as result.csv has them; ``dice(cell, method, seed)`` gives each run's final Dice."""
    rows = []
    for i, (src, tgt) in enumerate(cells):
        for m in methods:
            for sd in seeds:
                d = dice(i, m, sd)
                step = curve_step or iterations // 4
                curve = [[it, d] for it in range(step, iterations + 1, step)]
                rows.append({"study": "table1", "dataset": "iseg2019", "source": src, "target": tgt, "n_slices": np.nan,
                             "method": m, "seed": sd, "dice": d, "iterations": iterations, "curve": json.dumps(curve)})
    return pd.DataFrame(rows)


def test_report_budget_check_verdicts():
    cells = [(f"S{i}", "T0") for i in range(4)]
    others = [(f"S{i}", "T1") for i in range(4)]
    base = lambda i, m, sd: 0.6 + 0.01 * i + (0.02 if m == "trm" else 0.0) + 0.001 * sd  # noqa: E731
    runs = pd.concat([_fake_runs(cells + others, ["vanilla", "trm"], [0, 1, 2], base, 600)], ignore_index=True)
    ok = _fake_runs(cells, ["vanilla", "trm"], [0, 1, 2], lambda i, m, sd: base(i, m, sd) + 0.005, 1200)
    chk = R.budget_check(runs, ok, planned=[f"u{i}" for i in range(4)])
    assert chk["cells"] == 4 and chk["complete"] and chk["accepted"]  # the T side is the sample's cells only
    assert chk["table"].dice_mean_T.round(6).tolist() == pytest.approx([0.616, 0.636])
    assert R.check_label(chk).startswith("budget checked (4 cells, 600 vs 1200 iterations")
    moved = _fake_runs(cells, ["vanilla", "trm"], [0, 1, 2],
                       lambda i, m, sd: base(i, m, sd) + (0.03 if m == "trm" else 0.0), 1200)
    bad = R.budget_check(runs, moved, planned=[f"u{i}" for i in range(4)])
    assert not bad["accepted"] and R.check_label(bad).startswith("EARLY-BUDGET (budget check NOT passed on 4 cells")
    assert "largest change of a table method's mean Dice +0.0300 (rule v2: at most +0.01)" in R.check_label(bad)
    fell = _fake_runs(cells, ["vanilla", "trm"], [0, 1, 2], lambda i, m, sd: base(i, m, sd) - 0.03, 1200)
    over = R.budget_check(runs, fell, planned=[f"u{i}" for i in range(4)])  # rule v2: a fall is drift, accepted
    assert over["accepted"] and "largest fall -0.0300 (overfitting: drift, not a failure)" in R.check_label(over)
    part = R.budget_check(runs, ok[ok.source != "S3"], planned=[f"u{i}" for i in range(4)])
    assert part["cells"] == 3 and not part["accepted"] and "incomplete: 3 of 4 cells" in R.check_label(part)
    assert R.budget_check(runs, None) is None and R.check_label(None).startswith("EARLY-BUDGET (unchecked")
    none_yet = R.budget_check(runs, ok.iloc[:0], planned=["u0", "u1"])  # planned, nothing finished
    assert not none_yet["accepted"] and "not run yet: 0 of 2" in R.check_label(none_yet)


def test_provenance_names_retrained_sources_and_the_check_leaves_them_out():
    """A source retrained between units (a sweep resumed without its source cache, on another
    CPU) is flagged by its held-out Dice; a budget-check cell whose 2T unit had another model of
    its source is left out of the check (unlike with unlike), which is then incomplete."""
    cells = [(f"S{i}", "T0") for i in range(4)]
    base = lambda i, m, sd: 0.6 + 0.01 * i + 0.001 * sd  # noqa: E731
    runs = _fake_runs(cells, ["vanilla", "trm"], [0, 1, 2], base, 600)
    chk = _fake_runs(cells, ["vanilla", "trm"], [0, 1, 2], base, 1200)
    for df, tag in ((runs, ""), (chk, "-x2")):
        df["source_dice"] = df.source.map(lambda src: 0.80 + int(src[1:]) / 100)
        df["uid"] = "table1-iseg2019-" + df.source + "-to-" + df.target + tag
    chk.loc[chk.source == "S2", "source_dice"] = 0.8123  # S2 retrained for its 2T unit
    c = R.budget_check(runs, chk, planned=[f"u{i}" for i in range(4)])
    assert c["cells"] == 3 and c["unlike"] == ["S2 -> T0"] and not c["complete"] and not c["accepted"]
    assert "1 left out, their 2T run had another model of its source: S2 -> T0" in R.check_label(c)
    units = pd.DataFrame({"uid": sorted(set(runs.uid) | set(chk.uid)), "status": "done"})
    units["cpu"] = ["CPU A"] * 6 + [None] * 2
    prov = R.provenance(pd.concat([runs, chk], ignore_index=True), units)
    assert prov["machines"] == {"CPU A": 6, "unknown": 2}
    src = prov["sources"]
    assert src.source.tolist() == ["S2"] and src.models.tolist() == [2]
    assert "table1-iseg2019-S2-to-T0-x2" in src.units.iloc[0] and "0.8123" in src.source_dice.iloc[0]
    same = R.budget_check(runs, chk[chk.source != "S2"], planned=["u0", "u1", "u2"])
    assert same["unlike"] == [] and same["complete"]


def test_gain_by_iteration_reads_the_stored_curves():
    rows = []
    for m, (early, late) in {"vanilla": (0.4, 0.6), "trm": (0.5, 0.6)}.items():
        for sd in (0, 1):  # trm learns faster, both end at 0.6: a gain of learning speed only
            curve = [[100, early - 0.1], [200, early], [300, late], [400, late]]
            rows.append({"method": m, "seed": sd, "dice": late, "iterations": 400, "curve": json.dumps(curve),
                         "source": "S", "target": "T", "dataset": "iseg2019"})
    g = R.gain_by_iteration(pd.DataFrame(rows)).set_index(["method", "iteration"])
    assert sorted({i for _, i in g.index}) == [100, 200, 300, 400]  # from a quarter of the budget
    assert g.loc[("trm", 200), "gain_pct"] == pytest.approx(25.0) and g.loc[("trm", 400), "gain_pct"] == pytest.approx(0.0)
    assert g.loc[("vanilla", 300), "dice_mean"] == pytest.approx(0.6)
    paper = pd.DataFrame({"paper_gain_pct": [0.0, 1.8]}, index=pd.Index(["vanilla", "trm"], name="method"))
    fig = R.gain_by_iteration_figure({"table1_iseg2019": {"gain_by_iteration": g.reset_index(), "gains": paper}})
    assert [ln.get_label() for ln in fig.axes[0].get_lines()][0] == "trm"


def test_budget_search_and_the_sweeps_own_sources(tmp_path, settings, capsys):
    """A sweep prepares its sources once (trained at T_s and 2 T_s, judged by rule 1, carried in
    OUT/sources) and every unit loads them; the budget search runs the table's sample at 1x and 2x,
    then (not accepted) at 4x, decides by rule v2 alone, runs the table at the budget found, and the
    report shows the search, the ladder, the check at that budget and the sources."""
    out = tmp_path / "sw"
    args = ["run", "--study", "table1", "--dataset", "phantom", "--data-dir", settings.data_dir, "--preset", "smoke",
            "--seeds", "2", "--targets", "GM-T1", "--sources", "WM-T1,CSF-T1", "--out", str(out), "--threads", "1",
            "--iterations", "4", "--no-progress", "--max-factor", "2"]
    assert S.main(args) == 0
    meta = json.loads((out / "sweep.json").read_text())
    info = meta["budgets"]["table1"]
    first = info["checks"][0]
    assert (first["factor"], first["iterations_T"], first["iterations_2T"], first["cells"]) == (1, 4, 8, 2)
    if first["accepted"]:
        assert info["table_factor"] == 1 and len(info["checks"]) == 1 and info["accepted"]
    else:
        assert len(info["checks"]) == 2 and info["checks"][1]["iterations_2T"] == 16 and info["table_factor"] == 2
    k = info["table_factor"]
    units = {json.loads(f.read_text())["uid"]: json.loads(f.read_text()) for f in out.glob("units/*/unit.json")}
    assert all(u["status"] == "done" for u in units.values())
    assert {u["parameters"]["iterations"] for u in units.values()} == ({4, 8} if k == 1 else {4, 8, 16})
    assert len(meta["planned"]["table1"]) == 2 and all(R._uid_factor(u) == k for u in meta["planned"]["table1"])
    assert all(R._uid_factor(u) != k for u in meta["budget_check"]["table1"])
    # one model per source, carried in OUT/sources with its rule-1 check; every unit and run names it
    from trm_utils import sources as SRC

    recs = {r["identity"]["task"]: r for r in SRC.carried_records(out / "sources")}
    assert set(recs) == {"WM-T1", "CSF-T1"} and all("source_check" in r for r in recs.values())
    chk = pd.read_csv(out / "sources" / "source_checks.csv")
    assert set(chk.source) == {"WM-T1", "CSF-T1"} and {"dice_T", "dice_2T", "ok"} <= set(chk.columns)
    runs = pd.concat([pd.read_csv(f) for f in out.glob("units/*/result.csv")])
    assert set(runs.source_origin) == {"carried"} and runs.risk_share_5.between(0, 1).all()
    for src, g in runs.groupby("source"):
        assert set(g.source_sha256) == {recs[src]["sha256"]}
    assert {u["source_sha256"] for u in units.values()} == {r["sha256"] for r in recs.values()}
    # the report: the table at the budget found, its check at 2x it, the search, the ladder and the sources
    rep = R.build_report(out, n_boot=100)
    s = rep["studies"]["table1_iseg2019"]
    assert s["table_factor"] == k and set(rep["runs"].factor) == {k} and set(rep["check_runs"].factor) == {2 * k}
    assert s["budget_check"]["cells"] == 2 and s["budget_check"]["complete"] and s["label"] in R.headline(rep)[0]
    assert set(s["ladder"].factor) == {1, 2} | ({4} if k == 2 else set())
    car = rep["provenance"]["carried"]
    assert len(car) == 2 and car.one_model.all() and (car.units > 0).all()
    R.write_report(out, n_boot=100)
    text = (out / "report" / "report.md").read_text()
    assert "## Source models" in text and "one model throughout: **yes**" in text and "### The budget search" in text
    assert f"table1 2 of 2; budget check: table1 {len(meta['budget_check']['table1'])} of" in text
    for f in ("table1_iseg2019_budget_check.csv", "table1_iseg2019_budget_ladder.csv", "budget_ladder.png", "sources.csv"):
        assert (out / "report" / f).exists(), f
    # run again: nothing to do, no source trained again
    capsys.readouterr()
    stamps = {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file() and "report" not in f.parts}
    assert S.main(args) == 0
    printed = capsys.readouterr().out
    assert "WM-T1 (sweep," in printed and "to run" not in printed
    assert all(stamps[f] == f.stat().st_mtime_ns for f in stamps if f.name != "sweep.json")


def test_unit_hash_binds_the_source_model(settings, fams):
    u = S.expand("table1", settings, fams, sources=["WM-T1"], targets=["GM-T1"])[0]
    cfg, sig, code = settings.cfg(), S.data_signature(fams), S.code_version()
    plain = S.unit_hash(u, cfg, sig, code)
    assert S.unit_hash(u, cfg, sig, code, None) == plain  # a sweep without carried sources: as before
    a, b = S.unit_hash(u, cfg, sig, code, "a" * 64), S.unit_hash(u, cfg, sig, code, "b" * 64)
    assert len({plain, a, b}) == 3


def test_a_sweeps_sources_folder_holding_another_model_is_refused(tmp_path, settings, fams):
    """OUT/sources with a model of another identity (the preset's source settings changed) is never
    replaced behind the finished units' back."""
    import torch

    from trm_utils import sources as SRC

    out = S.open_sweep(tmp_path / "sw", settings, ["table1"])
    units = S.expand("table1", settings, fams, sources=["WM-T1"], targets=["GM-T1"])
    root = fams["tissue"][1]
    other = SRC.source_identity("iseg2019", root, "WM-T1", {**settings.cfg(), "source_iterations": 1})
    state = {"state_dict": {"w": torch.zeros(1)}, "history": {}, "provenance": {}}
    SRC.write_carried(state, other, 0.1, S.sources_dir(out))
    with pytest.raises(S.SweepError, match="is another model .*training.iterations.*give a new --out"):
        S.source_records(out, units, fams, settings.cfg())


def test_open_sweep_refuses_to_mix(tmp_path, settings):
    out = S.open_sweep(tmp_path / "sw", settings, ["table1"])
    S.open_sweep(out, settings, ["table3"])  # same settings, another study: fine
    assert json.loads((out / "sweep.json").read_text())["studies"] == ["table1", "table3"]
    other = S.Settings(**{**settings.__dict__, "seeds": [0, 1, 2]})
    with pytest.raises(S.SweepError, match=r"different settings \(seeds: folder has \[0, 1\], asked \[0, 1, 2\]\).*new --out"):
        S.open_sweep(out, other, ["table1"])
    (tmp_path / "notasweep").mkdir()
    (tmp_path / "notasweep" / "x.txt").write_text("mine")
    with pytest.raises(S.SweepError, match="not a sweep folder"):
        S.open_sweep(tmp_path / "notasweep", settings, ["table1"])


def test_cli_bad_input(tmp_path, capsys):
    assert S.main(["run", "--study", "table9", "--dry-run"]) == 2
    assert "unknown study 'table9'" in capsys.readouterr().err
    assert S.main(["run", "--study", "table1", "--dataset", "brats", "--dry-run"]) == 2
    assert "unknown dataset 'brats'; choose one of phantom, iseg2019, fets2021, msd" in capsys.readouterr().err
    assert S.main(["run", "--study", "table1", "--preset", "huge", "--dry-run"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    assert S.main(["run", "--study", "table1", "--dataset", "iseg2019", "--data-dir", str(tmp_path / "none"),
                   "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "data_download.sh" in err
    assert S.main(["run", "--study", "table1", "--executor", "cloud", "--dry-run"]) == 2
    assert "unknown executor 'cloud'" in capsys.readouterr().err


def test_slurm_executor_needs_sbatch_and_submitit(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    with pytest.raises(S.SweepError, match="needs SLURM's sbatch"):
        U.slurm_executor(tmp_path / "slurm")
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    with pytest.raises(S.SweepError, match="needs submitit: pip install submitit"):
        U.slurm_executor(tmp_path / "slurm", cluster="local")


def _specs(out, settings, fams, units):
    cfg, sig, code = settings.cfg(), S.data_signature(fams), S.code_version()
    return [U.unit_spec(out, u, settings, cfg, S.unit_hash(u, cfg, sig, code), device="cpu", num_threads=1,
                        data=sig.get(u.name), code=code) for u in units]


def test_failing_unit_is_recorded_and_the_rest_go_on(tmp_path, settings, fams):
    out = S.open_sweep(tmp_path / "sw", settings, ["table1"])
    good = S.expand("table1", settings, fams, sources=["WM-T1"], targets=["GM-T1"])[0]
    bad = S.Unit(**{**good.__dict__, "target": "XX-T9"})  # a task the data does not have
    res = U.run_local(_specs(out, settings, fams, [bad, good]), progress=False, log=None)
    assert [r["status"] for r in res] == ["failed", "done"]
    rec = json.loads(next((out / "units").glob("*XX-T9*/unit.json")).read_text())
    assert rec["status"] == "failed" and "XX-T9" in rec["error"] and "\n" not in rec["error"]
    assert list((out / "units").glob("*XX-T9*/*.failed.ipynb"))  # the executed notebook, kept for the post-mortem
    runs = pd.read_csv(next((out / "units").glob("*GM-T1*/result.csv")))
    done = json.loads(next((out / "units").glob("*GM-T1*/unit.json")).read_text())
    assert done["hash_format"] == S.HASH_FORMAT and done["data_signature"] == S.data_signature(fams)["iseg2019"]
    assert done["code_version"] == S.code_version() and done["machine"]["cpu"] and done["machine"]["torch"]
    assert len(runs) == len(S.STUDY_METHODS["table1"]) * 2 and set(runs.method) == set(S.STUDY_METHODS["table1"])
    # run again: the finished unit is skipped, the failed one retried (and fails again)
    res = U.run_local(_specs(out, settings, fams, [bad, good]), progress=False, log=None)
    assert [r["status"] for r in res] == ["failed", "skipped"]


def test_local_pool_runs_units_in_parallel_processes(tmp_path, settings, fams):
    out = S.open_sweep(tmp_path / "sw", settings, ["table1"])
    units = S.expand("table1", settings, fams, sources=["WM-T1", "GM-T2"], targets=["GM-T1"])
    res = U.run_local(_specs(out, settings, fams, units), workers=2, progress=False, log=None)
    assert sorted(r["status"] for r in res) == ["done", "done"]
    hosts = {json.loads(f.read_text())["parameters"]["num_threads"] for f in out.glob("units/*/unit.json")}
    assert hosts == {1}


def test_sweep_killed_and_resumed(tmp_path, settings):
    """A sweep killed mid-way keeps its finished units; re-running runs only the rest."""
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "trm_utils.sweep", "run", "--study", "table1", "--dataset", "phantom",
           "--data-dir", settings.data_dir, "--preset", "smoke", "--seeds", "2", "--targets", "GM-T1",
           "--sources", "WM-T1,CSF-T1,GM-T2", "--out", str(out), "--no-progress", "--threads", "1",
           "--iterations", "4", "--no-budget-check"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    t0 = time.time()
    while not any(U.unit_status(d) == "done" for d in (out / "units").glob("*")) and time.time() - t0 < 240:
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: runner and its kernel
    proc.wait()
    dirs = sorted((out / "units").glob("*"))
    done = [d for d in dirs if U.unit_status(d) == "done"]
    assert 1 <= len(done) < 3, "the kill should land mid-sweep"
    stamps = {d.name: (d / "unit.json").stat().st_mtime_ns for d in done}
    assert not list(out.rglob("*.tmp*"))  # nothing half-written under a final name
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"3 units, {len(done)} already done, {3 - len(done)} to run" in r.stdout
    assert set(pd.read_csv(next(out.glob("units/*/result.csv"))).iterations) == {4}  # --iterations reached the runs
    assert all(U.unit_status(d) == "done" for d in (out / "units").glob("*")) and len(list((out / "units").glob("*"))) == 3
    assert {d.name: (d / "unit.json").stat().st_mtime_ns for d in done} == stamps  # finished units untouched
    # and the report of the resumed sweep
    files = R.write_report(out, n_boot=200)
    assert (out / "report" / "report.md").exists() and any(f.name.endswith("_heatmap.png") for f in files)
    grid = pd.read_csv(out / "report" / "table1_iseg2019_grid.csv")
    assert {"vanilla", "trm", "vanilla_std", "paper_trm"} <= set(grid.columns)
    assert (grid.source == "average").sum() == 1 and len(grid) == 4
    # the paper's numbers sit beside ours for the same cell
    paper = TB.paper_table("iseg2019")
    want = paper[(paper.target == "GM-T1") & (paper.source == "WM-T1") & (paper.method == "ours")].dice.item()
    assert grid[(grid.target == "GM-T1") & (grid.source == "WM-T1")].paper_trm.item() == pytest.approx(want)
    # export: the result files only, which report reads like the original
    assert S.main(["export", str(out), str(tmp_path / "shared")]) == 0
    assert not list((tmp_path / "shared").rglob("*.ipynb"))
    # with the sweep's source models, byte for byte: a resume from the copy uses the same ones
    mine = {f.name: f.read_bytes() for f in (out / "sources").glob("*") if f.is_file()}
    assert mine and {f.name: f.read_bytes() for f in (tmp_path / "shared" / "sources").glob("*")} == mine
    R.write_report(tmp_path / "shared", n_boot=200)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "shared" / "report" / "table1_iseg2019_grid.csv"), grid)
    # exporting again brings the copy up to date: nothing new here, so nothing copied and nothing changed
    stamps = {f: f.stat().st_mtime_ns for f in (tmp_path / "shared" / "units").rglob("*")}
    assert S.export(out, tmp_path / "shared") == 0
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "shared" / "units").rglob("*")} == stamps
    newest = sorted((tmp_path / "shared" / "units").glob("*"))[-1]
    shutil.rmtree(newest)  # a unit that finished after the first export
    assert S.export(out, tmp_path / "shared") == 1 and U.unit_status(newest) == "done"
    other = tmp_path / "other"  # never into a folder of something else
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert S.main(["export", str(out), str(other)]) == 2 and (other / "notes.txt").read_text() == "mine"


def test_submitit_local_executor(tmp_path, settings, fams):
    pytest.importorskip("submitit")
    out = S.open_sweep(tmp_path / "sw", settings, ["table3"])
    units = S.expand("table3", settings, fams, targets=["WM-T1"], sizes=[6])
    ex = U.slurm_executor(out / "slurm", cluster="local", time_min=10, cpus_per_job=1)
    res = U.run_submitit(_specs(out, settings, fams, units), ex, progress=False, log=None)
    assert [r["status"] for r in res] == ["done"]
    runs = pd.read_csv(next((out / "units").glob("*/result.csv")))
    # few-shot: each seed drew its own subset of 6 slices, recorded
    assert set(runs.n_slices) == {6} and set(runs.subset_seed) == {0, 1} and set(runs.n_train_slices) == {6}
    assert not list((out / "units").glob("*/*.pkl"))  # results are files, not pickles


def test_sources_trained_in_a_job_of_their_own(tmp_path, settings, fams, monkeypatch):
    """A SLURM sweep trains its missing sources in one submitted job (the login node trains
    nothing) and waits; with nothing left to train it submits no job; the dry run counts the
    source training still to do (T_s and 2 T_s) and none once the sweep carries the source."""
    pytest.importorskip("submitit")
    monkeypatch.setenv("TRM_CACHE_DIR", str(tmp_path / "cache"))  # nothing cached: the job must train
    out = S.open_sweep(tmp_path / "sw", settings, ["table1"])
    units = S.expand("table1", settings, fams, sources=["GM-T2"], targets=["WM-T1"])
    cfg = settings.cfg()
    t_s = P.source_iterations(cfg, "iseg2019")
    assert S.source_iterations_to_train(units[0], fams, cfg, out) == 3 * t_s
    assert S.plan_sources(out, units, fams, cfg)["train"] == {("tissue", "iseg2019", fams["tissue"][1]): ["GM-T2"]}
    ex = U.slurm_executor(out / "slurm", cluster="local", time_min=10, cpus_per_job=1, name="trm-sources")
    lines = []
    tab = S.prepare_sources_in_job(ex, out, settings, units, fams, device="cpu", log=lines.append)
    assert "in job" in lines[0] and "GM-T2" in lines[0]
    jobs = {p.name for p in (out / "slurm").glob("*_log.out")}
    assert len(jobs) == 1  # the training ran in the job: its log names the source check
    assert "source check of iseg2019 GM-T2" in next((out / "slurm").glob("*_log.out")).read_text()
    assert list(tab.source) == ["GM-T2"] and tab.accepted.notna().all()
    from trm_utils import sources as SRC

    rec = SRC.read_record("iseg2019", "GM-T2", out / "sources")
    assert rec is not None and "source_check" in rec
    assert S.source_iterations_to_train(units[0], fams, cfg, out) == 0
    # nothing left to train: no second job
    S.prepare_sources_in_job(ex, out, settings, units, fams, device="cpu", log=None)
    assert {p.name for p in (out / "slurm").glob("*_log.out")} == jobs


def test_a_source_rule_1_does_not_accept_is_searched_by_doubling(tmp_path, settings, fams, monkeypatch):
    """A source rule 1 rejects at T_s is checked again at 2 T_s vs 4 T_s (the tables' budget search,
    applied to the source) and carried at the budget the search ends on; its units then fine-tune
    from that model: their cfg names its budget (and so their hash), the other sources' units hash
    as before, and a unit runs with it. With the default (max factor 1) it stays at T_s, labelled."""
    real = S.check_sources
    steps = []

    def reject_t_s(*a, start=1, **kw):  # rule 1 rejects the first step, whatever the numbers
        steps.append(start)
        chk = real(*a, start=start, **kw)
        return chk.assign(ok=False) if start == 1 else chk

    monkeypatch.setattr(S, "check_sources", reject_t_s)
    cfg = settings.cfg()
    t_s = P.source_iterations(cfg, "iseg2019")
    units = S.expand("table1", settings, fams, sources=["GM-T2"], targets=["WM-T1"])
    other = S.expand("table1", settings, fams, sources=["WM-T2"], targets=["WM-T1"])
    lines = []
    out = S.open_sweep(tmp_path / "sw", settings, ["table1"])
    tab = S.prepare_sources(out, settings, units, fams, device="cpu", log=lines.append, max_factor=2)
    assert steps == [1, 2]
    assert any(f"not accepted by rule 1 at {t_s} iterations" in ln and f"next: {2 * t_s} vs {4 * t_s}" in ln
               for ln in lines)
    checks = pd.read_csv(out / "sources" / S.SOURCE_CHECKS)
    assert sorted(checks.iterations_T) == [t_s, 2 * t_s]  # one row per step of the search
    from trm_utils import sources as SRC

    rec = SRC.read_record("iseg2019", "GM-T2", out / "sources")
    assert rec["identity"]["training"]["iterations"] == 2 * t_s and int(tab.iterations.iloc[0]) == 2 * t_s
    (u, spec, st), = S.specs_of(units, settings, out, fams)
    assert P.source_iterations(spec["cfg"], "iseg2019") == 2 * t_s and spec["source"] == rec["sha256"]
    assert spec["hash"] != S.unit_hash(u, cfg, S.data_signature(fams), S.code_version(), rec["sha256"])
    (uo, spec_o, _), = S.specs_of(other, settings, out, fams)  # a source at T_s: cfg (and hash) as before
    assert spec_o["cfg"] == cfg
    res = U.run_local([dict(spec, num_threads=1)], workers=1, progress=False)
    assert [r["status"] for r in res] == ["done"], res
    runs = pd.read_csv(Path(spec["dir"]) / "result.csv")
    assert set(runs.method) >= {"vanilla", "trm"}
    # the default search (max factor 1): the source stays at T_s, carried and labelled not accepted
    steps.clear()
    out1 = S.open_sweep(tmp_path / "sw1", settings, ["table1"])
    tab1 = S.prepare_sources(out1, settings, units, fams, device="cpu", log=None)
    assert steps == [1] and int(tab1.iterations.iloc[0]) == t_s and not bool(tab1.accepted.iloc[0])


def test_available_cpus_follow_the_affinity(monkeypatch):
    from trm_utils import utils as UT

    monkeypatch.setattr(UT.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert UT.available_cpus() == 3
    assert E.cpu_workers() == (3, 1) and E.cpu_workers(2) == (2, 1)
    monkeypatch.delattr(UT.os, "sched_getaffinity", raising=False)
    assert UT.available_cpus() == max(1, os.cpu_count() or 1)


def test_timed_out_job_is_requeued_with_the_same_unit():
    submitit = pytest.importorskip("submitit")
    spec = {"uid": "u", "dir": "/nonexistent"}
    again = U.UnitJob().checkpoint(spec)  # what submitit calls on a time-out or preemption
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert isinstance(again.function, U.UnitJob) and again.args == (spec,)


def test_bootstrap_and_wilcoxon():
    b = np.full((6, 3), 0.5)
    a = b * 1.1
    lo, hi = R.bootstrap_gain(a, b, n_boot=200)
    assert lo == pytest.approx(10.0) and hi == pytest.approx(10.0)
    rng = np.random.default_rng(0)
    b = rng.uniform(0.4, 0.6, (20, 3))
    lo, hi = R.bootstrap_gain(b + 0.05, b, n_boot=500)
    assert 0 < lo < 100 * 0.05 / b.mean() < hi
    assert np.isnan(R.wilcoxon_p([0.1, 0.2], [0.0, 0.1]))  # fewer than 3 cells: no statistic
    assert R.wilcoxon_p(b.mean(1) + 0.05, b.mean(1)) < 0.001


def test_source_ranking_needs_three_sources():
    rows = []
    for t in ("A", "B"):
        for i, s in enumerate(["s1", "s2", "s3"] if t == "A" else ["s1", "s2"]):
            rows.append({"target": t, "source": s, "method": "vanilla", "seed": 0, "pixel_leep": -i, "dice": 0.9 - 0.1 * i})
    rk = R.source_ranking(pd.DataFrame(rows)).set_index("target")
    assert rk.loc["A", "kendall_tau"] == pytest.approx(1.0) and np.isnan(rk.loc["B", "kendall_tau"])


def test_committed_phantom_sweep_reports():
    """The phantom sweep committed under results/ (notebook 07's default) is complete per unit, its
    units are the planned ones, its budget-check runs stay out of the tables, and it reports."""
    out = REPO_ROOT / "results" / "phantom-v3"
    units = sorted((out / "units").glob("*/unit.json"))
    assert units, f"{out} holds no units: python -m trm_utils.sweep export runs/sweep/phantom-v3 {out}"
    meta = json.loads((out / "sweep.json").read_text())
    settings = meta["settings"]
    assert settings["preset"] == "tutorial" and len(settings["seeds"]) >= 3
    planned = {u for kind in ("planned", "budget_check") for us in meta[kind].values() for u in us}
    assert {json.loads(f.read_text())["uid"] for f in units} <= planned
    for f in units:  # every unit under a content-named hash (format 2), in the folder its hash names
        u = json.loads(f.read_text())
        assert u["hash_format"] == S.HASH_FORMAT and f.parent.name == f"{u['uid']}-{u['hash']}"
    assert all(len(us) >= 4 for us in meta["budget_check"].values())  # at least 4 cells per table's check
    rep = R.build_report(out, n_boot=100)
    runs = pd.concat([rep["runs"], rep["check_runs"]])
    assert (rep["units"].status == "done").all() and set(rep["runs"].factor) == {1}
    per_unit = runs.groupby("uid").apply(lambda g: (sorted(set(g.method)), g.seed.nunique()), include_groups=False)
    for f in units:  # every method and seed of every unit
        u = json.loads(f.read_text())
        assert per_unit[u["uid"]] == (sorted(u["unit"]["methods"]), len(settings["seeds"])), u["uid"]
    st = rep["status"]  # counted per study, dataset and method; every run of the tables counted once
    assert st.runs.sum() == len(rep["runs"]) and not st.duplicated(["study", "dataset", "method"]).any()
    assert (st[["flat", "overfit", "rising"]].sum(axis=1) == st.runs).all()
    for key, s in rep["studies"].items():
        assert {"vanilla", "trm"} <= set(s["gains"].index.get_level_values(-1))
        if s["study"] in ("table1", "table2"):  # the paper's Dice beside ours (Table III's are per size, the ablations have none)
            assert "paper_trm" in s["grid"]
        if s["study"] != "ablations":  # every table carries its budget check's verdict
            assert s["label"].startswith(("budget checked", "EARLY-BUDGET"))
            assert "trm@map=image" in set(s["runs"].method)  # both readings


def test_grid_heatmaps_survive_a_cell_where_vanilla_ended_at_zero():
    """A stuck vanilla cell (Dice 0) makes TRM's gain there infinite: the gain panels still draw every cell."""
    rows = []
    tasks = ("CSF-T1", "GM-T1", "WM-T1")
    for t in tasks:
        for s_ in tasks:
            if s_ != t:
                for m, d in (("vanilla", 0.0 if (t, s_) == ("WM-T1", "CSF-T1") else 0.5), ("trm", 0.55)):
                    rows.append({"dataset": "iseg2019", "target": t, "source": s_, "method": m, "seed": 0, "dice": d})
    fig = R.grid_heatmaps(pd.DataFrame(rows), "table1")
    gain_ax = [ax for ax in fig.axes if ax.get_title().startswith("ours")][0]
    texts = [t.get_text() for t in gain_ax.texts]
    assert len(texts) == 6 and "+10.0" in texts and "inf" in texts  # every cell annotated, the inf one too
    lo, hi = gain_ax.collections[0].get_clim()
    assert np.isfinite(hi) and hi == pytest.approx(10.0) and lo == pytest.approx(-10.0)


def test_ablation_figure_has_a_bar_per_variant():
    gains = pd.DataFrame({"method": ["vanilla", "trm", "fg_only"], "n_cells": 2, "n_seeds": 3, "gain_pct": [0.0, -2.0, 1.0],
                          "gain_ci_low": [0.0, -3.0, 0.5], "gain_ci_high": [0.0, -1.0, 1.5]}).set_index("method")
    fig = R.ablation_figure(gains, "Ablations: iseg2019")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fg_only", "trm"]  # vanilla is the reference, not a bar
    assert sorted(round(b.get_width(), 6) for b in ax.patches) == [-2.0, 1.0]
    assert "2 cells x 3 seeds" in ax.get_title()
    # gains_table gives no interval over fewer than 3 cells: the figure says so instead of drawing one
    fig = R.ablation_figure(gains.assign(gain_ci_low=np.nan, gain_ci_high=np.nan), "Ablations: iseg2019")
    assert "no interval" in fig.axes[0].get_xlabel() and len(fig.axes[0].patches) == 2


def test_gains_table_gives_no_interval_over_fewer_than_three_cells():
    rows = [{"dataset": "iseg2019", "target": "GM-T1", "source": s_, "method": m, "seed": sd,
             "dice": 0.5 + (0.05 if m == "trm" else 0.0) + 0.01 * sd}
            for s_ in ("WM-T1", "CSF-T1", "GM-T2") for m in ("vanilla", "trm") for sd in (0, 1, 2)]
    runs = pd.DataFrame(rows)
    g3 = R.gains_table(runs, "table1", n_boot=200)
    assert np.isfinite(g3.loc["trm", "gain_ci_low"]) and g3.loc["trm", "vs_vanilla_wins"] == 3
    g2 = R.gains_table(runs[runs.source != "GM-T2"], "table1", n_boot=200)
    assert np.isnan(g2.loc["trm", "gain_ci_low"]) and np.isnan(g2.loc["trm", "vs_vanilla_wilcoxon_p"])
    assert g2.loc["trm", "gain_pct"] == pytest.approx(g3.loc["trm", "gain_pct"], rel=0.05)


def test_committed_sweep_v4_follows_its_budget_search():
    """The sweep v4 committed under results/ (built across sessions): every recorded step of each
    table's budget search is what rule v2 says on the committed units of its sample (read here from
    the units' own results, not from sweep.json), the search stops at the first accepted step, each
    table's units run at the budget found, and every source is one model throughout."""
    from trm_utils import budget as B

    out = REPO_ROOT / "results" / "phantom-v4"
    meta = json.loads((out / "sweep.json").read_text())
    rep = R.build_report(out, n_boot=50)
    runs, _ = R.load_sweep(out)  # every unit: the search's steps, the table's and its last check's
    runs["base"] = [u[: -len(f"-x{R._uid_factor(u)}")] if R._uid_factor(u) > 1 else u for u in runs.uid]
    runs["k"] = [R._uid_factor(u) for u in runs.uid]
    for study, info in meta.get("budgets", {}).items():
        sample = {u[: -len(f"-x{R._uid_factor(u)}")] if R._uid_factor(u) > 1 else u
                  for u in meta["budget_check"][study]}
        assert len(sample) >= 4
        checks = info["checks"]
        for i, c in enumerate(checks):
            k = c["factor"]
            assert k == 2 ** i  # doubling from the preset's budget
            both = pd.concat([runs[runs.base.isin(sample) & (runs.k == k)].assign(budget="T"),
                              runs[runs.base.isin(sample) & (runs.k == 2 * k)].assign(budget="2T")])
            assert both.groupby("budget").base.nunique().to_dict() == {"T": len(sample), "2T": len(sample)}
            both["family"] = both.dataset
            if "n_slices" not in both or both.n_slices.isna().all():
                both = both.drop(columns="n_slices", errors="ignore")
            t = B.compare(both)
            assert bool(t.accepted.iloc[0]) == c["accepted"], (study, k)
            assert float(t[t.gated].d_dice.max()) == pytest.approx(c["largest_rise"], abs=1e-9)
            assert c["accepted"] == (i == len(checks) - 1 and info["accepted"])  # stops at the first accepted
        if info.get("table_factor"):
            table = set(meta["planned"].get(study, []))
            assert table and {R._uid_factor(u) for u in table} == {info["table_factor"]}
    car = rep["provenance"]["carried"]
    assert len(car) and car.one_model.all()


def test_report_label_names_an_unfinished_search_latest_step():
    """A table whose budget search has not ended (no ``budgets`` entry yet) says its latest finished
    step, judged by rule v2 on the sample at k and 2k; an ended search, or one with no step complete,
    adds nothing."""
    cells = [("A", "T"), ("B", "T")]
    rise = {1: 0.0, 2: 0.05, 4: 0.09, 8: 0.095}  # still learning up to 4x, settled from 4x to 8x
    rows = []
    for k, r in rise.items():
        for src, tgt in cells:
            for m in ("vanilla", "trm"):
                for sd in (0, 1, 2):
                    d = 0.3 + r + 0.01 * sd
                    uid = f"table2-{src}-to-{tgt}" + (f"-x{k}" if k > 1 else "")
                    rows.append({"study": "table2", "dataset": "fets2021", "uid": uid, "factor": k, "iterations": 400 * k, "source": src, "target": tgt, "n_slices": np.nan,
                                 "method": m, "seed": sd, "dice": d, "curve": json.dumps([[400 * k, d]])})
    every = pd.DataFrame(rows)
    settings = {"budget_check": {"table2": sorted(set(every.uid))}}
    upto4 = every[every.factor <= 4]
    s = R.search_so_far(settings, upto4, "table2", "fets2021")
    assert "2 steps checked, the last 800 vs 1600 iterations not accepted (largest rise +0.0400)" in s
    s = R.search_so_far(settings, every, "table2", "fets2021")
    assert "3 steps checked, the last 1600 vs 3200 iterations accepted (largest rise +0.0050)" in s
    half = every[(every.factor <= 2) | (every.source == "A")]  # 4x has one of the two cells: step 2 not complete
    assert "1 step checked, the last 400 vs 800" in R.search_so_far(settings, half, "table2", "fets2021")
    assert R.search_so_far(settings, every[every.factor == 1], "table2", "fets2021") == ""
    assert R.search_so_far({**settings, "budgets": {"table2": {}}}, every, "table2", "fets2021") == ""


def test_unit_kinds_tell_a_table_found_at_4x_from_its_search_sample():
    units = pd.DataFrame({"uid": ["t1-A", "t1-A-x2", "t1-A-x4", "t1-B-x4", "t1-A-x8"], "factor": [1, 2, 4, 4, 8]})
    kinds = R.unit_kinds({"planned": {"table1": ["t1-A-x4", "t1-B-x4"]}}, units)
    assert list(kinds) == ["budget check (x1)", "budget check (x2)", "table (x4)", "table (x4)", "budget check (x8)"]
    assert list(R.unit_kinds({}, units[:1])) == ["budget check (x1)"]  # nothing planned: nothing is a table
