"""Source models carried with the repository: identity, loading, refusal of damaged files, and the
committed sources against what the current code would train."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from trm_utils import budget as B
from trm_utils import experiments as E
from trm_utils import presets as P
from trm_utils import sources as S

REPO = Path(__file__).resolve().parent.parent


def _ident(root, cfg, task="GM-T1", seed=0, memo=None):
    return S.source_identity("iseg2019", root, task, cfg, seed, memo_dir=memo)


def test_identity_names_what_decides_the_weights(phantom_root, tmp_path):
    cfg = P.get_preset("smoke", source_iterations=3)
    a = _ident(phantom_root, cfg, memo=tmp_path)
    assert a == _ident(phantom_root, cfg, memo=tmp_path) and S.identity_hash(a) == S.identity_hash(dict(a))
    assert a["training"]["iterations"] == 3 and a["architecture"]["base_channels"] == cfg["base_channels"]
    for changed in (P.get_preset("smoke", source_iterations=4), P.get_preset("smoke", source_iterations=3, source_lr=2e-3),
                    P.get_preset("smoke", source_iterations=3, base_channels=8),
                    P.get_preset("smoke", source_iterations=3, source_augment={"iseg2019": True})):
        b = _ident(phantom_root, changed, memo=tmp_path)
        assert S.identity_hash(b) != S.identity_hash(a) and S.identity_diff(a, b)
    assert S.identity_hash(_ident(phantom_root, cfg, seed=1, memo=tmp_path)) != S.identity_hash(a)
    # the data by content: a copy elsewhere is the same data, a changed byte is not
    copy = tmp_path / "copy"
    shutil.copytree(phantom_root, copy)
    assert _ident(copy, cfg, memo=tmp_path)["data"] == a["data"]
    victim = next(p for p in sorted((copy / "iSeg-2019-Training").glob("*.img")))
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 1
    victim.write_bytes(bytes(raw))
    assert _ident(copy, cfg, memo=tmp_path)["data"] != a["data"]
    # no code text in it: only settings and data
    assert "code" not in json.dumps(a) and set(a) == {"format", "dataset", "task", "seed", "architecture", "training",
                                                      "data"}


def test_carried_source_is_loaded_when_it_matches_and_named_when_not(phantom_root, tmp_path, monkeypatch):
    cfg = P.get_preset("smoke", source_iterations=3)
    model, info = E.source_model("iseg2019", phantom_root, "GM-T1", cfg, cache_dir=tmp_path / "cache")
    assert info["status"] == "trained" and "no carried source for iseg2019 GM-T1" in info["reason"]
    state = torch.load(info["path"], weights_only=False)
    assert state["provenance"]["cpu"] and state["provenance"]["threads"] >= 1
    carried = tmp_path / "carried"
    pt, rec = S.write_carried(state, _ident(phantom_root, cfg), 0.5, carried)
    monkeypatch.setattr(S, "SOURCES_DIR", carried)
    empty = tmp_path / "empty-cache"
    m2, i2 = E.source_model("iseg2019", phantom_root, "GM-T1", cfg, cache_dir=empty)
    assert i2["status"] == "carried" and i2["path"] == str(pt) and "carried" in i2["reason"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values()))
    assert not empty.exists()  # nothing trained, nothing cached
    # another setting: the carried model is named as another model, with what differs, and one is trained
    _, i3 = E.source_model("iseg2019", phantom_root, "GM-T1", P.get_preset("smoke", source_iterations=4), cache_dir=empty)
    assert i3["status"] == "trained" and "training.iterations: carried 3, asked 4" in i3["reason"]
    # retrain_sources: the carried model is not used
    _, i4 = E.source_model("iseg2019", phantom_root, "GM-T1", cfg, cache_dir=tmp_path / "c4", retrain=True)
    assert i4["status"] == "trained" and "retrain_sources=True" in i4["reason"]
    out = E.prepare_sources([("iseg2019", phantom_root, "GM-T1")], cfg, device="cpu", cache_dir=tmp_path / "c5",
                            log=None)
    assert out[("iseg2019", "GM-T1")][1]["status"] == "carried"
    rec_data = json.loads(rec.read_text())
    assert rec_data["identity_hash"] == S.identity_hash(rec_data["identity"]) and rec_data["parameters"] > 0
    assert [r["identity"]["task"] for r in S.carried_records(carried)] == ["GM-T1"]


def test_a_sweeps_own_sources_folder_and_nothing_else(phantom_root, tmp_path):
    """``sources_dir`` + ``sources_only`` (a sweep's units): the model carried there is loaded, with its
    SHA-256; a source not carried there is an error that says how to prepare it, never trained."""
    cfg = P.get_preset("smoke", source_iterations=3)
    _, info = E.source_model("iseg2019", phantom_root, "GM-T1", cfg, cache_dir=tmp_path / "cache")
    assert info["sha256"] == S.file_sha256(info["path"])
    folder = tmp_path / "sweep-sources"
    pt, _ = S.write_carried(torch.load(info["path"], weights_only=False), _ident(phantom_root, cfg), 0.5, folder)
    _, i2 = E.source_model("iseg2019", phantom_root, "GM-T1", cfg, cache_dir=tmp_path / "none", sources_dir=folder,
                           sources_only=True)
    assert i2["status"] == "carried" and i2["path"] == str(pt) and i2["sha256"] == S.file_sha256(pt)
    with pytest.raises(ValueError, match=r"source iseg2019 WM-T1 is not carried in .*sweep-sources.*--sources-only"):
        E.source_model("iseg2019", phantom_root, "WM-T1", cfg, cache_dir=tmp_path / "none", sources_dir=folder,
                       sources_only=True)
    assert not (tmp_path / "none").exists()  # nothing trained


def test_a_damaged_carried_source_is_an_error_not_a_silent_retrain(phantom_root, tmp_path, monkeypatch):
    cfg = P.get_preset("smoke", source_iterations=3)
    _, info = E.source_model("iseg2019", phantom_root, "GM-T1", cfg, cache_dir=tmp_path / "cache")
    carried = tmp_path / "carried"
    pt, rec = S.write_carried(torch.load(info["path"], weights_only=False), _ident(phantom_root, cfg), 0.5, carried)
    monkeypatch.setattr(S, "SOURCES_DIR", carried)
    before = rec.read_text()
    pt.write_bytes(pt.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(S.CarriedSourceError) as e:
        E.source_model("iseg2019", phantom_root, "GM-T1", cfg, cache_dir=tmp_path / "other")
    msg = str(e.value)
    assert "\n" not in msg and "iseg2019-GM-T1.pt is damaged" in msg and "git checkout" in msg
    assert "retrain_sources=True" in msg and rec.read_text() == before  # nothing on disk touched
    rec.write_text("{not json")
    with pytest.raises(S.CarriedSourceError, match="cannot be read"):
        E.source_model("iseg2019", phantom_root, "GM-T1", cfg, cache_dir=tmp_path / "other")
    rec.unlink()
    with pytest.raises(S.CarriedSourceError, match="iseg2019-GM-T1.json is missing"):
        E.source_model("iseg2019", phantom_root, "GM-T1", cfg, cache_dir=tmp_path / "other")
    # retrain_sources=True goes around a damaged file (the way out the message names)
    _, ok = E.source_model("iseg2019", phantom_root, "GM-T1", cfg, cache_dir=tmp_path / "other", retrain=True)
    assert ok["status"] == "trained"


@pytest.fixture(scope="module")
def tutorial_phantom(tmp_path_factory):
    """The tutorial phantom as `make run` writes it (about 40 s): the data the committed sources name."""
    from trm_utils.data import make_phantom

    root = tmp_path_factory.mktemp("tutorial-phantom")
    for kind in ("iseg2019", "fets2021"):
        make_phantom(kind, root, seed=0, preset="tutorial")
    return root


def test_committed_sources_match_the_current_code(tutorial_phantom, tmp_path):
    """Every source the main job uses (each budget family's) is committed, and its recorded identity
    is the one the current code computes for it (architecture, settings, the phantom's content): a
    change that would make the notebooks retrain them fails here. Each was carried at a budget its
    committed source check accepts under rule v2, and every tumour source clears the floor."""
    records = {(r["identity"]["dataset"], r["identity"]["task"]): r for r in S.carried_records()}
    cfg = P.get_preset("tutorial")
    for family in B.FAMILIES:
        name, sources, _ = B.family_tasks(family, "tutorial")
        chk = B.load_check(family)["sources"]
        for task in sources:
            assert (name, task) in records, f"{name} {task} is not carried: run budget_check.py {family} --skip-grid --carry"
            r = records[(name, task)]
            now = S.source_identity(name, tutorial_phantom, task, cfg, memo_dir=tmp_path)
            assert S.identity_diff(r["identity"], now) == [], f"{r['file']} no longer matches the code"
            assert r["identity_hash"] == S.identity_hash(now)
            assert chk is not None and int(chk.iterations_T.iloc[0]) == now["training"]["iterations"]
            assert bool(chk.set_index("source").loc[task, "ok"]), f"{task}'s budget is not accepted by its check"
            assert r["own_task_dice"] >= B.FAMILIES[family]["source_floor"]
            assert r["curve"] and r["provenance"]["commit"] and r["provenance"]["cpu"]
    total = sum(p.stat().st_size for p in S.SOURCES_DIR.glob("*"))
    assert total < 8 * 2**20, f"the carried sources take {total / 2**20:.1f} MiB"
