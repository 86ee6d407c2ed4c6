"""The experiment scripts keep working with today's model_train.py (they patch its functions by name)."""
import json
import sys
from pathlib import Path

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
