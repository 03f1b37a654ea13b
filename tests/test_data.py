"""Phantom, loaders and slice datasets (the same code reads the real data)."""
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from trm_utils import data as D
from trm_utils import phantom as ph
from trm_utils.data import DataError, make_phantom, open_dataset, task_slices

from .conftest import SMALL


def test_layouts_on_disk(phantom_root):
    iseg = phantom_root / "iSeg-2019-Training"
    assert {p.name for p in iseg.glob("subject-1-*")} == {f"subject-1-{k}.{e}" for k in ("T1", "T2", "label")
                                                            for e in ("hdr", "img")}
    fets = phantom_root / "MICCAI_FeTS2021_TrainingData"
    s = fets / "FeTS21_Training_001"
    assert {p.name for p in s.iterdir()} == {f"FeTS21_Training_001_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")}
    head = (fets / "partitioning_2.csv").read_bytes()
    assert head.startswith(b"Subject_ID,Partition_ID\r\n")
    msd = phantom_root / "Task01_BrainTumour"
    assert (msd / "dataset.json").exists() and nib.load(str(msd / "imagesTr" / "BRATS_001.nii.gz")).shape[-1] == 4


def test_label_values_and_nesting(phantom_root):
    v = open_dataset("iseg2019", phantom_root).load(1)
    assert set(np.unique(v["label"])) == {0, 10, 150, 250}
    assert v["T1"].shape == (32, 32, 10)  # trailing singleton axis of the Analyze file dropped
    f = open_dataset("fets2021", phantom_root)
    seg = f.load(f.subjects_in(13)[0])["label"]
    assert set(np.unique(seg)) <= {0, 1, 2, 4} and (seg == 2).any()


def test_tumour_sub_regions_are_nested():
    from scipy import ndimage

    cfg = ph.PhantomConfig(kind="fets2021", shape=(48, 48, 16))
    for seed in range(4):
        rng = np.random.default_rng(seed)
        anat = ph.brain_anatomy(rng, cfg.shape)
        t = ph.tumour_masks(rng, anat, "large")
        assert t["NCR"].any() and t["ET"].any() and t["ED"].any()
        # NCR is surrounded by ET only; ET (with NCR inside) by ED only
        ncr_ring = ndimage.binary_dilation(t["NCR"]) & ~t["NCR"]
        assert not (ncr_ring & ~t["ET"]).any()
        core = t["NCR"] | t["ET"]
        core_ring = ndimage.binary_dilation(core) & ~core
        assert not (core_ring & ~t["ED"]).any()
        assert not (t["ED"] & core).any() and not (t["ET"] & t["NCR"]).any()
        assert not ((t["ED"] | core) & ~anat["brain"]).any()


def test_modality_contrasts_invert():
    t1, t2 = ph.ISEG_CONTRAST["T1"], ph.ISEG_CONTRAST["T2"]
    assert t1["WM"] > t1["GM"] > t1["CSF"] and t2["CSF"] > t2["GM"] > t2["WM"]
    fl = ph.FETS_CONTRAST["flair"]
    assert fl["CSF"] < fl["WM"] and fl["ED"] > fl["GM"]


def test_deterministic_and_cached(tmp_path):
    a = make_phantom("iseg2019", tmp_path / "a", seed=5, **SMALL)
    b = make_phantom("iseg2019", tmp_path / "b", seed=5, **SMALL)
    va, vb = open_dataset("iseg2019", a).load(2), open_dataset("iseg2019", b).load(2)
    assert all(np.array_equal(va[k], vb[k]) for k in va)
    mtime = (a / "subject-1-T1.img").stat().st_mtime_ns
    assert make_phantom("iseg2019", tmp_path / "a", seed=5, **SMALL) == a  # reused
    assert (a / "subject-1-T1.img").stat().st_mtime_ns == mtime
    c = make_phantom("iseg2019", tmp_path / "c", seed=6, **SMALL)
    assert not np.array_equal(open_dataset("iseg2019", c).load(2)["T1"], va["T1"])


def test_phantom_never_overwrites_real_data(tmp_path):
    real = tmp_path / "iSeg-2019-Training"
    real.mkdir()
    (real / "mine.txt").write_text("precious")
    with pytest.raises(DataError, match="not a phantom"):
        make_phantom("iseg2019", tmp_path, **SMALL)
    assert (real / "mine.txt").read_text() == "precious"


def test_open_dataset_accepts_root_or_folder(phantom_root):
    a = open_dataset("iseg2019", phantom_root)
    b = open_dataset("iseg2019", phantom_root / "iSeg-2019-Training")
    assert a.subjects == b.subjects == [1, 2, 3, 4]
    f = open_dataset("fets2021", phantom_root / "MICCAI_FeTS2021_TrainingData")
    assert f.partitions == sorted(ph.FETS_PARTITIONS)
    assert open_dataset("fets2021", phantom_root, partitioning=1).partitions == sorted({v[0] for v in ph.FETS_PARTITIONS.values()})


def test_iseg_names_case_insensitive(tmp_path, phantom_root):
    dst = tmp_path / "iSeg-2019-Training"
    shutil.copytree(phantom_root / "iSeg-2019-Training", dst)
    for p in dst.glob("subject-1-*"):
        p.rename(p.with_name(p.name.upper().replace("SUBJECT", "Subject")))
    ds = open_dataset("iseg2019", tmp_path)
    assert 1 in ds.subjects and ds.load(1)["T1"].shape == (32, 32, 10)


def test_msd_labels_remapped_to_fets(phantom_root):
    msd = open_dataset("msd", phantom_root)
    fets = open_dataset("fets2021", phantom_root)
    # the MSD phantom was written from the same subjects: remapping must restore FeTS values
    a = msd.load("BRATS_001")
    b = fets.load("FeTS21_Training_001")
    assert np.array_equal(a["label"], b["label"])
    assert np.allclose(a["FLAIR"], b["FLAIR"]) and np.allclose(a["T1CE"], b["T1CE"])


def test_task_slices_tissue(phantom_root, cache_dir):
    tr = task_slices("iseg2019", "GM-T2", phantom_root, "train", image_size=40, cache_dir=cache_dir)
    te = task_slices("iseg2019", "GM-T2", phantom_root, "test", image_size=40, cache_dir=cache_dir)
    x, y = tr[0]
    assert x.shape == (1, 40, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(torch.unique(tr.labels).tolist()) == {0, 1}
    assert not set(tr.subject_ids) & set(te.subject_ids)  # split by subject
    # z-score over brain voxels: brain pixels have mean ~0, std ~1 per volume
    vals = tr.images[[s == tr.subject_ids[0] for s in tr.subject_ids]]
    brain = vals[vals != 0]
    assert abs(brain.mean()) < 0.1 and abs(brain.std() - 1) < 0.1
    assert list(cache_dir.glob("*.npz"))


def test_slices_without_brain_are_skipped(tmp_path, phantom_root, cache_dir):
    d = copy_set(phantom_root, tmp_path, "iSeg-2019-Training")
    p = d / "subject-1-T2.hdr"
    img = np.asarray(nib.load(str(p)).dataobj).copy()
    img[:, :, :3] = 0  # three slices without brain
    nib.save(nib.AnalyzeImage(img, np.eye(4)), str(p))
    full = task_slices("iseg2019", "GM-T2", phantom_root, "all", cache_dir=cache_dir)
    cut = task_slices("iseg2019", "GM-T2", tmp_path, "all", cache_dir=cache_dir)
    assert len(full) - len(cut) == 3
    assert sorted(z for s, z in zip(cut.subject_ids, cut.slice_index) if s == "1") == list(range(3, 10))


def test_task_slices_tumour_and_few_shot(phantom_root, cache_dir):
    tr = task_slices("fets2021", "13-FLAIR", phantom_root, "train", image_size=32, cache_dir=cache_dir)
    assert tr.num_classes == 4 and set(torch.unique(tr.labels).tolist()) <= {0, 1, 2, 3}
    few = task_slices("fets2021", "13-FLAIR", phantom_root, "train", image_size=32, max_slices=5, seed=1, cache_dir=cache_dir)
    again = task_slices("fets2021", "13-FLAIR", phantom_root, "train", image_size=32, max_slices=5, seed=1, cache_dir=cache_dir)
    assert len(few) == 5 and torch.equal(few.images, again.images)
    m = task_slices("msd", "MSD-T1GD", phantom_root, "train", image_size=32, cache_dir=cache_dir)
    assert m.num_classes == 4 and len(m) > 0


def test_unknown_task_lists_valid_ones(phantom_root):
    with pytest.raises(DataError, match="valid tasks: CSF-T1"):
        task_slices("iseg2019", "GM-FLAIR", phantom_root)
    with pytest.raises(DataError, match="valid tasks"):
        task_slices("fets2021", "99-T1", phantom_root)


# --- bad input: one line naming the file or value and the fix ---------------------------

def one_line(exc_info):
    assert "\n" not in str(exc_info.value)
    return str(exc_info.value)


def copy_set(phantom_root, tmp_path, folder):
    shutil.copytree(phantom_root / folder, tmp_path / folder)
    return tmp_path / folder


def test_missing_data_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist.*phantom") as e:
        open_dataset("iseg2019", tmp_path / "nope")
    one_line(e)


def test_missing_modality_file(tmp_path, phantom_root):
    d = copy_set(phantom_root, tmp_path, "iSeg-2019-Training")
    (d / "subject-2-T2.hdr").unlink()
    with pytest.raises(DataError, match="subject-2.*T2") as e:
        open_dataset("iseg2019", tmp_path)
    one_line(e)
    f = copy_set(phantom_root, tmp_path, "MICCAI_FeTS2021_TrainingData")
    (f / "FeTS21_Training_001" / "FeTS21_Training_001_seg.nii.gz").unlink()
    with pytest.raises(DataError, match="missing file .*_seg.nii.gz"):
        open_dataset("fets2021", tmp_path).load("FeTS21_Training_001")


def _rewrite(path, arr):
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


def test_shape_mismatch(tmp_path, phantom_root):
    f = copy_set(phantom_root, tmp_path, "MICCAI_FeTS2021_TrainingData")
    p = f / "FeTS21_Training_002" / "FeTS21_Training_002_t2.nii.gz"
    _rewrite(p, np.ones((30, 32, 10), np.float32))
    with pytest.raises(DataError, match="shapes differ") as e:
        open_dataset("fets2021", tmp_path).load("FeTS21_Training_002")
    one_line(e)


def test_unexpected_label_values(tmp_path, phantom_root):
    f = copy_set(phantom_root, tmp_path, "MICCAI_FeTS2021_TrainingData")
    p = f / "FeTS21_Training_003" / "FeTS21_Training_003_seg.nii.gz"
    seg = np.asarray(nib.load(str(p)).dataobj).copy()
    seg[0, 0, 0] = 3
    _rewrite(p, seg)
    with pytest.raises(DataError, match=r"unexpected label values \[3\]; expected a subset of \[0, 1, 2, 4\]") as e:
        open_dataset("fets2021", tmp_path).load("FeTS21_Training_003")
    one_line(e)


def test_nan_voxels(tmp_path, phantom_root):
    f = copy_set(phantom_root, tmp_path, "MICCAI_FeTS2021_TrainingData")
    p = f / "FeTS21_Training_004" / "FeTS21_Training_004_flair.nii.gz"
    img = np.asarray(nib.load(str(p)).dataobj).copy()
    img[5, 5, 5] = np.nan
    _rewrite(p, img)
    with pytest.raises(DataError, match="NaN or Inf") as e:
        open_dataset("fets2021", tmp_path).load("FeTS21_Training_004")
    one_line(e)


def test_truncated_nifti(tmp_path, phantom_root):
    f = copy_set(phantom_root, tmp_path, "MICCAI_FeTS2021_TrainingData")
    p = f / "FeTS21_Training_005" / "FeTS21_Training_005_t1.nii.gz"
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="corrupt or truncated") as e:
        open_dataset("fets2021", tmp_path).load("FeTS21_Training_005")
    one_line(e)


def test_empty_partition(tmp_path, phantom_root):
    f = copy_set(phantom_root, tmp_path, "MICCAI_FeTS2021_TrainingData")
    csv = f / "partitioning_2.csv"
    lines = [l for l in csv.read_text().splitlines() if not l.endswith(",14")]
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="unknown task '14-T1'"):
        task_slices("fets2021", "14-T1", tmp_path)
    with pytest.raises(DataError, match="partition 14 has no subjects") as e:
        open_dataset("fets2021", tmp_path).subjects_in(14)
    one_line(e)


def test_no_slices_left(tmp_path, phantom_root, cache_dir):
    d = copy_set(phantom_root, tmp_path, "iSeg-2019-Training")
    for p in d.glob("subject-*-T1.hdr"):
        img = nib.load(str(p))
        nib.save(nib.AnalyzeImage(np.zeros(img.shape, np.float32), np.eye(4)), str(p))
    with pytest.raises(DataError, match="no slices left") as e:
        task_slices("iseg2019", "GM-T1", tmp_path, cache_dir=cache_dir)
    one_line(e)


def test_cli_verify(phantom_root, capsys):
    assert D.main(["verify", "fets2021", str(phantom_root)]) == 0
    assert "partitions" in capsys.readouterr().out
    assert D.main(["verify", "iseg2019", str(phantom_root / "nothing")]) == 1
