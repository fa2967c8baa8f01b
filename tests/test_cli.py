"""The command-line entry points (radz/cli.py, `[project.scripts]`): each `--help` lists the options with their
defaults, and the scripts of a checkout are the same commands."""

import argparse
import re
import tomllib

import pytest

from conftest import REPO

COMMANDS = ("radz-train", "radz-evaluate", "radz-knowledge", "radz-compare", "radz-push")


def help_text(command: str, capsys) -> str:
    from radz import cli

    function = getattr(cli, command.removeprefix("radz-"))
    with pytest.raises(SystemExit) as exit_:
        function(["--help"])
    assert exit_.value.code == 0
    return re.sub(r"\s+", " ", capsys.readouterr().out)


def parser_of(command: str) -> argparse.ArgumentParser:
    """The argparse parser behind a command, captured when it parses `--help`."""
    from radz import cli

    captured = {}
    original = argparse.ArgumentParser.parse_known_args

    def capture(self, args=None, namespace=None):
        captured.setdefault("parser", self)
        return original(self, args, namespace)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        with pytest.raises(SystemExit):
            getattr(cli, command.removeprefix("radz-"))(["--help"])
    return captured["parser"]


def test_the_scripts_are_declared_as_a_block():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for command in COMMANDS:
        module, function = scripts[command].split(":")
        assert module == "radz.cli" and function == command.removeprefix("radz-")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_option_with_its_default(command, capsys):
    parser = parser_of(command)
    capsys.readouterr()
    text = help_text(command, capsys)
    assert text.startswith(f"usage: {command} ")
    ours = {"radz-train": ("lora_r", "lora_alpha", "tower_pretraining_steps", "anchor_descriptions_per_step",
                           "learning_rate", "push_to_hub", "max_bad_fraction", "train_split")}.get(command)
    checked = 0
    for action in parser._actions:
        name = action.dest
        if not action.option_strings or action.default in (None, argparse.SUPPRESS) or name == "help":
            continue
        if ours is not None and name not in ours:
            continue  # radz-train: the Trainer's own ~150 flags are transformers' to document
        option = action.option_strings[0]
        assert option in text, f"{command}: {option} missing from --help"
        shown = action.help and "default" in action.help
        assert shown or f"(default: {action.default})" in text, f"{command} {option}: {action.default!r} not shown"
        checked += 1
    assert checked >= (len(ours) if ours else 1)


def test_help_names_the_defaults_of_the_evaluation_protocol(capsys):
    text = help_text("radz-evaluate", capsys)
    protocol = "--threshold_protocol {validation,fixed,oracle} how F1/ACC thresholds are chosen (default: validation)"
    assert protocol in text
    assert "--update_card add the results to the model card (README.md) of --model (default: False)" in text
    # A switch that turns a default off shows no default of its own (it once read "(default: True)").
    assert "--no_knowledge radz: score every label by its prompt --negative_template" in text


def test_the_checkout_scripts_are_the_package_commands():
    import evaluate_radz
    import train_radz

    from radz import cli

    assert train_radz.main is cli.train and evaluate_radz.main is cli.evaluate_main


def test_push_refuses_an_incomplete_folder_and_names_what_is_missing(tmp_path, capsys):
    from radz import cli

    with pytest.raises(SystemExit) as exit_:
        cli.push([str(tmp_path), "someone/radz"])
    assert exit_.value.code == 2
    assert "no config.json" in capsys.readouterr().err
