"""The error type the CLI turns into a one-line message, and SIGTERM as an interrupt."""

from __future__ import annotations


class ApmaeError(Exception):
    """An error a user can act on; the CLI prints it as one line and exits non-zero."""


INTERRUPTED = "interrupted: rerun the same command to resume"


def on_sigterm(signum, frame) -> None:
    """The CLI's SIGTERM handler: unwind as after Ctrl-C (locks released, temporary files
    removed, the one line :data:`INTERRUPTED`, exit 130)."""
    raise KeyboardInterrupt()
