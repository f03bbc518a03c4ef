"""Errors a user can act on. The entry points print their message as one line and exit 1
(no traceback): a bad output folder, a resume that cannot match, a diverged run."""
from __future__ import annotations


class TrainError(RuntimeError):
    """A problem with the run's inputs or state that the user can fix; the message says how."""


class TrainingDiverged(TrainError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is left untouched."""
