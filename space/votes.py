"""The A/B vote log: one JSON object per line, appended, never rewritten.

Each line: ``{"time", "prompt", "models" (in displayed order), "vote" ("A", "B" or "tie"),
"blind", "sampling"}``. Where it goes: the app's ``votes_path``, ``$HUBPRUNE_VOTES``, or
``votes.jsonl`` in hubprune's cache folder.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger(__name__)

VOTES = ("A", "B", "tie")
_LOCK = threading.Lock()


def default_votes_path() -> Path:
    """``$HUBPRUNE_VOTES``, else ``votes.jsonl`` in ``$HUBPRUNE_CACHE`` / ``~/.cache/hubprune``."""
    if os.environ.get("HUBPRUNE_VOTES"):
        return Path(os.environ["HUBPRUNE_VOTES"]).expanduser()
    from hubprune.loading import cache_dir

    return cache_dir() / "votes.jsonl"


def append_vote(
    path: str | os.PathLike, *, prompt: str, models: list[str], vote: str, sampling: dict, blind: bool
) -> dict:
    """Append one vote to the JSONL file at ``path`` (its folder is created); returns the line written.

    Example: ``append_vote("votes.jsonl", prompt="Hi", models=["a", "b"], vote="A", sampling={}, blind=True)``
    """
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {', '.join(VOTES)}, got {vote!r}")
    line = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "prompt": prompt,
        "models": list(models),
        "vote": vote,
        "blind": blind,
        "sampling": dict(sampling),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _LOCK, path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line, ensure_ascii=True) + "\n")  # U+2028, U+0085 ... escaped: one record, one line
    logger.info("vote %s for %s appended to %s", vote, models, path)
    return line
