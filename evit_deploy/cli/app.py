"""The typer app and what every command shares: one-line errors and exit codes, Ctrl-C, the
consoles, and the entry point.

User mistakes come back as EvitDeployError and are printed as one line (exit 2 for usage, 1 for
runtime failures); so are the argument parser's (main). Tracebacks only with --debug.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings

import typer
from rich.console import Console
from rich.markup import escape

from evit_deploy import interrupt
from evit_deploy.cli.help_layout import HelpCommand
from evit_deploy.version import __version__
from evit_deploy.errors import EvitDeployError

app = typer.Typer(
    add_completion=False,
    # click's layout: at 80 columns rich's panels leave the help a third of the width and cut
    # long option names; this one gives long names their own line.
    rich_markup_mode=None,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Export, validate, build and benchmark EViT token-pruned vision transformers.",
)
# Piped output (CI logs, files) gets room for the tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True)
_debug = False


def _version(value: bool) -> None:
    if value:
        console.print(f"evit-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    global _debug
    _debug = debug


def command(*args, group: typer.Typer = app, **kwargs):
    """group.command() (app's by default) that turns errors into one line on stderr and an exit code (no traceback
    unless --debug): EvitDeployError -> its exit code, Ctrl-C/kill -> 130, a bug -> 1. A stop that was
    requested is 130 whatever the command did next (interrupt.py: libraries can swallow it)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*fn_args, **fn_kwargs):
            try:
                return _recorded_stop_as_interrupt(fn, *fn_args, **fn_kwargs)
            except typer.Exit:
                raise
            except BrokenPipeError:
                # The client converts its socket errors, so a closed pipe here is stdout's.
                raise typer.Exit(_closed_stdout()) from None
            except KeyboardInterrupt:
                err_console.print("interrupted: no partial output was left behind")
                raise typer.Exit(130) from None
            except EvitDeployError as exc:
                if _debug:
                    raise
                err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
                raise typer.Exit(exc.exit_code) from None
            except Exception as exc:
                if _debug:
                    raise
                err_console.print(
                    f"[red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} (rerun with --debug "
                    "for the traceback, and please report it)",
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(1) from None

        return group.command(*args, cls=HelpCommand, **kwargs)(wrapper)

    return decorate


def _recorded_stop_as_interrupt(fn, *args, **kwargs):
    """A stop the signal handler recorded ends the command as interrupted, whatever it did after
    a library caught the KeyboardInterrupt: finished, failed or exited (interrupt.py)."""
    try:
        result = _memory_error_as_user_error(fn, *args, **kwargs)
    except BaseException:
        if interrupt.requested():
            raise KeyboardInterrupt from None
        raise
    interrupt.check()
    return result


def _memory_error_as_user_error(fn, *args, **kwargs):
    """Running out of memory means a batch or input too big for this machine: the user's to fix."""
    try:
        return fn(*args, **kwargs)
    except (MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        text = str(exc).strip()
        # PyTorch's CPU message starts with the C++ check that failed: keep what it says.
        text = text[text.find(CPU_ALLOCATOR) :] if CPU_ALLOCATOR in text else text
        reason = text.splitlines()[0] if text else "no details"
        raise EvitDeployError(
            f"out of memory ({reason}); use a smaller batch or input size"
        ) from exc


CPU_ALLOCATOR = "DefaultCPUAllocator"


def _is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError (numpy), CUDA's out-of-memory error where torch is loaded (not imported for
    it), and PyTorch's CPU allocator failing, which raises a plain RuntimeError."""
    torch = sys.modules.get("torch")
    return (
        isinstance(exc, MemoryError)
        or (torch is not None and isinstance(exc, torch.OutOfMemoryError))
        or CPU_ALLOCATOR in str(exc)
    )


def _closed_stdout() -> int:
    """A reader that stops early (`| head -1`) is normal in a shell: no message, and the status
    standard tools get from SIGPIPE (141). Later writes and the final flush go to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    interrupt.install()  # kill -> the same clean-up as Ctrl-C
    warnings.showwarning = _show_warning
    # Decoders' own notes on a damaged image or checkpoint: the one error line says it already.
    logging.getLogger("PIL").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"PIL\.")
    warnings.filterwarnings("ignore", message="Detected pickle protocol", module=r"torch\.")
    try:
        code = app(standalone_mode=False)
    except _PARSER_ERROR as exc:
        code = exc.exit_code
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            err_console.print(f"[red]error:[/] {escape(_parser_error_line(exc))}", highlight=False, soft_wrap=True)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = _closed_stdout()
    sys.exit(code)


# click's UsageError (unknown option, missing or extra argument, bad value), found through the
# public typer.BadParameter, as typer bundles its own click.
_PARSER_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _parser_error_line(exc) -> str:
    """The parser's message in one line, and where the options are listed."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    return f"{message} (see {ctx.command_path} --help)" if ctx is not None else message
