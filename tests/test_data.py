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
    assert v["T1"].ndim == 3  # trailing singleton axis of the Analyze file dropped
    f = open_dataset("fets2021", phantom_root)
    seg = f.load(f.subjects_in(13)[0])["label"]
    assert set(np.unique(seg)) <= {0, 1, 2, 4} and (seg == 2).any()


def test_phantom_is_the_template_anatomy_deformed_per_subject():
    cfg = ph.make_config("iseg2019", preset="tutorial")
    tpl = ph.template(cfg.voxel_mm)
    subs = [ph.subject_anatomy(cfg, np.random.default_rng([0, 2019, s])) for s in (1, 2)]
    for a in subs:  # close to the template (same anatomy), not equal to it (own deformation)
        assert a["mask"].shape == tpl["brain"].shape
        overlap = (a["mask"] & (tpl["brain"] > 0.5)).sum() / (tpl["brain"] > 0.5).sum()
        assert 0.8 < overlap < 0.995, overlap
        assert set(np.unique(a["tissue"])) == {0, 1, 2, 3}
        # argmax of the fuzzy maps inside the brain; partial volume kept in the maps
        assert ((a["gm"] > 0.05) & (a["gm"] < 0.95) & a["mask"]).mean() > 0.05
    assert not np.array_equal(subs[0]["tissue"], subs[1]["tissue"])
    # grey and white matter are the big classes, CSF the small one, as in a real brain
    frac = [np.mean(subs[0]["tissue"][subs[0]["mask"]] == k) for k in (1, 2, 3)]
    assert frac[0] < frac[2] and frac[0] < frac[1] and 0.25 < frac[1] < 0.7


def test_tissue_contrast_follows_the_fuzzy_maps(phantom_root):
    v = open_dataset("iseg2019", phantom_root).load(2)
    lab = v["label"]
    t1 = {k: v["T1"][lab == val].mean() for k, val in (("CSF", 10), ("GM", 150), ("WM", 250))}
    t2 = {k: v["T2"][lab == val].mean() for k, val in (("CSF", 10), ("GM", 150), ("WM", 250))}
    assert t1["WM"] > t1["GM"] > t1["CSF"] and t2["CSF"] > t2["GM"] > t2["WM"]  # T1/T2 inversion


def test_tumour_sub_regions_are_nested():
    from scipy import ndimage

    cfg = ph.make_config("fets2021", preset="tutorial")
    for seed in range(4):
        rng = np.random.default_rng(seed)
        anat = ph.subject_anatomy(cfg, rng)
        t = ph.tumour_masks(rng, anat, cfg.voxel_mm)
        assert t["NCR"].any() and t["ET"].any() and t["ED"].any()
        # NCR is surrounded by ET only; ET (with NCR inside) by ED only
        ncr_ring = ndimage.binary_dilation(t["NCR"]) & ~t["NCR"]
        assert not (ncr_ring & ~t["ET"]).any()
        core = t["NCR"] | t["ET"]
        core_ring = ndimage.binary_dilation(core) & ~core
        assert not (core_ring & ~t["ED"]).any()
        assert not (t["ED"] & core).any() and not (t["ET"] & t["NCR"]).any()
        assert not ((t["ED"] | core) & ~anat["mask"]).any()
        assert (t["ED"] | core).sum() < 0.15 * anat["mask"].sum()  # a lesion, not a lobe


def test_partitions_mirror_the_real_files(phantom_root):
    fets = phantom_root / "MICCAI_FeTS2021_TrainingData"
    raw = (fets / "partitioning_2.csv").read_bytes()
    assert raw.startswith(b"Subject_ID,Partition_ID\r\n") and not raw.endswith(b"\n")  # CRLF, no final newline
    inst = {r.split(",")[1] for r in (fets / "partitioning_1.csv").read_text().splitlines()[1:]}
    assert inst == {"01", "06"}  # zero-padded ids
    p1 = open_dataset("fets2021", phantom_root, partitioning=1)
    p2 = open_dataset("fets2021", phantom_root)
    assert p2.partitions == [13, 14, 17, 18] and p1.partitions == [1, 6]
    for part, institution in ((13, 1), (14, 1), (17, 6), (18, 6)):
        assert {p1.partition_of[s] for s in p2.subjects_in(part)} == {institution}
    tut = dict(ph.make_config("fets2021", preset="tutorial").fets_subjects)
    assert min(tut[13], tut[14]) >= 2 * max(tut[17], tut[18])  # 13/14 much larger than 17/18
    nums = sorted(int(s.split("_")[-1]) for s in p2.subjects)
    assert nums[-1] >= len(nums)  # numbering may have gaps, as the real ids do


def test_modality_contrasts_invert():
    t1, t2 = ph.ISEG_CONTRAST["T1"], ph.ISEG_CONTRAST["T2"]
    assert t1["WM"] > t1["GM"] > t1["CSF"] and t2["CSF"] > t2["GM"] > t2["WM"]
    fl = ph.FETS_CONTRAST["flair"]
    assert fl["CSF"] < fl["WM"] and fl["ED"] > fl["GM"]


def test_tumour_contrasts_as_on_real_scans():
    """Each modality shows what the real one shows (DESIGN.md section 3), measured on a rendered subject:
    T2 oedema and core bright; FLAIR oedema bright, CSF dark; T1 core dark; T1ce enhancing rim bright."""
    cfg = ph.make_config("fets2021", preset="tutorial")
    v = ph.fets_subject(cfg, 14, 0)
    seg, brain = v["seg"], v["t1"] > 0
    normal = brain & (seg == 0)

    def mean(mod, value):
        return float(v[mod][(seg == value) & brain].mean())

    for mod in ph.FETS_MODALITIES:
        ref = float(v[mod][normal].mean())
        ed, et, ncr = mean(mod, 2), mean(mod, 4), mean(mod, 1)
        if mod == "t2":
            assert ed > 1.3 * ref and ncr > 1.3 * ref and ncr > ed  # oedema and core bright
        if mod == "flair":
            assert ed > 1.4 * ref and ed > et > ncr
        if mod == "t1":
            assert ncr < 0.5 * ref and ed < ref  # core dark, oedema darker than tissue
        if mod == "t1ce":
            assert et > 1.8 * ref and et > ed and et > ncr  # the enhancing rim
    fl = ph.FETS_CONTRAST["flair"]
    assert fl["CSF"] < min(fl["GM"], fl["WM"]) < fl["ED"]  # FLAIR: CSF dark


def test_tumour_variation_changes_only_the_tumour():
    """``tumour_variation`` (a difficulty knob, 0 in every preset) varies each subject's tumour intensities
    and adds a texture inside the lesion; the labels and everything outside the lesion stay the same."""
    a = ph.fets_subject(ph.make_config("fets2021", preset="smoke"), 14, 0)
    b = ph.fets_subject(ph.make_config("fets2021", preset="smoke", tumour_variation=0.3), 14, 0)
    assert np.array_equal(a["seg"], b["seg"])
    lesion = ndimage_dilate(a["seg"] > 0, 6)  # the blur (up to 4 sigma) carries a change a few voxels out
    for mod in ph.FETS_MODALITIES:
        assert np.allclose(a[mod][~lesion], b[mod][~lesion], rtol=1e-5, atol=1e-3), mod
        assert not np.allclose(a[mod][a["seg"] > 0], b[mod][a["seg"] > 0])
    assert ph.make_config("fets2021", preset="tutorial").tumour_variation == 0.0


def ndimage_dilate(mask, n):
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=n)


def test_tumour_partitions_give_every_target_three_test_subjects():
    """The real partitioning_2 holds 64 / 65 / 17 / 17 subjects in 13 / 14 / 17 / 18; the tutorial phantom
    keeps those proportions at about half, so that every tumour target has at least 3 test subjects."""
    from trm_utils.slices import split_subjects

    tut = dict(ph.make_config("fets2021", preset="tutorial").fets_subjects)
    assert tut == {13: 32, 14: 32, 17: 9, 18: 9}
    for part, n in tut.items():
        assert len(split_subjects(range(n), "test")) >= 3


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


def test_iseg_names_case_insensitive(tmp_path, phantom_root):
    dst = tmp_path / "iSeg-2019-Training"
    shutil.copytree(phantom_root / "iSeg-2019-Training", dst)
    for p in dst.glob("subject-1-*"):
        p.rename(p.with_name(p.name.upper().replace("SUBJECT", "Subject")))
    ds = open_dataset("iseg2019", tmp_path)
    assert 1 in ds.subjects and ds.load(1)["T1"].shape == open_dataset("iseg2019", phantom_root).load(1)["T1"].shape


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
    # z-score over brain voxels of the volume (before resizing): mean 0, std 1 per volume
    vol = open_dataset("iseg2019", phantom_root).load(int(tr.subject_ids[0]))["T2"]
    z = D.zscore_brain(vol)[vol != 0]
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3
    vals = tr.images[[s == tr.subject_ids[0] for s in tr.subject_ids]]
    brain = vals[vals != 0]  # after resizing (interpolation smooths a little)
    assert abs(brain.mean()) < 0.15 and 0.6 < brain.std() < 1.2
    assert list(cache_dir.glob("*.npz"))


def test_slices_without_brain_are_skipped(tmp_path, phantom_root, cache_dir):
    d = copy_set(phantom_root, tmp_path, "iSeg-2019-Training")
    p = d / "subject-1-T2.hdr"
    img = np.asarray(nib.load(str(p)).dataobj).copy()
    img[:, :, :3] = 0  # three slices without brain
    nz = img.shape[2]
    nib.save(nib.AnalyzeImage(img, np.eye(4)), str(p))
    full = task_slices("iseg2019", "GM-T2", phantom_root, "all", cache_dir=cache_dir)
    cut = task_slices("iseg2019", "GM-T2", tmp_path, "all", cache_dir=cache_dir)
    assert len(full) - len(cut) == 3
    assert sorted(z for s, z in zip(cut.subject_ids, cut.slice_index) if s == "1") == list(range(3, nz))


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
    sid = open_dataset("fets2021", tmp_path).subjects[1]
    p = f / sid / f"{sid}_t2.nii.gz"
    _rewrite(p, np.ones((30, 32, 10), np.float32))
    with pytest.raises(DataError, match="shapes differ") as e:
        open_dataset("fets2021", tmp_path).load(sid)
    one_line(e)


def test_unexpected_label_values(tmp_path, phantom_root):
    f = copy_set(phantom_root, tmp_path, "MICCAI_FeTS2021_TrainingData")
    sid = open_dataset("fets2021", tmp_path).subjects[2]
    p = f / sid / f"{sid}_seg.nii.gz"
    seg = np.asarray(nib.load(str(p)).dataobj).copy()
    seg[0, 0, 0] = 3
    _rewrite(p, seg)
    with pytest.raises(DataError, match=r"unexpected label values \[3\]; expected a subset of \[0, 1, 2, 4\]") as e:
        open_dataset("fets2021", tmp_path).load(sid)
    one_line(e)


def test_nan_voxels(tmp_path, phantom_root):
    f = copy_set(phantom_root, tmp_path, "MICCAI_FeTS2021_TrainingData")
    sid = open_dataset("fets2021", tmp_path).subjects[3]
    p = f / sid / f"{sid}_flair.nii.gz"
    img = np.asarray(nib.load(str(p)).dataobj).copy()
    img[5, 5, 5] = np.nan
    _rewrite(p, img)
    with pytest.raises(DataError, match="NaN or Inf") as e:
        open_dataset("fets2021", tmp_path).load(sid)
    one_line(e)


def test_truncated_nifti(tmp_path, phantom_root):
    f = copy_set(phantom_root, tmp_path, "MICCAI_FeTS2021_TrainingData")
    sid = open_dataset("fets2021", tmp_path).subjects[4]
    p = f / sid / f"{sid}_t1.nii.gz"
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="corrupt or truncated") as e:
        open_dataset("fets2021", tmp_path).load(sid)
    one_line(e)


def test_empty_partition(tmp_path, phantom_root):
    f = copy_set(phantom_root, tmp_path, "MICCAI_FeTS2021_TrainingData")
    csv = f / "partitioning_2.csv"
    lines = [l for l in csv.read_text().splitlines() if not l.endswith(",14")]
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="unknown task '14-T1'"):
        task_slices("fets2021", "14-T1", tmp_path)
    with pytest.raises(DataError, match="partition 14 is not in") as e:
        open_dataset("fets2021", tmp_path).subjects_in(14)
    one_line(e)


def test_partition_listed_but_without_folders_is_refused_at_parse(tmp_path, phantom_root):
    f = copy_set(phantom_root, tmp_path, "MICCAI_FeTS2021_TrainingData")
    ds = open_dataset("fets2021", tmp_path)
    for s in ds.subjects_in(17):
        shutil.rmtree(f / s)
    with pytest.raises(DataError, match=r"partition 17 is listed in .*partitions with data: \[13, 14, 18\]") as e:
        task_slices("fets2021", "17-T2", tmp_path)
    one_line(e)


def test_partition_columns_read_by_name(tmp_path, phantom_root):
    f = copy_set(phantom_root, tmp_path, "MICCAI_FeTS2021_TrainingData")
    before = open_dataset("fets2021", tmp_path).partition_of
    p = f / "partitioning_2.csv"
    rows = [r.split(",") for r in p.read_text().splitlines()]
    p.write_bytes("\r\n".join(f"{b},{a}" for a, b in rows).encode())  # FeTS 2022 order: Partition_ID,Subject_ID
    assert open_dataset("fets2021", tmp_path).partition_of == before
    p.write_text("Subject,Part\nx,1\n")
    with pytest.raises(DataError, match="header naming Subject_ID and Partition_ID"):
        open_dataset("fets2021", tmp_path)


def test_scaled_label_file_is_refused_with_the_fix(tmp_path, phantom_root):
    f = copy_set(phantom_root, tmp_path, "MICCAI_FeTS2021_TrainingData")
    sid = open_dataset("fets2021", tmp_path).subjects[0]
    p = f / sid / f"{sid}_seg.nii.gz"
    img = nib.load(str(p))
    scaled = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    scaled.header.set_slope_inter(0.5, 0)
    nib.save(scaled, str(p))
    with pytest.raises(DataError, match=r"scale factor 0.5 .*get_unscaled") as e:
        open_dataset("fets2021", tmp_path).load(sid)
    one_line(e)


def test_msd_ignores_appledouble_and_test_images(tmp_path, phantom_root):
    d = copy_set(phantom_root, tmp_path, "Task01_BrainTumour")
    (d / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (d / "labelsTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (d / "imagesTs").mkdir()
    shutil.copy(d / "imagesTr" / "BRATS_001.nii.gz", d / "imagesTs" / "BRATS_999.nii.gz")
    ds = open_dataset("msd", tmp_path)
    assert ds.subjects == open_dataset("msd", phantom_root).subjects and "BRATS_999" not in ds.subjects
    assert len(task_slices("msd", "MSD-FLAIR", tmp_path, "all", image_size=16, cache_dir=tmp_path / "c")) > 0


@pytest.mark.parametrize("shape", [(240, 240, 6), (197, 233, 6), (144, 192, 6)])
def test_real_sized_slices_keep_the_whole_brain(tmp_path, shape):
    """A brain filling a real-sized slice, with small structures at its edge, survives any image size."""
    from trm_utils.slices import brain_box, fit_slices

    X, Y, Z = shape
    xx, yy = np.meshgrid(np.arange(X), np.arange(Y), indexing="ij")
    brain2d = ((xx - X / 2) / (0.46 * X)) ** 2 + ((yy - Y / 2) / (0.46 * Y)) ** 2 < 1
    brain = np.repeat(brain2d[:, :, None], Z, 2)
    lab = np.zeros(shape, np.int64)
    for (cx, cy) in ((0.1, 0.5), (0.9, 0.5), (0.5, 0.08), (0.5, 0.92)):  # four peripheral "lesions"
        lab[int(cx * X) - 6:int(cx * X) + 6, int(cy * Y) - 6:int(cy * Y) + 6] = 1  # 12 px: >= 1 px at 32
    lab &= brain
    box = brain_box(brain)
    for size in (32, 64, 192):
        img = fit_slices(np.moveaxis(brain.astype(np.float32), 2, 0), box, size, labels=False)
        out = fit_slices(np.moveaxis(lab, 2, 0), box, size, labels=True)
        assert img.shape == out.shape == (Z, size, size)
        assert set(np.unique(out)) <= {0, 1}  # nearest neighbour: exact label values
        # every lesion is still there, in its own quadrant
        h = size // 2
        for q in (out[:, : h // 2], out[:, -h // 2:], out[:, :, : h // 2], out[:, :, -h // 2:]):
            assert q.any()
        # the brain spans the image along its longer side
        cols = np.nonzero(img[0].any(0))[0]
        rows = np.nonzero(img[0].any(1))[0]
        assert max(np.ptp(cols), np.ptp(rows)) >= 0.85 * size


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


def test_phantom_bytes_do_not_depend_on_numpy_cpu_code_paths(tmp_path):
    """A sweep resumed on another machine names its data by their content (sweep.data_signature):
    the phantom must come out byte for byte the same whichever SIMD code numpy and OpenBLAS pick
    (AVX-512, AVX2 or the SSE baseline). Generated here with every code path this CPU has, and in
    a subprocess with all of numpy's dispatch targets switched off and OpenBLAS on its oldest kernel."""
    import os
    import subprocess
    import sys

    from numpy._core import _multiarray_umath as m

    present = [k for k in m.__cpu_dispatch__ if m.__cpu_features__.get(k)]
    if not present:
        pytest.skip("this CPU runs numpy's baseline code only: nothing to switch off")
    for kind in ("iseg2019", "fets2021"):
        make_phantom(kind, tmp_path / "here", seed=0, **SMALL)
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": " ".join(present), "OPENBLAS_CORETYPE": "Nehalem"}
    code = ("from trm_utils.data import make_phantom\n"
            f"for k in ('iseg2019', 'fets2021'): make_phantom(k, {str(tmp_path / 'baseline')!r}, seed=0, preset='smoke')\n"
            "import numpy; numpy.show_runtime()")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "'found': []" in " ".join(out.split())  # numpy ran its baseline code only
    a = sorted(p.relative_to(tmp_path / "here") for p in (tmp_path / "here").rglob("*") if p.is_file())
    b = sorted(p.relative_to(tmp_path / "baseline") for p in (tmp_path / "baseline").rglob("*") if p.is_file())
    assert a == b and len(a) > 20
    differ = [str(p) for p in a if (tmp_path / "here" / p).read_bytes() != (tmp_path / "baseline" / p).read_bytes()]
    assert not differ, f"phantom files differ between numpy's CPU code paths: {differ[:5]}"
