"""Shipped recipes: YAML files in this folder (also reachable as `recipes/` in the repo)."""

from __future__ import annotations

from pathlib import Path

import yaml

FOLDER = Path(__file__).parent


def shipped() -> dict[str, Path]:
    return {p.stem: p for p in sorted(FOLDER.glob("*.yaml"))}


def describe(path: Path) -> str:
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return str(raw.get("description", "")).strip().splitlines()[0] if raw.get("description") else ""


def find_recipe(name_or_path: str | Path) -> Path:
    """A path as given if it exists, else a shipped recipe by name (with or without .yaml)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    by_name = shipped()
    if path.stem in by_name and path.parent in (Path("."), Path("recipes")):
        return by_name[path.stem]
    return path  # load_recipe reports the missing file
