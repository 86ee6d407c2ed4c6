"""Reading CIFAR-10 batch files (and refusing bad ones), the augmentations' real effects, reproducible loading."""
import copy
import os
import pickle
from argparse import Namespace
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch

import model_train as mt
from conftest import RunsCode, fails_with_one_line, make_cifar_folder, make_images, train_args, write_batch

MEAN_PIXEL = np.array(mt.CIFAR10_MEAN) * 255


def test_load_reads_all_batches_as_hwc_uint8(data_dir):
    train_x, train_y, test_x, test_y = mt.load_cifar10(data_dir)
    assert train_x.shape == (200, 32, 32, 3) and train_x.dtype == np.uint8 and len(train_y) == 200
    assert test_x.shape == (100, 32, 32, 3) and list(test_y[:12]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    # The stored rows are channel-planar: the first 1024 bytes are the red plane.
    with open(data_dir / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="latin1")["data"]
    assert np.array_equal(train_x[0, :, :, 0].ravel(), raw[0, :1024])
    assert np.array_equal(train_x[0, :, :, 2].ravel(), raw[0, 2048:])


def damage(folder, kind):
    """Spoil a synthetic CIFAR-10 folder in one way; returns what the error line must name."""
    batches = folder / "cifar-10-batches-py"
    if kind == "missing":
        os.remove(batches / "data_batch_3")
        return "data_batch_3 is missing"
    if kind == "truncated":
        (batches / "data_batch_4").write_bytes((batches / "data_batch_4").read_bytes()[:1000])
        return "data_batch_4 is truncated"
    if kind == "wrong shape":
        with open(batches / "data_batch_2", "wb") as f:
            pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}, f)
        return "shape"
    if kind == "bad labels":
        labels = np.array([0, 1, 2, 11])
        write_batch(batches / "data_batch_2", make_images(labels % 10, np.random.default_rng(0)), labels)
        return "labels from 0 to 9"
    with open(batches / "data_batch_1", "wb") as f:  # "runs code"
        pickle.dump({"data": RunsCode(), "labels": []}, f)
    return "data_batch_1"


@pytest.mark.parametrize("kind", ["missing", "truncated", "wrong shape", "bad labels", "runs code"])
def test_a_damaged_data_set_is_one_line_and_runs_nothing(kind, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    says = damage(make_cifar_folder(tmp_path / "data"), kind)
    err = fails_with_one_line(train_args(tmp_path / "data", tmp_path / "out"), capsys)
    assert says in err and not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out" / "best_model.pth").exists()


def no_download(monkeypatch):
    import torchvision.datasets
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: pytest.fail("tried to download"))


def test_data_dir_may_be_the_batch_folder_itself_but_not_a_file(data_dir, tmp_path, capsys, monkeypatch):
    no_download(monkeypatch)
    folder = data_dir / "cifar-10-batches-py"
    assert mt.find_batch_folder(folder) == folder and mt.find_batch_folder(data_dir) == folder
    assert len(mt.load_cifar10(folder)[0]) == 200 and not (folder / "cifar-10-batches-py").exists()
    (tmp_path / "notes.txt").write_text("not a folder")
    err = fails_with_one_line(train_args(tmp_path / "notes.txt", tmp_path / "out"), capsys)
    assert "is a file, not a folder" in err


def test_a_failed_download_says_how_to_supply_the_data_and_leaves_no_folder_it_made(tmp_path, capsys, monkeypatch):
    import torchvision.datasets

    def partial_download(root, **kwargs):
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"half")
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", partial_download)
    err = fails_with_one_line(train_args(tmp_path / "typo" / "data", tmp_path / "out"), capsys)
    assert "could not download CIFAR-10" in err and "copy an unpacked cifar-10-batches-py" in err
    assert sorted(os.listdir(tmp_path)) == ["out"]
    (tmp_path / "mine").mkdir()  # a folder the user made stays
    with pytest.raises(mt.UserError):
        mt.load_cifar10(tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()


# ----------------------------------------------------------------------------------------- augmentations
def only(transform_type):
    """The pipeline's own instance of one transform, always applied."""
    transform = copy.deepcopy(next(t for t in mt.train_transform().transforms if isinstance(t, transform_type)))
    transform.p = 1.0
    return transform


def test_pipelines_are_strict_and_each_random_step_fires_as_often_as_its_setting():
    for pipeline in (mt.train_transform(), mt.test_transform()):
        assert pipeline.strict and all(t.invalid_args == [] for t in pipeline.transforms)
    probabilities = {type(t).__name__: t.p for t in mt.train_transform(0.25, 0.75).transforms}
    assert probabilities == {"HorizontalFlip": 0.5, "Affine": 0.25, "CoarseDropout": 0.75, "ToTensorV2": 1.0}


def test_affine_and_cutout_probabilities_come_from_the_flags(data_dir):
    """--affine-p 0 --cutout-p 0 leaves only the flip; --cutout-p 1 cuts a hole into every image."""
    data = mt.load_cifar10(data_dir)
    images = torch.from_numpy(data[0]).permute(0, 3, 1, 2)

    def training_images(*flags):
        cfg = mt.get_args_parser().parse_args(["--workers", "0", "--batch-size", "64", *flags])
        loader, _ = mt.make_loaders(data, cfg, torch.device("cpu"))
        loader.sampler.epoch = 0
        index = list(loader.sampler)[:64]  # epoch 0: the first batch's image numbers, in order
        batch = next(iter(loader))[0]
        assert batch.dtype == torch.uint8  # pixels; normalize() makes floats of them
        return batch.int(), images[index].int()

    batch, originals = training_images("--affine-p", "0", "--cutout-p", "0")
    for out, original in zip(batch, originals):  # only flipped or not: nothing moved, nothing cut
        assert torch.equal(out, original) or torch.equal(out, original.flip(2))
    batch, _ = training_images("--cutout-p", "1")
    hole = (batch - torch.from_numpy(MEAN_PIXEL).view(3, 1, 1)).abs().amax(1) <= 1  # mean colour
    assert all(h.sum() >= 256 for h in hole)  # every image has a 16 x 16 hole of the mean colour


def test_coarse_dropout_cuts_one_16x16_hole_of_the_mean_colour():
    image = np.zeros((32, 32, 3), np.uint8)
    dropout = only(A.CoarseDropout)
    for seed in range(10):
        dropout.set_random_seed(seed)
        out = dropout(image=image)["image"]
        hole = out.any(2)
        rows, cols = hole.any(1).nonzero()[0], hole.any(0).nonzero()[0]
        assert hole.sum() == 256 and len(rows) == len(cols) == 16
        assert np.abs(out[hole] - MEAN_PIXEL).max() <= 1
    normalized = mt.normalize(torch.from_numpy(out).permute(2, 0, 1)[None], torch.device("cpu"))
    assert normalized[0].permute(1, 2, 0)[torch.from_numpy(hole)].abs().max() < 0.01  # ~0 once normalized


def test_affine_shifts_at_most_10_percent_and_reflects_at_the_border():
    affine = only(A.Affine)
    assert affine.rotate == (-10, 10) and affine.scale == {"x": (0.9, 1.1), "y": (0.9, 1.1)}
    marker = np.zeros((32, 32, 3), np.uint8)
    marker[15:17, 15:17] = 255  # the centre, which rotation and scaling about the centre leave in place
    shifts = []
    for seed in range(40):
        affine.set_random_seed(seed)
        out = affine(image=marker)["image"].max(2).astype(float)
        ys, xs = np.indices(out.shape)
        shifts.append(((ys * out).sum() / out.sum() - 15.5, (xs * out).sum() / out.sum() - 15.5))
    shifts = np.array(shifts)
    assert np.abs(shifts).max() <= 3.2 + 0.5  # 10 % of 32 pixels, plus interpolation
    assert shifts.min() < -1 and shifts.max() > 1  # it does move things, both ways
    flat = np.full((32, 32, 3), 200, np.uint8)
    assert (affine(image=flat)["image"] == 200).all()  # reflected border: no black corners


def test_normalize_uses_the_cifar10_statistics_and_leaves_the_batch_alone():
    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    before = pixels.clone()
    images = mt.normalize(pixels, torch.device("cpu"))
    mean, std = (torch.tensor(stats).view(1, 3, 1, 1) for stats in (mt.CIFAR10_MEAN, mt.CIFAR10_STD))
    assert images.dtype == torch.float32 and torch.allclose(images, (pixels / 255 - mean) / std, atol=1e-5)
    assert images.is_contiguous(memory_format=torch.channels_last) and torch.equal(pixels, before)


def test_augmentation_depends_on_seed_epoch_and_image_only():
    images, labels = make_images(np.arange(20) % 10, np.random.default_rng(0)), np.arange(20) % 10
    dataset = mt.CIFAR10Albumentations(images, labels, mt.train_transform(), seed=7)
    assert torch.equal(dataset[3][0], dataset[3][0]) and dataset[3 + 20][1] == dataset[3][1]
    assert not all(torch.equal(dataset[i][0], dataset[i + 20][0]) for i in range(20))  # new epoch, new draws
    other_seed = mt.CIFAR10Albumentations(images, labels, mt.train_transform(), seed=8)
    assert not all(torch.equal(dataset[i][0], other_seed[i][0]) for i in range(20))
    sampler = mt.EpochSampler(50, seed=1)
    sampler.epoch = 1
    first = list(sampler)
    assert sorted(first) == list(range(50, 100)) and first == list(sampler)  # epoch 1's tags, the same again
    sampler.epoch = 2
    assert [i - 100 for i in sampler] != [i - 50 for i in first]


def test_batches_do_not_depend_on_the_number_of_workers(data_dir):
    data = mt.load_cifar10(data_dir)

    def first_batches(workers):
        cfg = Namespace(workers=workers, seed=3, batch_size=16, affine_p=mt.AFFINE_P, cutout_p=mt.CUTOUT_P)
        loader, _ = mt.make_loaders(data, cfg, torch.device("cpu"))
        loader.sampler.epoch = 2
        return [images for images, _ in list(loader)[:3]]

    for a, b in zip(first_batches(0), first_batches(2)):
        assert torch.equal(a, b)
