"""Hub access without a network: fail (or use the local cache) at once instead of a minute of retries.

huggingface_hub retries a failed connection five times with backoff (about a minute, a warning line
each time) for every file it fetches. When the hub's host name does not even resolve, no retry can
succeed: deltafit then switches the hub libraries to their offline mode, as HF_HUB_OFFLINE=1 would.
A model or dataset in the local hub cache still loads; one that is not fails at once, and deltafit's
error says why.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


def offline_if_unreachable() -> bool:
    """Before a hub lookup: True when the hub libraries are (now) in offline mode."""
    import huggingface_hub.constants as constants

    if constants.HF_HUB_OFFLINE:
        return True
    if _resolves(urlparse(constants.ENDPOINT).hostname or ""):
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"  # for child processes (compare, launchers)
    constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub and transformers
    try:
        import datasets.config  # keeps its own copy, read when it loads a dataset
    except ImportError:
        return True
    datasets.config.HF_HUB_OFFLINE = True
    return True


@functools.lru_cache(maxsize=None)
def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):  # socket.gaierror is an OSError
        return False
    return True
