"""Using a trained model: load_model() and classify() for a notebook, --predict for image files, results.json."""
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import model_train as mt
from conftest import make_images
from test_bad_input import fails_with_one_line

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def write_image(path, rgb):
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def model(trained_run):
    return mt.load_model(trained_run / "best_model.pth")


def test_load_model_gives_the_best_weights_in_eval_mode(model, trained_run):
    assert isinstance(model, mt.Net) and not model.training
    saved = torch.load(trained_run / "best_model.pth", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_load_model_takes_the_averaged_weights_of_a_last_checkpoint(trained_run):
    checkpoint = torch.load(trained_run / "last_checkpoint.pth", weights_only=True)
    model = mt.load_model(trained_run / "last_checkpoint.pth")
    assert torch.equal(model.head[-1].weight, checkpoint["average"]["weights"]["head.3.weight"])


def test_classify_agrees_with_the_test_pass(model, data_dir):
    images, labels = mt.load_cifar10(data_dir)[2:]
    loader = torch.utils.data.DataLoader(mt.CIFAR10Albumentations(images, labels, mt.test_transform()), 64)
    logits, _ = mt.predict(model, loader, torch.device("cpu"))
    top = mt.classify(model, list(images), top=3)
    assert len(top) == len(images)
    for pairs, row in zip(top, logits.softmax(1)):
        values, indices = row.topk(3)
        assert [name for name, _ in pairs] == [mt.CLASSES[i] for i in indices]
        assert [p for _, p in pairs] == pytest.approx(values.tolist(), abs=1e-5)


def test_classify_resizes_any_size_to_32_by_32(model):
    image = make_images(np.array([3]), np.random.default_rng(1))[0]
    larger = image.repeat(3, axis=0).repeat(3, axis=1)  # 96 x 96: area averaging gives back the 32 x 32 original
    oblong = cv2.resize(image, (50, 40))
    small = image[::2, ::2]
    same, big, odd, tiny = mt.classify(model, [image, larger, oblong, small], top=10)
    assert same == big
    for pairs in (odd, tiny):
        assert sorted(name for name, _ in pairs) == sorted(mt.CLASSES)
        assert sum(p for _, p in pairs) == pytest.approx(1, abs=1e-4)
        assert [p for _, p in pairs] == sorted((p for _, p in pairs), reverse=True)


@pytest.mark.parametrize("bad", [np.zeros((32, 32), np.uint8), np.zeros((32, 32, 4), np.uint8),
                                 np.zeros((32, 32, 3), np.float32)])
def test_classify_refuses_what_is_not_an_rgb_image(model, bad):
    with pytest.raises(ValueError, match="uint8 height x width x 3"):
        mt.classify(model, [bad])


def test_predict_prints_the_top_3_classes_of_each_file(model, trained_run, tmp_path, capsys):
    rng = np.random.default_rng(2)
    png = write_image(tmp_path / "a.png", make_images(np.array([1]), rng)[0])
    jpeg = write_image(tmp_path / "b.jpg", cv2.resize(make_images(np.array([7]), rng)[0], (120, 90)))
    mt.main(["--predict", str(png), str(jpeg), "--weights", str(trained_run / "best_model.pth"), "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, (png, jpeg)):
        expected = mt.classify(model, [mt.read_image(path)])[0]
        assert line == f"{path}: " + ", ".join(f"{name} {100 * p:.1f} %" for name, p in expected)


def test_predict_takes_best_model_from_out_dir_by_default(trained_run, tmp_path, capsys):
    png = write_image(tmp_path / "a.png", np.zeros((32, 32, 3), np.uint8))
    mt.main(["--predict", str(png), "--out-dir", str(trained_run), "--device", "cpu"])
    assert len(re.findall(r"\d+\.\d %", capsys.readouterr().out)) == 3


@pytest.mark.parametrize("content", [b"epoch,lr\n1,0.1\n", b"", b"\x89PNG\r\n\x1a\n broken"])
def test_predict_on_a_file_that_is_not_an_image(content, trained_run, tmp_path, capsys):
    path = tmp_path / "not_an_image.png"
    path.write_bytes(content)
    err = fails_with_one_line(["--predict", str(path), "--out-dir", str(trained_run)], capsys)
    assert f"{path} is not an image file" in err


def test_predict_on_a_missing_file_and_with_missing_weights(tmp_path, capsys):
    assert "cannot read" in fails_with_one_line(["--predict", str(tmp_path / "gone.png")], capsys)
    png = write_image(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    err = fails_with_one_line(["--predict", str(png), "--out-dir", str(tmp_path)], capsys)
    assert f"--weights {tmp_path / 'best_model.pth'} does not exist" in err


def test_weights_is_only_for_predict(capsys):
    assert "--weights is for --predict" in fails_with_one_line(["--weights", "x.pth"], capsys)


def test_every_python_example_in_the_readme_runs(trained_run, tmp_path, monkeypatch, capsys):
    """The README's notebook lines and its plain PyTorch loading example, run as written in a folder that holds
    best_model.pth and the image they name."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    assert len(blocks) >= 2 and any(".eval()" in block for block in blocks)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "best_model.pth").write_bytes((trained_run / "best_model.pth").read_bytes())
    for name in set(re.findall(r'"([\w.-]+\.(?:png|jpg))"', "".join(blocks))):
        write_image(tmp_path / name, make_images(np.array([3]), np.random.default_rng(3))[0])
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert re.search(r"\('\w+', 0\.\d+\)", capsys.readouterr().out)  # classify's pairs were printed


def test_results_json_names_the_settings_and_the_results(trained_run):
    results = json.loads((trained_run / "results.json").read_text())
    history = torch.load(trained_run / "last_checkpoint.pth", weights_only=True)["history"]
    best = max(history, key=lambda row: row["test_acc"])
    assert results["settings"]["epochs"] == 2 and results["settings"]["seed"] == 42
    assert set(results["settings"]) == {name.lower() for name in mt.SETTINGS}
    assert results["finished"] and results["epochs_done"] == 2
    assert results["best_test_acc"] == best["test_acc"] and results["best_epoch"] == best["epoch"]
    assert results["last_test_acc"] == history[-1]["test_acc"]
    assert 0 <= results["best_test_acc_flip_tta"] <= 100 and "last_epoch_own_weights_acc" in results
