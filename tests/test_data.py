"""Reading CIFAR-10 batch files, the augmentations' real effects, and reproducible loading."""
import copy
import os
import pickle
from pathlib import Path
from argparse import Namespace

import albumentations as A
import numpy as np
import pytest
import torch

import model_train as mt
from conftest import make_cifar_folder, make_images, write_batch

MEAN_PIXEL = np.array(mt.CIFAR10_MEAN) * 255


def test_load_reads_all_batches_as_hwc_uint8(data_dir):
    train_x, train_y, test_x, test_y = mt.load_cifar10(data_dir)
    assert train_x.shape == (200, 32, 32, 3) and train_x.dtype == np.uint8
    assert test_x.shape == (100, 32, 32, 3) and list(test_y[:12]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    # The stored rows are channel-planar: the first 1024 bytes are the red plane.
    with open(data_dir / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="latin1")["data"]
    assert np.array_equal(train_x[0, :, :, 0].ravel(), raw[0, :1024])
    assert np.array_equal(train_x[0, :, :, 2].ravel(), raw[0, 2048:])


def test_missing_batch_file_is_named(tmp_path):
    make_cifar_folder(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(mt.UserError, match="data_batch_3 is missing"):
        mt.load_cifar10(tmp_path)


def test_truncated_batch_file_is_named(tmp_path):
    make_cifar_folder(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(mt.UserError, match="test_batch is truncated"):
        mt.load_cifar10(tmp_path)


def test_wrong_shape_and_bad_labels_are_refused(tmp_path):
    folder = make_cifar_folder(tmp_path) / "cifar-10-batches-py"
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}, f)
    with pytest.raises(mt.UserError, match="shape"):
        mt.load_cifar10(tmp_path)
    labels = np.array([0, 1, 2, 11])
    write_batch(folder / "data_batch_2", make_images(labels % 10, np.random.default_rng(0)), labels)
    with pytest.raises(mt.UserError, match="labels outside 0..9"):
        mt.load_cifar10(tmp_path)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_batch_file_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = make_cifar_folder(tmp_path) / "cifar-10-batches-py"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": RunsCode(), "labels": []}, f)
    with pytest.raises(mt.UserError, match="data_batch_1"):
        mt.load_cifar10(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_failed_download_says_how_to_supply_the_data(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    with pytest.raises(mt.UserError, match="could not download CIFAR-10.*copy an unpacked cifar-10-batches-py"):
        mt.load_cifar10(tmp_path / "empty")


# ----------------------------------------------------------------------------------------- augmentations
def only(transform_type, p=1.0):
    """The pipeline's own instance of one transform, always applied, seeded."""
    transform = copy.deepcopy(next(t for t in mt.train_transform().transforms if isinstance(t, transform_type)))
    transform.p = p
    return transform


def test_pipelines_are_strict_about_arguments():
    for pipeline in (mt.train_transform(), mt.test_transform()):
        assert pipeline.strict and all(t.invalid_args == [] for t in pipeline.transforms)
    with pytest.raises(ValueError, match="not valid"), pytest.warns(UserWarning):
        A.Compose([A.HorizontalFlip(probability=0.5)], strict=True)


def test_each_random_augmentation_fires_as_often_as_its_setting():
    def probabilities(*args):
        return {type(t).__name__: t.p for t in mt.train_transform(*args).transforms}

    assert probabilities() == {"HorizontalFlip": 0.5, "Affine": mt.AFFINE_P, "CoarseDropout": mt.CUTOUT_P,
                               "ToTensorV2": 1.0}
    assert probabilities(0.25, 0.75) == {"HorizontalFlip": 0.5, "Affine": 0.25, "CoarseDropout": 0.75,
                                         "ToTensorV2": 1.0}


def test_affine_and_cutout_probabilities_come_from_the_flags(data_dir):
    """--affine-p 0 --cutout-p 0 leaves only the flip; --cutout-p 1 cuts a hole into every image."""
    data = mt.load_cifar10(data_dir)
    images = torch.from_numpy(data[0]).permute(0, 3, 1, 2)

    def training_images(*flags):
        cfg = mt.get_args_parser().parse_args(["--workers", "0", "--batch-size", "64", *flags])
        loader, _ = mt.make_loaders(data, cfg, torch.device("cpu"))
        loader.sampler.set_epoch(0)
        index = list(loader.sampler)[:64]  # epoch 0: the first batch's image numbers, in order
        batch = next(iter(loader))[0]
        assert batch.dtype == torch.uint8  # pixels; to_device() normalizes them
        return batch.int(), images[index].int()

    batch, originals = training_images("--affine-p", "0", "--cutout-p", "0")
    for out, original in zip(batch, originals):  # only flipped or not: nothing moved, nothing cut
        assert torch.equal(out, original) or torch.equal(out, original.flip(2))
    batch, _ = training_images("--cutout-p", "1")
    hole = (batch - torch.from_numpy(MEAN_PIXEL).view(3, 1, 1)).abs().amax(1) <= 1  # mean colour
    assert all(h.sum() >= 256 for h in hole)  # every image has a 16 x 16 hole of the mean colour


def test_horizontal_flip_mirrors_the_image():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(only(A.HorizontalFlip)(image=image)["image"], image[:, ::-1])


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
    normalized, _ = mt.to_device(torch.from_numpy(out).permute(2, 0, 1)[None], torch.zeros(1), torch.device("cpu"))
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


def test_test_transform_only_makes_a_channels_first_tensor():
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = mt.test_transform()(image=image)["image"]
    assert out.dtype == torch.uint8 and torch.equal(out, torch.from_numpy(image).permute(2, 0, 1))


def test_to_device_normalizes_pixels_with_the_cifar10_statistics():
    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    labels, before = torch.tensor([3, 7]), pixels.clone()
    images, out_labels = mt.to_device(pixels, labels, torch.device("cpu"))
    mean, std = (torch.tensor(stats).view(1, 3, 1, 1) for stats in (mt.CIFAR10_MEAN, mt.CIFAR10_STD))
    expected = (pixels / 255 - mean) / std
    assert images.dtype == torch.float32 and torch.allclose(images, expected, atol=1e-5)
    assert images.is_contiguous(memory_format=torch.channels_last) and torch.equal(out_labels, labels)
    assert torch.equal(pixels, before)  # the caller's batch is untouched


def test_sample_augmentation_depends_on_seed_epoch_and_image_only():
    images = make_images(np.arange(20) % 10, np.random.default_rng(0))
    dataset = mt.CIFAR10Albumentations(images, np.arange(20) % 10, mt.train_transform(), seed=7)
    assert torch.equal(dataset[3][0], dataset[3][0])
    assert dataset[3 + 20][1] == dataset[3][1]  # epoch 1's tag for image 3
    assert not all(torch.equal(dataset[i][0], dataset[i + 20][0]) for i in range(20))  # new epoch, new draws
    other_seed = mt.CIFAR10Albumentations(images, np.arange(20) % 10, mt.train_transform(), seed=8)
    assert not all(torch.equal(dataset[i][0], other_seed[i][0]) for i in range(20))


def test_sampler_shuffles_per_epoch_and_is_reproducible():
    sampler = mt.EpochSampler(50, seed=1)
    sampler.set_epoch(1)
    first = list(sampler)
    assert sorted(first) == list(range(50, 100)) and first == list(sampler)
    sampler.set_epoch(2)
    assert [i - 100 for i in sampler] != [i - 50 for i in first]


def test_batches_do_not_depend_on_the_number_of_workers(data_dir):
    data = mt.load_cifar10(data_dir)

    def first_batches(workers):
        cfg = Namespace(workers=workers, seed=3, batch_size=16, affine_p=mt.AFFINE_P, cutout_p=mt.CUTOUT_P)
        loader, _ = mt.make_loaders(data, cfg, torch.device("cpu"))
        loader.sampler.set_epoch(2)
        return [images for images, _ in list(loader)[:3]]

    for a, b in zip(first_batches(0), first_batches(2)):
        assert torch.equal(a, b)


def test_data_dir_may_be_the_batch_folder_itself(data_dir, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: pytest.fail("tried to download"))
    folder = data_dir / "cifar-10-batches-py"
    assert mt.find_batch_folder(folder) == folder and mt.find_batch_folder(data_dir) == folder
    train_images, *_ = mt.load_cifar10(folder)
    assert len(train_images) == 200 and not (folder / "cifar-10-batches-py").exists()


def test_a_failed_download_leaves_no_folder_it_made(tmp_path, monkeypatch):
    import torchvision.datasets

    def partial_download(root, **kwargs):
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"half")
        raise OSError("Connection reset")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", partial_download)
    with pytest.raises(mt.UserError, match="could not download"):
        mt.load_cifar10(tmp_path / "typo" / "data")
    assert os.listdir(tmp_path) == []
    (tmp_path / "mine").mkdir()  # a folder the user made stays
    with pytest.raises(mt.UserError):
        mt.load_cifar10(tmp_path / "mine")
    assert os.listdir(tmp_path) == ["mine"]
