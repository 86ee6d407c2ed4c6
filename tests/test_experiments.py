"""The experiment scripts keep working with today's model_train.py (they patch its functions by name)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import recipe  # noqa: E402

from conftest import train_args  # noqa: E402


def test_the_recipe_candidate_trains_with_all_its_parts(data_dir, tmp_path, monkeypatch):
    import model_train as mt
    for name in ("train_transform", "train_one_epoch", "mixup_alpha", "Net", "make_scheduler"):
        monkeypatch.setattr(mt, name, getattr(mt, name))  # recipe.apply() replaces them; put them back afterwards
    recipe.main(["--parts", "aug,unit,sched", *train_args(data_dir, tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["finished"] and results["settings"]["max_lr"] == 0.02 and results["settings"]["mixup"] == 0.5
    assert sum(p.numel() for p in recipe.RecipeNet().parameters()) == 188_186


def test_compile_mode_compiles_the_model_in_the_mode_given(monkeypatch):
    import compile_mode
    import model_train as mt
    import torch
    calls, runs = [], []
    monkeypatch.setattr(torch, "compile", lambda model, **options: calls.append(options) or model)
    monkeypatch.setattr(mt, "main", runs.append)
    compile_mode.main(["reduce-overhead", "--seed", "3"])
    assert runs == [["--compile", "--seed", "3"]]
    torch.compile(torch.nn.Linear(1, 1))  # as model_train.py calls it
    assert calls == [{"mode": "reduce-overhead"}]


FAKE_RUN = """
import json, os, sys, time
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--out-dir") + 1]); out.mkdir(parents=True, exist_ok=True)
(out / "started").touch()
others = lambda: [p for p in out.parent.glob("*/started") if p.parent != out]
deadline = time.monotonic() + 20
while not others() and time.monotonic() < deadline:  # a partner started while this run goes on
    time.sleep(0.05)
(out / "results.json").write_text(json.dumps({"training_minutes": 0, "argv": sys.argv[1:], "partner": bool(others()),
                                              "threads": os.environ.get("OMP_NUM_THREADS")}))
"""


@pytest.mark.skipif(not shutil.which("flock"), reason="cpu_queue.sh locks its runs folder with flock")
def test_the_cpu_queue_runs_two_lanes_side_by_side_one_thread_each_and_skips_or_resumes(tmp_path):
    (tmp_path / "fake.py").write_text(FAKE_RUN)
    runs = tmp_path / "runs"
    (runs / "done").mkdir(parents=True)
    (runs / "done" / "results.json").write_text('{"training_minutes": 1}')
    (runs / "b").mkdir()
    (runs / "b" / "last_checkpoint.pth").touch()
    screens = tmp_path / "screens.txt"
    screens.write_text("# a comment\ndone fake.py\na fake.py --seed 1\n\nb fake.py --seed 2\n")
    env = {**os.environ, "LANES": "2", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("OMP_NUM_THREADS", None)
    queue = Path(__file__).resolve().parents[1] / "experiments" / "cpu_queue.sh"
    subprocess.run(["bash", str(queue), str(screens), str(runs)], cwd=tmp_path, env=env, check=True, timeout=60)
    assert (runs / "done" / "results.json").read_text() == '{"training_minutes": 1}'  # finished: not run again
    a, b = (json.loads((runs / name / "results.json").read_text()) for name in ("a", "b"))
    assert a["argv"] == ["--seed", "1", "--out-dir", str(runs / "a")]
    assert b["argv"] == ["--seed", "2", "--out-dir", str(runs / "b"), "--resume",
                         str(runs / "b" / "last_checkpoint.pth")]
    assert a["partner"] and b["partner"] and a["threads"] == b["threads"] == "1"


def test_compile_speed_times_both_models_side_by_side(monkeypatch, capsys):
    import compile_speed
    import model_train as mt
    monkeypatch.setattr(mt, "compiled", lambda model, cfg, device: model)  # no compiler needed, no minute spent
    compile_speed.main(["--rounds", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "round 1: eager" in out and "compiled / eager" in out
