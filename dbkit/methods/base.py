"""What a training method is: the interface every module in dbkit/methods/ fills in.

A method decides four things and nothing else: which params it refuses (at params load),
what trains (adapters through peft, or the weights themselves), how the result is written
(the files users load elsewhere) and how it is loaded back for inference. The training loop,
the metrics and the reports do not know which method ran.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


class ParamsProblem(ValueError):
    """A method refuses its params; config names the file and the key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class Method:
    """A training method. Subclasses set `name` and override what differs."""

    name = ""
    adapter = True  # trains adapters beside frozen weights (False: the weights themselves)

    def adapt_defaults(self, params: dict, default_unet_targets: list[str]) -> str | None:
        """Change base.yaml's defaults this method cannot use; returns a warning, or None."""
        return None

    def check(self, params: dict) -> None:
        """Raise ParamsProblem for params this method cannot train or save."""

    def apply(self, parts: Any, p: dict) -> None:
        """Make what trains trainable (everything is frozen when this is called)."""
        raise NotImplementedError

    def save(self, out: Path, modules: dict, meta: dict, pipeline: Callable[[], Any]) -> None:
        """Write the result into the folder `out` (`pipeline()` builds the full pipeline)."""
        raise NotImplementedError

    def load(self, pipe: Any, out: Path, weight_name: str, scale: float) -> None:
        """Load the result written by `save` into `pipe` (nothing for a full pipeline)."""
