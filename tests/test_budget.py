"""The budget check (doubling rule): its settings, its verdict, the script, and the committed checks."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trm_utils import budget as B
from trm_utils import checks as C
from trm_utils import presets as P

REPO = Path(__file__).resolve().parent.parent


def test_budget_cfg_doubles_the_run_and_keeps_its_shape():
    t, t2 = B.budget_cfg("tissue", "tutorial", 1), B.budget_cfg("tissue", "tutorial", 2)
    assert t2["iterations"] == 2 * t["iterations"] and t2["eval_every"] == 2 * t["eval_every"]
    assert t2["lr_decay"] == t["lr_decay"] and t2["lr"] == t["lr"]
    few = B.budget_cfg("fewshot", "tutorial", 1)  # the few-shot study's own budget
    assert few["iterations"] == P.PRESETS["tutorial"]["fewshot"]["iterations"] and "fewshot" not in few
    with pytest.raises(ValueError, match="unknown budget family 'tumor'"):
        B.budget_cfg("tumor")


def _runs(budget, dice_by_method, its, family="tissue", n_slices=None):
    rows = []
    for m, vals in dice_by_method.items():
        for cell, (src, d) in enumerate(zip(("A", "B"), vals)):
            for seed in (0, 1, 2):
                v = d + 0.001 * seed
                rows.append({"source": src, "target": "T", "method": m, "seed": seed, "dice": v, "iterations": its,
                             "curve": json.dumps([[its // 3, v], [2 * its // 3, v], [its, v]]), "budget": budget,
                             "family": family, "n_slices": n_slices})
    return pd.DataFrame(rows)


def test_compare_rule_v2_a_rise_fails_a_fall_is_drift():
    """Rule v2: T is accepted when no method of the paper's table is more than 0.01 higher at 2T;
    a fall of any size is overfitting (drift, never a failure); a moving gain is reported, not gated;
    a variant gets its own verdict and never blocks the table."""
    base = {"vanilla": (0.80, 0.70), "trm": (0.81, 0.71)}
    # doubling moves every Dice by 0.005: accepted, settled, the gain stable
    same = {m: tuple(v + 0.005 for v in d) for m, d in base.items()}
    t = B.compare(pd.concat([_runs("T", base, 100), _runs("2T", same, 200)]))
    assert t.accepted.all() and t.ok.all() and list(t.method) == ["vanilla", "trm"] and t.rule.eq("v2").all()
    assert t.d_dice.tolist() == pytest.approx([0.005, 0.005]) and (t.drift == "settled").all() and t.gain_stable.all()
    assert (t.iterations_T == 100).all() and (t.iterations_2T == 200).all() and (t.flat_T == 6).all()
    # trm rises 0.015 at 2T: still learning, the budget is not accepted, its gain depends on the budget
    moved = {"vanilla": base["vanilla"], "trm": tuple(v + 0.015 for v in base["trm"])}
    t = B.compare(pd.concat([_runs("T", base, 100), _runs("2T", moved, 200)])).set_index("method")
    assert not t.accepted.any() and t.ok.tolist() == [True, False] and t.loc["trm", "drift"] == "still learning"
    assert t.loc["trm", "d_gain"] == pytest.approx(100 * 0.015 / 0.75, abs=0.05) and not t.loc["trm", "gain_stable"]
    # every method falls by 0.03: overfitting, accepted (v1 failed this)
    fell = {m: tuple(v - 0.03 for v in d) for m, d in base.items()}
    t = B.compare(pd.concat([_runs("T", base, 100), _runs("2T", fell, 200)]))
    assert t.accepted.all() and (t.drift == "overfitting").all() and t.ok.all()
    # a gain that moves by more than 1 point with every Dice within 0.01: accepted, the gain reported unstable
    g = {"vanilla": (0.40, 0.40), "trm": (0.40, 0.40)}
    g2 = {"vanilla": (0.395, 0.395), "trm": (0.405, 0.405)}
    t = B.compare(pd.concat([_runs("T", g, 100), _runs("2T", g2, 200)])).set_index("method")
    assert t.loc["trm", "d_gain"] > 1 and t.loc["trm", "ok"] and t.accepted.all() and not t.loc["trm", "gain_stable"]
    # a variant still learning is labelled so and does not block the table
    var = {**base, "trm@map=image": (0.70, 0.60)}
    var2 = {**base, "trm@map=image": (0.75, 0.65)}
    t = B.compare(pd.concat([_runs("T", var, 100), _runs("2T", var2, 200)])).set_index("method")
    assert t.accepted.all() and not t.loc["trm@map=image", "gated"] and t.loc["trm@map=image", "learning"]
    text = "\n".join(B.grid_verdict_lines("demo", t.reset_index()))
    assert "ACCEPTED" in text and "variant TRM per-image: still learning at 100" in text
    # few-shot: one verdict row per (size, method)
    runs = pd.concat([_runs(b, base, it, "fewshot", n) for b, it in (("T", 100), ("2T", 200)) for n in (100, 25)])
    t = B.compare(runs)
    assert list(zip(t.n_slices, t.method)) == [(100, "vanilla"), (100, "trm"), (25, "vanilla"), (25, "trm")]


def test_sources_rule_v2_is_one_sided_with_a_floor():
    s = pd.DataFrame({"source": ["a", "b", "c", "d"], "iterations_T": 10, "iterations_2T": 20, "floor": 0.35,
                      "dice_T": [0.80, 0.80, 0.80, 0.30], "dice_2T": [0.82, 0.75, 0.805, 0.295]})
    j = B.judge_sources(s)
    assert j.ok.tolist() == [False, True, True, False]  # a rise fails, a fall passes, the floor holds
    assert j.drift.tolist() == ["still learning", "overfitting", "settled", "settled"]
    assert "below the floor" in B.source_verdict_line("tumour", j)


def test_committed_checks_reread_under_v2():
    """The committed checks were written under v1; read now, each is judged by v2 from its Dice
    columns alone (what notebooks 04 and 05 print). v2's verdicts on them, worked out by hand from the
    files: tissue 600 accepted (largest rise +0.0042, class weight; TRM per-image, a variant, +0.0113),
    few-shot 400 accepted (every change a fall), tumour 400 not (vanilla +0.070)."""
    hist = B.CHECK_DIR / "history-v1"  # a family's v1 check moves there once it is re-run with the carried sources
    t, f, u = (B.load_check(k, hist if (hist / f"{k}_budget_check.csv").exists() else None)["grid"]
               for k in ("tissue", "fewshot", "tumour"))
    if t is None or f is None or u is None:
        pytest.skip("a family's check is not committed")
    assert t.accepted.all() and t.set_index("method").loc["trm@map=image", "learning"]
    assert f.accepted.all() and (f.d_dice < 0).all()
    assert not u.accepted.any() and u.set_index("method").loc["vanilla", "learning"]


def test_check_grid_and_sources_run_both_budgets(phantom_root, cache_dir, monkeypatch):
    monkeypatch.setenv("TRM_CACHE_DIR", str(cache_dir))
    table, runs = C.check_grid("tissue", "smoke", seeds=(0, 1), root=phantom_root, log=None)
    assert sorted(runs.iterations.unique()) == [6, 12] and set(runs.budget) == {"T", "2T"}
    assert len(runs) == 2 * 2 * len(B.FAMILIES["tissue"]["methods"]) * 2  # budgets x cells x methods x seeds
    assert list(table.method) == B.FAMILIES["tissue"]["methods"] and table.accepted.nunique() == 1
    assert set(table.columns) >= {"dice_mean_T", "dice_mean_2T", "gain_pct_T", "gain_pct_2T", "rising_T", "overfit_2T",
                                  "below_0.05_T", "d_dice", "d_gain", "ok", "accepted"}
    src = C.check_sources("tissue", "smoke", root=phantom_root, log=None)
    assert list(src.source) == P.grid_tasks("iseg2019", "smoke")[0]
    assert (src.iterations_2T == 2 * src.iterations_T).all() and src.dice_T.between(0, 1).all()
    assert len(list(Path(cache_dir, "sources").glob("*.pt"))) == 2 * len(src)  # both budgets cached
    # the jobs in 2 worker processes (the default on 2 cores) give what one process gives, up to rounding
    t2, r2 = C.check_grid("tissue", "smoke", seeds=(0, 1), root=phantom_root, log=None, workers=1)
    k = ["budget", "source", "target", "method", "seed"]
    a, b = runs.sort_values(k).reset_index(drop=True), r2.sort_values(k).reset_index(drop=True)
    assert (a[k] == b[k]).all().all()
    assert np.allclose(a.dice, b.dice, atol=1e-3), (a.dice - b.dice).abs().max()
    # a doubling series: the next check (12 vs 24) takes its T runs from this check's 2T runs; trained afresh
    # they are the same to the last bit (same machine, seeds, sources, threads)
    nxt, nruns = C.check_grid("tissue", "smoke", seeds=(0, 1), root=phantom_root, log=None, budget=12, reuse_t=runs)
    fresh, fruns = C.check_grid("tissue", "smoke", seeds=(0, 1), root=phantom_root, log=None, budget=12)
    k2 = ["budget", "source", "target", "method", "seed"]
    x, y = nruns.sort_values(k2).reset_index(drop=True), fruns.sort_values(k2).reset_index(drop=True)
    assert (x[k2] == y[k2]).all().all() and (x.dice == y.dice).all() and sorted(set(x.iterations)) == [12, 24]
    assert set(runs.source_origin) <= {"loaded", "trained"} and runs.source_identity.nunique() == 2
    with pytest.raises(ValueError, match="no 2T runs at 24 iterations"):
        C.check_grid("tissue", "smoke", seeds=(0, 1), root=phantom_root, log=None, budget=24, reuse_t=runs)
    other = runs.assign(source_identity="0123456789ab")
    with pytest.raises(ValueError, match="other source models"):
        C.check_grid("tissue", "smoke", seeds=(0, 1), root=phantom_root, log=None, budget=12, reuse_t=other)
    with pytest.raises(ValueError, match="lack 10 of this check's T runs"):
        C.check_grid("tissue", "smoke", seeds=(0, 1, 2), root=phantom_root, log=None, budget=12,
                     reuse_t=runs[runs.method != "x"])


def test_script_writes_the_check_and_the_verdict(tmp_path):
    out = tmp_path / "cal"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "budget_check.py"), "fewshot", "--preset", "smoke",
                          "--seeds", "0,1", "--data-dir", str(tmp_path / "data"), "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO, env={**__import__("os").environ,
                                                                       "TRM_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-2000:]
    chk = B.load_check("fewshot", out)
    assert len(chk["grid"]) == 2 * 2 and set(chk["grid"].n_slices) == {100, 25}
    assert chk["meta"]["preset"] == "smoke" and chk["meta"]["seeds"] == [0, 1]
    text = B.verdict_text("fewshot", out)
    assert re.search(r"fewshot: fine-tuning budget 6 iterations (ACCEPTED|NOT accepted)", text)
    assert "budget_check.py fewshot" in text and "STALE" not in text
    # a candidate budget (a multiple of T) is checked into files of its own; the preset's check is kept
    env = {**__import__("os").environ, "TRM_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, str(REPO / "benchmarks" / "budget_check.py"), "fewshot", "--preset", "smoke", "--seeds", "0,1",
           "--data-dir", str(tmp_path / "data"), "--out", str(out), "--skip-sources"]
    res = subprocess.run(cmd + ["--budget", "12"], capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    cand = pd.read_csv(out / "fewshot_T12_budget_check.csv")
    assert set(cand.iterations_T) == {12} and set(cand.iterations_2T) == {24}
    assert "fewshot candidate budget 12: " in res.stdout and B.load_check("fewshot", out)["grid"].equals(chk["grid"])
    res = subprocess.run(cmd + ["--budget", "9"], capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 2 and "budget 9 for fewshot: give a whole multiple" in res.stderr
    # a candidate learning rate on a subset of the methods: files of its own, never an acceptance
    res = subprocess.run(cmd + ["--lr", "3e-3", "--methods", "vanilla"], capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    part = pd.read_csv(out / "fewshot_lr0.003_partial_budget_check.csv")
    meta = json.loads((out / "fewshot_lr0.003_partial_budget_check.json").read_text())
    assert set(part.method) == {"vanilla"} and not part.accepted.any() and meta["partial"] and meta["lr"] == 3e-3
    assert "a partial check, methods vanilla only" in res.stdout and B.load_check("fewshot", out)["grid"].equals(chk["grid"])
    runs = pd.read_csv(out / "fewshot_lr0.003_partial_budget_runs.csv")
    both = runs.merge(pd.read_csv(out / "fewshot_budget_runs.csv"), on=["method", "seed", "n_slices", "budget"])
    assert len(both) == len(runs) and (both.final_loss_x != both.final_loss_y).all()  # the candidate lr trained other models
    for bad, msg in ((["--methods", "trm"], "with vanilla in it"), (["--lr", "0"], "give a positive number")):
        res = subprocess.run(cmd + bad, capture_output=True, text=True, cwd=REPO, env=env)
        assert res.returncode == 2 and msg in res.stderr, res.stderr[-500:]


def test_notebook_defaults_are_the_checked_grids():
    """Notebooks 04 and 05 report the grids the budget check checks (same methods, seeds, sizes)."""
    import ast

    def params(nb):
        src = (REPO / "notebooks" / nb).read_text()
        cell = src.split('# %% tags=["parameters"]')[1].split("# %%")[0]
        return {t.id: ast.literal_eval(n.value) for n in ast.parse(cell).body if isinstance(n, ast.Assign)
                for t in n.targets}

    p4, p5 = params("04_weighted_finetuning.py"), params("05_few_shot.py")
    assert p4["methods"] is None and B.FAMILIES["tissue"]["methods"] == B.FAMILIES["tumour"]["methods"]
    assert 'methods = list(B.FAMILIES["tissue"]["methods"])' in (REPO / "notebooks" / "04_weighted_finetuning.py").read_text()
    assert p5["methods"] == B.FAMILIES["fewshot"]["methods"] and p5["fewshot_source"] == B.FAMILIES["fewshot"]["sources"][0]
    assert p4["seeds"] == p5["seeds"] == [0, 1, 2]


@pytest.mark.parametrize("family", list(B.FAMILIES))
def test_committed_check_is_for_the_current_budget(family):
    """The committed check (results/calibration) was made at the preset's current budget, on the
    main job's grid; its verdict is what the notebooks print."""
    chk = B.load_check(family)
    if chk["grid"] is None:
        pytest.skip(f"no committed {family} check")
    g = chk["grid"]
    assert int(g.iterations_T.iloc[0]) == B.budget_cfg(family, "tutorial", 1)["iterations"]
    assert list(dict.fromkeys(g.method)) == B.FAMILIES[family]["methods"]
    assert chk["meta"]["seeds"] == [0, 1, 2] and chk["meta"]["preset"] == "tutorial"
    assert "STALE" not in B.verdict_text(family)


def test_is_partial_is_one_rule_for_the_script_and_the_grid():
    """A check naming every method of the family (in any order) is the full check, not a partial one;
    a subset is partial; None is the family's own methods."""
    full = B.FAMILIES["tumour"]["methods"]
    assert not B.is_partial("tumour", None) and not B.is_partial("tumour", list(reversed(full)))
    assert B.is_partial("tumour", ["vanilla", "trm"])
    assert B.check_methods("tumour", None) == list(full)


def _check_csv(folder, stem, t, rises):
    """A check table at T vs 2T whose methods change by ``rises`` (vanilla first)."""
    methods = ["vanilla", "class_weight", "trs_map", "trm", "trm@map=image"]
    pd.DataFrame({"family": "tumour", "method": methods, "n_slices": None, "iterations_T": t, "iterations_2T": 2 * t,
                  "dice_mean_T": 0.5, "dice_mean_2T": [0.5 + r for r in [*rises, 0.05]], "gain_pct_T": [0.0, 1, 2, 3, 4],
                  "gain_pct_2T": [0.0, 1, 2, 3, 4]}).to_csv(folder / f"{stem}_budget_check.csv", index=False)


def test_series_choice_shows_the_lowest_accepted_budget(tmp_path):
    """Notebook 04 shows the doubling series' lowest accepted check, else the longest one checked."""
    assert B.series_choice("tumour", tmp_path) is None
    _check_csv(tmp_path, "tumour", 400, [0.03, 0.0, 0.0, 0.0])
    _check_csv(tmp_path, "tumour_T800", 800, [0.0, 0.0, 0.0, 0.02])
    assert B.series_choice("tumour", tmp_path) == "tumour_T800"  # none accepted: the longest checked
    _check_csv(tmp_path, "tumour_T1600", 1600, [-0.03, 0.0, 0.005, 0.0])
    _check_csv(tmp_path, "tumour_T3200", 3200, [-0.02, 0.0, 0.0, -0.01])
    assert B.series_choice("tumour", tmp_path) == "tumour_T1600"  # the lowest accepted
    chk = B.load_check("tumour", tmp_path, stem="tumour_T1600")
    assert chk["grid"].accepted.all() and int(chk["grid"].iterations_T.iloc[0]) == 1600
    text = B.verdict_text("tumour", tmp_path, stem="tumour_T1600")
    assert "budget 1600 iterations ACCEPTED" in text and "a candidate budget" in text and "STALE" not in text
