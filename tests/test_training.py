"""End-to-end runs on the synthetic data: outputs, schedule, reproducibility, resume, and what a run prints."""
import argparse
import csv
import hashlib
import json
import os
import random
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
RUN_MAIN = "import sys, model_train; model_train.main(sys.argv[1:])"


def metrics_without_seconds(out):
    with open(out / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def same_weights(a, b):
    a, b = (torch.load(path, weights_only=True) for path in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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


def test_a_run_writes_its_files_and_steps_the_schedule_every_batch(trained_run):
    for name in ("best_model.pth", "last_checkpoint.pth", "metrics.csv", "results.json", "curves.png"):
        assert (trained_run / name).is_file()
    assert not list(trained_run.glob(".*.tmp")), "a temporary file was left behind"
    mt.Net().load_state_dict(torch.load(trained_run / "best_model.pth", weights_only=True))
    with open(trained_run / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"]
    assert [row[0] for row in rows[1:]] == ["1", "2"]
    checkpoint = torch.load(trained_run / "last_checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["epochs"] == 2
    assert checkpoint["best_acc"] == max(row["test_acc"] for row in checkpoint["history"])
    history = checkpoint["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # the synthetic classes are learned
    batches = -(-200 // 32)  # 200 synthetic training images in batches of 32
    assert checkpoint["scheduler"]["total_steps"] == checkpoint["scheduler"]["last_epoch"] == 2 * batches
    assert history[0]["lr"] == pytest.approx(mt.LR)  # the lr column: each epoch's first step
    results = json.loads((trained_run / "results.json").read_text())
    best = max(history, key=lambda row: row["test_acc"])
    assert results["settings"] == {name: checkpoint["config"][name] for name in results["settings"]}
    assert results["settings"]["epochs"] == 2 and "resume" not in results["settings"]
    assert results["finished"] and results["best_test_acc"] == best["test_acc"] == checkpoint["best_acc"]
    assert results["last_test_acc"] == history[-1]["test_acc"] and 0 <= results["best_test_acc_flip_tta"] <= 100
    assert 0 <= results["last_epoch_acc_without_averaging"] <= 100


def test_same_seed_same_run_and_overwrite_replaces_an_earlier_one(data_dir, trained_run, copy_of_run, tmp_path):
    mt.main(train_args(data_dir, tmp_path / "again"))
    assert metrics_without_seconds(tmp_path / "again") == metrics_without_seconds(trained_run)
    mt.main(train_args(data_dir, copy_of_run, "--seed", "5", "--overwrite"))
    assert metrics_without_seconds(copy_of_run) != metrics_without_seconds(trained_run)
    assert torch.load(copy_of_run / "last_checkpoint.pth", weights_only=True)["config"]["seed"] == 5
    assert not same_weights(copy_of_run / "best_model.pth", trained_run / "best_model.pth")


@pytest.mark.parametrize("extra", [(), ("--mixup", "0.4")], ids=["default", "mixup"])
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(extra, data_dir, tmp_path, monkeypatch):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    mt.main(train_args(data_dir, whole, *extra, epochs=3))
    assert stop_in_epoch_2(train_args(data_dir, broken, *extra, epochs=3), monkeypatch) == 130
    assert torch.load(broken / "last_checkpoint.pth", weights_only=True)["epoch"] == 1
    # Resume with only the checkpoint: settings come from it, the output folder is the checkpoint's.
    mt.main(["--resume", str(broken / "last_checkpoint.pth"), "--data-dir", str(data_dir), "--workers", "0"])
    assert metrics_without_seconds(broken) == metrics_without_seconds(whole)
    assert same_weights(whole / "best_model.pth", broken / "best_model.pth")


def test_resume_keeps_the_runs_settings_and_folders_but_a_typed_flag_wins(trained_run, tmp_path, capsys):
    checkpoint = torch.load(trained_run / "last_checkpoint.pth", weights_only=True)
    torch.save(checkpoint, tmp_path / "last_checkpoint.pth")
    cfg = mt.get_args_parser().parse_args(["--resume", str(tmp_path / "last_checkpoint.pth"), "--epochs", "9",
                                           "--workers", "3", "--out-dir", "."])
    _, merged = mt.read_resume_checkpoint(cfg, {"epochs", "workers", "resume"})
    assert merged.epochs == 2 and merged.workers == 3 and merged.out_dir == str(tmp_path)
    assert merged.data_dir == checkpoint["config"]["data_dir"] and merged.resume == cfg.resume
    out = capsys.readouterr().out
    assert "--epochs 9 ignored" in out and "--resume" not in out
    # --out-dir . typed at its default value still means "here", not the checkpoint's folder.
    _, merged = mt.read_resume_checkpoint(cfg, {"resume", "out_dir", "data_dir"})
    assert merged.out_dir == "." and merged.data_dir == mt.DATA_DIR


def test_resume_of_a_finished_run_does_nothing_and_says_how_to_go_on(copy_of_run, capsys):
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in copy_of_run.iterdir()}
    mt.main(["--resume", str(copy_of_run / "last_checkpoint.pth"), "--workers", "0"])
    out = capsys.readouterr().out
    assert "this run finished after epoch 2; nothing to do" in out and "--init-from" in out
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in copy_of_run.iterdir()} == before


def test_resume_into_another_folder_finds_the_runs_data_and_brings_its_best_weights(data_dir, tmp_path, monkeypatch):
    """No --data-dir on resume: the run's own data, not a download into ./data; the new folder gets best_model.pth
    at once, as a later epoch may never beat it."""
    stop_in_epoch_2(train_args(data_dir, tmp_path / "run", epochs=3), monkeypatch)
    import torchvision.datasets
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: pytest.fail("tried to download"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    real_train = mt.train

    def train_once_the_best_weights_are_there(cfg, data, device, out, checkpoint):
        assert same_weights(out / "best_model.pth", tmp_path / "run" / "best_model.pth")
        real_train(cfg, data, device, out, checkpoint)

    monkeypatch.setattr(mt, "train", train_once_the_best_weights_are_there)
    mt.main(["--resume", str(tmp_path / "run" / "last_checkpoint.pth"), "--out-dir", "new", "--workers", "0"])
    assert torch.load(tmp_path / "elsewhere" / "new" / "last_checkpoint.pth", weights_only=True)["epoch"] == 3
    assert sorted(os.listdir(tmp_path / "elsewhere")) == ["new"]


def test_init_from_starts_a_new_run_from_trained_weights(data_dir, trained_run, tmp_path):
    mt.main(train_args(data_dir, tmp_path, "--init-from", str(trained_run / "best_model.pth"), "--ema-decay", "0",
                       "--lr", "1e-12", "--max-lr", "1e-12", epochs=1))  # lr ~0: the weights stay where they began
    start, after = (torch.load(path, weights_only=True) for path in (trained_run / "best_model.pth",
                                                                     tmp_path / "best_model.pth"))
    assert all(torch.allclose(start[k].float(), after[k].float(), atol=1e-6) for k in start if k.endswith("weight"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["init_from"] == str(trained_run / "best_model.pth") and results["epochs_done"] == 1


def test_a_kill_at_any_moment_leaves_files_from_which_the_run_ends_as_an_unbroken_one(data_dir, tmp_path):
    """SIGKILL a real training process at random moments after its first checkpoint, resuming each time, then
    resume to the end: the files are never half-written, and the run ends with an unbroken run's metrics."""
    out, rng = tmp_path / "run", random.Random(0)
    mt.main(train_args(data_dir, tmp_path / "whole", epochs=4))
    command = [sys.executable, "-c", RUN_MAIN, *train_args(data_dir, out, epochs=4)]
    for _ in range(3):
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (out / "last_checkpoint.pth").exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        for name in ("best_model.pth", "last_checkpoint.pth"):
            torch.load(out / name, weights_only=True)  # complete, not half-written
        command = [sys.executable, "-c", RUN_MAIN, "--resume", str(out / "last_checkpoint.pth"), "--workers", "0"]
    mt.main(["--resume", str(out / "last_checkpoint.pth"), "--workers", "0"])
    assert metrics_without_seconds(out) == metrics_without_seconds(tmp_path / "whole")


def test_import_has_no_side_effects(tmp_path):
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import model_train"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert os.listdir(tmp_path) == []


def test_benchmark_prints_cost_speed_and_minutes(capsys, monkeypatch):
    real = mt.images_per_second
    monkeypatch.setattr(mt, "images_per_second", lambda *a, **k: real(*a, **{**k, "seconds": 0.2}))
    mt.main(["--benchmark", "--device", "cpu", "--workers", "0", "--batch-size", "8", "--epochs", "3"])
    out = capsys.readouterr().out
    for text in ("multiply-adds per image", "parameters", "training step", "test pass", "augmentation",
                 "DataLoader, 0 worker"):
        assert text in out
    assert out.count("an epoch, ") == 4 and out.count("for 3 epochs") == 4


def test_compile_that_fails_at_its_first_step_trains_uncompiled_to_the_bit(
        data_dir, trained_run, tmp_path, monkeypatch, capsys):
    """torch.compile fails only when the compiled model first runs (no C++ compiler, no Triton): --compile then says
    so on one line and trains as without it, to the bit, though its trial step moved BatchNorm and drew dropout."""
    def compile_that_fails(model, **options):
        def first_call(images):
            model(images)
            raise RuntimeError("no working C++ compiler")
        return first_call

    monkeypatch.setattr(torch, "compile", compile_that_fails)
    mt.main(train_args(data_dir, tmp_path, "--compile"))
    assert capsys.readouterr().out.count("--compile: torch.compile does not work on this machine (RuntimeError)") == 1
    assert metrics_without_seconds(tmp_path) == metrics_without_seconds(trained_run)
    assert same_weights(tmp_path / "best_model.pth", trained_run / "best_model.pth")


def test_compile_without_a_cpp_compiler_trains_after_one_line_not_a_traceback(data_dir, tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    argv = train_args(data_dir, tmp_path / "run", "--compile", epochs=1)
    result = subprocess.run([sys.executable, "-c", RUN_MAIN, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "--compile: torch.compile does not work on this machine (InductorError)" in result.stdout
    assert (tmp_path / "run" / "best_model.pth").is_file()


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
    assert mt.mixup_alpha(argparse.Namespace(mixup=0.4, epochs=2), 2) == 0.4  # short runs reach it too


def test_mixup_trains_on_blends_and_scores_both_labels():
    """The model sees the blended batch, the loss is lam x loss(labels) + (1 - lam) x loss(partners), and the
    training accuracy gives a prediction lam for one label and 1 - lam for the other."""
    torch.manual_seed(0)
    pixels, labels = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.arange(16) % 10
    seen = []

    class Recorder(torch.nn.Linear):
        def forward(self, x):
            seen.append(x.detach().clone())
            return super().forward(x.flatten(1))

    def one_epoch(model, mixup):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights, and so the logits, stay put
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return mt.train_one_epoch(model, [(pixels, labels)], optimizer, scheduler, torch.nn.CrossEntropyLoss(),
                                  torch.amp.GradScaler("cpu", enabled=False), None, mixup, np.random.default_rng(5))

    model = Recorder(3 * 32 * 32, 10)
    loss, accuracy = one_epoch(model, 0.4)
    images = mt.normalize(pixels, torch.device("cpu"))
    mixed, partners, lam = mt.mix_batch(images, labels, 0.4, np.random.default_rng(5))
    assert 0 < lam < 1 and sorted(partners.tolist()) == sorted(labels.tolist()) and torch.allclose(seen[-1], mixed)
    with torch.no_grad():
        logits = model(mixed)
    expected = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, partners)
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    hits = lam * (logits.argmax(1) == labels).sum() + (1 - lam) * (logits.argmax(1) == partners).sum()
    assert accuracy == pytest.approx(100 * hits.item() / 16, rel=1e-5)
    plain_loss, _ = one_epoch(model, 0.0)
    assert torch.equal(seen[-1], images)  # no mixup: the batch as it is
    assert plain_loss == pytest.approx(F.cross_entropy(model(images), labels).item(), rel=1e-5)


def test_a_run_with_mixup_learns_and_differs_from_one_without(data_dir, trained_run, tmp_path):
    mt.main(train_args(data_dir, tmp_path, "--mixup", "0.4"))
    mixed, plain = metrics_without_seconds(tmp_path), metrics_without_seconds(trained_run)
    assert mixed[0] == plain[0] and mixed[1] != plain[1]  # the first epoch trains on plain images
    first, second = torch.load(tmp_path / "last_checkpoint.pth", weights_only=True)["history"]
    assert second["test_loss"] < first["test_loss"] and second["test_acc"] > 10  # 10 %: chance


def test_weight_average_warms_up_then_follows_its_model_slowly():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    torch.nn.init.zeros_(model[0].weight)
    average = mt.WeightAverage(model, decay=0.5)
    assert not average.model.training and not any(p.requires_grad for p in average.model.parameters())
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    model[1].num_batches_tracked.fill_(7)
    average.update()  # step 1: decay min(0.5, 2 / 11), so the average moves 9/11 of the way
    assert torch.allclose(average.model[0].weight, torch.full((2, 2), 9 / 11))
    assert average.model[1].num_batches_tracked.item() == 7
    for _ in range(20):  # later steps: decay 0.5 (the setting) once (1 + t) / (10 + t) passes it
        average.update()
    assert torch.allclose(average.model[0].weight, torch.ones(2, 2), atol=1e-5) and model[0].weight.requires_grad
    model.load_state_dict({"0.weight": torch.full((2, 2), 3.0)}, strict=False)  # in place, as a resume loads
    average.decay = 0.0
    average.update()
    assert torch.equal(average.model[0].weight, torch.full((2, 2), 3.0))


@pytest.mark.parametrize("decay", ["0.999", "0"])
def test_the_reported_and_kept_weights_are_the_average(decay, data_dir, tmp_path):
    """With EMA on, each epoch's test accuracy and best_model.pth are the averaged weights'; off, the model's."""
    mt.main(train_args(data_dir, tmp_path, "--ema-decay", decay))
    checkpoint = torch.load(tmp_path / "last_checkpoint.pth", weights_only=True)
    cfg = mt.get_args_parser().parse_args(train_args(data_dir, tmp_path))
    _, test_loader = mt.make_loaders(mt.load_cifar10(data_dir), cfg, torch.device("cpu"))
    kept = mt.Net()
    kept.load_state_dict(checkpoint["average"]["weights"] if checkpoint["average"] else checkpoint["model"])
    if decay != "0":
        assert checkpoint["average"]["steps"] == 2 * 7  # updated once per batch: 2 epochs of 7 batches
        assert not torch.equal(kept.head[-1].weight, checkpoint["model"]["head.3.weight"])
    kept = kept.to(memory_format=torch.channels_last)  # as in training, so the arithmetic is the same
    assert mt.evaluate(kept, test_loader, torch.device("cpu"))[1] == checkpoint["history"][-1]["test_acc"]


def test_ctrl_c_saves_the_curves_and_prints_the_command_that_goes_on(data_dir, tmp_path, monkeypatch, capsys):
    assert stop_in_epoch_2(train_args(data_dir, tmp_path), monkeypatch) == 130
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"continue with: python model_train.py --resume {tmp_path / 'last_checkpoint.pth'}")
    assert (tmp_path / "curves.png").is_file()


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


def test_a_run_says_how_long_it_will_take_and_shows_plain_progress_off_a_terminal(data_dir, tmp_path, capsys):
    mt.main(train_args(data_dir, tmp_path, epochs=3))
    out = capsys.readouterr().out
    assert out.count("expected: about") == 1 and "an epoch" in out and "for the 3 epoch(s) to go, done around" in out
    lines = [line for line in out.splitlines() if line.startswith("epoch 1/3: ")]
    assert len(lines) >= 5 and lines[0].startswith("epoch 1/3: 1/7 batches (10 %)"), out
    assert all(" images/s, " in line and line.endswith(" left") for line in lines) and "\r" not in out


def test_epoch_lines_reach_a_pipe_as_they_are_printed(data_dir, tmp_path):
    """nohup, tee and a notebook's !python read a pipe: a block buffer would hold the lines until the run ends, so
    the first epoch's row would arrive only after the process had exited."""
    command = [sys.executable, "-c", RUN_MAIN, *train_args(data_dir, tmp_path, epochs=60)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:
            if line.split()[:1] == ["1"]:  # the first epoch's row
                break
        assert process.poll() is None, "the row came only when the run ended"
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("device, capability, dtype", [("cuda", (7, 5), torch.float16),
                                                       ("cuda", (8, 0), torch.bfloat16), ("cpu", None, None),
                                                       ("mps", None, None)])
def test_precision_follows_the_device(device, capability, dtype, monkeypatch):
    """A T4 (Colab's free GPU, capability 7.5) has no fast bfloat16: float16 autocast with a loss scaler there; a
    CPU and Apple's MPS train in float32."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert mt.amp_dtype(torch.device(device)) is dtype


def test_the_loss_scalers_state_is_checkpointed_and_restored(trained_run, tmp_path):
    checkpoint = torch.load(trained_run / "last_checkpoint.pth", weights_only=True)
    cfg = argparse.Namespace(**checkpoint["config"])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # the scale tensor exists from the first use
    model = mt.Net()
    optimizer = mt.make_optimizer(model, cfg, torch.device("cpu"))
    state = dict(model=model, average=None, optimizer=optimizer, scheduler=mt.make_scheduler(optimizer, cfg, 7),
                 scaler=scaler)
    mt.save_checkpoint(tmp_path / "c.pth", state, checkpoint["history"], dict(acc=1.0, weights=None), cfg)
    state["scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0)
    mt.restore_checkpoint(torch.load(tmp_path / "c.pth", weights_only=True), state)
    assert state["scaler"].get_scale() == 1024.0
