"""Shared fixtures and helpers: a tiny synthetic CIFAR-10 folder (tests never need the real data), a finished run."""
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model_train  # noqa: E402


def make_images(labels, rng):
    """Learnable synthetic images: each class has its own colour, plus noise."""
    palette = np.random.default_rng(123).integers(30, 226, size=(10, 3))
    images = palette[labels][:, None, None, :] + rng.normal(0, 20, size=(len(labels), 32, 32, 3))
    return np.clip(images, 0, 255).astype(np.uint8)


def write_batch(path, images, labels):
    """Write one batch in the standard CIFAR-10 python layout (channel-planar rows of 3072 bytes)."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    batch = {"batch_label": path.name, "labels": [int(x) for x in labels], "data": data,
             "filenames": [f"{i}.png" for i in range(len(images))]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def make_cifar_folder(root, per_batch=40, test_images=100, seed=0):
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test_images)]:
        labels = np.arange(n) % 10
        write_batch(folder / name, make_images(labels, rng), labels)
    return Path(root)


class RunsCode:
    """A pickle that runs a command when loaded: no file this script reads may load it."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def fails_with_one_line(argv, capsys):
    """main(argv) exits non-zero with one line on stderr and no traceback; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        model_train.main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return make_cifar_folder(tmp_path_factory.mktemp("data"))


def train_args(data_dir, out_dir, *extra, epochs=2):
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--epochs", str(epochs), "--batch-size", "32",
            "--workers", "0", "--device", "cpu", "--misclassified", "5", *extra]


@pytest.fixture(scope="session")
def trained_run(data_dir, tmp_path_factory):
    """One finished 2-epoch run on the synthetic data, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run")
    model_train.main(train_args(data_dir, out))
    return out


@pytest.fixture
def copy_of_run(trained_run, tmp_path):
    """A folder holding a copy of the finished run, for tests that may change it."""
    out = tmp_path / "copy"
    out.mkdir()
    for path in trained_run.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    return out
