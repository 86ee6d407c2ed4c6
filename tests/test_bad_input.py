"""Every bad flag, checkpoint or folder gets one clear line on stderr, a non-zero exit, no traceback, and
overwrites nothing. (Bad data sets: test_data.py; bad images: test_use.py.)"""
import hashlib
import os
import pickle

import pytest
import torch

import model_train as mt
from conftest import RunsCode, fails_with_one_line, train_args


@pytest.fixture
def out_dir(copy_of_run):
    """An output folder that already holds a finished run; no failure may change a byte of it."""
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in copy_of_run.iterdir()}
    yield copy_of_run
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in copy_of_run.iterdir()} == before


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs: must be a whole number above 0, not 0"),
    (["--epochs", "ten"], "--epochs: invalid number value: 'ten'"),
    (["--epochs", "2.5"], "--epochs: invalid number value"),
    (["--batch-size", "0"], "--batch-size: must be a whole number above 0"),
    (["--lr", "nan"], "--lr: must be a number above 0"),
    (["--max-lr", "-0.01"], "--max-lr: must be a number above 0"),
    (["--lr", "0.1", "--max-lr", "0.01"], "--lr 0.1 is above --max-lr 0.01"),
    (["--pct-start", "1.5"], "--pct-start: must be at least 0 and below 1"),
    (["--ema-decay", "1"], "--ema-decay: must be at least 0 and below 1"),
    (["--cutout-p", "1.5"], "--cutout-p: must be from 0 to 1, not 1.5"),
    (["--mixup", "-0.4"], "--mixup: must be a number, 0 or more, not -0.4"),
    (["--device", "tpu"], "--device: invalid choice: 'tpu'"),
    (["--workers", "-1"], "--workers: must be auto or a whole number, 0 or more"),
    (["--epoch", "5"], "unrecognized arguments"),
    (["--resume", "a", "--eval", "b"], "not allowed with argument"),
    (["--weights", "x.pth"], "--weights is for --predict"),
    (["--init-from", "a.pth", "--resume", "b.pth"], "--init-from starts a new run"),
])
def test_bad_flag_values(flags, message, capsys):
    err = fails_with_one_line(flags, capsys)
    assert message in err and "see --help" in err


def test_unavailable_device(data_dir, out_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = fails_with_one_line(train_args(data_dir, out_dir)[:-6] + ["--device", "cuda", "--overwrite"], capsys)
    assert "--device cuda is not available" in err


def write_checkpoint_variant(kind, path, trained_run):
    if kind == "corrupt":
        path.write_bytes(os.urandom(4096))
    elif kind == "csv":
        path.write_bytes((trained_run / "metrics.csv").read_bytes())
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
    elif kind == "earlier format":  # the same weights' shapes, written by an earlier development version
        torch.save({**torch.load(trained_run / "last_checkpoint.pth", weights_only=True), "format": "model_train/1"},
                   path)
    elif kind == "best_model":
        path.write_bytes((trained_run / "best_model.pth").read_bytes())


@pytest.mark.parametrize("flag", ["--resume", "--eval", "--init-from"])
@pytest.mark.parametrize("kind, says", [
    ("missing", "does not exist"),
    ("corrupt", "is not a checkpoint written by this script"),
    ("csv", "is not a checkpoint written by this script"),
    ("old pickle", "is not a checkpoint written by this script"),
    ("truncated", "is damaged (truncated or corrupt)"),
    ("foreign", "is not a"),
    ("malicious", "could run code"),
    ("other model", "holds weights for a different model"),
    ("earlier format", "is not a"),
])
def test_bad_checkpoints_are_named_for_what_they_are(flag, kind, says, data_dir, out_dir, trained_run, tmp_path,
                                                     capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "given.pth"
    write_checkpoint_variant(kind, path, trained_run)
    if flag == "--resume" and kind == "other model":
        says = "is not a last_checkpoint.pth written by this script"
    err = fails_with_one_line([flag, str(path), *train_args(data_dir, out_dir)], capsys)
    assert str(path) in err and says in err
    assert not (tmp_path / "pwned").exists(), "loading the checkpoint ran code"


def test_resume_from_best_model_or_an_earlier_version_says_what_to_do(data_dir, trained_run, tmp_path, capsys):
    write_checkpoint_variant("best_model", tmp_path / "best.pth", trained_run)
    err = fails_with_one_line(["--resume", str(tmp_path / "best.pth"), *train_args(data_dir, tmp_path)], capsys)
    assert "resume from last_checkpoint.pth" in err
    old = torch.load(trained_run / "last_checkpoint.pth", weights_only=True)
    del old["scaler"]  # a checkpoint from before the loss scaler
    torch.save(old, tmp_path / "old.pth")
    err = fails_with_one_line(["--resume", str(tmp_path / "old.pth"), *train_args(data_dir, tmp_path)], capsys)
    assert "written by an earlier version of this script" in err


def test_a_new_run_keeps_an_earlier_runs_files(data_dir, out_dir, capsys):
    err = fails_with_one_line(train_args(data_dir, out_dir), capsys)
    assert f"{out_dir} already holds best_model.pth and last_checkpoint.pth from an earlier run" in err
    assert "another --out-dir" in err and "--overwrite" in err
    assert f"--resume {out_dir / 'last_checkpoint.pth'} continues that run" in err


def test_resume_into_another_runs_folder_keeps_its_files(data_dir, out_dir, tmp_path, capsys, monkeypatch):
    from test_training import stop_in_epoch_2

    stop_in_epoch_2(train_args(data_dir, tmp_path / "stopped"), monkeypatch)
    capsys.readouterr()
    err = fails_with_one_line(["--resume", str(tmp_path / "stopped" / "last_checkpoint.pth"), "--out-dir",
                               str(out_dir), "--workers", "0"], capsys)
    assert "already holds" in err and "--overwrite" in err


def test_out_dir_that_is_a_file_or_read_only(data_dir, out_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):
        assert "cannot write to --out-dir" in fails_with_one_line(train_args(data_dir, out), capsys)
    assert blocker.read_text() == "keep me"
    if os.geteuid() != 0:  # root may write to any folder
        out_dir.chmod(0o500)
        try:
            assert "cannot write to --out-dir" in fails_with_one_line(train_args(data_dir, out_dir), capsys)
        finally:
            out_dir.chmod(0o700)


def test_too_few_steps_for_the_warm_up_is_one_line(data_dir, tmp_path, capsys):
    err = fails_with_one_line(train_args(data_dir, tmp_path, "--batch-size", "5000", epochs=5), capsys)
    assert "--epochs 5 at --batch-size 5000 makes only 5 optimizer steps" in err and "warm-up" in err
    assert os.listdir(tmp_path) == []


def test_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "best_model.pth"
    path.write_bytes(b"previous version")

    def write_half_then_fail(obj, f):
        f.write(b"half of a new")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(mt.UserError, match="No space left on device"):
        mt.save({"weights": 1}, path)
    assert path.read_bytes() == b"previous version" and os.listdir(tmp_path) == ["best_model.pth"]
