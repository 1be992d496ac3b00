"""Publish the comparison app as a Hugging Face Space (Gradio SDK) in one commit.

The Space gets this folder's app files, a README whose ``models:`` list names the models to
compare (the app reads it back), ``requirements.txt``, and a copy of the ``hubprune`` package
source (so ``python app.py`` imports it without hubprune being on a package index)::

    push_space("me/smollm2-compare", ["HuggingFaceTB/SmolLM2-135M-Instruct", "me/smollm2-24l"])
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
APP_FILES = ("app.py", "backends.py", "figures.py", "votes.py", "requirements.txt")
_PACKAGE_SKIP = {"space", "server", "__pycache__"}  # the app files sit at the Space's top level instead


def space_operations(models: list[str]) -> list:
    """The ``CommitOperationAdd`` list of a Space comparing ``models`` (Hub ids)."""
    from huggingface_hub import CommitOperationAdd, SpaceCard

    missing = [name for name in ("README.md", *APP_FILES) if not (HERE / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"this hubprune install lacks {', '.join(missing)} in {HERE}; install hubprune from "
            "its repository (pip install -e .) to push a Space"
        )
    card = SpaceCard.load(HERE / "README.md")
    card.data.models = list(models)
    operations = [CommitOperationAdd("README.md", str(card).encode())]
    operations += [CommitOperationAdd(name, str(HERE / name)) for name in APP_FILES]
    for path_in_repo, path in _package_files():
        operations.append(CommitOperationAdd(path_in_repo, str(path)))
    return operations


def push_space(
    repo_id: str,
    models: list[str],
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    retries: int = 4,
):
    """Create (or update) the Space ``repo_id`` comparing ``models``; returns the ``CommitInfo``. Never logs the token.

    Example: ``push_space("me/smollm2-compare", ["HuggingFaceTB/SmolLM2-135M-Instruct", "me/smollm2-24l"])``
    """
    from huggingface_hub import HfApi

    from hubprune.hub import check_repo_id, with_retries

    check_repo_id(repo_id)
    models = check_space_models(models)
    operations = space_operations(models)
    api = HfApi(token=token)
    message = commit_message or f"hubprune compare: {' vs '.join(models)}"

    def push():
        api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=message, repo_type="space")

    info = with_retries(push, retries, f"hubprune space push {repo_id}")
    logger.info("pushed %d files to the Space %s in one commit: %s", len(operations), repo_id, info.commit_url)
    return info


def check_space_models(models: list[str]) -> list[str]:
    """Two or more distinct Hub ids (a Space cannot read folders on this machine)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    models = [m.strip() for item in models for m in item.split(",") if m.strip()]
    if len(models) < 2:
        raise ValueError(
            f"a comparison Space needs two or more models, got {len(models)}: pass --models ORIGINAL PRUNED"
        )
    if len(set(models)) != len(models):
        raise ValueError(f"--models names a model twice: {models}")
    for model in models:
        local = Path(model).expanduser().exists()
        try:
            validate_repo_id(model)
        except HFValidationError:
            local = True
        if local or model.count("/") != 1:
            raise ValueError(
                f"{model!r} is not a Hub id (org/name); a Space loads models from the Hub, so push a "
                "pruned folder first with `hubprune push FOLDER user/name` and give that id"
            )
    return models


def _package_files() -> list[tuple[str, Path]]:
    """(path in the Space, local file) for the hubprune package source and its card templates."""
    spec, cards_spec = importlib.util.find_spec("hubprune"), importlib.util.find_spec("hubprune.cards")
    if spec is None or spec.origin is None or cards_spec is None or not cards_spec.submodule_search_locations:
        raise ModuleNotFoundError("hubprune and its cards must be installed to push a Space: pip install hubprune")
    package = Path(spec.origin).parent
    files = {
        f"hubprune/{p.relative_to(package).as_posix()}": p
        for p in package.rglob("*.py")
        if not _PACKAGE_SKIP & set(p.relative_to(package).parts)
    }
    cards = Path(next(iter(cards_spec.submodule_search_locations)))
    for path in cards.iterdir():  # an editable install keeps cards/ outside the package folder
        if path.is_file() and path.suffix in (".py", ".j2"):
            files[f"hubprune/cards/{path.name}"] = path
    return sorted(files.items())
