"""The README's commands and flags are the script's: a renamed or removed flag fails here, not for a reader."""
import re
import shlex
from pathlib import Path

import pytest

import model_train as mt

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


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


@pytest.mark.parametrize("args", readme_commands(), ids=" ".join)
def test_every_readme_command_parses(args):
    try:
        mt.get_args_parser().parse_args(args)
    except SystemExit as exit_info:
        assert exit_info.code == 0, f"README command `python model_train.py {' '.join(args)}` is refused"


def test_every_flag_the_readme_names_exists():
    known = set(re.findall(r"--[a-z][a-z-]*", mt.get_args_parser().format_help()))
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", README))
    assert named - known == set()
    assert {mt.setting_flag(name) for name in mt.SETTINGS} <= named  # every setting is documented


def test_requirements_ask_for_the_torch_that_this_script_needs():
    """torch 2.5 is the first that loads the scheduler's state with weights_only=True and runs autocast(enabled=False)
    on Apple MPS; a lower floor would let pip install a torch on which --resume or MPS training fails."""
    requirements = (Path(__file__).resolve().parent.parent / "requirements.txt").read_text()
    floors = dict(re.findall(r"^(torch|torchvision)>=([\d.]+)", requirements, flags=re.MULTILINE))
    as_tuple = lambda version: tuple(int(part) for part in version.split(".")[:2])  # noqa: E731
    assert as_tuple(floors["torch"]) >= (2, 5) and as_tuple(floors["torchvision"]) >= (0, 20)
