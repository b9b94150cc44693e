"""Errors a user can act on. The CLI turns them into one line on stderr and a non-zero exit."""

from __future__ import annotations


class RunnerError(Exception):
    """An expected failure (bad input, missing model, ...). The message says what and how to fix it."""

    exit_code = 1


class NonFiniteEmbedding(RunnerError):
    """A model produced NaN/Inf; the job is aborted and nothing non-finite is written."""

    exit_code = 3


class NothingEmbedded(RunnerError):
    """Every record read was rejected: the job ran, but produced no embedding (rejects.arrow says why)."""

    exit_code = 5


class CheckpointError(RunnerError):
    """A checkpoint is missing, unreadable or does not match the architecture it claims."""


def first_line(error: BaseException) -> str:
    """An exception's message as one line for a user-facing message (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
