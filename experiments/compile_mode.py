"""Issue 57's first GPU screens: model_train.py with torch.compile in another mode, measured before model_train.py
changes.

    python experiments/compile_mode.py MODE [any model_train.py flag ...]

MODE is one of torch.compile's modes: "reduce-overhead" records the compiled forward and backward as CUDA graphs, so
a step's hundreds of small kernels go to the GPU in a few launches (the H200 was busy 43 % of an eager step); the
epoch's last, partial batch (80 images at batch 128) gets a graph of its own. "max-autotune" also tunes the kernels;
"default" is model_train.py's own --compile. --compile is implied. Eager still: the loss, the fused AdamW step, the
weight average's update and the test pass of the averaged weights. On a CPU no graph is recorded.
"""
import functools
import os
import sys
from pathlib import Path

sys.path.insert(0, os.environ.get("MODEL_TRAIN_DIR", str(Path(__file__).resolve().parents[1])))
import torch  # noqa: E402

import model_train as mt  # noqa: E402

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in MODES:
        sys.exit(f"usage: python experiments/compile_mode.py {{{','.join(MODES)}}} [model_train.py flags ...]")
    torch.compile = functools.partial(torch.compile, mode=argv[0])  # model_train.py calls torch.compile(model)
    print(f"torch.compile mode: {argv[0]}")
    mt.main(["--compile", *argv[1:]])


if __name__ == "__main__":
    main()
