"""Ctrl-C and SIGTERM stop a command even when a library catches the KeyboardInterrupt.

The CLI's signal handler records the request before it raises, because a KeyboardInterrupt does
not always reach the CLI: one that lands in torch's lazy imports inside torch.export leaves a
module half-imported, and the exporter then reports an unrelated AttributeError, or moves on to
its next capture strategy and finishes. A recorded request is therefore checked again where it
matters: atomic_output never renames its file after one, and the CLI exits 130 whatever the
command did next. Library users who install no handler are unaffected.
"""

from __future__ import annotations

import signal

_requested = False


def install() -> None:
    """SIGTERM, and SIGINT unless it is ignored (a shell's background job), raise KeyboardInterrupt
    through `stop`."""
    signal.signal(signal.SIGTERM, stop)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, stop)


def stop(signum, frame) -> None:
    global _requested
    _requested = True
    raise KeyboardInterrupt


def requested() -> bool:
    return _requested


def check() -> None:
    """Raise KeyboardInterrupt if a stop was requested, whether or not its exception got through."""
    if _requested:
        raise KeyboardInterrupt


def handled() -> None:
    """The command has acted on the request (serve shuts down gracefully): not a stop any more."""
    global _requested
    _requested = False
