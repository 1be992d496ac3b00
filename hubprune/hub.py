"""Publish a pruned folder to the Hugging Face Hub in one commit (a folder of many GB: resumably).

The repository is created when needed; weights, config, tokenizer, card, recipe, record
and plots go up in ONE commit (optionally as a pull request). A folder of at least
``LARGE_FOLDER`` bytes goes up through ``HfApi.upload_folder`` instead: with ``hf_xet``
installed (a huggingface_hub dependency) that is huggingface_hub 2.x's streamed upload, which
commits in batches and resumes when run again (committed files are skipped, uploaded chunks
deduplicated; 2.x has no ``upload_large_folder``); the card follows in one last commit, on the
same pull request where one is asked for. A README the user edited
in the folder is kept unless ``replace_readme``; otherwise the card is rendered fresh
for the target repo id. Transient errors (5xx, dropped connections) are retried with
back-off; nothing in the local folder is changed; the token is never printed or logged.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from hubprune.card import CARD_FILE, readme_was_edited, render_card
from hubprune.record import RECORD_FILE

logger = logging.getLogger(__name__)

_SKIP = (".", "__pycache__")  # hidden files and folders (temporary, checkpoints) stay local
_SKIP_PATTERNS = [f"{where}{start}*" for where in ("", "*/") for start in _SKIP]  # the same, as upload_folder globs
LARGE_FOLDER = 5 * 2**30  # bytes; a folder this large is pushed resumably, in several commits


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    replace_readme: bool = False,
    repo_type: str = "model",
    retries: int = 4,
    large_folder: int = LARGE_FOLDER,
):
    """Create ``repo_id`` if needed and upload ``folder`` in one commit; returns the ``CommitInfo``.

    A folder of ``large_folder`` bytes or more is uploaded resumably in several commits, then its
    card (see the module docstring); the ``CommitInfo`` is then the card's, or the pull request's.

    Example: ``push_folder("out/smollm2-24l", "me/smollm2-24l", private=True)``
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give a folder written by hubprune prune or heal")
    if repo_type == "model" and not (folder / RECORD_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {RECORD_FILE}: push folders written by hubprune prune or heal")
    check_repo_id(repo_id)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder)))
    operations = [
        CommitOperationAdd(str(p.relative_to(folder)), str(p))
        for p in files
        if p.name != CARD_FILE or p.parent != folder
    ]
    readme = folder / CARD_FILE
    card = None
    if repo_type != "model" or (readme.is_file() and readme_was_edited(folder) and not replace_readme):
        if readme.is_file():
            card = CommitOperationAdd(CARD_FILE, str(readme))
            logger.info("keeping the README.md in %s as it is (it differs from the generated card)", folder)
    else:
        card = CommitOperationAdd(CARD_FILE, str(render_card(folder, repo_id)).encode())

    api = HfApi(token=token)
    message = commit_message or f"Upload {repo_id.rsplit('/', 1)[-1]} (pruned with hubprune)"
    size = sum(p.stat().st_size for p in files)
    if size >= large_folder:
        return _push_large(api, folder, repo_id, card, message, size, private, create_pr, repo_type, retries)
    operations += [card] if card is not None else []

    def push():
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=message, repo_type=repo_type, create_pr=create_pr)

    info = with_retries(push, retries, f"hubprune push {folder} {repo_id}")
    logger.info("pushed %d files to %s in one commit: %s", len(operations), repo_id, info.commit_url)
    return info


def _push_large(
    api, folder: Path, repo_id: str, card, message: str, size: int, private, create_pr, repo_type, retries
):
    """``upload_folder`` for everything but the card (resumable in several commits with hf_xet; one commit
    without it), then the card in one commit, on the same pull request where one was asked for."""
    again = f"hubprune push {folder} {repo_id}"
    logger.info("%s holds %.1f GB: uploading it resumably, in several commits where needed", folder, size / 1e9)

    def push():
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type=repo_type,
            commit_message=message,
            create_pr=create_pr,
            ignore_patterns=[*_SKIP_PATTERNS, CARD_FILE],
        )

    info = with_retries(push, retries, again)
    if card is None:
        return info
    revision = info.pr_revision if create_pr else None  # None also when no file changed: no PR was opened

    def push_card():
        return api.create_commit(
            repo_id,
            [card],
            commit_message=f"{message}: model card",
            repo_type=repo_type,
            revision=revision,
            create_pr=create_pr and revision is None,
        )

    card_info = with_retries(push_card, retries, again)
    info = info if info.pr_url else card_info
    logger.info("pushed %s to %s: %s", folder, repo_id, info.pr_url or info.commit_url)
    return info


def with_retries(call, retries: int, again: str):
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(retries + 1):
        try:
            return call()
        except HfHubHTTPError as err:
            status = err.response.status_code if err.response is not None else None
            if status == 401:
                raise PermissionError(
                    "the Hub refused the token (401): pass a valid write token with --token or "
                    "HF_TOKEN, or log in with `hf auth login`"
                ) from None
            if status == 403:
                raise PermissionError(
                    f"this token may not write there (403): {_server_message(err)}; "
                    "push to your own namespace or an organisation you belong to"
                ) from None
            if status is not None and status < 500 and status != 429:
                raise ValueError(f"the Hub refused the push ({status}): {_server_message(err)}") from None
            failure = f"HTTP {status}"
        except _transport_errors() as err:
            failure = type(err).__name__
        if attempt == retries:
            raise ConnectionError(
                f"the push failed after {retries + 1} attempts ({failure}); the local folder "
                f"is unchanged: run `{again}` again"
            ) from None
        delay = min(2**attempt, 30)
        logger.warning("push attempt %d failed (%s); retrying in %d s", attempt + 1, failure, delay)
        time.sleep(delay)


def _transport_errors() -> tuple[type[BaseException], ...]:
    # Dropped connections and time-outs, from the stdlib and the HTTP client huggingface_hub uses.
    import importlib

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            errors.append(
                getattr(importlib.import_module(module), "TransportError" if "httpx" in module else "ConnectionError")
            )
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _server_message(err) -> str:
    message = getattr(err, "server_message", None) or str(err).splitlines()[0]
    return message.strip()


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{repo_id!r} is not a valid repo id (expected 'user/name'): {err}") from None
    if "/" not in repo_id:
        raise ValueError(f"{repo_id!r} has no namespace; use 'user/name' or 'org/name'")


def _hidden(relative: Path) -> bool:
    return any(part.startswith(_SKIP) for part in relative.parts)
