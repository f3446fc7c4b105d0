"""Where a base model comes from: a local folder, or a Hub repo checked once, quickly, before loading.

transformers fetches a Hub base file by file, and the Hub client retries each request with back-off: an
unreachable Hub or a typo in an id costs minutes and screens of retries before the error. One metadata
request with a short timeout answers first, in one line that names the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from zoo.errors import ZooError

PathLike = str | os.PathLike

#: Seconds the one check may take (the client's own retries would take 1 + 2 + 4 + 8 + 8 per file).
PROBE_TIMEOUT_S = 5.0


def looks_like_path(text: str) -> bool:
    """'./x', '../x', '/x', '~/x', 'a/b/c', 'C:\\x': meant as a folder (a Hub id is NAME or ORG/NAME)."""
    return text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in text or text.count("/") > 1 or text in (".", "..")


def check_base(base: PathLike, *, revision: str | None = None) -> None:
    """Raise a one-line `ZooError` unless `base` is an existing folder, or a Hub repo that answers (or the
    client is offline: transformers then reads its cache and says what is missing)."""
    text = os.fspath(base)
    path = Path(text)
    if path.is_dir():
        return
    if path.exists():
        raise ZooError(f"base model {text!r} is a file, not a folder", "pass the folder holding config.json, or a Hub repo id")
    if looks_like_path(text):
        raise ZooError(f"folder {text!r} does not exist", "check the path (a typo?), or pass a Hub repo id such as org/name")
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    if constants.HF_HUB_OFFLINE:
        return
    try:
        HfApi().model_info(text, revision=revision, timeout=PROBE_TIMEOUT_S)
    except HFValidationError:
        raise ZooError(f"base model {text!r} is neither a folder nor a Hub repo id", "pass a local folder, or a Hub id such as org/name") from None
    except GatedRepoError:
        raise ZooError(f"base model {text!r} is gated on the Hub", "accept its terms on the Hub and log in (`hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ZooError(f"base model {text!r} has no revision {revision!r} on the Hub", "check the branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise ZooError(
            f"no model {text!r} on the Hub ({constants.ENDPOINT})",
            "check the id (a typo?), log in for a private repo (`hf auth login` or HF_TOKEN), or pass a local folder",
        ) from None
    except HfHubHTTPError as e:
        raise ZooError(f"the Hub ({constants.ENDPOINT}) answered {_status(e)} for base model {text!r}", "retry later, or pass a local folder") from None
    except Exception as e:  # the transport's own errors (no network, DNS, timeout): the client's classes vary by version
        if not isinstance(e, OSError) and not type(e).__module__.startswith(("httpx", "httpcore")):
            raise
        raise ZooError(f"cannot reach the Hub ({constants.ENDPOINT}) for base model {text!r}: {type(e).__name__}", _offline_hint(text, revision)) from None


def _status(error: Exception) -> str:
    response = getattr(error, "response", None)
    return str(getattr(response, "status_code", "an error"))


def _offline_hint(repo_id: str, revision: str | None) -> str:
    """Offline with the base in the cache: say how to use it; else how to get a folder."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return "it is in your cache: set HF_HUB_OFFLINE=1 to use it without the network"
    return "check the network or HF_ENDPOINT, or pass a local folder (`hf download` it where the Hub is reachable)"
