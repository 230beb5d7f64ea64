"""Whether a model hub can be reached: asked before anything would wait on one, so a hub id or
a hub corpus fails at once, with the offline alternatives, when there is none."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse


def reachable(timeout: float = 3.0) -> bool:
    """True when a model hub answers; `HF_HUB_OFFLINE=1` means no without trying."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def push(folder: Path, repo_id: str) -> str:
    """Upload a checkpoint folder to the hub repo `repo_id` (created if needed); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="shrink checkpoint")
    return f"https://huggingface.co/{repo_id}"
