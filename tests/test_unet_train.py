"""U-Net, frozen encoder, fine-tuning protocol, determinism, atomic checkpoints."""
import copy

import pytest
import torch

from trm_utils import UNet2D, evaluate, finetune, get_device, reset_head, seed_everything, train_source
from trm_utils.losses import METHODS


def toy_data(n=12, size=16, seed=0, classes=2):
    """Bright disks on noise; label = disk (and a ring class when classes=3)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = [], []
    for _ in range(n):
        cy, cx = torch.randint(4, size - 4, (2,), generator=g)
        r = torch.sqrt((yy - cy).float() ** 2 + (xx - cx).float() ** 2)
        lab = (r < 3).long()
        if classes == 3:
            lab[(r >= 3) & (r < 4.5)] = 2
        img = lab.float() + 0.3 * torch.randn(size, size, generator=g)
        images.append(img[None])
        labels.append(lab)
    return torch.stack(images), torch.stack(labels)


def small_unet(classes=2, seed=0):
    seed_everything(seed)
    return UNet2D(1, classes, base_channels=4, depth=2)


def test_unet_shapes_and_padding():
    m = small_unet(3)
    assert m(torch.randn(2, 1, 16, 16)).shape == (2, 3, 16, 16)
    assert m(torch.randn(1, 1, 13, 18)).shape == (1, 3, 13, 18)  # padded then cropped back
    with pytest.raises(ValueError, match="expects B x 1"):
        m(torch.randn(1, 2, 16, 16))


def test_classic_configuration_builds():
    m = UNet2D(1, 2)  # base 64, depth 4: the paper's U-Net
    n = sum(p.numel() for p in m.parameters())
    assert 30e6 < n < 32e6, n  # ~31M parameters, as the classic U-Net


def test_reset_head():
    m = small_unet(2)
    reset_head(m, 4)
    assert m(torch.randn(1, 1, 8, 8)).shape[1] == 4 and m.num_classes == 4


def test_finetune_freezes_encoder_and_trains_decoder():
    data = toy_data()
    src = small_unet()
    train_source(src, data, iterations=5, batch_size=4, show_progress=False)
    model = copy.deepcopy(src)
    finetune(model, data, "trm", iterations=4, batch_size=4, lr=1e-3, show_progress=False)
    for (name, a), b in zip(src.encoder.state_dict().items(), model.encoder.state_dict().values()):
        assert torch.equal(a, b), f"encoder {name} changed"  # weights and BatchNorm buffers
    changed = [not torch.equal(a, b) for a, b in zip(src.decoder.state_dict().values(), model.decoder.state_dict().values())]
    assert any(changed)
    assert all(not p.requires_grad for p in model.encoder.parameters())
    model.train()
    assert not model.encoder[0][1].training  # BatchNorm stays in eval mode
    assert model.decoder[0].conv[1].training


def test_head_reset_when_class_counts_differ():
    src = small_unet(2)
    data = toy_data(classes=3)
    model = copy.deepcopy(src)
    finetune(model, data, "vanilla", iterations=2, batch_size=4, show_progress=False)
    assert model.num_classes == 3


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_lowers_training_loss(method):
    data = toy_data(n=16)
    src = small_unet(seed=1)
    train_source(src, toy_data(n=16, seed=5), iterations=10, batch_size=8, show_progress=False)
    model = copy.deepcopy(src)
    hist = finetune(model, data, method, iterations=60, lr=3e-3, batch_size=16, show_progress=False)
    assert len(hist["loss"]) == 60
    first, last = sum(hist["loss"][:5]) / 5, sum(hist["loss"][-5:]) / 5
    assert last < 0.8 * first, (method, first, last)


def test_same_seed_same_losses():
    data = toy_data()
    runs = []
    for _ in range(2):
        m = small_unet(seed=3)
        runs.append(finetune(m, data, "trm", iterations=5, batch_size=4, seed=11, show_progress=False)["loss"])
    assert runs[0] == runs[1]
    m = small_unet(seed=3)
    other = finetune(m, data, "trm", iterations=5, batch_size=4, seed=12, show_progress=False)["loss"]
    assert other != runs[0]


def test_refresh_and_eval_history(tmp_path):
    data = toy_data()
    m = small_unet()
    ckpt = tmp_path / "ft.pt"
    hist = finetune(m, data, "trm", iterations=6, batch_size=4, refresh_every=2, eval_data=data, eval_every=3,
                    show_progress=False, checkpoint_path=ckpt)
    assert len(hist["refresh_seconds"]) == 2  # at iterations 2 and 4 (not after the last)
    assert [e["iteration"] for e in hist["eval"]] == [3, 6]
    assert all(0 <= e["dice"] <= 1 for e in hist["eval"])
    saved = torch.load(ckpt, weights_only=False)
    assert set(saved) == {"state_dict", "history"}
    assert not list(tmp_path.glob("*.tmp"))


def test_maps_of_other_slices_or_reading_refused():
    from trm_utils.maps import LossMaps

    data = toy_data()
    wrong = LossMaps("image", torch.zeros(3, 16, 16), torch.zeros(3, 16, 16), n=3)
    with pytest.raises(ValueError, match="image maps have shape"):
        finetune(small_unet(), data, "trm", maps=wrong, reading="image", iterations=1, show_progress=False)
    with pytest.raises(ValueError, match="reading given for a run that reads 'dataset'"):
        finetune(small_unet(), data, "trm", maps=wrong, iterations=1, show_progress=False)
    small = LossMaps("dataset", torch.zeros(8, 8), torch.zeros(8, 8), n=12)
    with pytest.raises(ValueError, match="dataset maps have shape"):
        finetune(small_unet(), data, "trm", maps=small, iterations=1, show_progress=False)
    with pytest.raises(ValueError, match="exp\\(-T\\)"):
        finetune(small_unet(), data, "trs_map", reading="image", iterations=1, show_progress=False)


def test_evaluate_per_subject():
    images, labels = toy_data(n=4)

    class Data:
        pass

    d = Data()
    d.images, d.labels, d.subject_ids, d.num_classes = images, labels, [0, 0, 1, 1], 2
    out = evaluate(small_unet(), d)
    assert out["n_subjects"] == 2 and 0 <= out["dice"] <= 1


def test_get_device():
    assert get_device("cpu").type == "cpu"
    assert get_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA|none is available"):
            get_device("cuda")


def test_augment_batch_labels_follow_the_flips_and_the_seed_fixes_it():
    from trm_utils.train import AUGMENT, augment_batch

    x, y = toy_data(n=64, size=16, seed=4)
    ax, ay = augment_batch(x, y, torch.Generator().manual_seed(5))
    bx, by = augment_batch(x, y, torch.Generator().manual_seed(5))
    assert torch.equal(ax, bx) and torch.equal(ay, by)
    assert not torch.equal(ay, y)  # some of the 64 slices were flipped
    flips = {"none": lambda t: t, "lr": lambda t: t.flip(-1), "ap": lambda t: t.flip(-2),
             "both": lambda t: t.flip(-1).flip(-2)}
    seen = set()
    for i in range(len(y)):
        match = [k for k, f in flips.items() if torch.equal(f(y[i]), ay[i])]
        assert match, f"slice {i}: the label is not a flip of the original"
        k = match[0]
        seen.add(k)
        orig = flips[k](x[i])
        # the image is the same flip of the original, then a * x + b within the stated ranges
        a = ((ax[i] - ax[i].mean()) * (orig - orig.mean())).sum() / ((orig - orig.mean()) ** 2).sum()
        b = ax[i].mean() - a * orig.mean()
        assert torch.allclose(ax[i], a * orig + b, atol=1e-4)
        assert abs(float(a) - 1) <= AUGMENT["scale"] + 1e-5 and abs(float(b)) <= AUGMENT["shift"] + 1e-5
    assert seen == set(flips)  # 64 slices draw every combination
    assert torch.equal(x, toy_data(n=64, size=16, seed=4)[0])  # the input is not modified


def test_source_augmentation_changes_training_and_is_seeded():
    data = toy_data()
    run = lambda aug: train_source(small_unet(seed=3), data, iterations=6, batch_size=4, seed=2,  # noqa: E731
                                   show_progress=False, augment=aug)["loss"]
    a, b, plain = run(True), run(True), run(False)
    assert a == b and a != plain
