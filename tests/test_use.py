"""Using a trained model: load_model() and classify() in a notebook, --predict for image files, --eval."""
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import model_train as mt
from conftest import fails_with_one_line, make_images

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def write_image(path, rgb):
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def model(trained_run):
    return mt.load_model(trained_run / "best_model.pth")


def test_load_model_gives_the_best_or_the_averaged_weights_in_eval_mode(model, trained_run):
    assert isinstance(model, mt.Net) and not model.training
    saved = torch.load(trained_run / "best_model.pth", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    checkpoint = torch.load(trained_run / "last_checkpoint.pth", weights_only=True)
    from_checkpoint = mt.load_model(trained_run / "last_checkpoint.pth")
    assert torch.equal(from_checkpoint.head[-1].weight, checkpoint["average"]["weights"]["head.3.weight"])


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


def test_classify_takes_one_image_or_a_list_of_any_size(model):
    image = make_images(np.array([3]), np.random.default_rng(1))[0]
    larger = image.repeat(3, axis=0).repeat(3, axis=1)  # 96 x 96: area averaging gives back the 32 x 32 original
    same, big, odd, tiny = mt.classify(model, [image, larger, cv2.resize(image, (50, 40)), image[::2, ::2]], top=10)
    assert same == big
    one = mt.classify(model, image, top=10)  # one array: its pairs, not a list of one
    assert [name for name, _ in one] == [name for name, _ in same]
    assert [p for _, p in one] == pytest.approx([p for _, p in same], abs=1e-6)
    for pairs in (odd, tiny):
        assert sorted(name for name, _ in pairs) == sorted(mt.CLASSES)
        assert sum(p for _, p in pairs) == pytest.approx(1, abs=1e-4)
        assert [p for _, p in pairs] == sorted((p for _, p in pairs), reverse=True)
    for bad in (np.zeros((32, 32), np.uint8), np.zeros((32, 32, 4), np.uint8), np.zeros((32, 32, 3), np.float32)):
        with pytest.raises(ValueError, match="uint8 height x width x 3"):
            mt.classify(model, [bad])


def expected_line(model, path):
    return f"{path}: " + ", ".join(f"{name} {100 * p:.1f} %" for name, p in mt.classify(model, mt.read_image(path)))


def test_predict_classifies_every_readable_image_and_names_each_bad_file(model, trained_run, tmp_path, capsys):
    rng = np.random.default_rng(2)
    png = write_image(tmp_path / "a.png", make_images(np.array([1]), rng)[0])
    jpeg = write_image(tmp_path / "b.jpg", cv2.resize(make_images(np.array([7]), rng)[0], (120, 90)))
    (tmp_path / "c.txt.jpg").write_bytes(b"epoch,lr\n1,0.1\n")
    paths = [png, tmp_path / "missing.png", jpeg, tmp_path / "c.txt.jpg"]
    with pytest.raises(SystemExit) as exit_info:
        mt.main(["--predict", *map(str, paths), "--weights", str(trained_run / "best_model.pth"), "--device", "cpu"])
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [expected_line(model, png), expected_line(model, jpeg)]
    assert err.splitlines() == [f"error: cannot read {tmp_path / 'missing.png'} (No such file or directory); give "
                                f"the path of an image file",
                                f"error: {tmp_path / 'c.txt.jpg'} is not an image file that OpenCV can read (PNG, "
                                f"JPEG, BMP, WebP, TIFF)"]


def test_predict_takes_the_images_of_a_folder_and_best_model_from_out_dir(model, trained_run, tmp_path, capsys):
    for name in ("b.png", "a.jpg"):
        write_image(tmp_path / name, make_images(np.array([4]), np.random.default_rng(len(name)))[0])
    (tmp_path / "notes.txt").write_text("not an image, and not named as one: left alone")
    mt.main(["--predict", str(tmp_path), "--out-dir", str(trained_run), "--device", "cpu"])
    assert capsys.readouterr().out.splitlines() == [expected_line(model, tmp_path / n) for n in ("a.jpg", "b.png")]
    err = fails_with_one_line(["--predict", str(tmp_path / "a.jpg"), "--out-dir", str(tmp_path)], capsys)
    assert f"no --weights given, and the default, best_model.pth in --out-dir {tmp_path}, does not exist" in err


def test_eval_says_what_it_tests_and_writes_its_report_beside_the_weights(data_dir, trained_run, copy_of_run, capsys):
    (copy_of_run / "per_class.csv").unlink()
    mt.main(["--eval", str(copy_of_run / "best_model.pth"), "--data-dir", str(data_dir), "--workers", "0",
             "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.startswith(f"evaluating {copy_of_run / 'best_model.pth'}\nCIFAR-10 from {data_dir}")
    assert "100 test images; device cpu (float32)" in out and (copy_of_run / "per_class.csv").is_file()
    history = torch.load(trained_run / "last_checkpoint.pth", weights_only=True)["history"]
    best = max(history, key=lambda row: row["test_acc"])
    assert f"test loss {best['test_loss']:.4f}, accuracy {best['test_acc']:.2f} %; with flip TTA" in out
    help_text = " ".join(mt.get_args_parser().format_help().split())
    assert "which it needs (--data-dir), and write per_class.csv, confusion_matrix.png and misclassified.png" \
        in help_text


def test_eval_keeps_the_reports_of_other_weights_unless_told(data_dir, copy_of_run, tmp_path, capsys):
    """--eval of a last_checkpoint.pth beside a run's reports (or into another run's folder) would replace the
    best weights' reports with another's: it stops, unless --overwrite."""
    argv = ["--eval", str(copy_of_run / "last_checkpoint.pth"), "--data-dir", str(data_dir), "--workers", "0"]
    before = (copy_of_run / "per_class.csv").read_bytes()
    err = fails_with_one_line(argv, capsys)
    assert "already holds per_class.csv, confusion_matrix.png, misclassified.png of other weights" in err
    assert (copy_of_run / "per_class.csv").read_bytes() == before
    mt.main([*argv, "--overwrite", "--no-tta"])
    last = torch.load(copy_of_run / "last_checkpoint.pth", weights_only=True)["history"][-1]
    assert f"accuracy {last['test_acc']:.2f} %" in capsys.readouterr().out  # the averaged weights' own
    mt.main([*argv, "--out-dir", str(tmp_path / "elsewhere"), "--no-tta"])
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == sorted(mt.REPORT_FILES)


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
