"""The embedded toy world: scenes, subjects, the shipped base model and the oracle.

`base_model_path()` is where the pretrained toy Stable Diffusion pipeline ships inside
the package; params say `base.model: toyworld` to use it.
"""

from __future__ import annotations

from pathlib import Path

BASE_DIR = Path(__file__).parent / "base"


def base_model_path() -> Path:
    """The shipped toy base model (diffusers format). Raises with a fix if it is missing."""
    if not (BASE_DIR / "model_index.json").exists():
        raise FileNotFoundError(
            f"the toy base model is missing from {BASE_DIR}; rebuild it with "
            "`dbkit pretrain-toyworld --out dbkit/toyworld/base` (see dbkit/toyworld/base/README.md)"
        )
    return BASE_DIR
