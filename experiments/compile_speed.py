"""The training step of model_train.Net eager and torch.compile'd, side by side in one process (interleaved rounds on
the same random batches), so a busy or drifting CPU shows in both:

    python experiments/compile_speed.py [--rounds 5] [--device cpu]
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model_train as mt  # noqa: E402


def step_runner(cfg, device, batches, compile_it):
    """A function that trains one pass over batches, as model_train.benchmark() does."""
    torch.manual_seed(cfg.seed)
    model = mt.Net(cfg.dropout).to(device, memory_format=torch.channels_last)
    step_model = mt.compiled(model, cfg, device) if compile_it else model
    optimizer = mt.make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    average = mt.WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    scaler = torch.amp.GradScaler(device.type, enabled=mt.amp_dtype(device) == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    rng = np.random.default_rng(cfg.seed)
    return lambda: mt.train_one_epoch(step_model, batches, optimizer, scheduler, criterion, scaler, average,
                                      cfg.mixup, rng)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    cfg, device = mt.get_args_parser().parse_args([]), mt.select_device(args.device)
    batches = [(torch.randint(0, 256, (cfg.batch_size, 3, 32, 32), dtype=torch.uint8),
                torch.randint(0, 10, (cfg.batch_size,)))] * 6
    start = time.perf_counter()
    runners = dict(eager=step_runner(cfg, device, batches, False), compiled=step_runner(cfg, device, batches, True))
    print(f"set up, compiling included: {time.perf_counter() - start:.0f} s")
    rates = {name: [] for name in runners}
    for round_ in range(1, args.rounds + 1):
        for name, run in runners.items():  # each pass ends with .item(), which waits for the device
            rates[name].append(mt.images_per_second(run, len(batches) * cfg.batch_size))
        print(f"round {round_}: " + ", ".join(f"{name} {rate[-1]:,.0f}" for name, rate in rates.items()) + " images/s")
    ratio = np.array(rates["compiled"]) / np.array(rates["eager"])
    print(f"medians: eager {np.median(rates['eager']):,.0f}, compiled {np.median(rates['compiled']):,.0f} images/s; "
          f"compiled / eager {np.median(ratio):.2f} (rounds {ratio.min():.2f}-{ratio.max():.2f})")


if __name__ == "__main__":
    main()
