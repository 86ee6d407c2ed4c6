"""The README's commands and flags are the script's, and requirements.txt names what the script imports."""
import ast
import re
import shlex
import sys
from pathlib import Path

import pytest

import model_train as mt

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_commands():
    """The arguments of every `python model_train.py ...` in the README, shell comments left out."""
    commands = []
    for line in README.splitlines():
        code = line.split("#", 1)[0]  # "tar ... # then: python model_train.py" is prose, not a command
        commands += [shlex.split(args) for args in re.findall(r"python model_train\.py([^`|]*)", code)]
    return commands


def test_the_readme_shows_the_commands_users_need():
    commands = readme_commands()
    assert [] in commands and ["--benchmark"] in commands
    assert any("--epochs" in args for args in commands)  # the CPU quick run
    assert any("--init-from" in args for args in commands)  # training further from trained weights


@pytest.mark.parametrize("args", readme_commands(), ids=" ".join)
def test_every_readme_command_parses(args):
    try:
        mt.get_args_parser().parse_args(args)
    except SystemExit as exit_info:
        assert exit_info.code == 0, f"README command `python model_train.py {' '.join(args)}` is refused"


def test_every_flag_the_readme_names_exists_and_every_setting_is_documented():
    known = set(re.findall(r"--[a-z][a-z-]*", mt.get_args_parser().format_help()))
    prose = "\n".join(line for line in README.splitlines() if "pip install" not in line)  # pip has flags of its own
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", prose))
    assert named - known == set()
    settings = mt.settings_of(mt.get_args_parser().parse_args([]))
    assert {"--" + name.replace("_", "-") for name in settings} <= named


def test_requirements_name_every_package_the_script_imports_and_the_torch_it_needs():
    """cv2 arrives with Albumentations today, but the script imports it itself. torch 2.5 is the first that loads
    the scheduler's state with weights_only=True and runs autocast(enabled=False) on Apple MPS."""
    requirements = (ROOT / "requirements.txt").read_text()
    listed = set(re.findall(r"^([A-Za-z][\w.-]*)", requirements, flags=re.MULTILINE))
    tree = ast.parse((ROOT / "model_train.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom)}
    package = {"cv2": "opencv-python-headless"}
    third_party = {name for name in imported if name not in sys.stdlib_module_names}
    assert {package.get(name, name) for name in third_party} <= listed
    floors = dict(re.findall(r"^(torch|torchvision)>=([\d.]+)", requirements, flags=re.MULTILINE))
    as_tuple = lambda version: tuple(int(part) for part in version.split(".")[:2])  # noqa: E731
    assert as_tuple(floors["torch"]) >= (2, 5) and as_tuple(floors["torchvision"]) >= (0, 20)


def test_help_says_what_label_smoothing_does():
    """0.1 spreads a tenth of the target over the ten classes: the true class's target is 0.91, not 0.9."""
    help_text = " ".join(mt.get_args_parser().format_help().split())
    assert "0.1 makes the true class's target 0.91" in help_text and "target 0.9 " not in help_text
