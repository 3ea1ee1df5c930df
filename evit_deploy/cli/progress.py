"""What a long command is doing, on stderr, for every command in one place.

On a terminal: a spinner with the stage and its elapsed time, or for a counted stage (images
validated, evaluated, generated) a bar with the count and the time left; it disappears when done.
Otherwise (a log, a pipe, CI) one line per stage once it is under way, "validating on heldout/
(400 images) ...", and a done line when a counted stage ends, "... done in 109 s". Under way
means: begun, for a stage after the opening one (which reads the inputs), and its first items
done, for a counted one; so a mistake in the inputs still ends the command with one line.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn
from rich.text import Text

from evit_deploy.cli.app import err_console


class Stages:
    """The stages of one command: `step` starts one (counted when `total` is given), `advance`
    sets how many of its items are done. Library callbacks (on_step, on_progress) take these."""

    def __init__(self, console: Console, progress: Progress | None):
        self._console = console
        self._progress = progress  # None where stderr is not a terminal: lines instead
        self._task = None
        self._text: str | None = None
        self._total: int | None = None
        self._done = 0
        self._started = 0.0

    def step(self, text: str, total: int | None = None) -> None:
        self.end()
        opening = self._text is None
        self._text, self._total, self._done, self._started = text, total, 0, time.monotonic()
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(escape(text), total=total)
        elif total is None and not opening:
            self._log(f"{text} ...")

    def advance(self, done: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done)
        elif self._total is not None and self._done == 0 and done > 0:
            self._log(f"{self._text} ...")
        self._done = done

    def end(self) -> None:
        """The current stage is over: its done line, for a counted stage where lines are shown."""
        if self._progress is None and self._total is not None and self._done > 0:
            self._log(f"{self._text} ... done in {time.monotonic() - self._started:.0f} s")
        self._total = None

    def _log(self, line: str) -> None:
        self._console.print(escape(line), highlight=False, soft_wrap=True)


class _Bar(BarColumn):
    """A counted stage's bar; nothing for the others."""

    def render(self, task: Task):
        return super().render(task) if task.total is not None else Text("")


class _Count(ProgressColumn):
    """A counted stage's count and time left; the elapsed time of the others."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text(f"{task.elapsed or 0:.0f} s", style="progress.elapsed")
        left = task.time_remaining
        eta = f", {left:.0f} s left" if left is not None else ""
        return Text(f"{task.completed:.0f}/{task.total:.0f}{eta}", style="progress.remaining")


@contextmanager
def stages(text: str, total: int | None = None, console: Console = err_console):
    """Show a command's stages while the block runs, the opening one named `text`."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), _Bar(), _Count())
    progress = Progress(*columns, console=console, transient=True) if console.is_terminal else None
    with progress or nullcontext():
        shown = Stages(console, progress)
        shown.step(text, total)
        yield shown
        shown.end()
