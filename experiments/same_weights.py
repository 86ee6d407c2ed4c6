"""Do two versions of model_train.py train the same weights to the bit on this CPU?

    python experiments/same_weights.py OLD_DIR [NEW_DIR] [-- extra model_train.py flags]

Each version (the folder holding its model_train.py; NEW_DIR defaults to this repository) trains the same short run
on the same small synthetic CIFAR-format data set, in its own process; then their metrics.csv (without the seconds
column) and the tensors of best_model.pth and last_checkpoint.pth are compared. Prints what differs; exit status 1
if anything does. A refactoring that must not change results passes this before it lands.
"""
import csv
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def make_data(root, per_batch=64, test_images=128):
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    palette = rng.integers(30, 226, size=(10, 3))
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test_images)]:
        labels = np.arange(n) % 10
        images = np.clip(palette[labels][:, None, None, :] + rng.normal(0, 40, (n, 32, 32, 3)), 0, 255)
        data = images.astype(np.uint8).transpose(0, 3, 1, 2).reshape(n, -1)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels.tolist()}, f, protocol=2)


def run(code_dir, data, out, extra):
    args = ["--data-dir", str(data), "--out-dir", str(out), "--epochs", "2", "--batch-size", "32", "--workers", "0",
            "--device", "cpu", *extra]
    subprocess.run([sys.executable, "-c", "import sys, model_train; model_train.main(sys.argv[1:])", *args],
                   cwd=code_dir, check=True, stdout=subprocess.DEVNULL)


def tensors(value, prefix=""):
    """Every tensor in a (nested) checkpoint, by its path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else []
    return {k: v for key, item in items for k, v in tensors(item, f"{prefix}/{key}").items()}


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    dirs = argv[:argv.index("--")] if "--" in argv else argv
    old, new = Path(dirs[0]), Path(dirs[1]) if len(dirs) > 1 else ROOT
    differences = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_data(tmp / "data")
        for name, code in (("old", old), ("new", new)):
            run(code, tmp / "data", tmp / name, extra)
        metrics = []
        for name in ("old", "new"):
            with open(tmp / name / "metrics.csv", newline="") as f:
                metrics.append([{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)])
        if metrics[0] != metrics[1]:
            differences.append(f"metrics.csv: {metrics[0]} != {metrics[1]}")
        for file in ("best_model.pth", "last_checkpoint.pth"):
            a, b = (tensors(torch.load(tmp / name / file, weights_only=True)) for name in ("old", "new"))
            if a.keys() != b.keys():
                differences.append(f"{file}: other tensors: {sorted(a.keys() ^ b.keys())}")
            differences += [f"{file}: {key} differs" for key in sorted(a.keys() & b.keys())
                            if not torch.equal(a[key], b[key])]
        print(f"{len(metrics[0])} epochs, metrics {'equal' if metrics[0] == metrics[1] else 'DIFFER'}; "
              f"{len(a)} tensors in last_checkpoint.pth")
    print("\n".join(differences) or f"identical: {old} and {new} train the same weights to the bit")
    sys.exit(1 if differences else 0)


if __name__ == "__main__":
    main()
