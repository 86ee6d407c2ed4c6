"""End-to-end runs on the synthetic data: outputs, OneCycle stepping, reproducibility and resume."""
import copy
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import model_train as mt
from conftest import train_args

ROOT = Path(__file__).resolve().parents[1]


def metrics_without_seconds(out):
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def stop_in_epoch_2(argv, monkeypatch):
    """Run main(argv) with a Ctrl-C during epoch 2's test pass; returns the exit code."""
    real_evaluate, evaluations = mt.evaluate, []

    def interrupt_in_epoch_2(*args, **kwargs):
        evaluations.append(1)
        if len(evaluations) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(mt, "evaluate", interrupt_in_epoch_2)
        with pytest.raises(SystemExit) as exit_info:
            mt.main(argv)
    return exit_info.value.code


def test_run_writes_the_three_files_and_a_loadable_best_model(trained_run):
    for name in ("best_model.pth", "last_checkpoint.pth", "metrics.csv"):
        assert (trained_run / name).is_file()
    model = mt.Net()
    model.load_state_dict(torch.load(trained_run / "best_model.pth", weights_only=True))
    with open(trained_run / "metrics.csv", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"]
        rows = list(reader)
    assert [row[0] for row in rows] == ["1", "2"]
    checkpoint = torch.load(trained_run / "last_checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 2 and len(checkpoint["history"]) == 2
    assert checkpoint["best_acc"] == max(row["test_acc"] for row in checkpoint["history"])
    assert checkpoint["config"]["epochs"] == 2
    assert not list(trained_run.glob(".*.tmp")), "a temporary file was left behind"


def test_synthetic_classes_are_learned(trained_run):
    history = torch.load(trained_run / "last_checkpoint.pth", weights_only=True)["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_one_cycle_steps_once_per_batch(trained_run):
    checkpoint = torch.load(trained_run / "last_checkpoint.pth", weights_only=True)
    batches = -(-200 // 32)  # 200 synthetic training images in batches of 32
    assert checkpoint["scheduler"]["total_steps"] == 2 * batches
    assert checkpoint["scheduler"]["last_epoch"] == 2 * batches  # stepped epochs x batches times
    lrs = [row["lr"] for row in checkpoint["history"]]
    assert lrs[0] == pytest.approx(mt.LR)  # starts at --lr, peaks at --max-lr in between


def test_same_seed_gives_the_same_metrics(data_dir, trained_run, tmp_path):
    mt.main(train_args(data_dir, tmp_path))
    assert metrics_without_seconds(tmp_path) == metrics_without_seconds(trained_run)


def test_other_seed_gives_other_metrics(data_dir, trained_run, tmp_path):
    mt.main(train_args(data_dir, tmp_path, "--seed", "5"))
    assert metrics_without_seconds(tmp_path) != metrics_without_seconds(trained_run)


def test_overwrite_replaces_an_earlier_run(data_dir, trained_run, tmp_path):
    for path in trained_run.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    mt.main(train_args(data_dir, tmp_path, "--seed", "5", "--overwrite"))
    assert metrics_without_seconds(tmp_path) != metrics_without_seconds(trained_run)
    assert torch.load(tmp_path / "last_checkpoint.pth", weights_only=True)["config"]["seed"] == 5
    assert (tmp_path / "best_model.pth").read_bytes() != (trained_run / "best_model.pth").read_bytes()


def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(data_dir, tmp_path, monkeypatch):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    mt.main(train_args(data_dir, whole, epochs=3))
    assert stop_in_epoch_2(train_args(data_dir, broken, epochs=3), monkeypatch) == 130
    assert torch.load(broken / "last_checkpoint.pth", weights_only=True)["epoch"] == 1
    assert len(metrics_without_seconds(broken)) == 1

    # Resume with only the checkpoint: settings come from it, the output folder is the checkpoint's.
    mt.main(["--resume", str(broken / "last_checkpoint.pth"), "--data-dir", str(data_dir), "--workers", "0"])
    assert metrics_without_seconds(broken) == metrics_without_seconds(whole)
    whole_weights = torch.load(whole / "best_model.pth", weights_only=True)
    broken_weights = torch.load(broken / "best_model.pth", weights_only=True)
    assert all(torch.equal(whole_weights[k], broken_weights[k]) for k in whole_weights)


def test_resume_ignores_flags_that_would_change_the_result(data_dir, trained_run, tmp_path, capsys):
    checkpoint = torch.load(trained_run / "last_checkpoint.pth", weights_only=True)
    cfg = mt.get_args_parser().parse_args(["--resume", "x/last_checkpoint.pth", "--epochs", "9", "--workers", "3"])
    merged = mt.resume_settings(cfg, checkpoint, {"epochs", "workers", "resume"})
    assert merged.epochs == 2 and merged.workers == 3 and merged.out_dir == "x"
    assert merged.resume == "x/last_checkpoint.pth"  # not the saved run's own None
    out = capsys.readouterr().out
    assert "--epochs 9 ignored" in out and "--resume" not in out


def test_a_kill_at_any_moment_leaves_a_loadable_checkpoint(data_dir, tmp_path):
    """SIGKILL a real training process repeatedly while it writes, then resume to the end."""
    out = tmp_path / "run"
    command = [sys.executable, "-c", "import sys, model_train; model_train.main(sys.argv[1:])",
               *train_args(data_dir, out, epochs=4)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "last_checkpoint.pth").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    for name in ("best_model.pth", "last_checkpoint.pth"):
        torch.load(out / name, weights_only=True)  # complete, not half-written
    mt.main(["--resume", str(out / "last_checkpoint.pth"), "--data-dir", str(data_dir), "--workers", "0"])
    assert [row["epoch"] for row in metrics_without_seconds(out)] == ["1", "2", "3", "4"]


def test_save_atomically_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "best_model.pth"
    path.write_bytes(b"previous version")

    def write_half_then_fail(f):
        f.write(b"half of a new")
        raise OSError(28, "No space left on device")

    with pytest.raises(mt.UserError, match="No space left on device"):
        mt.save_atomically(path, write_half_then_fail)
    assert path.read_bytes() == b"previous version"
    assert os.listdir(tmp_path) == ["best_model.pth"]


def test_import_has_no_side_effects(tmp_path):
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import model_train"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert os.listdir(tmp_path) == []


def test_eval_reports_loss_and_accuracy_with_and_without_tta(data_dir, trained_run, tmp_path, capsys):
    mt.main(["--eval", str(trained_run / "best_model.pth"), "--data-dir", str(data_dir), "--out-dir", str(tmp_path),
             "--workers", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    history = torch.load(trained_run / "last_checkpoint.pth", weights_only=True)["history"]
    best = max(history, key=lambda row: row["test_acc"])
    assert f"test loss {best['test_loss']:.4f}, accuracy {best['test_acc']:.2f} %; with flip TTA" in out


def test_benchmark_prints_cost_and_speed(capsys, monkeypatch):
    real = mt.images_per_second
    monkeypatch.setattr(mt, "images_per_second", lambda *a, **k: real(*a, **{**k, "seconds": 0.2}))
    mt.main(["--benchmark", "--device", "cpu", "--workers", "0", "--batch-size", "8"])
    out = capsys.readouterr().out
    for text in ("multiply-adds per image", "parameters", "training (model alone", "evaluation", "augmentation",
                 "DataLoader"):
        assert text in out


def test_weight_decay_is_decoupled_from_the_gradient():
    """With no gradient, a step shrinks each weight by lr x weight_decay (AdamW); Adam's L2 penalty would instead
    move every weight by about lr, whatever its size, as Adam normalizes the penalty like any gradient."""
    cfg = mt.get_args_parser().parse_args(["--lr", "0.1", "--weight-decay", "0.5"])
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[4.0, -0.01]]))
    optimizer = mt.make_optimizer(model, cfg, torch.device("cpu"))
    model.weight.grad = torch.zeros_like(model.weight)
    optimizer.step()
    assert torch.allclose(model.weight.detach(), torch.tensor([[4.0, -0.01]]) * (1 - 0.1 * 0.5))


@pytest.mark.parametrize("capability, native", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_gpus_before_ampere_train_in_float32(capability, native, monkeypatch):
    """A T4 (Colab's free GPU, capability 7.5) would emulate bfloat16, slower than float32."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    mt.native_bf16.cache_clear()
    try:
        assert mt.native_bf16(torch.device("cuda")) is native
        assert mt.precision(torch.device("cuda")) == ("bfloat16 autocast" if native else "float32")
    finally:
        mt.native_bf16.cache_clear()


def test_mps_is_not_autocast():
    assert mt.native_bf16(torch.device("mps")) is False


def test_weight_average_warms_up_then_follows_the_model_slowly():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    torch.nn.init.zeros_(model[0].weight)
    average = mt.WeightAverage(model, decay=0.5)
    assert not average.model.training and not any(p.requires_grad for p in average.model.parameters())
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    model[1].num_batches_tracked.fill_(7)
    average.update(model)  # step 1: decay min(0.5, 2 / 11), so the average moves 9/11 of the way
    assert torch.allclose(average.model[0].weight, torch.full((2, 2), 9 / 11))
    assert average.model[1].num_batches_tracked.item() == 7
    for _ in range(20):  # later steps: decay 0.5 (the setting) once (1 + t) / (10 + t) passes it
        average.update(model)
    assert torch.allclose(average.model[0].weight, torch.ones(2, 2), atol=1e-5)
    assert model[0].weight.requires_grad  # the live model is untouched


def test_weight_average_follows_the_model_it_is_given():
    """update() pairs the tensors once per model: weights changed in place are followed, and a model passed
    for the first time is read, not the tensors of the one before."""
    first = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    second = copy.deepcopy(first)
    average = mt.WeightAverage(first, decay=0.0)  # decay 0: the average is the latest weights
    average.update(first)
    with torch.no_grad():
        first[0].weight.fill_(2.0)
    average.update(first)
    assert torch.equal(average.model[0].weight, torch.full((2, 2), 2.0))
    with torch.no_grad():
        second[0].weight.fill_(3.0)
    second[1].num_batches_tracked.fill_(5)
    average.update(second)
    assert torch.equal(average.model[0].weight, torch.full((2, 2), 3.0))
    assert average.model[1].num_batches_tracked.item() == 5


@pytest.mark.parametrize("decay", ["0.999", "0"])
def test_the_reported_and_kept_weights_are_the_average(decay, data_dir, tmp_path):
    """With EMA on, each epoch's test accuracy and best_model.pth are the averaged weights'; off, the model's."""
    mt.main(train_args(data_dir, tmp_path, "--ema-decay", decay))
    checkpoint = torch.load(tmp_path / "last_checkpoint.pth", weights_only=True)
    cfg = mt.get_args_parser().parse_args(train_args(data_dir, tmp_path))
    _, test_loader = mt.make_loaders(mt.load_cifar10(data_dir), cfg, torch.device("cpu"))
    raw = mt.Net()
    raw.load_state_dict(checkpoint["model"])
    if decay == "0":
        assert checkpoint["average"] is None
        kept = raw
    else:
        assert checkpoint["average"]["steps"] == 2 * 7  # updated once per batch: 2 epochs of 7 batches
        kept = mt.Net()
        kept.load_state_dict(checkpoint["average"]["weights"])
        assert not torch.equal(kept.head[-1].weight, raw.head[-1].weight)
    kept = kept.to(memory_format=torch.channels_last)  # as in training, so the arithmetic is the same
    assert mt.evaluate(kept, test_loader, torch.device("cpu"))[1] == checkpoint["history"][-1]["test_acc"]


def test_eval_of_a_last_checkpoint_uses_its_averaged_weights(data_dir, trained_run, tmp_path, capsys):
    mt.main(["--eval", str(trained_run / "last_checkpoint.pth"), "--data-dir", str(data_dir), "--out-dir",
             str(tmp_path), "--workers", "0", "--device", "cpu"])
    last = torch.load(trained_run / "last_checkpoint.pth", weights_only=True)["history"][-1]
    assert f"accuracy {last['test_acc']:.2f} %" in capsys.readouterr().out


def test_a_checkpoint_from_before_the_weight_average_resumes_without_one(data_dir, tmp_path, monkeypatch):
    stop_in_epoch_2(train_args(data_dir, tmp_path), monkeypatch)
    checkpoint = torch.load(tmp_path / "last_checkpoint.pth", weights_only=True)
    del checkpoint["average"], checkpoint["config"]["ema_decay"]  # what the version before the average wrote
    torch.save(checkpoint, tmp_path / "last_checkpoint.pth")
    mt.main(["--resume", str(tmp_path / "last_checkpoint.pth"), "--data-dir", str(data_dir), "--workers", "0"])
    resumed = torch.load(tmp_path / "last_checkpoint.pth", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["average"] is None and resumed["config"]["ema_decay"] == 0
