"""Built-in recipes: the TOML configs shipped inside the package (tim_ray/configs, the repository's configs/ folder;
pyproject.toml puts them in the wheel), named by their path there without `.toml` ("quickstart",
"experiments/fmnist_tim", "c2i_xl2_256"). A recipe's first comment line is its description. Tune search spaces live
in the same folder but are not recipes: their tables are config keys, not config sections.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

RECIPES_DIR = Path(__file__).parent / "configs"


def _is_recipe(path: Path) -> bool:
    try:
        tree = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return all(isinstance(body, dict) and not any(isinstance(v, dict) for v in body.values())
               for body in tree.values())


def recipes() -> dict[str, Path]:
    """{name: file} of every built-in recipe, sorted by name."""
    found = {p.relative_to(RECIPES_DIR).with_suffix("").as_posix(): p for p in RECIPES_DIR.rglob("*.toml")}
    return {name: path for name, path in sorted(found.items()) if _is_recipe(path)}


def description(path: Path) -> str:
    """The recipe's first comment line."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def find(name: str) -> Path | None:
    """The file of the built-in recipe `name`, if there is one."""
    return recipes().get(name.removesuffix(".toml"))
