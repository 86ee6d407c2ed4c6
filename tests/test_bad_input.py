"""Every bad input gets one clear line on stderr, a non-zero exit, no traceback, and overwrites nothing."""
import hashlib
import os
import pickle

import pytest
import torch

import model_train as mt
from conftest import make_cifar_folder, train_args


def fails_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mt.main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def out_dir(tmp_path, trained_run):
    """An output folder that already holds a finished run; no failure may change a byte of it."""
    out = tmp_path / "out"
    out.mkdir()
    for path in trained_run.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    yield out
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == before


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs: must be a whole number above 0, not 0"),
    (["--epochs", "-3"], "--epochs: must be a whole number above 0"),
    (["--epochs", "ten"], "--epochs: invalid number value: 'ten'"),
    (["--epochs", "2.5"], "--epochs: invalid number value"),
    (["--batch-size", "0"], "--batch-size: must be a whole number above 0"),
    (["--lr", "0"], "--lr: must be a number above 0"),
    (["--lr", "abc"], "--lr: invalid number value: 'abc'"),
    (["--lr", "nan"], "--lr: must be a number above 0"),
    (["--max-lr", "-0.01"], "--max-lr: must be a number above 0"),
    (["--lr", "0.1", "--max-lr", "0.01"], "--lr 0.1 is above --max-lr 0.01"),
    (["--pct-start", "1.5"], "--pct-start: must be at least 0 and below 1"),
    (["--ema-decay", "1"], "--ema-decay: must be at least 0 and below 1"),
    (["--cutout-p", "1.5"], "--cutout-p: must be from 0 to 1, not 1.5"),
    (["--affine-p", "-0.1"], "--affine-p: must be from 0 to 1"),
    (["--mixup", "-0.4"], "--mixup: must be a number, 0 or more, not -0.4"),
    (["--device", "tpu"], "--device: must be auto, cuda, mps or cpu"),
    (["--workers", "-1"], "--workers: must be a whole number, 0 or more"),
    (["--epoch", "5"], "unrecognized arguments"),
    (["--learning-rate", "1e-3"], "unrecognized arguments"),
    (["--resume", "a", "--eval", "b"], "not allowed with argument"),
])
def test_bad_flag_values(flags, message, capsys):
    err = fails_with_one_line(flags, capsys)
    assert message in err and "see --help" in err


def test_unavailable_device(data_dir, out_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = fails_with_one_line(train_args(data_dir, out_dir)[:-6] + ["--device", "cuda", "--overwrite"], capsys)
    assert "--device cuda is not available" in err


def test_empty_data_folder_without_network(tmp_path, out_dir, capsys, monkeypatch):
    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    err = fails_with_one_line(train_args(tmp_path / "nothing", out_dir, "--overwrite"), capsys)
    assert "could not download CIFAR-10" in err and "without network" in err


def test_empty_batch_folder(tmp_path, out_dir, capsys):
    (tmp_path / "cifar-10-batches-py").mkdir()
    err = fails_with_one_line(train_args(tmp_path, out_dir, "--overwrite"), capsys)
    assert "data_batch_1 is missing" in err


def test_truncated_dataset(tmp_path, out_dir, capsys):
    make_cifar_folder(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    path.write_bytes(path.read_bytes()[:1000])
    err = fails_with_one_line(train_args(tmp_path, out_dir, "--overwrite"), capsys)
    assert "data_batch_4 is truncated" in err


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def write_checkpoint_variant(kind, path, trained_run):
    if kind == "corrupt":
        path.write_bytes(os.urandom(4096))
    elif kind == "csv":
        path.write_bytes((trained_run / "metrics.csv").read_bytes())
    elif kind == "png":
        path.write_bytes((trained_run / "confusion_matrix.png").read_bytes())
    elif kind == "truncated":
        path.write_bytes((trained_run / "last_checkpoint.pth").read_bytes()[:50_000])
    elif kind == "foreign":
        torch.save({"state": torch.zeros(3), "note": "another project"}, path)
    elif kind == "malicious":
        torch.save({"model": RunsCode()}, path)
    elif kind == "other model":
        torch.save(torch.nn.Linear(3, 10).state_dict(), path)
    elif kind == "old pickle":
        with open(path, "wb") as f:
            pickle.dump(RunsCode(), f)


@pytest.mark.parametrize("flag", ["--resume", "--eval"])
@pytest.mark.parametrize("kind", ["missing", "corrupt", "csv", "png", "truncated", "foreign", "malicious",
                                  "other model", "old pickle"])
def test_bad_checkpoints(flag, kind, data_dir, out_dir, trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "given.pth"
    write_checkpoint_variant(kind, path, trained_run)
    err = fails_with_one_line([flag, str(path), *train_args(data_dir, out_dir)], capsys)
    assert str(path) in err
    assert not (tmp_path / "pwned").exists(), "loading the checkpoint ran code"


@pytest.mark.parametrize("flag", ["--resume", "--eval"])
@pytest.mark.parametrize("kind, says", [("corrupt", "is not a checkpoint written by this script"),
                                        ("csv", "is not a checkpoint written by this script"),
                                        ("png", "is not a checkpoint written by this script"),
                                        ("old pickle", "is not a checkpoint written by this script"),
                                        ("truncated", "is damaged (truncated or corrupt)"),
                                        ("malicious", "could run code"),
                                        ("other model", "holds weights for a different model")])
def test_a_bad_checkpoint_is_named_for_what_it_is(flag, kind, says, data_dir, trained_run, tmp_path, capsys):
    if flag == "--resume" and kind == "other model":
        says = "is not a last_checkpoint.pth written by this script"
    path = tmp_path / "given.pth"
    write_checkpoint_variant(kind, path, trained_run)
    err = fails_with_one_line([flag, str(path), *train_args(data_dir, tmp_path / "out")], capsys)
    assert says in err and err.endswith(("written by this script", "resume from last_checkpoint.pth)")), err


def test_resume_from_best_model_says_which_file_to_use(data_dir, out_dir, capsys):
    err = fails_with_one_line(["--resume", str(out_dir / "best_model.pth"), *train_args(data_dir, out_dir)], capsys)
    assert "resume from last_checkpoint.pth" in err


def test_resume_from_a_checkpoint_of_the_relu_net_says_which_version_to_use(data_dir, out_dir, tmp_path, capsys):
    """Its weights have the same shapes as today's Net, so only the format tells the two apart."""
    checkpoint = torch.load(out_dir / "last_checkpoint.pth", weights_only=True)
    old = tmp_path / "relu_checkpoint.pth"
    torch.save({**checkpoint, "format": "model_train/1"}, old)
    err = fails_with_one_line(["--resume", str(old), *train_args(data_dir, tmp_path / "new")], capsys)
    assert "earlier version" in err and "git checkout 14e11af" in err


def test_a_new_run_keeps_an_earlier_runs_files(data_dir, out_dir, capsys):
    err = fails_with_one_line(train_args(data_dir, out_dir), capsys)
    assert f"{out_dir} already holds best_model.pth and last_checkpoint.pth from an earlier run" in err
    assert "another --out-dir" in err and "--overwrite" in err
    assert f"--resume {out_dir / 'last_checkpoint.pth'} continues that run" in err


def test_resume_into_another_runs_folder_keeps_its_files(data_dir, out_dir, trained_run, capsys):
    err = fails_with_one_line(["--resume", str(trained_run / "last_checkpoint.pth"), "--data-dir", str(data_dir),
                               "--out-dir", str(out_dir), "--workers", "0"], capsys)
    assert "already holds" in err and "--overwrite" in err


def test_out_dir_that_is_a_file(data_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):
        err = fails_with_one_line(train_args(data_dir, out), capsys)
        assert "cannot write to --out-dir" in err
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_read_only_out_dir(data_dir, out_dir, capsys):
    out_dir.chmod(0o500)
    try:
        assert "cannot write to --out-dir" in fails_with_one_line(train_args(data_dir, out_dir), capsys)
    finally:
        out_dir.chmod(0o700)


def test_a_model_over_the_parameter_limit_is_refused(data_dir, out_dir, capsys, monkeypatch):
    monkeypatch.setattr(mt, "MAX_PARAMETERS", 100_000)
    assert "over the 100,000 limit" in fails_with_one_line(train_args(data_dir, out_dir, "--overwrite"), capsys)
