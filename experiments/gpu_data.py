"""Carry CIFAR-10 to a GPU machine that cannot download it, in parts small enough for one call (64 MiB each).

    python experiments/gpu_data.py pack data .gpu/part1 .gpu/part2   # here: the batch files -> lossless WebP mosaics
    python experiments/gpu_data.py unpack .gpu/part1 data            # there, once per part: -> the batch files

Each batch file (10,000 images) becomes one 3200 x 3200 lossless WebP mosaic (about 17 MB) and its labels; the parts
take the six files in turn. unpack writes each batch file in the standard pickle layout that model_train.py reads and
checks its pixels against the sha256 that pack recorded, so a figure measured there is on the original data.
"""
import hashlib
import json
import pickle
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model_train as mt  # noqa: E402

FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def pack(data_dir, *parts):
    folder = mt.find_batch_folder(data_dir)
    for k, name in enumerate(FILES):
        images, labels = mt.read_batch_file(folder / name)
        out = Path(parts[k % len(parts)])
        out.mkdir(parents=True, exist_ok=True)
        mosaic = images.reshape(100, 100, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(3200, 3200, 3)
        ok, webp = cv2.imencode(".webp", cv2.cvtColor(mosaic, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_WEBP_QUALITY, 101])
        assert ok, "OpenCV could not write WebP"
        (out / f"{name}.webp").write_bytes(webp.tobytes())
        (out / f"{name}.json").write_text(json.dumps(dict(labels=labels.tolist(),
                                                          sha256=hashlib.sha256(images.tobytes()).hexdigest())))
        print(f"{name}: {len(webp) / 1e6:.1f} MB -> {out}")


def unpack(part, data_dir):
    folder = Path(data_dir) / mt.BATCH_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for webp in sorted(Path(part).glob("*.webp")):
        meta = json.loads(webp.with_suffix(".json").read_text())
        mosaic = cv2.cvtColor(cv2.imdecode(np.fromfile(webp, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        tiles = mosaic.reshape(100, 32, 100, 32, 3).transpose(0, 2, 1, 3, 4)
        images = np.ascontiguousarray(tiles.reshape(-1, 32, 32, 3))
        assert hashlib.sha256(images.tobytes()).hexdigest() == meta["sha256"], f"{webp} did not round-trip"
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        with open(folder / webp.stem, "wb") as f:
            pickle.dump({"data": data, "labels": meta["labels"]}, f, protocol=2)
        print(f"{webp.stem}: {len(images):,} images, pixels checked")


if __name__ == "__main__":
    {"pack": pack, "unpack": unpack}[sys.argv[1]](*sys.argv[2:])
