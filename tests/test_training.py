"""End-to-end runs on the synthetic data: outputs, OneCycle stepping, reproducibility and resume."""
import argparse
import copy
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model_train as mt
from conftest import train_args

ROOT = Path(__file__).resolve().parents[1]


class FakeLoader(list):
    """A list of (images, labels) batches with the .dataset length that train_one_epoch() divides by."""

    @property
    def dataset(self):
        return range(sum(len(labels) for _, labels in self))


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


@pytest.mark.parametrize("extra", [(), ("--mixup", "0.4")], ids=["default", "mixup"])
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(extra, data_dir, tmp_path, monkeypatch):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    mt.main(train_args(data_dir, whole, *extra, epochs=3))
    assert stop_in_epoch_2(train_args(data_dir, broken, *extra, epochs=3), monkeypatch) == 130
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


def test_mixup_strength_rises_from_nothing_to_its_setting_by_mid_run():
    cfg = argparse.Namespace(mixup=0.4, epochs=75)
    assert mt.mixup_alpha(cfg, 1) == 0.0  # the first epoch learns plain images
    assert mt.mixup_alpha(cfg, 19) == pytest.approx(0.4 * 18 / 37)
    assert [mt.mixup_alpha(cfg, epoch) for epoch in (38, 60, 75)] == [0.4, 0.4, 0.4]
    assert mt.mixup_alpha(argparse.Namespace(mixup=0.0, epochs=75), 60) == 0.0
    assert mt.mixup_alpha(argparse.Namespace(mixup=0.4, epochs=2), 2) == 0.4  # short runs reach it too


def test_mix_batch_blends_each_image_with_its_partner_by_one_weight():
    images, labels = torch.randn(8, 3, 4, 4), torch.arange(8)  # label i is image i, so a partner's label is its index
    mixed, partners, lam = mt.mix_batch(images, labels, 0.4, np.random.default_rng(0))
    assert 0 < lam < 1 and sorted(partners.tolist()) == list(range(8)) and not torch.equal(partners, labels)
    assert torch.allclose(mixed, lam * images + (1 - lam) * images[partners])
    again = mt.mix_batch(images, labels, 0.4, np.random.default_rng(0))
    assert torch.equal(again[0], mixed) and again[2] == lam  # the same draws from the same generator


def test_mixup_trains_on_blends_and_scores_both_labels():
    """The model sees the blended batch, the loss is lam x loss(labels) + (1 - lam) x loss(partners), and the
    training accuracy gives a prediction lam for one label and 1 - lam for the other."""
    torch.manual_seed(0)
    pixels, labels = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.arange(16) % 10
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3 * 32 * 32, 10)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.linear(x.flatten(1))

    def one_epoch(model, mixup):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights, and so the logits, stay put
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return mt.train_one_epoch(model, FakeLoader([(pixels, labels)]), optimizer, scheduler,
                                  torch.nn.CrossEntropyLoss(), torch.device("cpu"), mt.make_grad_scaler(
                                      torch.device("cpu")), mixup=mixup, rng=np.random.default_rng(5))

    model = Recorder()
    loss, accuracy = one_epoch(model, 0.4)
    mixed, partners, lam = mt.mix_batch(*mt.to_device(pixels, labels, torch.device("cpu")), 0.4,
                                        np.random.default_rng(5))
    assert torch.allclose(seen[-1], mixed)
    with torch.no_grad():
        logits = model(mixed)
    expected = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, partners)
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    predicted = logits.argmax(1)
    hits = lam * (predicted == labels).sum() + (1 - lam) * (predicted == partners).sum()
    assert accuracy == pytest.approx(100 * hits.item() / 16, rel=1e-5)

    plain_loss, _ = one_epoch(model, 0.0)
    plain = seen[-1]
    assert torch.equal(plain, mt.to_device(pixels, labels, torch.device("cpu"))[0])  # no mixup: the batch as is
    assert plain_loss == pytest.approx(F.cross_entropy(model(plain), labels).item(), rel=1e-5)


def test_a_run_with_mixup_learns_and_differs_from_one_without(data_dir, trained_run, tmp_path):
    mt.main(train_args(data_dir, tmp_path, "--mixup", "0.4"))
    mixed, plain = metrics_without_seconds(tmp_path), metrics_without_seconds(trained_run)
    assert mixed[0] == plain[0]  # the first epoch trains on plain images
    assert mixed[1] != plain[1]
    checkpoint = torch.load(tmp_path / "last_checkpoint.pth", weights_only=True)
    assert checkpoint["config"]["mixup"] == 0.4
    first, second = checkpoint["history"]  # its training loss is that of blends: judge it by the test images
    assert second["test_loss"] < first["test_loss"] and second["test_acc"] > 10  # 10 %: chance


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


def test_resume_finds_the_data_folder_the_run_trained_on(data_dir, tmp_path, monkeypatch):
    """No --data-dir on resume: the run's own data, not a download into ./data (and a flag given still wins)."""
    import torchvision.datasets

    stop_in_epoch_2(train_args(data_dir, tmp_path / "run"), monkeypatch)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: pytest.fail("tried to download"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    mt.main(["--resume", str(tmp_path / "run" / "last_checkpoint.pth"), "--workers", "0"])
    assert torch.load(tmp_path / "run" / "last_checkpoint.pth", weights_only=True)["epoch"] == 2
    assert os.listdir(tmp_path / "elsewhere") == []

    checkpoint = torch.load(tmp_path / "run" / "last_checkpoint.pth", weights_only=True)
    cfg = mt.get_args_parser().parse_args(["--resume", "x/last_checkpoint.pth", "--data-dir", "other"])
    assert mt.resume_settings(cfg, checkpoint, {"resume", "data_dir"}).data_dir == "other"


def test_resume_into_another_folder_brings_the_best_weights(data_dir, trained_run, tmp_path):
    """Even when no later epoch beats them (here: the run had finished), the new folder gets best_model.pth."""
    new = tmp_path / "new"
    mt.main(["--resume", str(trained_run / "last_checkpoint.pth"), "--out-dir", str(new), "--workers", "0"])
    assert (new / "best_model.pth").read_bytes() != b""
    kept, earlier = (torch.load(path / "best_model.pth", weights_only=True) for path in (new, trained_run))
    assert kept.keys() == earlier.keys() and all(torch.equal(kept[k], earlier[k]) for k in kept)
    assert torch.load(new / "last_checkpoint.pth", weights_only=True)["epoch"] == 2
    assert (new / "results.json").is_file() and (new / "misclassified.png").is_file()


def test_ctrl_c_names_the_real_checkpoint_once_an_epoch_is_saved(data_dir, tmp_path, monkeypatch, capsys):
    assert stop_in_epoch_2(train_args(data_dir, tmp_path), monkeypatch) == 130
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--resume {tmp_path / 'last_checkpoint.pth'}") and "OUT_DIR" not in err


def test_ctrl_c_before_the_first_epoch_or_in_benchmark_promises_nothing(data_dir, tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mt, "train_one_epoch", interrupt)
    with pytest.raises(SystemExit):
        mt.main(train_args(data_dir, tmp_path))
    err = capsys.readouterr().err
    assert "nothing was saved" in err and "--resume" not in err
    monkeypatch.setattr(mt, "images_per_second", interrupt)
    with pytest.raises(SystemExit):
        mt.main(["--benchmark", "--device", "cpu", "--workers", "0"])
    assert capsys.readouterr().err.strip() == "interrupted"


def test_progress_is_shown_as_plain_lines_when_stdout_is_not_a_terminal(data_dir, tmp_path, capsys):
    mt.main(train_args(data_dir, tmp_path))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("epoch 1/2: ")]
    assert len(lines) >= 5 and lines[0].startswith("epoch 1/2: 1/7 batches (10 %)"), out
    assert "\r" not in out


def test_epoch_lines_reach_a_pipe_as_they_are_printed(data_dir, tmp_path):
    """nohup, tee and a notebook's !python read a pipe: a block buffer would hold the lines until the run ends."""
    out = tmp_path / "run"
    command = [sys.executable, "-c", "import sys, model_train; model_train.main(sys.argv[1:])",
               *train_args(data_dir, out, epochs=60)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:
            if line.split()[:1] == ["2"]:  # the second epoch's row, printed before its checkpoint is saved
                break
        epochs_done = torch.load(out / "last_checkpoint.pth", weights_only=True)["epoch"]
    finally:
        process.kill()
        process.wait()
    assert 1 <= epochs_done <= 5


def test_too_few_steps_for_the_warm_up_is_one_line(data_dir, tmp_path, capsys):
    from test_bad_input import fails_with_one_line

    err = fails_with_one_line(train_args(data_dir, tmp_path, "--batch-size", "5000", epochs=5), capsys)
    assert "--epochs 5 at --batch-size 5000 makes only 5 optimizer steps" in err and "warm-up" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("capability, dtype, scaled", [((7, 5), torch.float16, True), ((8, 0), torch.bfloat16, False),
                                                       ((9, 0), torch.bfloat16, False)])
def test_precision_follows_the_gpu(capability, dtype, scaled, monkeypatch):
    """A T4 (Colab's free GPU, capability 7.5) has no fast bfloat16: float16 autocast with a loss scaler there."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: (device, enabled))
    mt.native_bf16.cache_clear()
    try:
        cuda = torch.device("cuda")
        assert mt.autocast_dtype(cuda) is dtype and mt.make_grad_scaler(cuda) == ("cuda", scaled)
        assert mt.precision(cuda) == ("float16 autocast with loss scaling" if scaled else "bfloat16 autocast")
    finally:
        mt.native_bf16.cache_clear()


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_cpu_and_mps_train_in_float32_without_scaling(device):
    assert mt.autocast_dtype(torch.device(device)) is None and mt.precision(torch.device(device)) == "float32"
    assert not mt.make_grad_scaler(torch.device("cpu")).is_enabled()


def test_the_loss_scalers_state_is_checkpointed_and_restored(trained_run, tmp_path):
    checkpoint = torch.load(trained_run / "last_checkpoint.pth", weights_only=True)
    assert "scaler" in checkpoint
    cfg = argparse.Namespace(**checkpoint["config"])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # the scale tensor exists from the first use
    model = mt.Net()
    optimizer = mt.make_optimizer(model, cfg, torch.device("cpu"))
    parts = dict(model=model, average=None, optimizer=optimizer, scheduler=mt.make_scheduler(optimizer, cfg, 7),
                 scaler=scaler)
    mt.save_checkpoint(tmp_path / "c.pth", parts, checkpoint["history"], dict(acc=1.0, weights=None), cfg)
    parts["scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0)
    mt.restore_checkpoint(torch.load(tmp_path / "c.pth", weights_only=True), parts, "c.pth")
    assert parts["scaler"].get_scale() == 1024.0


def test_cudnn_picks_its_fastest_convs_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert mt.select_device("cuda").type == "cuda" and torch.backends.cudnn.benchmark
