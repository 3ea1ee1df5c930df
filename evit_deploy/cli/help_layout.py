"""How `--help` names parameters, for every command in one place: positionals in capitals, as
in the usage line (ARTIFACT, IMAGE..., [URL]), values by a metavar (PATH, INTEGER) and flags by
their names alone. Typer's own labels are `<path>`, `<list[Path]>` and `{artifact}`."""

from __future__ import annotations

from typer.core import TyperArgument, TyperCommand

# Typer's type labels as click-style metavars.
_METAVARS = {"<int>": "INTEGER", "<float>": "FLOAT", "<str>": "TEXT", "<path>": "PATH"}


class _Positional(TyperArgument):
    """A positional argument shown by its metavar alone, in the usage line as in the help."""

    def display_type_rich(self, ctx) -> None:
        return None

    def get_usage_pieces(self, ctx) -> list[str]:
        return [self.metavar if self.required else f"[{self.metavar}]"]


class HelpCommand(TyperCommand):
    """A command whose parameters are named as above (metavars given in the command win)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if isinstance(param, TyperArgument):
                if param.metavar is None:
                    param.metavar = param.name.upper() + ("..." if param.nargs != 1 else "")
                param.__class__ = _Positional
            elif param.metavar is None and not param.is_flag:
                label = param.display_type(ctx)
                param.metavar = _METAVARS.get(label, label.strip("<>").upper())
        return params
