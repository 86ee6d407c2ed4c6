"""Train a compact CNN (< 200,000 parameters) on CIFAR-10 with Albumentations, AdamW and OneCycleLR.

`python model_train.py` trains with the settings below; `--help` lists the flags that change them, and the actions.
Read top to bottom: settings, data, model and training, down to train(), then the plumbing below a divider.
Importing it only defines things, so tests and DataLoader workers import it freely."""
import argparse
import codecs
import copy
import functools
import itertools
import json
import math
import os
import pickle
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path

# Albumentations otherwise asks PyPI for a newer version at every import, in every worker (a 2 s wait offline).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Sampler  # noqa: E402
from tqdm import tqdm  # noqa: E402

# ============================================================================================== settings
# Edit these, or override any of them from the command line: EPOCHS is --epochs, MAX_LR is --max-lr, ...
EPOCHS = 75             # length of the one-cycle schedule; 15 makes a quick run on a CPU
BATCH_SIZE = 128        # images per optimizer step
LR = 1e-3               # learning rate at the first step; OneCycle warms up from here to MAX_LR
MAX_LR = 4e-3           # peak learning rate, reached after PCT_START of the steps, then cosine-annealed to ~0
WEIGHT_DECAY = 5e-2     # decoupled weight decay (AdamW): each step shrinks every weight by lr x this
PCT_START = 0.2         # share of all steps spent warming up: a short warm-up keeps early Adam steps stable
DROPOUT = 0.1           # dropout on the pooled features before the linear head
LABEL_SMOOTHING = 0.1   # share of the target spread over all classes: 0.1 makes the true class's target 0.91
EMA_DECAY = 0.999       # evaluate and keep a moving average of the weights (per-step decay); 0 turns it off
AFFINE_P = 0.5          # share of training images shifted/scaled/rotated (up to 10 %, 10 %, 10 degrees)
CUTOUT_P = 0.0          # share of training images with a 16 x 16 hole of the mean colour (off: it cost accuracy)
MIXUP = 0.0             # mixup strength from mid-run on (blends pairs of images and their labels); 0 is off
TTA = True              # also report accuracy with flip test-time augmentation (mean of image and mirror)
TARGET_ACC = 85.0       # announce the first epoch whose test accuracy (%) reaches this
MISCLASSIFIED = 20      # how many misclassified test images misclassified.png shows
SEED = 42               # same seed, same data order, augmentations, weights and metrics (on a CPU)
DATA_DIR = "./data"     # holds cifar-10-batches-py/ (downloaded there if missing)
OUT_DIR = "."           # where best_model.pth, last_checkpoint.pth, metrics.csv and the plots go
OVERWRITE = False       # let a new run replace an earlier run's files in OUT_DIR
INIT_FROM = None        # start a new run from these weights (a best_model.pth or last_checkpoint.pth)
WORKERS = "auto"        # DataLoader worker processes: a number, or auto (all cores but one with a GPU, 1 on a CPU)
DEVICE = "auto"         # auto (CUDA, else Apple MPS, else CPU), cuda, mps or cpu
COMPILE = False         # torch.compile the model: faster steps on a GPU after a minute of compiling

MAX_PARAMETERS = 200_000      # the product's promise: the model stays under this many parameters
MIN_RECEPTIVE_FIELD = 49      # ... and its last convolution sees at least this many pixels across
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # published per-channel statistics of the training set
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ================================================================================================== data
def train_transform(affine_p=AFFINE_P, cutout_p=CUTOUT_P):
    """The training augmentation, on uint8 pixels (normalize() does whole batches on the device, so a worker ships a
    quarter of the bytes); strict=True makes an argument Albumentations would drop (misspelled, renamed) an error."""
    mean_pixel = tuple(round(255 * m) for m in CIFAR10_MEAN)  # the mean colour, so a hole normalizes to ~0
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.Affine(translate_percent=(-0.1, 0.1), scale=(0.9, 1.1), rotate=(-10, 10),
                 border_mode=cv2.BORDER_REFLECT_101, p=affine_p),  # reflect, so no black corners appear
        A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(16, 16), hole_width_range=(16, 16),
                        fill=mean_pixel, p=cutout_p),
        ToTensorV2(),  # height x width x channel array -> channel x height x width tensor, still uint8
    ], strict=True)


def test_transform():
    return A.Compose([ToTensorV2()], strict=True)


class CIFAR10Albumentations(Dataset):
    """uint8 height x width x channel images and labels -> (uint8 3 x 32 x 32 tensor, label). The index (from
    EpochSampler: epoch * len(self) + image) seeds the augmentation, so workers and resumes do not change it."""

    def __init__(self, images, labels, transform, seed=0):
        self.images, self.labels, self.transform, self.seed = images, labels, transform, seed

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        sample_seed = self.seed * 2**32 + index
        self.transform.set_random_state(np.random.default_rng(sample_seed), random.Random(sample_seed))
        i = index % len(self.labels)
        return self.transform(image=self.images[i])["image"], int(self.labels[i])


class EpochSampler(Sampler):
    """Shuffles anew each epoch from (seed, .epoch) alone and tags each index with its epoch (see above)."""

    def __init__(self, num_images, seed):
        self.num_images, self.seed, self.epoch = num_images, seed, 0

    def __len__(self):
        return self.num_images

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_images)
        return iter((order + self.epoch * self.num_images).tolist())


def init_worker(_worker_id):
    cv2.setNumThreads(0)  # each worker is one process on one core; OpenCV's own threads would oversubscribe


def make_loaders(data, cfg, device):
    """Shuffled training loader (per-epoch order from EpochSampler) and an unshuffled test loader."""
    cv2.setNumThreads(0)  # also when augmenting in this process (--workers 0): the model's threads need the cores
    train_images, train_labels, test_images, test_labels = data
    # A GPU eats tens of thousands of images a second, a worker augments a few thousand; on a CPU one keeps up.
    cores = (os.cpu_count() or 1) - 1
    workers = (min(16, cores) if device.type != "cpu" else min(1, cores)) if cfg.workers == "auto" else cfg.workers
    # A private generator: the loader's worker seeds must not draw from the global RNG that dropout uses, or a
    # resumed run would drift from an uninterrupted one.
    common = dict(num_workers=workers, persistent_workers=workers > 0, worker_init_fn=init_worker,
                  pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
    train_set = CIFAR10Albumentations(train_images, train_labels, train_transform(cfg.affine_p, cfg.cutout_p),
                                      seed=cfg.seed)
    test_set = CIFAR10Albumentations(test_images, test_labels, test_transform())
    train_loader = DataLoader(train_set, cfg.batch_size, sampler=EpochSampler(len(train_set), cfg.seed), **common)
    test_loader = DataLoader(test_set, 2 * cfg.batch_size, shuffle=False, **common)
    return train_loader, test_loader


# ================================================================================================= model
class Net(nn.Module):
    """C1 -> C5 -> global average pooling -> Linear: 195k parameters, 24 M multiply-adds, receptive field 79.

    Multiply-adds are expensive at 32 x 32, so the net goes down to 16 x 16 after two convs and to 8 x 8 at C4,
    each time with a stride-2 conv: unlike MaxPool it learns what to keep. Dilated convs (C3, C5) widen the view
    without more parameters, so the last conv sees 79 pixels across. Widths grow where positions are few."""

    def __init__(self, dropout=DROPOUT, num_classes=len(CLASSES)):
        super().__init__()
        self.features = nn.Sequential(OrderedDict(
            # C1, 32 x 32: plain 3 x 3 convs pick up edges and colours. Only 16 wide: full-resolution maps are
            # the costliest to compute and store, and edge and colour filters need few channels.
            C1=nn.Sequential(ConvBNAct(3, 16), Residual(ConvBNAct(16, 16))),
            # C2, 16 x 16: a stride-2 conv replaces MaxPool, then two inverted bottlenecks: 48 channels between
            # units, 96 inside, where the depthwise 3 x 3 conv looks around.
            C2=nn.Sequential(ConvBNAct(16, 48, stride=2), Residual(InvertedBottleneck(48)),
                             Residual(InvertedBottleneck(48))),
            # C3, 16 x 16: two more, the first dilated (dilation 2 spans 5 x 5 with 3 x 3 weights).
            C3=nn.Sequential(Residual(InvertedBottleneck(48, dilation=2)), Residual(InvertedBottleneck(48))),
            # C4, 8 x 8: a stride-2 depthwise conv whose 1 x 1 pointwise conv is the 48 -> 176 transition, then
            # two more units: at 8 x 8 a 176-wide unit costs 2 M multiply-adds, so the parameters go here.
            C4=nn.Sequential(DepthwiseSeparable(48, 176, stride=2), Residual(DepthwiseSeparable(176, 176)),
                             Residual(DepthwiseSeparable(176, 176))),
            # C5, 8 x 8: two dilated depthwise-separable convs bring the receptive field from 47 to 79.
            C5=nn.Sequential(Residual(DepthwiseSeparable(176, 176, dilation=2)),
                             Residual(DepthwiseSeparable(176, 176, dilation=2))),
        ))
        # Dropout on the pooled features, as in MobileNet and EfficientNet: on every feature map it is costly.
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(176, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


class ConvBNAct(nn.Sequential):
    """k x k convolution -> BatchNorm -> SiLU. SiLU (x * sigmoid(x)) passes a little of each negative input, so a
    narrow net keeps more of what its few channels carry than with ReLU. Not in place: its backward needs its input."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, dilation=1, groups=1):
        super().__init__(conv2d(in_channels, out_channels, kernel_size, stride, dilation, groups),
                         nn.BatchNorm2d(out_channels), nn.SiLU())


class DepthwiseSeparable(nn.Sequential):
    """3 x 3 depthwise conv (one filter per channel: looks around) -> 1 x 1 pointwise conv (mixes channels)
    -> BatchNorm -> SiLU. About 8x fewer parameters and multiply-adds than a full 3 x 3 conv of equal width."""

    def __init__(self, in_channels, out_channels, stride=1, dilation=1):
        super().__init__(conv2d(in_channels, in_channels, 3, stride, dilation, groups=in_channels),
                         conv2d(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels), nn.SiLU())


class InvertedBottleneck(nn.Sequential):
    """MobileNetV2's unit: 1 x 1 conv widens the channels `expansion` times -> 3 x 3 depthwise conv looks around at
    that width, many channels for few weights -> 1 x 1 conv projects back -> BatchNorm, no activation (on the
    narrow output SiLU would all but zero the negative values the residual sum carries)."""

    def __init__(self, channels, expansion=2, dilation=1):
        wide = channels * expansion
        super().__init__(ConvBNAct(channels, wide, 1), ConvBNAct(wide, wide, dilation=dilation, groups=wide),
                         conv2d(wide, channels, 1), nn.BatchNorm2d(channels))


class Residual(nn.Module):
    """x + f(x): the gradient also flows around f, so a 19-layer stack trains as readily as a shallow one."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return x + self.fn(x)


def conv2d(in_channels, out_channels, kernel_size=3, stride=1, dilation=1, groups=1):
    """A k x k conv padded to keep the map size (divided by the stride). No bias: the BatchNorm after it shifts."""
    if dilation > 1:
        assert stride == 1, "DilatedConv2d regroups pixels for stride 1 only"
        return DilatedConv2d(in_channels, out_channels, kernel_size, dilation, groups)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups,
                     bias=False)


class DilatedConv2d(nn.Conv2d):
    """A CPU speed optimization; skip it on a first read: an nn.Conv2d with dilation, computed differently. On a CPU
    it runs as the same undilated conv on the d x d interleaved sub-grids of its input ("space to batch"): same
    outputs, as PyTorch's CPU kernels for dilated depthwise convs are slow. GPUs take the plain path."""

    def __init__(self, in_channels, out_channels, kernel_size, dilation, groups=1):
        super().__init__(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2),
                         dilation=dilation, groups=groups, bias=False)

    def forward(self, x):
        d, (n, c, h, w) = self.dilation[0], x.shape
        if x.device.type != "cpu" or h % d or w % d:
            return super().forward(x)
        hs, ws = h // d, w // d  # the size of each sub-grid
        # Pixel (d*i + r, d*j + s) goes to sub-grid (r, s), position (i, j); dilation d becomes dilation 1 there.
        # The shuffles work on the channels-last order (n, h, w, c), so each is a single copy.
        sub = x.permute(0, 2, 3, 1).reshape(n, hs, d, ws, d, c).permute(0, 2, 4, 1, 3, 5)
        sub = sub.reshape(n * d * d, hs, ws, c).permute(0, 3, 1, 2)
        y = F.conv2d(sub, self.weight, None, 1, self.padding[0] // d, 1, self.groups)
        y = y.permute(0, 2, 3, 1).reshape(n, d, d, hs, ws, -1).permute(0, 3, 1, 4, 2, 5)
        return y.reshape(n, h, w, -1).permute(0, 3, 1, 2)


# ============================================================================================== training
@functools.cache
def pixel_statistics(device):
    """CIFAR10_MEAN and CIFAR10_STD in pixels (0-255), once per device: a per-step copy to a GPU would stall the CPU."""
    return tuple(255 * torch.tensor(stats, device=device).view(1, 3, 1, 1) for stats in (CIFAR10_MEAN, CIFAR10_STD))


def normalize(images, device):
    """A batch of uint8 pixels (N x 3 x H x W) -> normalized float32 images on the device. channels_last is the
    layout of cuDNN's and oneDNN's fastest convs; non_blocking lets the copy from pinned memory overlap other work."""
    mean, std = pixel_statistics(device)
    images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
    return (images.float() - mean) / std


def amp_dtype(device):
    """The reduced precision of the device's fast convs: bfloat16 on NVIDIA GPUs since Ampere, float16 (with loss
    scaling) before, as a T4 emulates bfloat16 slowly; None (float32) on a CPU or Apple MPS, where it gained little."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def autocast(device):
    dtype = amp_dtype(device)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def mixup_alpha(cfg, epoch):
    """The mixup strength of an epoch: 0 at the first, rising linearly to MIXUP halfway through training, then held:
    early on the net has yet to learn the plain images, late in a long run it fits them too well."""
    return cfg.mixup * min(1.0, (epoch - 1) / max(1, cfg.epochs // 2))


def mix_batch(images, labels, alpha, rng):
    """Mixup (Zhang et al., 2018): blend the batch with a shuffled copy of itself, with one weight lam ~ Beta(alpha,
    alpha) for the batch. Returns (blended images, the partners' labels, lam); the loss is blended with the same lam."""
    lam = float(rng.beta(alpha, alpha))
    order = torch.from_numpy(rng.permutation(len(labels))).to(images.device)
    return lam * images + (1 - lam) * images[order], labels[order], lam


def train_one_epoch(model, batches, optimizer, scheduler, criterion, scaler, average, mixup, rng):
    """One pass over the batches, stepping OneCycleLR and the weight average after each; returns (mean loss,
    accuracy %). Sums stay on the device until the end: a per-step .item() would make the CPU wait for the GPU."""
    device = next(model.parameters()).device
    model.train()
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    for images, labels in batches:
        seen += len(labels)
        images, labels = normalize(images, device), labels.to(device, non_blocking=True)
        if mixup > 0:
            images, partners, lam = mix_batch(images, labels, mixup, rng)
        with autocast(device):
            logits = model(images)
            loss = criterion(logits, labels)
            if mixup > 0:
                loss = lam * loss + (1 - lam) * criterion(logits, partners)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # float16's loss scaling; a pass-through in float32 and bfloat16
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if average:
            average.update()
        loss_sum += loss.detach() * len(labels)
        predicted = logits.argmax(1)
        correct += (predicted == labels).sum() if mixup == 0 else \
            lam * (predicted == labels).sum() + (1 - lam) * (predicted == partners).sum()
    return loss_sum.item() / seen, 100.0 * correct.item() / seen


@torch.no_grad()
def predict(model, loader, device, tta=False, desc=None):
    """Logits (float32, on the CPU) for every image in loader, and the labels; with tta, averaged with the mirror's."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in progress(loader, desc or "test", plain_lines=desc is not None):
        images = normalize(images, device)
        with autocast(device):
            logits = model(images)
            if tta:
                logits = (logits + model(images.flip(3))) / 2
        all_logits.append(logits.float())
        all_labels.append(labels)
    return torch.cat(all_logits).cpu(), torch.cat(all_labels)


def loss_and_accuracy(logits, labels):
    return F.cross_entropy(logits, labels).item(), 100.0 * (logits.argmax(1) == labels).sum().item() / len(labels)


def evaluate(model, loader, device, tta=False):
    return loss_and_accuracy(*predict(model, loader, device, tta))


def make_optimizer(model, cfg, device):
    """AdamW: Adam's own weight_decay is a gradient term that Adam rescales like any other, so it hardly holds back
    weights with large gradients; AdamW shrinks every weight by lr x weight_decay apart from the gradient."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def make_scheduler(optimizer, cfg, steps_per_epoch):
    """OneCycle: warm up from LR to MAX_LR, then cosine-anneal to almost zero, stepping every batch; the high middle
    explores, the long tail settles. Adam moves each weight by about lr a step, and these weights are ~0.05."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.max_lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=cfg.pct_start, anneal_strategy="cos", div_factor=cfg.max_lr / cfg.lr)


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics: the model we test and keep. Each
    step's weights wander around the valley the optimizer is in, and their average sits nearer its floor. The decay
    warms up as (1 + t) / (10 + t), as in TensorFlow and timm, so even a short run forgets the random start."""

    def __init__(self, model, decay):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.steps = decay, 0
        # Each averaged tensor beside `model`'s own, paired once (state_dict() costs 1-2 ms a step), as training
        # changes `model`'s tensors in place. BatchNorm's step counts (integers) are copied, not averaged.
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
        self.averages = [average for average, now in pairs if average.is_floating_point()]
        self.latest = [now for average, now in pairs if average.is_floating_point()]
        self.counters = [(average, now) for average, now in pairs if not average.is_floating_point()]

    @torch.no_grad()
    def update(self):  # after each optimizer step: move towards the model it was made from
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch.optim.swa_utils.get_ema_multi_avg_fn(decay)(self.averages, self.latest, None)
        for average, now in self.counters:
            average.copy_(now)

    def state_dict(self):
        return dict(weights=self.model.state_dict(), steps=self.steps)

    def load_state_dict(self, state):
        self.model.load_state_dict(state["weights"])
        self.steps = state["steps"]


def compiled(model, cfg, device):
    """torch.compile(model); where compiling fails (no C++ compiler, no Triton), one line why, and the model itself."""
    weights, step_model = copy.deepcopy(model.state_dict()), torch.compile(model)
    try:  # a stand-in training step, forward and backward; the weights and random state are put back after it
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast(device):
            step_model(normalize(torch.zeros(cfg.batch_size, 3, 32, 32, dtype=torch.uint8), device)).sum().backward()
    except Exception as e:  # Inductor and Triton raise many kinds; to a user each means the same
        print(f"--compile: torch.compile does not work on this machine ({type(e).__name__}); going on without it")
        step_model = model
    model.load_state_dict(weights)
    return step_model


def train(cfg, data, device, out, checkpoint=None):
    """The whole run: train for cfg.epochs epochs, test after each, keep the best weights in best_model.pth and
    save everything a resumed run needs in last_checkpoint.pth; `checkpoint` (from --resume) is where to go on."""
    torch.manual_seed(cfg.seed)
    model = Net(cfg.dropout)
    describe_model(model)
    if cfg.init_from:  # start from trained weights instead of random ones
        load_weights(model, cfg.init_from, "--init-from")
    model = model.to(device, memory_format=torch.channels_last)
    step_model = compiled(model, cfg, device) if cfg.compile else model
    train_loader, test_loader = make_loaders(data, cfg, device)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = make_scheduler(optimizer, cfg, len(train_loader))
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)  # see amp_dtype
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    state = dict(model=model, average=average, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    history, best = restore_checkpoint(checkpoint, state) if checkpoint else ([], dict(acc=-1.0, weights=None))
    # The weights tested after each epoch, and kept when they improve: the average's, if there is one.
    kept_model, test_model = (average.model, average.model) if average else (model, step_model)

    print(" ".join(f"{key:>10}" for key in METRICS))
    first_epoch = len(history) + 1
    try:
        for epoch in range(first_epoch, cfg.epochs + 1):
            start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
            train_loader.sampler.epoch = epoch
            batches = progress(train_loader, f"epoch {epoch}/{cfg.epochs}",  # and once, how long the run will take
                               epochs_left=cfg.epochs - epoch + 1 if epoch == first_epoch else 0)
            rng = np.random.default_rng([cfg.seed, epoch, 1])  # mixup's draws: from (seed, epoch) alone, as the order
            train_loss, train_acc = train_one_epoch(step_model, batches, optimizer, scheduler, criterion, scaler,
                                                    average, mixup_alpha(cfg, epoch), rng)
            test_loss, test_acc = evaluate(test_model, test_loader, device)
            row = dict(epoch=epoch, lr=lr, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                       test_acc=test_acc, seconds=time.perf_counter() - start)
            tqdm.write(" ".join(f"{row[key]:>10{spec}}" for key, spec in METRICS.items()))
            # Best weights first, then the checkpoint that records them: a kill in between costs only a rerun of
            # this epoch, which gives the same result.
            if test_acc > best["acc"]:
                best = dict(acc=test_acc, weights={k: v.detach().clone() for k, v in kept_model.state_dict().items()})
                save(best["weights"], out / "best_model.pth")
            history.append(row)
            save_checkpoint(out / "last_checkpoint.pth", state, history, best, cfg)
            write_metrics_csv(history, out / "metrics.csv")
            write_results(out, cfg, history)
            if test_acc >= cfg.target_acc > max([r["test_acc"] for r in history[:-1]], default=-1):
                tqdm.write(f"target reached: {test_acc:.2f} % >= {cfg.target_acc} % at epoch {epoch}")
    except KeyboardInterrupt:
        if not history:
            raise KeyboardInterrupt("before the first epoch finished; nothing was saved")
        plot_curves(history, cfg, out / "curves.png")
        raise KeyboardInterrupt(f"every finished epoch ({len(history)} of {cfg.epochs}) is saved, and curves.png; "
                                f"continue with: python model_train.py --resume {out / 'last_checkpoint.pth'}")

    if max(row["test_acc"] for row in history) < cfg.target_acc:
        print(f"target {cfg.target_acc} % not reached")
    minutes = sum(row["seconds"] for row in history) / 60
    print(f"best test accuracy {best['acc']:.2f} % ({out / 'best_model.pth'}); {minutes:.1f} min of training")
    final = dict(training_minutes=round(minutes, 2), device=f"{device.type} ({PRECISION[amp_dtype(device)]})",
                 torch=torch.__version__)
    if average:  # what the average bought: the last epoch's own weights, on the same test set
        final["last_epoch_acc_without_averaging"] = acc = evaluate(model, test_loader, device)[1]
        print(f"without weight averaging, the last epoch's weights score {acc:.2f} %")
    model.load_state_dict(best["weights"])
    weights = f"best_model.pth, epoch {max(history, key=lambda row: row['test_acc'])['epoch']}"
    final["best_test_acc_flip_tta"] = report(model, test_loader, device, cfg, out, weights)
    plot_curves(history, cfg, out / "curves.png")
    write_results(out, cfg, history, **final)
    print(f"wrote curves.png and results.json to {out}")


# ========================================================================================================
# Below: the product's plumbing, which a first read may skip.
class UserError(Exception):
    """A problem the user can fix (bad data, flag, checkpoint or folder): main() prints it on one line."""


# ------------------------------------------------------------------------------------ reading CIFAR-10
BATCH_FOLDER = "cifar-10-batches-py"


class _ArrayUnpickler(pickle.Unpickler):
    """Only numpy arrays and lists, what CIFAR-10 batch files hold: another pickle could run code while it loads.
    (torchvision's md5 check would refuse every copy whose pickle bytes differ, even one with the original pixels.)"""

    def find_class(self, module, name):
        allowed = {"_reconstruct": np.ndarray.__reduce__(np.empty(0))[0], "ndarray": np.ndarray, "dtype": np.dtype}
        if module.split(".")[0] == "numpy" and name in allowed:
            return allowed[name]
        if (module, name) == ("_codecs", "encode"):  # how Python 3 writes bytes into a protocol-2 pickle
            return codecs.encode
        raise pickle.UnpicklingError(f"it holds a {module}.{name} object, which a CIFAR-10 batch never does")


def read_batch_file(path):
    """One batch file -> (uint8 images N x 32 x 32 x 3, int64 labels N), checked."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
        data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64)
        if data.dtype != np.uint8 or data.shape[1:] != (3072,) or not 0 < len(data) == len(labels) \
                or labels.min() < 0 or labels.max() >= len(CLASSES):
            raise ValueError(f"{data.dtype} data of shape {data.shape} and {len(labels)} labels, not N x 3072 uint8 "
                             f"images with N labels from 0 to 9")
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the folder holds an incomplete CIFAR-10 copy; delete "
                        f"{path.parent} and run again to download it, or copy the complete folder there") from None
    except Exception as e:  # truncated, corrupt, or not a CIFAR batch at all
        raise UserError(f"{path} is truncated or not a CIFAR-10 batch file ({type(e).__name__}: {e}); replace "
                        f"{path.parent} with a complete copy") from None
    # Stored channel-planar (all R, then G, then B); Albumentations and OpenCV want height x width x channel.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def find_batch_folder(data_dir):
    """DATA_DIR/cifar-10-batches-py, or DATA_DIR itself when it is that folder (a common slip)."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise UserError(f"--data-dir {data_dir} is a file, not a folder; give the folder that holds {BATCH_FOLDER} "
                        f"(or where to download it)")
    return data_dir if data_dir.name == BATCH_FOLDER or (data_dir / "data_batch_1").is_file() else \
        data_dir / BATCH_FOLDER


def load_cifar10(data_dir):
    """(train_images, train_labels, test_images, test_labels), downloaded by torchvision if missing."""
    folder = find_batch_folder(data_dir)
    if not folder.is_dir():
        made = [parent for parent in (folder.parent, *folder.parent.parents) if not parent.exists()]
        print(f"downloading CIFAR-10 (163 MB) into {folder.parent} ...")
        try:
            from torchvision.datasets import CIFAR10
            CIFAR10(root=str(folder.parent), train=True, download=True)
        except Exception as e:  # no network, a proxy, a full disk, a failed checksum, a torchvision not for this torch
            if made:
                shutil.rmtree(made[-1], ignore_errors=True)
            raise UserError(f"could not download CIFAR-10 into {folder.parent} ({type(e).__name__}: {e}); without "
                            f"network, copy an unpacked {BATCH_FOLDER} folder into {folder.parent} (README: "
                            f"Troubleshooting)") from None
    train = [read_batch_file(folder / f"data_batch_{i}") for i in range(1, 6)]
    return (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]),
            *read_batch_file(folder / "test_batch"))


PRECISION = {torch.bfloat16: "bfloat16 autocast", torch.float16: "float16 autocast with loss scaling", None: "float32"}


def select_device(choice):
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    choice = next(name for name, ok in available.items() if ok) if choice == "auto" else choice
    if not available[choice]:
        raise UserError(f"--device {choice} is not available on this machine; use --device auto or cpu")
    torch.backends.cudnn.benchmark = True  # CUDA: every batch has one shape, so cuDNN may time its convs once
    return torch.device(choice)


def device_and_data(cfg):
    device, data = select_device(cfg.device), load_cifar10(cfg.data_dir)
    print(f"CIFAR-10 from {find_batch_folder(cfg.data_dir)}: {len(data[1]):,} training and {len(data[3]):,} test "
          f"images; device {device} ({PRECISION[amp_dtype(device)]})")
    return device, data


# ------------------------------------------------------------------------------ files, written atomically
def save(content, path):
    """Write a Figure, text lines or what torch.save takes beside path, then rename it over path (atomic)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if isinstance(content, Figure):
                content.savefig(f, format="png", dpi=110, bbox_inches="tight")
            elif isinstance(content, list):
                f.write("".join(f"{line}\n" for line in content).encode())
            else:
                torch.save(content, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); free some space or choose another --out-dir") \
            from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# metrics.csv's columns and their formats; the console's table of epochs shows them 10 characters wide.
METRICS = dict(epoch="d", lr=".3e", train_loss=".4f", train_acc=".2f", test_loss=".4f", test_acc=".2f", seconds=".1f")


def write_metrics_csv(history, path):
    save([",".join(METRICS)] + [",".join(format(row[k], f) for k, f in METRICS.items()) for row in history], path)


def write_results(out, cfg, history, **final):
    """results.json: the settings, where the run stands and (`final`) what is measured at its end."""
    best = max(history, key=lambda row: row["test_acc"])
    results = dict(settings={name: getattr(cfg, name) for name in settings_of(cfg)}, epochs_done=len(history),
                   finished=len(history) == cfg.epochs, best_epoch=best["epoch"], best_test_acc=best["test_acc"],
                   last_test_acc=history[-1]["test_acc"], **final)
    save([json.dumps(results, indent=2)], out / "results.json")


def prepare_out_dir(out_dir):
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise UserError(f"cannot write to --out-dir {out} ({e.strerror or e}); choose a folder you can write to") \
            from None
    return out


# ---------------------------------------------------------------------------------- checkpoints, resume
CHECKPOINT_FORMAT = "model_train/2"  # marks the files save_checkpoint() writes; /2 since Net uses SiLU
MACHINE_SETTINGS = {"data_dir", "out_dir", "overwrite", "workers", "device", "compile"}  # a resume may change these
OURS = "give a best_model.pth or last_checkpoint.pth written by this script"


def load_checkpoint_file(path, what):
    """torch.load with weights_only=True, so a file can hold tensors and plain data but never run code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; give the path of a .pth file this script wrote")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise UserError(f"{what} {path} is not a checkpoint written by this script; {OURS}")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles before failing; the errors below say it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a torch file holding objects other than tensors and plain data
        raise UserError(f"{what} {path} holds objects other than tensors and plain data, which could run code "
                        f"when loaded, so it is refused; {OURS}") from None
    except Exception:  # a truncated or damaged file, or another program's zip archive
        raise UserError(f"{what} {path} is damaged (truncated or corrupt) or not a checkpoint; {OURS}") from None


def is_state_dict(state):
    """Whether `state` is a model's weights alone, as best_model.pth holds them."""
    return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def load_weights(model, path, what="weights file"):
    """`model` with the weights of a best_model.pth, or the averaged (tested) ones of a last_checkpoint.pth."""
    state = load_checkpoint_file(path, what)
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        state = state["average"]["weights"] if state.get("average") else state.get("model")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError):
        kind = "holds weights for a different model than this script's Net" if is_state_dict(state) else \
            "is not a checkpoint written by this script"
        raise UserError(f"{what} {path} {kind}; {OURS}") from None
    return model


def save_checkpoint(path, state, history, best, cfg):
    """All a resumed run needs to go on exactly: train()'s `state`, the best weights, settings, history, RNG state."""
    rng = dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])
    parts = {name: part.state_dict() if part else None for name, part in state.items()}
    config = {**vars(cfg), "data_dir": str(Path(cfg.data_dir).resolve())}  # a resume from elsewhere finds the data
    save(dict(format=CHECKPOINT_FORMAT, **parts, epoch=len(history), best_acc=best["acc"], best_model=best["weights"],
              config=config, history=history, rng=rng), path)


def restore_checkpoint(checkpoint, state):
    """Load what save_checkpoint() saved into `state`; returns (history, best) as train() keeps them."""
    for name, part in state.items():
        if part:
            part.load_state_dict(checkpoint[name])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    print(f"resumed after epoch {checkpoint['epoch']} (best test accuracy {checkpoint['best_acc']:.2f} %)")
    return checkpoint["history"], dict(acc=checkpoint["best_acc"], weights=checkpoint["best_model"])


def read_resume_checkpoint(cfg, typed):
    """--resume: the checkpoint and its run's settings; of the flags typed, only this machine's settings count."""
    checkpoint = load_checkpoint_file(cfg.resume, "--resume checkpoint")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        hint = " (best_model.pth holds weights only: resume from last_checkpoint.pth)" if is_state_dict(checkpoint) \
            else ""
        raise UserError(f"--resume {cfg.resume} is not a last_checkpoint.pth written by this script{hint}")
    if not {"average", "scaler", "best_model", "rng"} <= checkpoint.keys():
        raise UserError(f"--resume {cfg.resume} was written by an earlier version of this script; finish that run "
                        f"with the version that started it")
    saved = {key: value for key, value in checkpoint["config"].items() if key in settings_of(cfg)}
    for key in sorted(typed & saved.keys() - MACHINE_SETTINGS):
        if getattr(cfg, key) != saved[key]:
            print(f"note: --{key.replace('_', '-')} {getattr(cfg, key)} ignored; the resumed run keeps {saved[key]}")
    merged = {**vars(cfg), **{key: value for key, value in saved.items() if key not in MACHINE_SETTINGS}}
    merged["out_dir"] = cfg.out_dir if "out_dir" in typed else str(Path(cfg.resume).parent)
    merged["data_dir"] = cfg.data_dir if "data_dir" in typed else saved["data_dir"]
    return checkpoint, argparse.Namespace(**merged)


def start_training(cfg, typed):
    """Everything before train(): a resumed run's settings, the checks, the output folder, the device and data."""
    checkpoint = None
    if cfg.resume:
        checkpoint, cfg = read_resume_checkpoint(cfg, typed)
        if checkpoint["epoch"] >= cfg.epochs:
            weights = Path(cfg.resume).parent / "best_model.pth"
            print(f"this run finished after epoch {checkpoint['epoch']}; nothing to do. To train further, start a new "
                  f"run from its weights: python model_train.py --init-from {weights} --out-dir NEW_FOLDER")
            return
    if cfg.init_from:
        load_weights(Net(), cfg.init_from, "--init-from")  # a bad file is refused before anything is written
    out = prepare_out_dir(cfg.out_dir)
    # A new run writes best_model.pth at its first epoch: another run's files there stay unless --overwrite.
    found = [name for name in ("best_model.pth", "last_checkpoint.pth") if (out / name).exists()]
    continuing = cfg.resume and Path(cfg.resume).resolve().parent == out.resolve()
    if found and not cfg.overwrite and not continuing:
        hint = f"; --resume {out / 'last_checkpoint.pth'} continues that run" if "last_checkpoint.pth" in found else ""
        raise UserError(f"{out} already holds {' and '.join(found)} from an earlier run: give another --out-dir to "
                        f"keep that run's files, or add --overwrite to replace them{hint}")
    if checkpoint and not continuing:  # resumed into another folder: the run's files go there now
        save(checkpoint["best_model"], out / "best_model.pth")
        save(checkpoint, out / "last_checkpoint.pth")
        write_metrics_csv(checkpoint["history"], out / "metrics.csv")
    device, data = device_and_data(cfg)
    steps = cfg.epochs * math.ceil(len(data[1]) / cfg.batch_size)
    if cfg.pct_start * steps == 1:  # OneCycleLR divides by zero on a warm-up of one step
        raise UserError(f"--epochs {cfg.epochs} at --batch-size {cfg.batch_size} makes only {steps} optimizer steps, "
                        f"and --pct-start {cfg.pct_start} of them is a warm-up of one step; "
                        f"use a smaller --batch-size or more --epochs")
    train(cfg, data, device, out, checkpoint)


# ------------------------------------------------------------------------------------------- layer table
def layer_table(model):
    """A row per conv and linear layer, in forward order: name, kind, output shape, receptive field, parameters and
    multiply-adds. The receptive field grows by (kernel - 1) * dilation * (product of the strides so far) per conv."""
    model = copy.deepcopy(model).eval()  # a copy to hook and run: the caller's model stays as it was
    rows, receptive_field, jump = [], 1, 1

    def record(name):
        def hook(module, _inputs, output):
            nonlocal receptive_field, jump
            kind, macs = "linear", module.weight.numel()
            if isinstance(module, nn.Conv2d):
                receptive_field += (module.kernel_size[0] - 1) * module.dilation[0] * jump
                jump *= module.stride[0]
                macs, k = output[0].numel() * module.weight[0].numel(), module.kernel_size[0]
                kind = ("depthwise" if module.groups == module.in_channels > 1 else "pointwise" if k == 1 else "conv") \
                    + f" {k}x{k}" + f" s{module.stride[0]}" * (module.stride[0] > 1) \
                    + f" d{module.dilation[0]}" * (module.dilation[0] > 1)
            rows.append(dict(name=name.removeprefix("features."), kind=kind, output=tuple(output.shape[1:]), macs=macs,
                             receptive_field=receptive_field, parameters=sum(p.numel() for p in module.parameters())))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(record(name))
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32, device=next(model.parameters()).device))
    return rows


def describe_model(model):
    """The per-layer table and the promised properties, printed at start; refuses a model that breaks them."""
    rows, params = layer_table(model), sum(p.numel() for p in model.parameters())
    rf = [row for row in rows if row["kind"] != "linear"][-1]["receptive_field"]  # of the last conv
    print(f"{'layer':<14}{'kind':<18}{'output':>10}{'RF':>5}{'params':>9}{'MACs':>12}")
    for r in rows:
        print(f"{r['name']:<14}{r['kind']:<18}{'x'.join(map(str, r['output'])):>10}{r['receptive_field']:>5}"
              f"{r['parameters']:>9,}{r['macs']:>12,}")
    print(f"{params:,} parameters (limit {MAX_PARAMETERS:,}), {sum(r['macs'] for r in rows) / 1e6:.1f} M multiply-adds "
          f"per image, receptive field {rf} px (at least {MIN_RECEPTIVE_FIELD})")
    if params >= MAX_PARAMETERS:
        raise UserError(f"the model has {params:,} parameters, over the {MAX_PARAMETERS:,} limit; narrow Net")
    if rf < MIN_RECEPTIVE_FIELD:
        raise UserError(f"the model's receptive field is {rf} px, under {MIN_RECEPTIVE_FIELD}; add dilation or stride")


# ---------------------------------------------------------------------------------------------- progress
def duration(seconds):
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


def progress(batches, desc, plain_lines=True, epochs_left=0):
    """Yields the batches while showing progress: tqdm's bar on a terminal, elsewhere (a log) a line every tenth. With
    epochs_left, one line after the first batches says how long an epoch and the rest will take."""
    bar = tqdm(total=len(batches), desc=desc, leave=False, dynamic_ncols=True) if sys.stderr.isatty() else None
    total, start, shown, seen, after_first = len(batches), time.perf_counter(), 0, 0, 0.0
    timed = max(2, min(30, total // 10))  # the batch after which to estimate; the first, slow one is left out
    for done, batch in enumerate(batches, 1):
        yield batch
        now, seen = time.perf_counter(), seen + len(batch[1])
        after_first = now if done == 1 else after_first
        if bar:
            bar.update()
        if epochs_left and done == timed:
            per_epoch = (now - after_first) / (done - 1) * total * (1 + 1 / 15)
            left = per_epoch * epochs_left - (now - start)
            finish = time.strftime("%a %H:%M" if left > 12 * 3600 else "%H:%M", time.localtime(time.time() + left))
            tqdm.write(f"expected: about {duration(per_epoch)} an epoch, {duration(left)} for the {epochs_left} "
                       f"epoch(s) to go, done around {finish}")
        tenths = 10 * done // total
        if not bar and plain_lines and tenths > shown and done < total:
            shown, elapsed = tenths, now - start
            print(f"{desc}: {done}/{total} batches ({10 * tenths} %), {elapsed:.0f} s, {seen / elapsed:,.0f} images/s, "
                  f"{duration(elapsed / done * (total - done))} left")
    if bar:
        bar.close()


# =============================================================================================== reports
# matplotlib's Figure without pyplot: no window, no global state, nothing that blocks.
REPORT_FILES = ("per_class.csv", "confusion_matrix.png", "misclassified.png")


def report(model, test_loader, device, cfg, out, weights):
    """Test loss and accuracy (and flip TTA's, returned), then the report files of `weights` (named in their titles)."""
    logits, labels = predict(model, test_loader, device, desc="test pass")
    loss, acc = loss_and_accuracy(logits, labels)
    tta_acc = evaluate(model, test_loader, device, tta=True)[1] if cfg.tta else None
    print(f"test loss {loss:.4f}, accuracy {acc:.2f} %" + (f"; with flip TTA {tta_acc:.2f} %" if cfg.tta else ""))
    counts = np.bincount(10 * labels + logits.argmax(1), minlength=100).reshape(10, 10)  # [true class, predicted]
    write_per_class(counts, out / "per_class.csv")
    plot_confusion_matrix(counts, out / "confusion_matrix.png", weights)
    plot_misclassified(logits, labels, test_loader.dataset.images, cfg.misclassified, out / "misclassified.png",
                       weights)
    print(f"wrote {', '.join(REPORT_FILES)} to {out}")
    return tta_acc


def plot_curves(history, cfg, path):
    """Loss, accuracy and learning rate per epoch (metrics.csv's columns), titled with the run's settings."""
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(13, 4), layout="constrained")
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    for ax, key, title in ((loss_ax, "loss", "loss"), (acc_ax, "acc", "accuracy (%)")):
        for split in ("train", "test"):
            label = "train (blended images)" if split == "train" and cfg.mixup else split  # why it sits below test
            ax.plot(epochs, [row[f"{split}_{key}"] for row in history], marker=".", label=label)
        ax.set(title=title)
        ax.legend()
    lr_ax.plot(epochs, [row["lr"] for row in history], marker=".", color="tab:green")
    lr_ax.set(title="learning rate (at each epoch's start)")
    for ax in fig.axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers, never 0.5
        ax.grid(alpha=0.3)
    best = max(history, key=lambda row: row["test_acc"])
    mixup = f"mixup {cfg.mixup:g}, " if cfg.mixup else ""
    fig.suptitle(f"{cfg.epochs} epochs, batch {cfg.batch_size}, max lr {cfg.max_lr:g}, weight decay "
                 f"{cfg.weight_decay:g}, EMA {cfg.ema_decay:g}, {mixup}seed {cfg.seed}: best test accuracy "
                 f"{best['test_acc']:.2f} % at epoch {best['epoch']}")
    save(fig, path)
    return fig


def plot_misclassified(logits, labels, images, limit, path, weights, columns=5):
    """The first `limit` test images (the stored height x width x 3 pixels) that the model gets wrong."""
    probabilities, predictions = logits.softmax(1).max(1)
    wrong = (predictions != labels).nonzero().flatten()[:limit].tolist()
    rows = max(1, math.ceil(len(wrong) / columns))
    fig = Figure(figsize=(2.3 * columns, 2.5 * rows + 0.4))
    for ax, i in zip(fig.subplots(rows, columns, squeeze=False).flat, wrong):
        ax.imshow(images[i], interpolation="nearest")
        ax.set_title(f"{CLASSES[labels[i]]} → {CLASSES[predictions[i]]} ({probabilities[i].item():.0%})", fontsize=8)
    for ax in fig.axes:
        ax.axis("off")
    fig.suptitle(f"test images that {weights} gets wrong: true → predicted (the prediction's probability)")
    save(fig, path)


def plot_confusion_matrix(counts, path, weights):
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # shading by row: the share of each true class
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.subplots()
    fig.colorbar(ax.imshow(shares, cmap="Blues", vmin=0, vmax=1), ax=ax, label="share of the true class")
    ax.set(xticks=range(len(CLASSES)), yticks=range(len(CLASSES)), xlabel="predicted", ylabel="true",
           title=f"confusion matrix of {weights} (test set)", yticklabels=CLASSES)
    ax.set_xticklabels(CLASSES, rotation=45, ha="right")
    for (i, j), count in np.ndenumerate(counts):
        ax.text(j, i, count, ha="center", va="center", fontsize=7, color="white" if shares[i, j] > 0.5 else "black")
    save(fig, path)


def write_per_class(counts, path):
    """per_class.csv and the console's table: each class's accuracy and the class it is most often taken for."""
    rows = ["class,images,correct,accuracy,most_confused_with,times"]
    print(f"{'class':<11}{'images':>7}{'accuracy':>10}   most often taken for")
    for i, name in enumerate(CLASSES):
        wrong = np.where(np.arange(len(CLASSES)) == i, 0, counts[i])
        accuracy, j = 100.0 * counts[i, i] / max(counts[i].sum(), 1), int(wrong.argmax())
        other, times = (CLASSES[j], wrong[j]) if wrong[j] else ("", 0)  # a class never mistaken is taken for none
        rows.append(f"{name},{counts[i].sum()},{counts[i, i]},{accuracy:.2f},{other},{times}")
        print(f"{name:<11}{counts[i].sum():>7}{accuracy:>9.2f}%   {f'{other} ({times})' if times else '-'}")
    save(rows, path)
    off_diagonal = counts * (1 - np.eye(len(CLASSES), dtype=counts.dtype))
    cells = [np.unravel_index(c, counts.shape) for c in np.argsort(off_diagonal, axis=None, kind="stable")[::-1][:5]]
    pairs = ", ".join(f"{CLASSES[i]} -> {CLASSES[j]} ({off_diagonal[i, j]})" for i, j in cells if off_diagonal[i, j])
    print(f"most confused (true -> predicted): {pairs or 'none'}")


def evaluate_checkpoint(cfg, typed):
    """--eval: the report of some weights, beside them unless --out-dir is typed; others' reports stay."""
    weights = Path(cfg.eval)
    model = load_weights(Net(), weights, "--eval checkpoint")
    out = prepare_out_dir(cfg.out_dir if "out_dir" in typed else weights.parent)
    found = [name for name in REPORT_FILES if (out / name).exists()]
    own = (out / "best_model.pth").exists() and (out / "best_model.pth").samefile(weights)  # its reports: the same
    if found and not own and not cfg.overwrite:
        raise UserError(f"{out} already holds {', '.join(found)} of other weights: give another --out-dir to keep "
                        f"them, or add --overwrite to replace them")
    print(f"evaluating {weights}")
    device, data = device_and_data(cfg)
    _, test_loader = make_loaders(data, cfg, device)
    report(model.to(device, memory_format=torch.channels_last), test_loader, device, cfg, out, weights.name)


# ================================================================================= using a trained model
def load_model(path="best_model.pth", device="cpu", what="weights file"):
    """A trained Net from best_model.pth (or a last_checkpoint.pth) on `device`, in eval mode: in training mode
    BatchNorm normalizes a batch by its own statistics, and one image comes out as noise."""
    return load_weights(Net(), path, what).to(device, memory_format=torch.channels_last).eval()


def read_image(path):
    """An image file (PNG, JPEG, BMP, WebP, ...) -> uint8 height x width x 3 RGB array; UserError if it is not one."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}); give the path of an image file") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise UserError(f"{path} is not an image file that OpenCV can read (PNG, JPEG, BMP, WebP, TIFF)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)  # OpenCV decodes to blue, green, red


def to_cifar_size(image):
    """uint8 height x width x 3 -> 32 x 32 x 3, shrunk by area averaging, which leaves no aliasing, as CIFAR's were."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 height x width x 3 RGB image, got {image.dtype} of shape {image.shape}")
    shrinking = image.shape[0] > 32 or image.shape[1] > 32
    return cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


@torch.no_grad()
def classify(model, images, top=3, batch_size=256):
    """uint8 height x width x 3 RGB images of any size, a list or one -> for each, its `top` most likely classes as
    (name, probability) pairs. `model` should be in eval mode (load_model's is)."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        return classify(model, [images], top, batch_size)[0]
    device, results = next(model.parameters()).device, []
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(np.stack([to_cifar_size(image) for image in images[start:start + batch_size]]))
        with autocast(device):
            probabilities = model(normalize(pixels.permute(0, 3, 1, 2), device)).float().softmax(1).cpu()
        values, indices = probabilities.topk(top, dim=1)
        results += [[(CLASSES[i], p) for p, i in zip(v.tolist(), ix.tolist())] for v, ix in zip(values, indices)]
    return results


def predict_files(cfg):
    """--predict: each image's three likeliest classes; a file that cannot be read is one line on stderr."""
    weights = cfg.weights or Path(cfg.out_dir) / "best_model.pth"
    if not cfg.weights and not weights.is_file():
        raise UserError(f"no --weights given, and the default, best_model.pth in --out-dir {cfg.out_dir}, does not "
                        f"exist; give --weights PATH, or the --out-dir of a finished run")
    model, failed = load_model(weights, select_device(cfg.device), "--weights"), 0
    for given in map(Path, cfg.predict):
        kinds = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
        paths = sorted(p for p in given.iterdir() if p.suffix.lower() in kinds) if given.is_dir() else [given]
        if not paths:
            print(f"error: {given} is a folder with no image files ({', '.join(kinds)}) in it", file=sys.stderr)
            failed += 1
        for path in paths:
            try:
                top = classify(model, read_image(path))
                print(f"{path}: " + ", ".join(f"{name} {100 * probability:.1f} %" for name, probability in top))
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                failed += 1
    if failed:
        sys.exit(1)  # each failure has had its line


# ============================================================================================= benchmark
def images_per_second(step, images_per_step, seconds=3.0):
    """Run step() (which waits for its results) until `seconds` have passed, after one warm-up call."""
    step()
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps * images_per_step / (time.perf_counter() - start)


def benchmark(cfg):
    """--benchmark: the speed of the training step, test pass, augmentation and DataLoader, in images/s and minutes."""
    device = select_device(cfg.device)
    model = Net(cfg.dropout).to(device, memory_format=torch.channels_last)
    describe_model(model)
    step_model = compiled(model, cfg, device) if cfg.compile else model
    batches = [(torch.randint(0, 256, (cfg.batch_size, 3, 32, 32), dtype=torch.uint8),
                torch.randint(0, 10, (cfg.batch_size,)))] * 10
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    train_speed = images_per_second(lambda: train_one_epoch(step_model, batches, optimizer, scheduler, criterion,
                                                            scaler, average, 0.0, None), 10 * cfg.batch_size)
    eval_speed = images_per_second(lambda: predict(step_model, batches, device), 10 * cfg.batch_size)
    # As many stand-in images as CIFAR-10's: the workers are measured busy, not waiting at the end of a short pass.
    fake_images = np.random.default_rng(cfg.seed).integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8)
    loader, _ = make_loaders((fake_images, np.zeros(50_000, np.int64)) * 2, cfg, device)
    indices = itertools.count()
    augment_speed = images_per_second(lambda: loader.dataset[next(indices)], 1)
    endless = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch
    loader_speed = images_per_second(lambda: next(endless), cfg.batch_size)
    print(f"device {device} ({PRECISION[amp_dtype(device)]}), batch size {cfg.batch_size}, {torch.get_num_threads()} "
          f"CPU threads for the model; an epoch is 50,000 training and 10,000 test images")
    for what, speed, images in (("training step (random batches)", train_speed, 50_000),
                                ("test pass", eval_speed, 10_000), ("augmentation, one process", augment_speed, 50_000),
                                (f"DataLoader, {loader.num_workers} worker process(es)", loader_speed, 50_000)):
        print(f"{what + ':':<40}{speed:9,.0f} images/s: {duration(images / speed)} an epoch, "
              f"{duration(images / speed * cfg.epochs)} for {cfg.epochs} epochs")
    print("an epoch takes about as long as the slower of the training step and the DataLoader, plus the test pass")


# ========================================================================================== command line
def number(kind, accept, what):
    """An argparse type: text -> kind, refused unless accept(value), with "must be {what}" in the message."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number value: {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
        return value
    return convert


positive_int = number(int, lambda v: v > 0, "a whole number above 0")
whole = number(int, lambda v: v >= 0, "a whole number, 0 or more")
positive = number(float, lambda v: math.isfinite(v) and v > 0, "a number above 0")
non_negative = number(float, lambda v: math.isfinite(v) and v >= 0, "a number, 0 or more")
probability = number(float, lambda v: 0 <= v <= 1, "from 0 to 1")
fraction = number(float, lambda v: 0 <= v < 1, "at least 0 and below 1")
worker_count = number(lambda text: text if text == "auto" else int(text), lambda v: v == "auto" or v >= 0,
                      "auto or a whole number, 0 or more")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's documented hook: one line instead of the usage text and the error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


ACTIONS = ("resume", "eval", "benchmark", "predict", "weights")  # what to do, as opposed to the run's settings


def settings_of(cfg):
    return [name for name in vars(cfg) if name not in ACTIONS]


def get_args_parser():
    parser = OneLineParser(prog="model_train.py", allow_abbrev=False,  # --epoch is a typo, not --epochs
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           description="Train a compact CNN on CIFAR-10 (see README.md). A setting's default is the "
                                       "constant of its name at the top of model_train.py, where a comment says more.")
    s = parser.add_argument_group("settings")
    s.add_argument("--epochs", type=positive_int, default=EPOCHS, help="length of the schedule")
    s.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, help="images per step")
    s.add_argument("--lr", type=positive, default=LR, help="learning rate at the first step")
    s.add_argument("--max-lr", type=positive, default=MAX_LR, help="peak learning rate")
    s.add_argument("--weight-decay", type=non_negative, default=WEIGHT_DECAY, help="decoupled weight decay (AdamW)")
    s.add_argument("--pct-start", type=fraction, default=PCT_START, help="share of the steps spent warming up")
    s.add_argument("--dropout", type=fraction, default=DROPOUT, help="dropout before the linear head")
    s.add_argument("--label-smoothing", type=fraction, default=LABEL_SMOOTHING,
                   help="share of the target spread over all classes: 0.1 makes the true class's target 0.91")
    s.add_argument("--ema-decay", type=fraction, default=EMA_DECAY, help="weight average's decay; 0 turns it off")
    s.add_argument("--affine-p", type=probability, default=AFFINE_P, help="share of images shifted, scaled, rotated")
    s.add_argument("--cutout-p", type=probability, default=CUTOUT_P, help="share of images with a 16 x 16 hole")
    s.add_argument("--mixup", type=non_negative, default=MIXUP, help="mixup strength from mid-run on; 0 is off")
    s.add_argument("--tta", action=argparse.BooleanOptionalAction, default=TTA, help="also report flip TTA accuracy")
    s.add_argument("--target-acc", type=float, default=TARGET_ACC, help="test accuracy (%%) to announce")
    s.add_argument("--misclassified", type=whole, default=MISCLASSIFIED, help="mistakes misclassified.png shows")
    s.add_argument("--seed", type=whole, default=SEED, help="same seed, same run on a CPU")
    s.add_argument("--data-dir", default=DATA_DIR, help="holds cifar-10-batches-py/ (downloaded there if missing)")
    s.add_argument("--out-dir", default=OUT_DIR, help="where the run's files go")
    s.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=OVERWRITE,
                   help="let a new run, or --eval, replace earlier files in --out-dir")
    s.add_argument("--init-from", metavar="CHECKPOINT", default=INIT_FROM, help="start a new run from these weights "
                   "(best_model.pth or last_checkpoint.pth) with the settings given (--resume keeps the run's own)")
    s.add_argument("--workers", type=worker_count, default=WORKERS, help="DataLoader worker processes, or auto")
    s.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default=DEVICE, help="auto: CUDA, MPS or CPU")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=COMPILE, help="torch.compile the model")
    action = parser.add_argument_group("instead of a new run (one of)").add_mutually_exclusive_group()
    action.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in this last_checkpoint.pth")
    action.add_argument("--eval", metavar="CHECKPOINT", help="test these weights on the CIFAR-10 test set, which it "
                        "needs (--data-dir), and write per_class.csv, confusion_matrix.png and misclassified.png "
                        "beside them (or into --out-dir)")
    action.add_argument("--benchmark", action="store_true", help="print images/s and minutes; needs no data")
    action.add_argument("--predict", nargs="+", metavar="IMAGE", help="print the three most likely classes of each "
                        "image file (PNG, JPEG, ...; any size), or of each image in a folder")
    parser.add_argument("--weights", metavar="CHECKPOINT", help="for --predict; default: best_model.pth in --out-dir")
    return parser


def main(argv=None):
    parser = get_args_parser()
    cfg = parser.parse_args(argv)
    if cfg.lr > cfg.max_lr:
        parser.error(f"--lr {cfg.lr} is above --max-lr {cfg.max_lr}; OneCycle warms up from --lr to --max-lr")
    if cfg.weights and not cfg.predict:
        parser.error("--weights is for --predict; --eval, --resume and --init-from take the checkpoint as their value")
    if cfg.init_from and (cfg.resume or cfg.eval or cfg.predict or cfg.benchmark):
        parser.error("--init-from starts a new run; it does not go with --resume, --eval, --predict or --benchmark")
    if hasattr(sys.stdout, "reconfigure"):  # each line as it is printed, also into a pipe or a file (nohup, tee)
        sys.stdout.reconfigure(line_buffering=True)
    # The flags typed, even at their default value: --out-dir . is a choice, not an omission. (--no-tta is tta.)
    typed = {arg.split("=")[0][2:].removeprefix("no-").replace("-", "_") for arg in
             (sys.argv[1:] if argv is None else argv) if arg.startswith("--")}
    try:
        if cfg.benchmark:
            benchmark(cfg)
        elif cfg.eval:
            evaluate_checkpoint(cfg, typed)
        elif cfg.predict:
            predict_files(cfg)
        else:
            start_training(cfg, typed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C; train() says what was saved
        print("\ninterrupted" + (f": {e}" if e.args else ""), file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
