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


def hub_reachable(timeout_s: float = 5.0) -> str:
    """"" when a TCP connection to the hub's endpoint opens within `timeout_s`, else why not. Checked before a
    download because huggingface_hub retries an unreachable hub for ~30 s before it gives up."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError as exc:
        return f"cannot reach {constants.ENDPOINT} ({first_line(exc)})"
    return ""


def fetch_file(repo_id: str, filename: str, error: type[ValueError]) -> Path:
    """A file of a hub repository: from the Hugging Face cache, else downloaded (into the cache). One-line `error`
    at once when it is not cached and the hub is offline or unreachable, or the download fails."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    what = f"'{filename}' of hub repo '{repo_id}'"
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    why = "HF_HUB_OFFLINE is set" if hub_offline() else hub_reachable()
    if why:
        raise error(f"{what} is not in the Hugging Face cache and {why}; download it where the hub is reachable "
                    f"and give its local path")
    try:
        return Path(hf_hub_download(repo_id, filename))
    except (OSError, ValueError) as exc:
        raise error(f"cannot download {what}: {first_line(exc)}") from None
