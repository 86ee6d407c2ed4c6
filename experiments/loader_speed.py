"""How fast the training images can be delivered on this machine, for a GPU host whose main process mostly waits.

    python experiments/loader_speed.py [ROUNDS]

Interleaved rounds, medians: (1) one process augmenting with today's pipeline and with Albumentations' per-call
checks off (strict validates the data's keys on every call, is_check_shapes the shapes; the arguments are checked
once, at construction, either way), the same draws; (2) the DataLoader with 1, 2 and 3 workers, the main process only
taking batches (as it does when a GPU does the work). Random images, as many as CIFAR-10's training set.
"""
import itertools
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

import albumentations as A
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model_train as mt  # noqa: E402


def rate(fn, count, seconds=4.0):
    fn()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn()
        n += count
    return n / (time.perf_counter() - start)


def main(rounds=3):
    images = np.random.default_rng(0).integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8)
    labels = np.zeros(len(images), np.int64)
    pipelines = {"today's pipeline": mt.train_transform(),
                 "checks off": A.Compose(mt.train_transform().transforms, strict=False, is_check_shapes=False)}
    results = {}
    for _ in range(rounds):
        for name, pipeline in pipelines.items():
            dataset, index = mt.CIFAR10Albumentations(images, labels, pipeline, seed=1), iter(range(10**9))
            results.setdefault(f"one process, {name}", []).append(rate(lambda: dataset[next(index)], 1))
        for workers in (1, 2, 3):
            cfg = Namespace(workers=workers, seed=1, batch_size=128, affine_p=mt.AFFINE_P, cutout_p=mt.CUTOUT_P)
            loader, _ = mt.make_loaders((images, labels, images, labels), cfg, torch.device("cpu"))
            batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch
            results.setdefault(f"DataLoader, {workers} worker(s)", []).append(rate(lambda: next(batches), 128))
    for name, values in results.items():
        print(f"{name:<40}{statistics.median(values):8,.0f} images/s ({min(values):,.0f}-{max(values):,.0f})")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
