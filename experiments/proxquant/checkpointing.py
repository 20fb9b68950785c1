"""Orbax checkpoints of a training phase, so that long runs resume where they stopped.

Each phase (warm start, one quantization method, ...) keeps its own directory; a checkpoint holds
the train state and the phase's history (a JSON-able dict), saved at the end of every epoch.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

__all__ = ["PhaseCheckpoints"]


@contextlib.contextmanager
def _quiet():
    """Silence orbax's per-save INFO lines (they would drown the training log)."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


class PhaseCheckpoints:
    """Save and restore (state, history) of one training phase under `directory`, by epoch."""

    def __init__(self, directory: str, *, max_to_keep: int = 1):
        self.directory = os.path.abspath(directory)
        with _quiet():
            self.manager = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
            )

    def latest_epoch(self) -> int | None:
        """The last saved epoch, or None when the phase has not saved yet."""
        return self.manager.latest_step()

    def save(self, epoch: int, state: Any, history: dict) -> None:
        """Save the state after `epoch` (blocking, so a kill right after loses nothing)."""
        with _quiet():
            self.manager.save(
                epoch,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)
                ),
            )
            self.manager.wait_until_finished()

    def restore(self, like: Any) -> tuple[Any, dict, int]:
        """The latest (state, history, epoch); `like` gives the state's structure and dtypes."""
        epoch = self.manager.latest_step()
        if epoch is None:
            raise ValueError(f"no checkpoint in {self.directory}")
        with _quiet():
            restored = self.manager.restore(
                epoch,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(like), history=ocp.args.JsonRestore()
                ),
            )
        return restored.state, dict(restored.history), epoch


def write_json(path: str, value: Any) -> None:
    """Write `value` as indented JSON (the experiments' results.json)."""
    with open(path, "w") as file:
        json.dump(value, file, indent=2)
