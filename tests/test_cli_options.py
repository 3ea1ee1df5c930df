"""The command line as a whole: options that mean the same thing are the same option on every
command (the JSON outputs, a checkpoint's EViT settings); every `--help` reads well at 80
columns; long steps show their stages where stderr is no terminal (a log, CI)."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from evit_deploy.cli import app

ROOT = typer.main.get_command(app)
COMMANDS = ROOT.commands
SHIPPED = "evit_deploy/assets/shapes/shapes_evit_tiny.safetensors"
SHIPPED_PLAIN = "evit_deploy/assets/shapes_plain_tiny/shapes_plain_tiny.safetensors"
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


def every_command(command=ROOT, path: tuple[str, ...] = ()):
    """(words that reach it, command) for the app, each group and each command in them."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from every_command(sub, (*path, name))


def help_at_80_columns(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("path", [path for path, _ in every_command()], ids=lambda path: " ".join(("evit-deploy", *path)))
def test_help_reads_well_at_80_columns(path):
    text = help_at_80_columns(path)
    assert max(len(line) for line in text.splitlines()) <= 80, text
    for typer_label in ("<bool>", "<list[", "<path>", "<int>", "<float>", "<str>", "{"):
        assert typer_label not in text, (typer_label, text)
    assert "--no-force" not in text
    assert not re.search(r"--[\w-]*…", text), f"an option name cut short:\n{text}"
    assert not re.search(r"--[\w-]*-$", text, re.MULTILINE), f"an option name split at a hyphen:\n{text}"
    usage = re.search(r"^Usage: .*? \[OPTIONS\](.*)$", text, re.MULTILINE).group(1).split()
    assert all(re.fullmatch(r"\[?[A-Z_]+\]?(\.\.\.)?", word) for word in usage), usage  # ARTIFACT IMAGE... [URL]


def test_command_lists_show_each_summary_whole():
    """A command's summary is its docstring's first line, shown whole in its group's list."""
    for path, group in every_command():
        if not hasattr(group, "commands"):
            continue
        text = help_at_80_columns(path)
        for name, command in group.commands.items():
            summary = command.help.split("\n\n")[0]
            assert "\n" not in summary, (name, summary)
            assert re.search(rf"^  {name} +{re.escape(summary)}$", text, re.MULTILINE), (name, text)


def test_flags_that_are_off_by_default_have_no_off_switch():
    """--force, --json, --with-token-indices: giving the flag turns it on; --no-force would only
    repeat the default."""
    for path, command in every_command():
        for param in command.params:
            if getattr(param, "is_flag", False) and param.default is False:
                assert not param.secondary_opts, (path, param.opts, param.secondary_opts)


STAGE_DONE = r" \.\.\. done in \d+ s"


def test_long_steps_show_their_stages_where_stderr_is_no_terminal(tmp_path):
    """One line as a stage gets under way, a done line after a counted one; the opening stage
    (loading the inputs) has no line, so a mistake in them ends with one line alone."""
    runner = CliRunner()
    data = tmp_path / "shapes"
    made = runner.invoke(app, ["dataset", "shapes", "-o", str(data), "--count", "8"])
    assert made.exit_code == 0, made.output
    generating = re.escape(f"generating 8 images in {data}")
    assert re.fullmatch(rf"{generating} \.\.\.\n{generating}{STAGE_DONE}\n", made.stderr), made.stderr

    evaluated = runner.invoke(app, ["eval", SHIPPED, str(data), "--batch", "4", "--json"])
    assert evaluated.exit_code == 0, evaluated.stderr
    evaluating = re.escape(f"evaluating 8 images in {data}")
    recall = re.escape("object recall: which patches each drop block keeps ...")
    assert re.fullmatch(rf"{evaluating} \.\.\.\n{evaluating}{STAGE_DONE}\n{recall}\n", evaluated.stderr), evaluated.stderr
    # a plain ViT keeps every patch: no object recall stage and no note about it
    plain = runner.invoke(app, ["eval", SHIPPED_PLAIN, str(data), "--batch", "4"])
    assert plain.exit_code == 0, plain.stderr
    assert re.fullmatch(rf"{evaluating} \.\.\.\n{evaluating}{STAGE_DONE}\n", plain.stderr), plain.stderr
    title = " ".join(plain.stdout.split())  # the table title wraps at 80 columns
    assert "keep rate 1.0 (no token dropped), 224 px" in title and "drop blocks" not in title

    refused = runner.invoke(app, ["dataset", "shapes", "-o", str(tmp_path / "other"), "--count", "8", "--img-size", "100"])
    assert refused.exit_code == 2
    assert refused.stderr == "error: --img-size must be a positive multiple of 16, got 100\n"  # no blank line before it


def test_export_shows_its_validation_stage(tmp_path):
    runner = CliRunner()
    data = tmp_path / "held-out"
    assert runner.invoke(app, ["dataset", "shapes", "-o", str(data), "--count", "4", "--img-size", "64"]).exit_code == 0
    exported = runner.invoke(app, [
        "export", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--validate-dir", str(data),
        "-o", str(tmp_path / "m.onnx"), "--json",
    ])
    assert exported.exit_code == 0, exported.stderr
    validating = re.escape("validating on held-out/ (4 images)")
    stages = [line for line in exported.stderr.splitlines() if not line.startswith("warning:")]
    assert stages[:3] == ["exporting ...", "simplifying ...", "validating ..."], exported.stderr
    assert re.fullmatch(rf"{validating} \.\.\.", stages[3]) and re.fullmatch(rf"{validating}{STAGE_DONE}", stages[4]), exported.stderr
    assert stages[5:] == ["writing ..."], exported.stderr
