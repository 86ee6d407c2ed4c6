"""Train a compact CNN (< 200,000 parameters) on CIFAR-10 with Albumentations, Adam and OneCycleLR.

    python model_train.py                          # 75 epochs with the constants below
    python model_train.py --epochs 10 --lr 2e-3    # any constant, overridden from the command line
    python model_train.py --resume last_checkpoint.pth
    python model_train.py --eval best_model.pth
    python model_train.py --benchmark              # MACs, parameters and images/s; needs no data
    python model_train.py --predict cat.jpg        # the three most likely classes of an image, from best_model.pth

The file reads top to bottom: settings, data, model, training and evaluation, reports, using a trained model,
benchmark, main().
Importing it only defines things, so tests and DataLoader workers can import it freely.
"""
import argparse
import codecs
import copy
import csv
import functools
import io
import itertools
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

# Albumentations otherwise asks PyPI for a newer version on every import: a network call (and up to a 2 s
# wait offline) in the main process and in every DataLoader worker.
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
# Every UPPER_CASE name in this block becomes a flag, with its comment as the help text.
EPOCHS = 75             # length of the one-cycle schedule; 15 makes a quick run on a CPU
BATCH_SIZE = 128        # images per optimizer step; on a GPU, 512 with a max lr of 8e-3 keeps it busy: ~3.7x faster
LR = 1e-3               # learning rate at the first step; OneCycle warms up from here to MAX_LR
MAX_LR = 4e-3           # peak learning rate, reached after PCT_START of the steps, then cosine-annealed to ~0
WEIGHT_DECAY = 5e-2     # decoupled weight decay (AdamW): each step shrinks every weight by lr x this
PCT_START = 0.2         # fraction of all steps spent warming up: a short warm-up keeps early Adam steps stable
DROPOUT = 0.1           # dropout on the pooled features before the linear head
LABEL_SMOOTHING = 0.1   # target 0.9 for the true class: keeps logits from growing without bound
EMA_DECAY = 0.999       # evaluate and save a moving average of the weights (per-step decay); 0 turns it off
AFFINE_P = 0.5          # share of training images shifted/scaled/rotated (up to 10 %, 10 %, 10 degrees)
CUTOUT_P = 0.0          # share of training images with a 16 x 16 hole of the mean colour (off: it cost accuracy)
MIXUP = 0.0             # mixup strength from mid-run on (blends pairs of training images and labels); 0 is off
TTA = True              # also report accuracy with flip test-time augmentation (mean of image and mirror)
TARGET_ACC = 85.0       # announce the first epoch whose test accuracy (%) reaches this
MISCLASSIFIED = 20      # how many misclassified test images misclassified.png shows
SEED = 42               # same seed, same data order, augmentations, weights and metrics (on the CPU)
DATA_DIR = "./data"     # holds cifar-10-batches-py/ (downloaded there if missing)
OUT_DIR = "."           # where best_model.pth, last_checkpoint.pth, metrics.csv and the plots go
OVERWRITE = False       # let a new run replace the best_model.pth and last_checkpoint.pth of an earlier run in OUT_DIR
WORKERS = "auto"        # DataLoader worker processes: a number, or auto (all cores but one with a GPU, 1 on a CPU)
DEVICE = "auto"         # auto (CUDA, else Apple MPS, else CPU), cuda, mps or cpu
COMPILE = False         # torch.compile the model: faster steps on a GPU after a minute of compiling
SETTINGS = [name for name, value in dict(globals()).items()  # the names above, in order
            if name.isupper() and isinstance(value, (bool, int, float, str))]

MAX_PARAMETERS = 200_000      # the product's promise: the model stays under this many parameters
MIN_RECEPTIVE_FIELD = 49      # ... and its last convolution sees at least this many pixels across
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # published per-channel statistics of the training set
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
METRICS = dict(epoch="d", lr=".3e", train_loss=".4f", train_acc=".2f", test_loss=".4f", test_acc=".2f", seconds=".1f")
CHECKPOINT_FORMAT = "model_train/2"  # marks the files save_checkpoint() writes; /2 since Net uses SiLU
EARLIER_FORMATS = {  # ... and what --resume says of each earlier one
    "model_train/1": "whose Net used ReLU; finish that run with it (git checkout 14e11af)"}


class UserError(Exception):
    """A problem the user can fix (bad data, flag, checkpoint or folder): main() prints it on one line."""


# ================================================================================================== data
BATCH_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)


class _ArrayUnpickler(pickle.Unpickler):
    """Reads CIFAR-10 batch files, which hold only numpy arrays and lists, and refuses anything else:
    a pickle from elsewhere could otherwise run arbitrary code while it loads."""

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
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the folder holds an incomplete CIFAR-10 copy; delete "
                        f"{path.parent} and run again to download it, or copy the complete folder there") from None
    except Exception as e:  # truncated, corrupt, or not a CIFAR batch at all
        raise UserError(f"{path} is truncated or not a CIFAR-10 batch file ({type(e).__name__}: {e}); "
                        f"replace {path.parent} with a complete copy") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels) \
            or len(data) == 0:
        raise UserError(f"{path} holds data of shape {data.shape} ({data.dtype}) and {len(labels)} labels, "
                        f"not N x 3072 uint8 images with N labels; replace {path.parent} with a complete copy")
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise UserError(f"{path} has labels outside 0..9; replace {path.parent} with a complete copy")
    # Stored channel-planar (all R, then G, then B); Albumentations and OpenCV want height x width x channel.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def find_batch_folder(data_dir):
    """DATA_DIR/cifar-10-batches-py, or DATA_DIR itself when it is that folder: --data-dir data/cifar-10-batches-py
    is a common slip, and taking it literally would download a second copy inside the first."""
    data_dir = Path(data_dir)
    if data_dir.name == BATCH_FOLDER or (data_dir / TRAIN_FILES[0]).is_file():
        return data_dir
    return data_dir / BATCH_FOLDER


def download_cifar10(data_dir):
    """Fetch and unpack cifar-10-batches-py into data_dir with torchvision (imported only when needed). A folder
    this made is removed again if the download fails, so a mistyped --data-dir leaves nothing behind."""
    from torchvision.datasets import CIFAR10
    made = [folder for folder in (data_dir, *data_dir.parents) if not folder.exists()]
    print(f"downloading CIFAR-10 (163 MB) into {data_dir} ...")
    try:
        CIFAR10(root=str(data_dir), train=True, download=True)
    except Exception as e:  # no network, a proxy, a full disk, a failed checksum ...
        if made:
            shutil.rmtree(made[-1], ignore_errors=True)
        raise UserError(f"could not download CIFAR-10 into {data_dir} ({type(e).__name__}: {e}); without network, "
                        f"copy an unpacked cifar-10-batches-py folder into {data_dir} (README: Troubleshooting)") \
            from None


def load_cifar10(data_dir):
    """Return (train_images, train_labels, test_images, test_labels) from find_batch_folder(data_dir).

    The batch files are read directly, without torchvision's md5 check, so a copy made elsewhere works."""
    folder = find_batch_folder(data_dir)
    if not folder.is_dir():
        download_cifar10(folder.parent)
    parts = {}
    for split, files in (("train", TRAIN_FILES), ("test", TEST_FILES)):
        batches = [read_batch_file(folder / name) for name in files]
        parts[split] = (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    return (*parts["train"], *parts["test"])


def train_transform(affine_p=AFFINE_P, cutout_p=CUTOUT_P):
    """The training augmentation, on uint8 pixels. strict=True turns a misspelled or renamed argument, which
    Albumentations would otherwise drop with a mere warning, into an error.

    No Normalize here: normalize() normalizes whole batches on the device. A worker then ships a quarter of
    the bytes (uint8, not float32) and does about a fifth less work per image: the same cores feed a GPU faster."""
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
    """uint8 height x width x channel images and labels -> (uint8 3 x 32 x 32 tensor, label).

    Index i < len(self) is image i. EpochSampler hands out `epoch * len(self) + i` instead, and that number
    seeds the sample's augmentation: what an image looks like depends on (seed, epoch, image) alone, not on
    the number of workers, their history, or the epoch a run was resumed at."""

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
    """Shuffles anew each epoch from (seed, epoch) alone and tags each index with its epoch (see above)."""

    def __init__(self, num_images, seed):
        self.num_images, self.seed, self.epoch = num_images, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_images

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_images)
        return iter((order + self.epoch * self.num_images).tolist())


def init_worker(_worker_id):
    cv2.setNumThreads(0)  # each worker is one process on one core; OpenCV's own threads would oversubscribe


def resolve_workers(workers, device):
    if workers != "auto":
        return workers
    cores = os.cpu_count() or 1
    # A GPU eats tens of thousands of images a second and each worker augments a few thousand: give it all
    # cores but one. On a CPU the workers share the cores with training, and one keeps up (--benchmark).
    return min(16, cores - 1) if device.type != "cpu" else min(1, cores - 1)


def make_loaders(data, cfg, device):
    """Shuffled training loader (per-epoch order from EpochSampler) and an unshuffled test loader."""
    cv2.setNumThreads(0)  # also when augmenting in this process (--workers 0): the model's threads need the cores
    train_images, train_labels, test_images, test_labels = data
    workers = resolve_workers(cfg.workers, device)
    common = dict(num_workers=workers, persistent_workers=workers > 0, worker_init_fn=init_worker,
                  pin_memory=device.type == "cuda",
                  # A private generator: the loader's worker seeds must not draw from the global RNG that
                  # dropout uses, or a resumed run would drift from an uninterrupted one.
                  generator=torch.Generator().manual_seed(cfg.seed))
    train_set = CIFAR10Albumentations(train_images, train_labels, train_transform(cfg.affine_p, cfg.cutout_p),
                                      seed=cfg.seed)
    test_set = CIFAR10Albumentations(test_images, test_labels, test_transform())
    train_loader = DataLoader(train_set, cfg.batch_size, sampler=EpochSampler(len(train_set), cfg.seed), **common)
    test_loader = DataLoader(test_set, 2 * cfg.batch_size, shuffle=False, **common)
    return train_loader, test_loader


# ================================================================================================= model
class DilatedConv2d(nn.Conv2d):
    """A stride-1 dilated conv that, on a CPU, runs as the same undilated conv on the d x d interleaved sub-grids
    of its input ("space to batch", as in TensorFlow's atrous_conv2d): same weights, same outputs.

    oneDNN, PyTorch's CPU conv library, has no fast kernel for the backward pass of a dilated depthwise conv: it
    took 14-35x as long as the undilated one, a fifth of each training step, and regrouping the pixels costs far
    less: the whole training step ran up to 1.6x faster. GPUs take the plain path."""

    def __init__(self, in_channels, out_channels, kernel_size, dilation, groups=1):
        super().__init__(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2),
                         dilation=dilation, groups=groups, bias=False)

    def forward(self, x):
        d = self.dilation[0]
        n, c, h, w = x.shape
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


def conv2d(in_channels, out_channels, kernel_size=3, stride=1, dilation=1, groups=1):
    """A k x k conv padded to keep the map size (divided by the stride). No bias: the BatchNorm after it shifts."""
    if dilation > 1:
        assert stride == 1, "DilatedConv2d regroups pixels for stride 1 only"
        return DilatedConv2d(in_channels, out_channels, kernel_size, dilation, groups)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups,
                     bias=False)


class ConvBNAct(nn.Sequential):
    """k x k convolution -> BatchNorm -> SiLU.

    SiLU (x * sigmoid(x), "swish"), the activation of EfficientNet and MobileNetV3, instead of ReLU: it passes a
    little of each negative input and bends smoothly, so a narrow net keeps more of what its few channels carry.
    +0.7 points at 20 epochs over ReLU (three seeds), for 11 % more CPU time per step.

    Not in place: SiLU's backward needs its input, so an in-place SiLU, which overwrites it, makes autograd save a
    copy of it first; out of place the input itself is kept: the same weights to the bit, 5 % faster."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, dilation=1, groups=1):
        super().__init__(
            conv2d(in_channels, out_channels, kernel_size, stride, dilation, groups),
            nn.BatchNorm2d(out_channels), nn.SiLU())


class DepthwiseSeparable(nn.Sequential):
    """3 x 3 depthwise conv (one filter per channel: looks around) -> 1 x 1 pointwise conv (mixes channels)
    -> BatchNorm -> SiLU. About 8x fewer parameters and multiply-adds than a full 3 x 3 conv of equal width."""

    def __init__(self, in_channels, out_channels, stride=1, dilation=1):
        super().__init__(
            conv2d(in_channels, in_channels, 3, stride, dilation, groups=in_channels),
            conv2d(in_channels, out_channels, 1),
            nn.BatchNorm2d(out_channels), nn.SiLU())  # not in place: see ConvBNAct


class InvertedBottleneck(nn.Sequential):
    """MobileNetV2's unit: 1 x 1 conv widens the channels `expansion` times -> 3 x 3 depthwise conv looks around
    at that width -> 1 x 1 conv projects back -> BatchNorm, no activation (on the narrow output it would squash
    what the residual sum carries: SiLU all but zeroes negative values). The depthwise conv works on many channels
    for few weights."""

    def __init__(self, channels, expansion=2, dilation=1):
        wide = channels * expansion
        super().__init__(
            ConvBNAct(channels, wide, kernel_size=1),
            ConvBNAct(wide, wide, dilation=dilation, groups=wide),
            conv2d(wide, channels, 1), nn.BatchNorm2d(channels))


class Residual(nn.Module):
    """x + f(x): the gradient also flows around f, so a 19-layer stack trains as readily as a shallow one."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return x + self.fn(x)


class Net(nn.Module):
    """C1 -> C5 -> global average pooling -> Linear: 195k parameters, 24 M multiply-adds, receptive field 79.

    Multiply-adds are expensive at 32 x 32 and parameters are cheap there, so the net goes down to 16 x 16
    after two convs and to 8 x 8 at C4, each time with a stride-2 conv: unlike MaxPool it learns what to keep.
    Dilated convs (C3, C5) widen the view without more parameters or another downsampling, so the last
    conv sees 79 pixels across, the whole image with margin. Widths grow where positions are few:
    16 channels at 32 x 32, 48 (96 inside the bottlenecks) at 16 x 16, 176 at 8 x 8."""

    def __init__(self, dropout=DROPOUT, num_classes=len(CLASSES)):
        super().__init__()
        self.features = nn.Sequential(OrderedDict(
            # C1, 32 x 32: plain 3 x 3 convs pick up edges and colours.
            # Only 16 wide: full-resolution maps are the costliest to compute and store, and edge and colour
            # filters need few channels.
            C1=nn.Sequential(ConvBNAct(3, 16), Residual(ConvBNAct(16, 16))),
            # C2, 16 x 16: a stride-2 conv replaces MaxPool, then two inverted bottlenecks: 48 channels between
            # units, 96 inside, where the depthwise 3 x 3 conv looks around. They learned the most per epoch
            # of every 16 x 16 stage we measured.
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
        # Dropout on the pooled features, before the classifier, as in MobileNet and EfficientNet. Dropout on
        # every feature map instead cost 15 % of the CPU step time (drawing a random mask per value).
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(176, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


class Layer(NamedTuple):
    name: str
    kind: str            # e.g. "conv 3x3 s2", "depthwise 3x3 d2", "pointwise 1x1", "linear"
    output_shape: tuple  # channels, height, width (or features for the head)
    receptive_field: int  # pixels across that one output position of this layer sees
    parameters: int      # of this layer alone (BatchNorm's are counted in the model total)
    macs: int            # multiply-adds per image


def layer_kind(module):
    if isinstance(module, nn.Linear):
        return "linear"
    size = "x".join(map(str, module.kernel_size))
    kind = "depthwise" if module.groups == module.in_channels > 1 else "pointwise" if size == "1x1" else "conv"
    return " ".join([kind, size] + [f"s{module.stride[0]}"] * (module.stride[0] > 1)
                    + [f"d{module.dilation[0]}"] * (module.dilation[0] > 1))


def layer_table(model, image_size=32):
    """One Layer per convolution and linear layer, in the order a forward pass runs them.

    The receptive field grows by (kernel - 1) * dilation * jump at each conv, where jump is the product of
    all strides so far. Residual shortcuts skip convs, so the longest path, through every conv, sets it."""
    rows, receptive_field, jump = [], 1, 1

    def record(name):
        def hook(module, _inputs, output):
            nonlocal receptive_field, jump
            if isinstance(module, nn.Conv2d):
                receptive_field += (module.kernel_size[0] - 1) * module.dilation[0] * jump
                jump *= module.stride[0]
                macs = output[0].numel() * module.weight[0].numel()
            else:
                macs = module.weight.numel()
            params = sum(p.numel() for p in module.parameters())
            rows.append(Layer(name, layer_kind(module), tuple(output.shape[1:]), receptive_field, params, macs))
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return rows


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def receptive_field(model):
    return [row for row in layer_table(model) if row.name.startswith("features")][-1].receptive_field


def count_macs(model):
    return sum(row.macs for row in layer_table(model))


def describe_model(model):
    """The per-layer table and the promised properties, printed at start; refuses a model that breaks them."""
    rows = layer_table(model)
    print(f"{'layer':<14}{'kind':<18}{'output':>10}{'RF':>5}{'params':>9}{'MACs':>12}")
    for r in rows:
        shape = "x".join(map(str, r.output_shape))
        print(f"{r.name.removeprefix('features.'):<14}{r.kind:<18}{shape:>10}{r.receptive_field:>5}{r.parameters:>9,}"
              f"{r.macs:>12,}")
    params, rf = count_parameters(model), [r for r in rows if r.name.startswith("features")][-1].receptive_field
    print(f"{params:,} parameters (limit {MAX_PARAMETERS:,}), {sum(r.macs for r in rows) / 1e6:.1f} M multiply-adds "
          f"per image, receptive field {rf} px (at least {MIN_RECEPTIVE_FIELD})")
    if params >= MAX_PARAMETERS:
        raise UserError(f"the model has {params:,} parameters, over the {MAX_PARAMETERS:,} limit; narrow Net")
    if rf < MIN_RECEPTIVE_FIELD:
        raise UserError(f"the model's receptive field is {rf} px, under {MIN_RECEPTIVE_FIELD}; add dilation or stride")


# ================================================================================ training and evaluation
@functools.cache
def pixel_statistics(device):
    """CIFAR10_MEAN and CIFAR10_STD in pixel units (0-255), shaped to broadcast over a batch; made once per
    device, as a per-step copy to a GPU would make the CPU wait for it."""
    return tuple(255 * torch.tensor(stats, device=device).view(1, 3, 1, 1) for stats in (CIFAR10_MEAN, CIFAR10_STD))


def normalize(images, device):
    """A batch of uint8 pixels (N x 3 x H x W) -> normalized float32 images on the device.

    channels_last is the layout cuDNN's and oneDNN's fastest conv kernels use; non_blocking lets the copy
    from pinned memory overlap the previous step's work. Normalizing a whole batch here is two small kernels on
    a GPU (see train_transform for why the workers do not)."""
    mean, std = pixel_statistics(device)
    images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
    return (images.float() - mean) / std


def to_device(images, labels, device):
    """A training batch -> (normalized images, labels), both on the device."""
    return normalize(images, device), labels.to(device, non_blocking=True)


@functools.cache
def native_bf16(device):
    """Whether the device computes bfloat16 in hardware: NVIDIA GPUs since Ampere (compute capability 8). Before
    (a T4, Colab's free GPU) bfloat16 is emulated, slower than float32, and cuDNN has no bfloat16 convolutions."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def autocast_dtype(device):
    """The reduced precision the device's tensor cores compute convs in, about twice as fast as float32: bfloat16
    where native_bf16, float16 on older NVIDIA GPUs (with loss scaling, see make_grad_scaler). None (float32) on a
    CPU or Apple MPS, where reduced precision gained little here."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if native_bf16(device) else torch.float16


def autocast(device):
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def make_grad_scaler(device):
    """float16 keeps 5 exponent bits, so small gradients round to zero: the scaler multiplies the loss before the
    backward pass, divides the gradients before the step, and skips a step whose gradients overflowed. bfloat16
    has float32's range and needs none; elsewhere the scaler is a pass-through."""
    return torch.amp.GradScaler(device.type, enabled=autocast_dtype(device) == torch.float16)


def precision(device):
    return {torch.bfloat16: "bfloat16 autocast", torch.float16: "float16 autocast with loss scaling",
            None: "float32"}[autocast_dtype(device)]


def progress(batches, desc, plain_lines=True):
    """tqdm's bar on a terminal. Elsewhere (nohup, | tee, a notebook's !python, SLURM) a bar's redraws pile up
    in the log, so with plain_lines a line every tenth of the pass instead, and otherwise nothing."""
    if sys.stderr.isatty():
        yield from tqdm(batches, desc=desc, leave=False, dynamic_ncols=True)
        return
    total, start, shown = len(batches), time.perf_counter(), 0
    for done, batch in enumerate(batches, 1):
        yield batch
        tenths = 10 * done // total
        if plain_lines and tenths > shown and done < total:
            shown = tenths
            print(f"{desc}: {done}/{total} batches ({10 * tenths} %), {time.perf_counter() - start:.0f} s")


def mixup_alpha(cfg, epoch):
    """The mixup strength of an epoch: 0 at the first, rising linearly to MIXUP halfway through training, then held.
    Early on the net has yet to learn the plain images; late in a long run it fits them too well (at 75 epochs
    99 % of the training images against 92.5 % of the test images): the blend is the regularizer for that."""
    return cfg.mixup * min(1.0, (epoch - 1) / max(1, cfg.epochs // 2))


def mix_batch(images, labels, alpha, rng):
    """Mixup (Zhang et al., 2018): blend the batch with a shuffled copy of itself, with one weight lam ~ Beta(alpha,
    alpha) for the batch. Returns (blended images, the partners' labels, lam); the loss is blended with the same lam."""
    lam = float(rng.beta(alpha, alpha))
    order = torch.from_numpy(rng.permutation(len(labels))).to(images.device)
    return lam * images + (1 - lam) * images[order], labels[order], lam


def train_one_epoch(model, loader, optimizer, scheduler, criterion, device, scaler, average=None, desc="train",
                    mixup=0.0, rng=None):
    """One pass over the training set; OneCycleLR (and the weight average, if any) steps after every batch.
    With mixup > 0, each batch is blended by mix_batch(), drawing from the numpy Generator rng.
    Returns (mean loss, accuracy %); under mixup a prediction counts lam for the first label, 1 - lam for the other.

    Loss and correct counts accumulate on the device and are read once at the end: a per-step .item()
    would make the CPU wait for the GPU every step."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    for images, labels in progress(loader, desc):
        images, labels = to_device(images, labels, device)
        if mixup > 0:
            images, partners, lam = mix_batch(images, labels, mixup, rng)
        with autocast(device):
            logits = model(images)
            loss = criterion(logits, labels)
            if mixup > 0:
                loss = lam * loss + (1 - lam) * criterion(logits, partners)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if average:
            average.update(model)
        loss_sum += loss.detach() * len(labels)
        predicted = logits.argmax(1)
        correct += (predicted == labels).sum() if mixup == 0 else \
            lam * (predicted == labels).sum() + (1 - lam) * (predicted == partners).sum()
    return loss_sum.item() / len(loader.dataset), 100.0 * correct.item() / len(loader.dataset)


@torch.no_grad()
def predict(model, loader, device, tta=False, desc="test"):
    """Logits (float32, on the CPU) for every image in loader, in order, and the labels.
    With tta, the logits are the mean over each image and its mirror image."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in progress(loader, desc, plain_lines=False):
        images = normalize(images, device)
        with autocast(device):
            logits = model(images)
            if tta:
                logits = (logits + model(images.flip(3))) / 2
        all_logits.append(logits.float())
        all_labels.append(labels)
    return torch.cat(all_logits).cpu(), torch.cat(all_labels)


def loss_and_accuracy(logits, labels):
    """(cross-entropy loss, accuracy %)."""
    return F.cross_entropy(logits, labels).item(), 100.0 * (logits.argmax(1) == labels).sum().item() / len(labels)


def evaluate(model, loader, device, tta=False):
    return loss_and_accuracy(*predict(model, loader, device, tta))


def make_optimizer(model, cfg, device):
    """Adam with decoupled weight decay (AdamW). Adam's own weight_decay adds an L2 term to the gradient, which
    Adam then rescales like any gradient, so it hardly holds back the weights whose gradients are large; AdamW
    shrinks every weight by lr x weight_decay apart from the gradient: +0.6 points, at 20 epochs and at 75.
    fused on CUDA: one kernel updates all parameters, instead of several small kernels."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics: the model we evaluate and keep.

    Each step's weights wander around the valley the optimizer is in; their running average sits nearer its
    floor, so it tests better while the learning rate is high, and at least as well at the end. The decay
    warms up as (1 + t) / (10 + t), as in TensorFlow and timm, so that even a short run forgets the random
    initial weights; it reaches EMA_DECAY only after ~9,000 steps (an average over the last ~1,000)."""

    def __init__(self, model, decay):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.steps = decay, 0
        self.source = None  # the model whose tensors self.averages and self.latest hold (see update)

    @torch.no_grad()
    def update(self, model):
        if model is not self.source:
            # Pair the tensors once, not every step: state_dict() builds a fresh dict of ~130 tensors per call,
            # 1-2 ms of Python a step that a GPU would wait for. The pairs stay valid because training changes
            # the tensors in place.
            pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
            floats = [pair for pair in pairs if pair[0].is_floating_point()]
            self.averages, self.latest = [average for average, _ in floats], [now for _, now in floats]
            self.counters = [pair for pair in pairs if not pair[0].is_floating_point()]  # BatchNorm's step counts
            self.source = model
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        # One fused kernel for all tensors (what torch.optim's own foreach paths use), not ~120 small ones.
        torch._foreach_lerp_(self.averages, self.latest, 1 - decay)
        for average, now in self.counters:
            average.copy_(now)

    def state_dict(self):
        return dict(weights=self.model.state_dict(), steps=self.steps)

    def load_state_dict(self, state):
        self.model.load_state_dict(state["weights"])
        self.steps = state["steps"]


def make_weight_average(model, cfg):
    return WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None  # --ema-decay 0: none


def select_device(choice):
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if choice == "auto":
        choice = next(name for name, ok in available.items() if ok)
    if not available[choice]:
        raise UserError(f"--device {choice} is not available on this machine; use --device auto or cpu")
    if choice == "cuda":  # every batch has the same shape, so cuDNN may time its conv algorithms once and keep the best
        torch.backends.cudnn.benchmark = True
    return torch.device(choice)


# ------------------------------------------------------------------------------ files, written atomically
def save_atomically(path, write):
    """Call write(binary file) on a temporary file beside path, then rename it over path. A rename is atomic,
    so a kill at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); free some space or choose another --out-dir") \
            from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_torch(obj, path):
    save_atomically(path, lambda f: torch.save(obj, f))


def write_metrics_csv(history, path):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRICS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: format(row[key], spec) for key, spec in METRICS.items()} for row in history)
    save_atomically(path, lambda f: f.write(text.getvalue().encode()))


def prepare_out_dir(out_dir):
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError(f"cannot write to --out-dir {out} ({e.strerror or e}); choose a folder you can write to") \
            from None
    return out


def load_checkpoint_file(path, what):
    """torch.load with weights_only=True, so a file can hold tensors and plain data but never run code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; give the path of a .pth file this script wrote")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    use = "give a best_model.pth or last_checkpoint.pth written by this script"
    if not is_zip:
        raise UserError(f"{what} {path} is not a checkpoint written by this script; {use}")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles before failing; the errors below say it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a torch file holding objects other than tensors and plain data
        raise UserError(f"{what} {path} holds objects other than tensors and plain data, which could run code "
                        f"when loaded, so it is refused; {use}") from None
    except Exception:  # a truncated or damaged file, or another program's zip archive
        raise UserError(f"{what} {path} is damaged (truncated or corrupt) or not a checkpoint; {use}") from None


def is_state_dict(state):
    """Whether `state` is a model's weights alone, as best_model.pth holds them."""
    return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def weights_in(state, path):
    """The model weights in what load_checkpoint_file() read: a best_model.pth is them; a last_checkpoint.pth holds
    them beside the optimizer's state, and its averaged weights are the ones the run evaluated."""
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        return state["average"]["weights"] if state.get("average") else state["model"]
    if is_state_dict(state):
        return state
    raise UserError(f"{path} is not a checkpoint written by this script; give a best_model.pth or "
                    f"last_checkpoint.pth written by this script")


def load_weights(model, state_dict, path):
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError):
        raise UserError(f"{path} holds weights for a different model than this script's Net; "
                        f"use a best_model.pth or last_checkpoint.pth written by this script") from None


# ------------------------------------------------------------------------------------------------ training
PARTS = ("model", "average", "optimizer", "scheduler", "scaler")  # what a checkpoint saves the state of
# Settings that describe the run's environment, not its result: a resumed run takes them from the command line.
ENVIRONMENT_SETTINGS = {"data_dir", "out_dir", "overwrite", "workers", "device", "compile"}


def resume_settings(cfg, checkpoint, explicit):
    """The checkpoint's settings, except where they describe this machine; a flag that would change the
    result is ignored, with a note, because a resumed run must end as the uninterrupted one would have.
    Unless given again, the data and output folders are the run's own."""
    saved = {"ema_decay": 0.0, "mixup": 0.0, **checkpoint["config"]}  # a run begun before a setting existed: without it
    saved = {k: v for k, v in saved.items() if k.upper() in SETTINGS}  # its settings, not its --resume/--eval
    for key in sorted(explicit - ENVIRONMENT_SETTINGS):
        if key in saved and getattr(cfg, key) != saved[key]:
            print(f"note: --{key.replace('_', '-')} {getattr(cfg, key)} ignored; the resumed run keeps {saved[key]}")
    merged = {**saved, **{k: v for k, v in vars(cfg).items() if k in ENVIRONMENT_SETTINGS}}
    if "out_dir" not in explicit:
        merged["out_dir"] = str(Path(cfg.resume).parent)
    if "data_dir" not in explicit:
        merged["data_dir"] = saved.get("data_dir", cfg.data_dir)
    return argparse.Namespace(**{**vars(cfg), **merged})


def check_for_earlier_run(out, cfg):
    """A new run writes best_model.pth at its first epoch. If the folder holds another run's files, stop before
    anything is written, unless --overwrite says to replace them (or --resume continues that very run)."""
    found = [name for name in ("best_model.pth", "last_checkpoint.pth") if (out / name).exists()]
    continuing = cfg.resume and Path(cfg.resume).resolve().parent == out.resolve()
    if found and not cfg.overwrite and not continuing:
        them = "them" if len(found) > 1 else "it"
        hint = f"; --resume {out / 'last_checkpoint.pth'} continues that run" if "last_checkpoint.pth" in found else ""
        raise UserError(f"{out} already holds {' and '.join(found)} from an earlier run: give another --out-dir to "
                        f"keep {them}, or add --overwrite to replace {them}{hint}")


def read_resume_checkpoint(path):
    checkpoint = load_checkpoint_file(path, "--resume checkpoint")
    if isinstance(checkpoint, dict) and checkpoint.get("format") in EARLIER_FORMATS:  # same shapes, other activation
        raise UserError(f"--resume {path} was written by an earlier version of this script, "
                        f"{EARLIER_FORMATS[checkpoint['format']]}")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        hint = " (best_model.pth holds weights only: resume from last_checkpoint.pth)" if is_state_dict(checkpoint) else ""
        raise UserError(f"--resume {path} is not a last_checkpoint.pth written by this script{hint}")
    return checkpoint


def save_checkpoint(path, parts, history, best, cfg):
    """Everything a resumed run needs to continue exactly: the state of each of `parts` (model, weight average,
    optimizer, scheduler, loss scaler), the best weights so far, the settings and the random number generators."""
    rng = dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])
    states = {name: part.state_dict() if part else None for name, part in parts.items()}
    config = {**vars(cfg), "data_dir": str(Path(cfg.data_dir).resolve())}  # a resume from elsewhere finds the data
    save_torch(dict(format=CHECKPOINT_FORMAT, **states, epoch=len(history), best_acc=best["acc"],
                    best_model=best["weights"], config=config, history=history, rng=rng), path)


def restore_checkpoint(checkpoint, parts, path):
    """Load what save_checkpoint() saved into `parts`; returns (history, best) as train() keeps them."""
    load_weights(parts["model"], checkpoint["model"], path)
    for name in PARTS[1:]:
        if parts[name] and checkpoint.get(name):  # a checkpoint from before the average or the scaler has none
            parts[name].load_state_dict(checkpoint[name])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return checkpoint["history"], dict(acc=checkpoint["best_acc"], weights=checkpoint.get("best_model"))


def keep_best_weights(best, resumed_from, out):
    """A run resumed into another folder gets the best weights so far there too: a later epoch may never beat
    them. A checkpoint from before best_model was in it has best_model.pth beside it, which is taken instead."""
    earlier = Path(resumed_from).parent / "best_model.pth"
    if best["weights"] is None and earlier.is_file():
        best["weights"] = load_checkpoint_file(earlier, "best weights")
    if best["weights"] is not None:
        save_torch(best["weights"], out / "best_model.pth")


def make_scheduler(optimizer, cfg, steps_per_epoch):
    """OneCycle: warm up from LR to MAX_LR, then cosine-anneal to almost zero, stepping every batch so the curve is
    smooth; the high middle explores, the long tail settles into a minimum. Adam moves each weight by about the
    learning rate per step whatever the gradient's size, and these conv weights are ~0.05: a peak of 1e-2 kept
    rewriting them, and test accuracy stalled near 70 % for half of a 20-epoch run."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.max_lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=cfg.pct_start, anneal_strategy="cos", div_factor=cfg.max_lr / cfg.lr)


def check_schedule(cfg, num_images):
    """Refuse, before anything is written, a schedule OneCycleLR cannot run: a warm-up of exactly one step ends
    where it starts, and it divides by zero (e.g. --epochs 5 --batch-size 50000)."""
    steps = cfg.epochs * math.ceil(num_images / cfg.batch_size)
    if cfg.pct_start * steps == 1:
        raise UserError(f"--epochs {cfg.epochs} at --batch-size {cfg.batch_size} makes only {steps} optimizer steps, "
                        f"and --pct-start {cfg.pct_start} of them is a warm-up of one step; "
                        f"use a smaller --batch-size or more --epochs")


def planned_learning_rates(cfg, steps_per_epoch):
    """The learning rate of every step of a run's schedule, from the scheduler itself on a stand-in parameter."""
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    rates = []
    for _ in range(cfg.epochs * steps_per_epoch):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()  # no gradient, so nothing changes; the scheduler expects a step before its own
        scheduler.step()
    return rates


def write_results(out, cfg, history, **final):
    """results.json: the run's settings and where it stands (best and last epoch), rewritten after every epoch so
    that a folder says what produced it; `final` adds what is measured at the end (flip TTA, minutes)."""
    best = max(history, key=lambda row: row["test_acc"])
    results = dict(
        settings={name.lower(): getattr(cfg, name.lower()) for name in SETTINGS},
        epochs_done=len(history), finished=len(history) == cfg.epochs,
        best_epoch=best["epoch"], best_test_acc=best["test_acc"], last_test_acc=history[-1]["test_acc"], **final)
    text = json.dumps(results, indent=2) + "\n"
    save_atomically(out / "results.json", lambda f: f.write(text.encode()))


def column_width(key):
    return max(len(key), 9)


def train(cfg, explicit=frozenset()):
    checkpoint = read_resume_checkpoint(cfg.resume) if cfg.resume else None
    if checkpoint:
        cfg = resume_settings(cfg, checkpoint, explicit)
    out = prepare_out_dir(cfg.out_dir)
    check_for_earlier_run(out, cfg)
    device = select_device(cfg.device)
    data = load_cifar10(cfg.data_dir)
    print(f"CIFAR-10 from {find_batch_folder(cfg.data_dir)}: {len(data[1]):,} training and "
          f"{len(data[3]):,} test images; device {device} ({precision(device)})")
    check_schedule(cfg, len(data[1]))

    torch.manual_seed(cfg.seed)
    model = Net(cfg.dropout)
    describe_model(model)
    model = model.to(device, memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.compile else model
    train_loader, test_loader = make_loaders(data, cfg, device)
    optimizer = make_optimizer(model, cfg, device)
    average = make_weight_average(model, cfg)
    parts = dict(model=model, average=average, optimizer=optimizer,
                 scheduler=make_scheduler(optimizer, cfg, len(train_loader)), scaler=make_grad_scaler(device))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    history, best = [], dict(acc=0.0, weights=None)
    if checkpoint:
        history, best = restore_checkpoint(checkpoint, parts, cfg.resume)
        keep_best_weights(best, cfg.resume, out)
        save_checkpoint(out / "last_checkpoint.pth", parts, history, best, cfg)  # the same state, now in `out` too
        write_metrics_csv(history, out / "metrics.csv")
        print(f"resumed from {cfg.resume} after epoch {len(history)} (best test accuracy {best['acc']:.2f} %)")
    try:
        run_epochs(step_model, parts, train_loader, test_loader, criterion, device, cfg, out, history, best)
    except KeyboardInterrupt:
        if not history:
            raise KeyboardInterrupt("before the first epoch finished; nothing was saved") from None
        raise KeyboardInterrupt(f"every finished epoch ({len(history)} of {cfg.epochs}) is saved; continue with "
                                f"--resume {out / 'last_checkpoint.pth'}") from None
    finish(model, parts, test_loader, device, cfg, out, history, best)


def run_epochs(step_model, parts, train_loader, test_loader, criterion, device, cfg, out, history, best):
    """Train the epochs not yet in `history`; after each, save what improved and the checkpoint."""
    model, average, optimizer, scheduler, scaler = (parts[name] for name in PARTS)
    kept_model = average.model if average else model  # the weights evaluated each epoch and kept ...
    test_model = average.model if average else step_model  # ... and how to run them (compiled, if so)
    target_reached = any(row["test_acc"] >= cfg.target_acc for row in history)
    print(" ".join(f"{key:>{column_width(key)}}" for key in METRICS))
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        train_loader.sampler.set_epoch(epoch)
        train_loss, train_acc = train_one_epoch(step_model, train_loader, optimizer, scheduler, criterion, device,
                                                scaler, average, desc=f"epoch {epoch}/{cfg.epochs}",
                                                mixup=mixup_alpha(cfg, epoch),
                                                # from (seed, epoch) alone, as the sampler, so a resumed run mixes alike
                                                rng=np.random.default_rng([cfg.seed, epoch, 1]))
        test_loss, test_acc = evaluate(test_model, test_loader, device)
        row = dict(epoch=epoch, lr=lr, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                   test_acc=test_acc, seconds=time.perf_counter() - start)
        tqdm.write(" ".join(f"{row[key]:>{column_width(key)}{spec}}" for key, spec in METRICS.items()))
        # Best weights first, then the checkpoint that records them: a kill in between costs only a rerun
        # of this epoch, which gives the same result.
        if test_acc > best["acc"]:
            best.update(acc=test_acc, weights={k: v.detach().clone() for k, v in kept_model.state_dict().items()})
            save_torch(best["weights"], out / "best_model.pth")
        history.append(row)
        save_checkpoint(out / "last_checkpoint.pth", parts, history, best, cfg)
        write_metrics_csv(history, out / "metrics.csv")
        write_results(out, cfg, history)
        if test_acc >= cfg.target_acc and not target_reached:
            target_reached = True
            tqdm.write(f"target reached: {test_acc:.2f} % >= {cfg.target_acc} % at epoch {epoch}")
    if not target_reached:
        print(f"target {cfg.target_acc} % not reached")


def finish(model, parts, test_loader, device, cfg, out, history, best):
    """The end of a run: the best weights' report and plots, and results.json with what they scored."""
    minutes = sum(row["seconds"] for row in history) / 60
    print(f"best test accuracy {best['acc']:.2f} % ({out / 'best_model.pth'}); {minutes:.1f} min of training")
    final = dict(training_minutes=round(minutes, 2), device=f"{device.type} ({precision(device)})",
                 torch=torch.__version__)
    if parts["average"]:  # what the average bought: the last epoch's own weights, on the same test set
        final["last_epoch_own_weights_acc"] = evaluate(model, test_loader, device)[1]
        print(f"without weight averaging, the last epoch's weights score {final['last_epoch_own_weights_acc']:.2f} %")
    if best["weights"] is not None:
        model.load_state_dict(best["weights"])
        final["best_test_acc_flip_tta"] = report(model, test_loader, device, cfg, out)
    plot_curves(history, planned_learning_rates(cfg, parts["scheduler"].total_steps // cfg.epochs), cfg,
                out / "curves.png")
    write_results(out, cfg, history, **final)
    print(f"wrote curves.png and results.json to {out}")


def evaluate_checkpoint(cfg):
    """--eval: load weights (best_model.pth or last_checkpoint.pth), report on the test set, write the reports."""
    device = select_device(cfg.device)
    model = load_model(cfg.eval, device, what="--eval checkpoint")
    out = prepare_out_dir(cfg.out_dir)
    data = load_cifar10(cfg.data_dir)
    _, test_loader = make_loaders(data, cfg, device)
    report(model, test_loader, device, cfg, out)


def report(model, test_loader, device, cfg, out):
    """Test loss and accuracy (and with flip TTA, returned), then the per-class table and pictures of mistakes."""
    logits, labels = predict(model, test_loader, device)
    loss, acc = loss_and_accuracy(logits, labels)
    tta_acc = evaluate(model, test_loader, device, tta=True)[1] if cfg.tta else None
    print(f"test loss {loss:.4f}, accuracy {acc:.2f} %" + (f"; with flip TTA {tta_acc:.2f} %" if cfg.tta else ""))
    write_reports(logits, labels, test_loader.dataset, out, cfg.misclassified)
    return tta_acc


# =============================================================================================== reports
# Pictures of what the model learned, written as files (matplotlib's Figure without pyplot: no window,
# no global state, nothing that blocks).
def confusion_matrix(predictions, labels, num_classes=len(CLASSES)):
    """counts[true, predicted]."""
    flat = np.asarray(labels) * num_classes + np.asarray(predictions)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_accuracy(counts):
    return 100.0 * np.diag(counts) / np.maximum(counts.sum(1), 1)


def most_confused_pairs(counts, k=5):
    """The k largest off-diagonal cells as (true class, predicted class, count), largest first."""
    off_diagonal = counts * (1 - np.eye(len(counts), dtype=counts.dtype))
    cells = np.argsort(off_diagonal, axis=None, kind="stable")[::-1][:k]
    return [(CLASSES[i], CLASSES[j], int(off_diagonal[i, j])) for i, j in zip(*np.unravel_index(cells, counts.shape))
            if off_diagonal[i, j] > 0]


def misclassified(logits, labels, limit):
    """The first `limit` test images the model gets wrong: (index, true class, predicted class, confidence)."""
    probabilities, predictions = logits.softmax(1).max(1)
    wrong = (predictions != labels).nonzero().flatten()[:limit].tolist()
    return [(i, CLASSES[labels[i]], CLASSES[predictions[i]], probabilities[i].item()) for i in wrong]


def save_figure(fig, path):
    save_atomically(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))


def plot_curves(history, learning_rates, cfg, path):
    """Loss and accuracy per epoch, and the learning rate of every step (`learning_rates`), titled with the
    settings that shape a run. Returns the figure."""
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(13, 4), layout="constrained")
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    for ax, key, title in ((loss_ax, "loss", "loss"), (acc_ax, "acc", "accuracy (%)")):
        for split in ("train", "test"):
            label = "train (blended images)" if split == "train" and cfg.mixup else split  # why it sits below test
            ax.plot(epochs, [row[f"{split}_{key}"] for row in history], marker=".", label=label)
        ax.set(title=title)
        ax.legend()
    steps_per_epoch = len(learning_rates) / cfg.epochs
    lr_ax.plot([step / steps_per_epoch for step in range(len(learning_rates))], learning_rates, color="tab:green")
    lr_ax.set(title="learning rate (every step)", xlim=(0, cfg.epochs))
    for ax in fig.axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers, never 0.5
        ax.grid(alpha=0.3)
    best = max(history, key=lambda row: row["test_acc"])
    mixup = f"mixup {cfg.mixup:g}, " if cfg.mixup else ""
    fig.suptitle(f"{cfg.epochs} epochs, batch {cfg.batch_size}, max lr {cfg.max_lr:g}, weight decay "
                 f"{cfg.weight_decay:g}, EMA {cfg.ema_decay:g}, {mixup}seed {cfg.seed}: best test accuracy "
                 f"{best['test_acc']:.2f} % at epoch {best['epoch']}")
    save_figure(fig, path)
    return fig


def plot_misclassified(images, captions, path, columns=5):
    rows = max(1, math.ceil(len(images) / columns))
    fig = Figure(figsize=(2.3 * columns, 2.5 * rows))
    for ax, image, caption in zip(fig.subplots(rows, columns, squeeze=False).flat, images, captions):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(caption, fontsize=8)
    for ax in fig.axes:
        ax.axis("off")
    save_figure(fig, path)


def plot_confusion_matrix(counts, path):
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # shading by row: the share of each true class
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    ax.set(xticks=range(len(CLASSES)), yticks=range(len(CLASSES)), xlabel="predicted", ylabel="true",
           title="confusion matrix (test set)")
    ax.set_xticklabels(CLASSES, rotation=45, ha="right")
    ax.set_yticklabels(CLASSES)
    for (i, j), count in np.ndenumerate(counts):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if shares[i, j] > 0.5 else "black")
    save_figure(fig, path)


def write_per_class(counts, path):
    accuracy = per_class_accuracy(counts)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["class", "images", "correct", "accuracy", "most_confused_with", "times"])
    print(f"{'class':<11}{'images':>7}{'accuracy':>10}   most often taken for")
    for i, name in enumerate(CLASSES):
        wrong = counts[i].copy()
        wrong[i] = -1
        j = int(wrong.argmax())
        writer.writerow([name, counts[i].sum(), counts[i, i], f"{accuracy[i]:.2f}", CLASSES[j], counts[i, j]])
        print(f"{name:<11}{counts[i].sum():>7}{accuracy[i]:>9.2f}%   {CLASSES[j]} ({counts[i, j]})")
    save_atomically(path, lambda f: f.write(text.getvalue().encode()))
    pairs = ", ".join(f"{true} -> {predicted} ({n})" for true, predicted, n in most_confused_pairs(counts))
    print(f"most confused (true -> predicted): {pairs or 'none'}")


def write_reports(logits, labels, test_set, out, num_misclassified):
    """confusion_matrix.png, per_class.csv and misclassified.png from the test logits."""
    counts = confusion_matrix(logits.argmax(1), labels)
    write_per_class(counts, out / "per_class.csv")
    plot_confusion_matrix(counts, out / "confusion_matrix.png")
    wrong = misclassified(logits, labels, num_misclassified)
    plot_misclassified([test_set.images[i] for i, *_ in wrong],  # the stored height x width x 3 pixels
                       [f"{true} → {predicted} ({confidence:.0%})" for _, true, predicted, confidence in wrong],
                       out / "misclassified.png")
    print(f"wrote per_class.csv, confusion_matrix.png and misclassified.png to {out}")


# ================================================================================= using a trained model
def load_model(path="best_model.pth", device="cpu", what="weights file"):
    """A trained Net from best_model.pth (or a last_checkpoint.pth), on `device`, in eval mode, ready to classify.

    Eval mode matters: in training mode BatchNorm normalizes each batch by its own statistics, and a batch of one
    image comes out as noise."""
    model = Net()
    load_weights(model, weights_in(load_checkpoint_file(path, what), path), path)
    return model.to(device, memory_format=torch.channels_last).eval()


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
    """uint8 height x width x 3 -> 32 x 32 x 3. CIFAR-10's images were made by downscaling larger photos, and area
    averaging downscales without the aliasing that nearest or bilinear sampling leaves."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 height x width x 3 RGB image, got {image.dtype} of shape {image.shape}")
    if image.shape[:2] == (32, 32):
        return image
    shrinking = image.shape[0] > 32 or image.shape[1] > 32
    return cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


@torch.no_grad()
def classify(model, images, top=3, batch_size=256):
    """uint8 height x width x 3 RGB images (any size; see to_cifar_size) -> for each image, its `top` most likely
    classes as (name, probability) pairs, most likely first. `model` should be in eval mode (load_model's is)."""
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(np.stack([to_cifar_size(image) for image in images[start:start + batch_size]]))
        x = normalize(pixels.permute(0, 3, 1, 2), device)
        with autocast(device):
            probabilities = model(x).float().softmax(1).cpu()
        values, indices = probabilities.topk(top, dim=1)
        results += [[(CLASSES[i], p) for p, i in zip(v.tolist(), ix.tolist())] for v, ix in zip(values, indices)]
    return results


def predict_files(cfg):
    """--predict: the three most likely classes of each image file, from --weights (OUT_DIR/best_model.pth)."""
    images = [read_image(path) for path in cfg.predict]  # every file checked before any output
    model = load_model(cfg.weights or Path(cfg.out_dir) / "best_model.pth", select_device(cfg.device), "--weights")
    for path, top in zip(cfg.predict, classify(model, images)):
        print(f"{path}: " + ", ".join(f"{name} {100 * probability:.1f} %" for name, probability in top))


# ============================================================================================= benchmark
def images_per_second(step, images_per_step, device, seconds=3.0, warmup=2):
    """Run step() until `seconds` have passed (after warm-up steps) and return images per second."""
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
        if device.type == "cuda" and steps % 10:
            continue
        sync()
    sync()
    return steps * images_per_step / (time.perf_counter() - start)


def benchmark(cfg):
    """--benchmark: cost and speed of the model and the input pipeline on random data (no dataset needed)."""
    device = select_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = Net(cfg.dropout)
    describe_model(model)
    model = model.to(device, memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.compile else model
    images, labels = to_device(torch.randint(0, 256, (cfg.batch_size, 3, 32, 32), dtype=torch.uint8),
                               torch.randint(0, 10, (cfg.batch_size,)), device)
    optimizer = make_optimizer(model, cfg, device)
    average = make_weight_average(model, cfg)
    scaler = make_grad_scaler(device)

    def train_step():
        with autocast(device):
            loss = F.cross_entropy(step_model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if average:
            average.update(model)

    @torch.no_grad()
    def eval_step():
        with autocast(device):
            step_model(images)

    model.train()
    train_speed = images_per_second(train_step, cfg.batch_size, device)
    model.eval()
    eval_speed = images_per_second(eval_step, cfg.batch_size, device)

    # As many stand-in images as CIFAR-10's training set: a pass lasts as long as a real epoch, so the many
    # workers of a GPU run are all busy, not waiting at the end of a short pass.
    fake_images = np.random.default_rng(cfg.seed).integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8)
    fake_labels = np.zeros(len(fake_images), dtype=np.int64)
    loader, _ = make_loaders((fake_images, fake_labels, fake_images, fake_labels), cfg, device)
    indices = itertools.count()
    augment_speed = images_per_second(lambda: loader.dataset[next(indices)], 1, torch.device("cpu"))

    def endless(loader):
        while True:
            yield from loader

    batches = endless(loader)
    loader_speed = images_per_second(lambda: next(batches), cfg.batch_size, torch.device("cpu"))
    print(f"device {device} ({precision(device)}), batch size {cfg.batch_size}, {torch.get_num_threads()} CPU threads "
          f"for the model")
    print(f"training (model alone, random tensors): {train_speed:9,.0f} images/s")
    print(f"evaluation (model alone):               {eval_speed:9,.0f} images/s")
    print(f"augmentation, one process:              {augment_speed:9,.0f} images/s")
    print(f"DataLoader, {loader.num_workers} worker process(es):       {loader_speed:9,.0f} images/s")


# ========================================================================================== command line
def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, not {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more, not {text}")
    return value


def positive_float(text):
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number, 0 or more, not {text}")
    return value


def probability(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, not {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, not {text}")
    return value


def worker_count(text):
    return text if text == "auto" else non_negative_int(text)


def device_name(text):
    if text not in ("auto", "cuda", "mps", "cpu"):
        raise argparse.ArgumentTypeError(f"must be auto, cuda, mps or cpu, not {text}")
    return text


# What each setting accepts, beyond the type of its default. argparse names the flag in its error message.
SETTING_TYPES = dict(EPOCHS=positive_int, BATCH_SIZE=positive_int, LR=positive_float, MAX_LR=positive_float,
                     WEIGHT_DECAY=non_negative_float, PCT_START=fraction, DROPOUT=fraction, LABEL_SMOOTHING=fraction,
                     EMA_DECAY=fraction, AFFINE_P=probability, CUTOUT_P=probability, MIXUP=non_negative_float,
                     MISCLASSIFIED=non_negative_int, SEED=non_negative_int, WORKERS=worker_count, DEVICE=device_name)
for _convert in (positive_int, non_negative_int, positive_float, non_negative_float, probability, fraction):
    _convert.__name__ = "number"  # argparse says "invalid number value: 'abc'" for text that is not a number


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: None)" after --resume, --eval, ... tells nothing
        return action.help if action.default is None else super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def setting_help():
    """Each setting's trailing comment in this file, used as its --help text."""
    try:
        source = Path(__file__).read_text(encoding="utf-8")
    except OSError:
        return {}
    found = re.findall(r"^([A-Z_]+) = .*?# (.*)$", source, flags=re.MULTILINE)
    return {name: text.replace("%", "%%") for name, text in found}  # argparse formats help with %


def setting_flag(name):
    """The command-line flag of a setting: MAX_LR is --max-lr."""
    return "--" + name.lower().replace("_", "-")


def get_args_parser():
    parser = OneLineParser(prog="model_train.py", allow_abbrev=False,  # --epoch is a typo, not --epochs
                           description="Train a compact CNN on CIFAR-10 (see README.md).",
                           formatter_class=DefaultsFormatter)
    helps = setting_help()
    for name in SETTINGS:
        default, flag = globals()[name], setting_flag(name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helps.get(name))
        else:
            parser.add_argument(flag, type=SETTING_TYPES.get(name, type(default)), default=default,
                                help=helps.get(name))
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in this last_checkpoint.pth")
    action.add_argument("--eval", metavar="CHECKPOINT", help="evaluate these weights on the test set and exit")
    action.add_argument("--benchmark", action="store_true", help="print MACs, parameters and images/s, and exit")
    action.add_argument("--predict", nargs="+", metavar="IMAGE",
                        help="print the three most likely classes of each image file (PNG, JPEG, ...; any size)")
    parser.add_argument("--weights", metavar="CHECKPOINT",
                        help="the weights --predict uses (default: best_model.pth in --out-dir)")
    return parser


def main(argv=None):
    parser = get_args_parser()
    cfg = parser.parse_args(argv)
    if cfg.lr > cfg.max_lr:
        parser.error(f"--lr {cfg.lr} is above --max-lr {cfg.max_lr}; OneCycle warms up from --lr to --max-lr")
    if cfg.weights and not cfg.predict:
        parser.error("--weights is for --predict; --eval and --resume take the checkpoint as their value")
    if hasattr(sys.stdout, "reconfigure"):  # each line as it is printed, also into a pipe or a file (nohup, tee)
        sys.stdout.reconfigure(line_buffering=True)
    changed = {key for key, value in vars(cfg).items() if value != parser.get_default(key)}
    try:
        if cfg.benchmark:
            benchmark(cfg)
        elif cfg.eval:
            evaluate_checkpoint(cfg)
        elif cfg.predict:
            predict_files(cfg)
        else:
            train(cfg, changed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C; train() says what was saved
        print("\ninterrupted" + (f": {e}" if e.args else ""), file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
