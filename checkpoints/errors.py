"""The one error type of the checkpoints package."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint xlserve cannot read or write; the message names the file and what was expected."""
