"""Where a base model comes from: a local folder, or a Hub repo checked once, quickly, before loading;
its tokenizer, whose absence is one line too; and transformers' load report, cut to the line that matters.

transformers fetches a Hub base file by file, and the Hub client retries each request with back-off: an
unreachable Hub or a typo in an id costs minutes and screens of retries before the error. One metadata
request with a short timeout answers first, in one line that names the fix.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    except Exception as e:
        if not _unreachable(e):
            raise
        raise ZooError(f"cannot reach the Hub ({constants.ENDPOINT}) for base model {text!r}: {type(e).__name__}", _offline_hint(text, revision)) from None


def _unreachable(error: Exception) -> bool:
    """The transport's own errors (no network, DNS, timeout): the client's classes vary by version."""
    return isinstance(error, OSError) or type(error).__module__.startswith(("httpx", "httpcore"))


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


def load_tokenizer(base: PathLike, *, trust_remote_code: bool = False) -> Any:
    """The base's tokenizer (`AutoTokenizer`), or a one-line `ZooError` when the base has none that loads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:  # no tokenizer files; a vocabulary whose converter is not installed
        folder = Path(base)
        files = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if folder.is_dir() and not any(n.startswith(("tokenizer", "vocab", "spiece", "sentencepiece", "merges")) for n in files):
            why = "the folder has no tokenizer files"
        raise ZooError(
            f"cannot load the tokenizer of base model {os.fspath(base)!r}: {why}",
            "put them beside its config.json (tokenizer.json, or tokenizer_config.json and its vocabulary): tokenizer.save_pretrained(FOLDER)",
        ) from None


#: What transformers' LOAD REPORT table says of a weight (one row per weight or group of layers).
_STATUS_WORDS = {"MISSING": "not in the checkpoint, initialised at random", "MISMATCH": "of another shape in the checkpoint"}


@contextmanager
def load_report(base: PathLike, *, supplied: Iterable[str] = ()) -> Iterator[list[str]]:
    """Turn transformers' LOAD REPORT (a table of every weight the checkpoint lacks, leaves unused or shapes
    otherwise: 50 lines when a head is swapped) into one warning naming the weights that matter: those left
    at random or mismatched, except under `supplied` modules (an adapter's saved `modules_to_save`). Unused
    checkpoint weights (a head the class does not have) do not matter. When loading fails, nothing is
    printed: the yielded list then holds the summary, for the error to say."""
    reports: list[str] = []
    summaries: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" not in str(record.msg):
            return True
        reports.append(record.getMessage())
        return False

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(keep)
    try:
        yield summaries
    finally:
        logger.removeFilter(keep)
        summaries += [s for s in (_report_summary(r, tuple(supplied)) for r in reports) if s]
    for summary in summaries:
        warnings.warn(f"{summary} (transformers' load report of {os.fspath(base)!r})", stacklevel=3)


def _report_summary(report: str, supplied: tuple[str, ...]) -> str:
    report = re.sub(r"\x1b\[[0-9;]*m", "", report)
    rows: dict[str, list[str]] = {status: [] for status in _STATUS_WORDS}
    for line in report.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) >= 2 and cells[1] in rows and not any(cells[0] == m or cells[0].startswith(m + ".") or f".{m}." in cells[0] for m in supplied):
            rows[cells[1]].append(cells[0])
    found = "; ".join(
        f"{len(keys)} weight{'s' if len(keys) > 1 else ''} {_STATUS_WORDS[status]} ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})"
        for status, keys in rows.items() if keys
    )
    model = re.search(r"(\w+) LOAD REPORT", report)
    return f"{model.group(1) if model else 'the model'}: {found}" if found else ""
