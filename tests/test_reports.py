"""The pictures and tables that show what the model learned (curves, mistakes, confusion, per class)."""
import csv
import struct
import sys

import numpy as np
import pytest
import torch

import model_train as mt
from conftest import make_images


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])  # width, height from the IHDR chunk


def test_training_writes_valid_pngs_of_sensible_size(trained_run):
    for name in ("curves.png", "misclassified.png", "confusion_matrix.png"):
        width, height = png_size(trained_run / name)
        assert 300 <= width <= 3000 and 200 <= height <= 3000, (name, width, height)
    assert "matplotlib.pyplot" not in sys.modules  # never the interactive interface: no window can open


@pytest.fixture(scope="module")
def predictions():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(np.arange(200) % 10)
    logits = torch.from_numpy(rng.normal(size=(200, 10))).float()
    logits[torch.arange(200), labels] += torch.from_numpy(rng.uniform(0, 3, 200)).float()  # mostly right
    return logits, labels


def test_per_class_csv_and_console_match_a_direct_count(predictions, tmp_path, capsys):
    logits, labels = predictions
    counts = np.zeros((10, 10), np.int64)
    np.add.at(counts, (labels.numpy(), logits.argmax(1).numpy()), 1)
    mt.write_per_class(counts, tmp_path / "per_class.csv")
    with open(tmp_path / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["class"] for row in rows] == list(mt.CLASSES)
    for k, row in enumerate(rows):
        mine = labels == k
        assert float(row["accuracy"]) == pytest.approx(100 * (logits.argmax(1)[mine] == k).float().mean().item(),
                                                       abs=0.005)
        wrong = (logits.argmax(1)[mine][logits.argmax(1)[mine] != k]).tolist()
        assert int(row["images"]) == mine.sum() and int(row["times"]) == max(map(wrong.count, wrong), default=0)
    off = counts * (1 - np.eye(10, dtype=counts.dtype))
    i, j = np.unravel_index(off.argmax(), off.shape)
    out = capsys.readouterr().out
    assert f"most confused (true -> predicted): {mt.CLASSES[i]} -> {mt.CLASSES[j]} ({off[i, j]})" in out


def test_a_class_never_mistaken_is_taken_for_nothing(tmp_path, capsys):
    counts = np.diag([50] * 10)
    counts[3, 5], counts[5, 3], counts[1, 9] = 30, 20, 7
    mt.write_per_class(counts, tmp_path / "per_class.csv")
    out = capsys.readouterr().out
    assert "horse           50   100.00%   -" in out and "cat             80    62.50%   dog (30)" in out
    assert "most confused (true -> predicted): cat -> dog (30), dog -> cat (20), automobile -> truck (7)" in out
    with open(tmp_path / "per_class.csv", newline="") as f:
        horse = [row for row in csv.DictReader(f) if row["class"] == "horse"][0]
    assert horse["most_confused_with"] == "" and horse["times"] == "0"


def test_misclassified_png_shows_the_first_mistakes_with_their_true_labels(predictions, monkeypatch, tmp_path):
    logits, labels = predictions
    images = np.random.default_rng(3).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    saved = {}
    monkeypatch.setattr(mt, "save", lambda content, path: saved.update({path.name: content}))
    mt.plot_misclassified(logits, labels, images, 20, tmp_path / "misclassified.png", "w")
    fig = saved["misclassified.png"]
    wrong = (logits.argmax(1) != labels).nonzero().flatten()[:20].tolist()  # the first ones, in test-set order
    shown = [ax for ax in fig.axes if ax.get_images()]
    assert len(shown) == len(wrong) == min(20, (logits.argmax(1) != labels).sum().item())
    for ax, index in zip(shown, wrong):
        assert np.array_equal(ax.get_images()[0].get_array(), images[index])
        confidence = round(100 * logits[index].softmax(0).max().item())
        assert ax.get_title() == f"{mt.CLASSES[labels[index]]} → {mt.CLASSES[logits[index].argmax()]} ({confidence}%)"


def test_the_report_pictures_say_what_they_show(monkeypatch, tmp_path):
    """misclassified.png shows the first mistakes in their true colours with a legend for its captions, and both
    pictures name the weights they come from."""
    images = np.random.default_rng(2).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    labels = torch.from_numpy(np.arange(20) % 10)
    logits = torch.nn.functional.one_hot((labels + 1) % 10, 10).float()  # every image wrong
    saved = {}
    monkeypatch.setattr(mt, "save", lambda content, path: saved.update({path.name: content}))
    loader = torch.utils.data.DataLoader(mt.CIFAR10Albumentations(images, labels.numpy(), mt.test_transform()), 8)
    monkeypatch.setattr(mt, "predict", lambda *args, **kwargs: (logits, labels))
    cfg = mt.get_args_parser().parse_args(["--misclassified", "3", "--no-tta"])
    mt.report(None, loader, torch.device("cpu"), cfg, tmp_path, "best_model.pth, epoch 7")
    figure = saved["misclassified.png"]
    shown = [ax.get_images()[0].get_array() for ax in figure.axes if ax.get_images()]
    assert len(shown) == 3 and all(np.array_equal(a, b) for a, b in zip(shown, images))
    assert figure.axes[0].get_title() == "airplane → automobile (23%)"
    assert "true → predicted (the prediction's probability)" in figure._suptitle.get_text()
    assert "best_model.pth, epoch 7" in figure._suptitle.get_text()
    assert "best_model.pth, epoch 7" in saved["confusion_matrix.png"].axes[0].get_title()


def test_flip_tta_equals_plain_evaluation_on_mirror_symmetric_images():
    labels = np.arange(20) % 10
    images = make_images(labels, np.random.default_rng(0))
    images = np.concatenate([images[:, :, :16], images[:, :, :16][:, :, ::-1]], axis=2)  # left-right symmetric
    loader = torch.utils.data.DataLoader(mt.CIFAR10Albumentations(images, labels, mt.test_transform()), 8)
    torch.manual_seed(0)
    model = mt.Net().to(memory_format=torch.channels_last)
    plain, _ = mt.predict(model, loader, torch.device("cpu"))
    tta, _ = mt.predict(model, loader, torch.device("cpu"), tta=True)
    assert torch.allclose(plain, tta, atol=1e-5)
    asymmetric = mt.CIFAR10Albumentations(make_images(labels, np.random.default_rng(1)), labels, mt.test_transform())
    loader = torch.utils.data.DataLoader(asymmetric, 8)
    assert not torch.allclose(*(mt.predict(model, loader, torch.device("cpu"), tta=t)[0] for t in (False, True)))


def test_curves_show_whole_epochs_the_learning_rate_and_the_settings(trained_run, tmp_path):
    history = torch.load(trained_run / "last_checkpoint.pth", weights_only=True)["history"]
    cfg = mt.get_args_parser().parse_args(["--epochs", "2", "--batch-size", "32"])
    fig = mt.plot_curves(history, cfg, tmp_path / "curves.png")
    png_size(tmp_path / "curves.png")
    loss_ax, acc_ax, lr_ax = fig.axes
    assert list(lr_ax.lines[0].get_ydata()) == [row["lr"] for row in history] and history[0]["lr"] == mt.LR
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    title = fig._suptitle.get_text()
    assert "2 epochs" in title and "batch 32" in title and "seed 42" in title and "best test accuracy" in title
    assert "mixup" not in title and acc_ax.get_legend_handles_labels()[1] == ["train", "test"]
    cfg.mixup = 0.4  # a run with mixup says so: its training accuracy is on blended images and sits below the test's
    fig = mt.plot_curves(history, cfg, tmp_path / "curves.png")
    assert "mixup 0.4, seed 42" in fig._suptitle.get_text()
    assert fig.axes[1].get_legend_handles_labels()[1] == ["train (blended images)", "test"]
