"""Whether the Hugging Face hub can be reached: asked once, quickly, before anything would retry for a minute."""

from __future__ import annotations

import os


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within `timeout` seconds; False in offline mode (`HF_HUB_OFFLINE`)."""
    from huggingface_hub import constants, get_session

    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 - any failure to connect means unreachable
        return False
    return True
