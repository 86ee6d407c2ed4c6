"""Issue 58's "one big bet": the recipe of the 97.5k-parameter network that reaches 94.4 % (xvel/cifar10-tiniest),
adapted to this project's spec, as a candidate run of model_train.py.

    python experiments/recipe.py --parts aug,unit,sched [any model_train.py flag ...]
    python experiments/recipe.py --speed   # CPU training images/s: default Net, RecipeNet, the seed's layout

It imports model_train (from the repository root, or from MODEL_TRAIN_DIR), replaces the parts named in --parts and
runs model_train.main() with the remaining flags, so a run writes the usual run folder and continues with --resume
(give the same --parts again). The three parts:
- aug: always-on, stronger augmentation (flip; shift of +-4 px and rotation of +-15 degrees on 95 % of images,
  replicate border; sharpening like PIL's factor 1.0-2.2 on 95 %; colour jitter 0.1/0.1/0.5/0.05 on 90 %) and mixup
  on every batch, a weight lam ~ U(0, lam_max) per image for its partner, lam_max rising from 0 to 0.5 over the
  first half of the run;
- unit: the four 16 x 16 bottlenecks replaced by the gated multi-kernel unit (channels split four ways: identity,
  depthwise 3x3, depthwise 5x5, 3x3 average pool then depthwise 3x3 dilation 2; BatchNorm; 1x1 conv to 2 x 96; SiLU
  gate; 1x1 conv back; a learnable per-channel scale on the shortcut), the 8 x 8 stage 160 wide;
- sched: AdamW peak lr 0.02, weight decay 0.01 (the default's lr x wd), 1 % warm-up from 0.02 / 25, ending at 10 %
  of the peak, no momentum cycling.
"""
import argparse
import os
import sys
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, os.environ.get("MODEL_TRAIN_DIR", str(Path(__file__).resolve().parents[1])))
import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

import model_train as mt  # noqa: E402

PARTS = ("aug", "unit", "sched")


# ------------------------------------------------------------------------------------------------ aug
def recipe_transform(affine_p=None, cutout_p=None):
    """The published pipeline in Albumentations. Sharpen's kernel with lightness 1 is img + 8 a (img - mean of the
    8 neighbours); PIL's sharpness factor f is img + 8 (f - 1) / 13 (img - that mean): f in 1.0-2.2 is a in 0-0.092."""
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.Affine(translate_px=(-4, 4), rotate=(-15, 15), border_mode=cv2.BORDER_REPLICATE, p=0.95),
        A.Sharpen(alpha=(0.0, 1.2 / 13), lightness=(1.0, 1.0), p=0.95),
        A.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.5, hue=0.05, p=0.9),
        ToTensorV2(),
    ], strict=True)


def recipe_mixup_max(cfg, epoch):
    """--mixup is lam_max's ceiling (0.5 in the recipe), reached halfway through the run."""
    return min(cfg.mixup, (epoch - 1) / cfg.epochs)


def train_one_epoch_uniform_mixup(model, batches, optimizer, scheduler, criterion, scaler, average, mixup, rng):
    """model_train.train_one_epoch with per-image mixup: image i becomes (1 - lam_i) x_i + lam_i x_partner,
    lam_i ~ U(0, mixup), and its loss (1 - lam_i) CE(y_i) + lam_i CE(y_partner)."""
    device = next(model.parameters()).device
    model.train()
    per_image = nn.CrossEntropyLoss(label_smoothing=criterion.label_smoothing, reduction="none")
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    for images, labels in batches:
        seen += len(labels)
        images, labels = mt.normalize(images, device), labels.to(device, non_blocking=True)
        lam = torch.from_numpy(rng.uniform(0, mixup, len(labels))).float().to(device)
        order = torch.from_numpy(rng.permutation(len(labels))).to(device)
        partners = labels[order]
        images = (1 - lam).view(-1, 1, 1, 1) * images + lam.view(-1, 1, 1, 1) * images[order]
        with mt.autocast(device):
            logits = model(images)
            loss = ((1 - lam) * per_image(logits, labels) + lam * per_image(logits, partners)).mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if average:
            average.update()
        loss_sum += loss.detach() * len(labels)
        hits = logits.argmax(1)
        correct += ((1 - lam) * (hits == labels) + lam * (hits == partners)).sum()
    return loss_sum.item() / seen, 100.0 * correct.item() / seen


# ----------------------------------------------------------------------------------------------- unit
class GatedUnit(nn.Module):
    """x * scale + f(x), f: four-way split (identity, dw 3x3, dw 5x5, avg-pool 3x3 -> dw 3x3 d2) -> BatchNorm ->
    1x1 conv to 2 x hidden -> SiLU(one half) * other half -> 1x1 conv back."""

    def __init__(self, channels=48, hidden=96):
        super().__init__()
        part = channels // 4
        self.dw3 = mt.conv2d(part, part, 3, groups=part)
        self.dw5 = mt.conv2d(part, part, 5, groups=part)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.dw3d2 = mt.conv2d(part, part, 3, dilation=2, groups=part)
        self.norm = nn.BatchNorm2d(channels)
        self.expand = nn.Conv2d(channels, 2 * hidden, 1)
        self.project = nn.Conv2d(hidden, channels, 1)
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x):
        a, b, c, d = x.chunk(4, dim=1)
        y = torch.cat([a, self.dw3(b), self.dw5(c), self.dw3d2(self.pool(d))], dim=1)
        gate, value = self.expand(self.norm(y)).chunk(2, dim=1)
        return x * self.scale + self.project(F.silu(gate) * value)


class RecipeNet(nn.Module):
    def __init__(self, dropout=mt.DROPOUT, num_classes=len(mt.CLASSES), width=160):
        super().__init__()
        self.features = nn.Sequential(OrderedDict(
            C1=nn.Sequential(mt.ConvBNAct(3, 16), mt.Residual(mt.ConvBNAct(16, 16))),
            C2=nn.Sequential(mt.ConvBNAct(16, 48, stride=2), GatedUnit(), GatedUnit()),
            C3=nn.Sequential(GatedUnit(), GatedUnit()),
            C4=nn.Sequential(mt.DepthwiseSeparable(48, width, stride=2),
                             mt.Residual(mt.DepthwiseSeparable(width, width)),
                             mt.Residual(mt.DepthwiseSeparable(width, width))),
            C5=nn.Sequential(mt.Residual(mt.DepthwiseSeparable(width, width, dilation=2)),
                             mt.Residual(mt.DepthwiseSeparable(width, width, dilation=2))),
        ))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(width, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------- sched
END_SHARE = 0.1  # the schedule ends at this share of the peak learning rate


def recipe_scheduler(optimizer, cfg, steps_per_epoch):
    div_factor = cfg.max_lr / cfg.lr
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.max_lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, pct_start=cfg.pct_start,
        anneal_strategy="cos", cycle_momentum=False, div_factor=div_factor,
        final_div_factor=1 / (div_factor * END_SHARE))


# Each part's settings, given as flags before the user's own (a later flag wins), so results.json records them.
PART_FLAGS = dict(aug=["--mixup", "0.5"],
                  unit=[],
                  sched=["--lr", "8e-4", "--max-lr", "0.02", "--weight-decay", "0.01", "--pct-start", "0.01"])


def apply(parts):
    if "aug" in parts:
        mt.train_transform = recipe_transform
        mt.train_one_epoch = train_one_epoch_uniform_mixup
        mt.mixup_alpha = recipe_mixup_max
    if "unit" in parts:
        mt.Net = RecipeNet
    if "sched" in parts:
        mt.make_scheduler = recipe_scheduler


def speed(rounds=5):
    """Training images/s of the default Net, RecipeNet and the seed's layout, taking turns in one process so that the
    machine's drift hits all three; the seed's layout and the timing loop are the workplace's seed_layout.py (in
    ../shared/tools, beside the repository)."""
    import statistics
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "tools"))
    from seed_layout import seed_layout, train_images_per_second
    models = dict(default=mt.Net, recipe=RecipeNet, seed_layout=seed_layout)
    speeds = {name: [] for name in models}
    for _ in range(rounds):
        for name, make in models.items():
            speeds[name].append(train_images_per_second(make()))
    for name, values in speeds.items():
        ratios = [v / s for v, s in zip(values, speeds["seed_layout"])]
        print(f"{name:<12} median {statistics.median(values):5.0f} images/s ({min(values):.0f}-{max(values):.0f}), "
              f"{statistics.median(ratios):.2f} x the seed's layout ({min(ratios):.2f}-{max(ratios):.2f})")


def main(argv=None):
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--speed", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.speed:
        return speed()
    parts = set(filter(None, args.parts.split(",")))
    if parts - set(PARTS):
        sys.exit(f"error: --parts takes a comma-separated subset of {','.join(PARTS)}, not {args.parts}")
    apply(parts)
    print(f"recipe parts: {','.join(sorted(parts)) or 'none (the default)'}")
    mt.main([flag for part in PARTS if part in parts for flag in PART_FLAGS[part]] + rest)


if __name__ == "__main__":
    main()
