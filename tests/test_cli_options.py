"""Options that mean the same thing are the same option on every command: the JSON outputs and a
checkpoint's EViT settings. Checked on the parsed command definitions (nothing runs)."""

from __future__ import annotations

import typer

from evit_deploy.cli import app

COMMANDS = typer.main.get_command(app).commands
JSON_COMMANDS = {"export", "predict", "info", "plan", "doctor", "client", "bench", "eval", "loadtest", "build-engine", "quantize", "optimize"}
# Every command that loads a checkpoint (loadtest: with --artifact); info and plan take the model
# as their argument, so they have the settings but not --model.
CHECKPOINT_COMMANDS = {"export", "predict", "bench", "serve", "eval", "visualize", "loadtest"}
EVIT_OPTIONS = ("--model", "--keep-rate", "--drop-loc", "--fuse-token", "--img-size")


def options(command: str) -> dict[str, object]:
    return {name: param for param in COMMANDS[command].params for name in param.opts}


def test_json_prints_and_json_out_writes_everywhere():
    having_json = {name for name in COMMANDS if "--json" in options(name)}
    assert having_json == JSON_COMMANDS
    for name in JSON_COMMANDS:
        given = options(name)
        assert given["--json"].is_flag, name
        assert not given["--json-out"].is_flag and given["--json-out"].metavar == "PATH", name
        assert given["--force"].help == "Replace existing output files.", name


def test_one_set_of_evit_options_for_every_command_that_loads_a_checkpoint():
    reference = options("predict")
    for name in CHECKPOINT_COMMANDS:
        given = options(name)
        for option in EVIT_OPTIONS:
            assert given[option].help == reference[option].help, (name, option)
            assert given[option].default is None, (name, option)  # not given: the artifact's own
    for name in ("info", "plan"):
        given = options(name)
        assert "--model" not in given
        for option in set(EVIT_OPTIONS) & set(given):
            assert given[option].help == reference[option].help, (name, option)


def test_help_names_the_defaults():
    given = options("predict")
    assert "read off the checkpoint's weights" in given["--model"].help
    assert "default 0.7" in given["--keep-rate"].help and "default 3,6,9" in given["--drop-loc"].help
