"""Where pretrained weights come from (a local directory or a Hugging Face hub id), and the one-line errors
that the text encoders and codecs raise when they cannot be found. A missing model must never surface as the
traceback of a hub download attempt."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SAVED_DIR = "a directory written by save_pretrained"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


@dataclass(frozen=True)
class Source:
    location: str  # what from_pretrained gets
    local: bool

    @property
    def local_files_only(self) -> bool:
        return self.local or hub_offline()


def locate(name: str, what: str, error: type[ValueError], alternatives: str) -> Source:
    """A local path when `name` is one (it must then be a saved model), else a hub id.
    `what` names the thing in messages ("text encoder"); `alternatives` ends them ("or 'pixel'")."""
    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise error(f"{what} path '{name}' has no config.json; give {SAVED_DIR}, a hub id, {alternatives}")
    if path.exists():
        return Source(str(path), local=True)
    if name.startswith((".", "/", "~")):
        raise error(f"{what} path '{name}' does not exist; give {SAVED_DIR}, a hub id, {alternatives}")
    return Source(name, local=False)


def load_failure(what: str, name: str, source: Source, exc: BaseException, alternatives: str) -> str:
    """The one-line message for a failed from_pretrained."""
    if source.local:
        return f"cannot load {what} from local path '{name}': {first_line(exc)}"
    offline = " (HF_HUB_OFFLINE is set)" if hub_offline() else ""
    return (f"cannot load {what} '{name}': not a local path and not in the Hugging Face cache{offline}; give "
            f"{SAVED_DIR}, allow network access to the hub, {alternatives}")
