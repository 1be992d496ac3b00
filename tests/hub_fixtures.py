"""The ``hub`` fixture: a local Hugging Face Hub (tests/hubserver.py) that the real client talks to.

One server serves the whole session; each test starts from an empty Hub, its own HF_HOME and cache,
and online mode, and everything is put back at teardown. huggingface_hub reads its environment
variables once, at import, so the fixture patches the module constants as well as the environment,
and the copies of the endpoint taken at import time (the module-level ``HfApi``, the hosts the
client trusts, transformers' shared ``HfApi``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

from hubserver import HubServer

USER, TOKEN = "alice", "hf_alice_token"
ORG = "hubprune-org"
OTHER_USER, OTHER_TOKEN = "bob", "hf_bob_token"


@dataclass
class Hub:
    """What a test needs: the endpoint, alice's token and name, and the server (fail_next, commits, files)."""

    server: HubServer
    endpoint: str
    token: str = TOKEN
    user: str = USER
    org: str = ORG
    other_user: str = OTHER_USER
    other_token: str = OTHER_TOKEN


@pytest.fixture(scope="session")
def _hub_server():
    with HubServer() as server:
        yield server


@pytest.fixture
def hub(_hub_server, tmp_path, monkeypatch):
    """An empty local Hub, with huggingface_hub and transformers pointed at it and alice logged in (HF_TOKEN)."""
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    server = _hub_server
    server.reset()
    endpoint = server.endpoint
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)

    env = {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home), "HF_HUB_CACHE": str(cache),
           "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH",
                 "HUGGINGFACE_HUB_CACHE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)

    patches = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {urlsplit(endpoint).hostname},
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    # Copies of the endpoint taken at import time.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)  # behind huggingface_hub.create_repo, upload_folder, ...
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(endpoint)})
    _reset_shared_clients()
    try:
        yield Hub(server=server, endpoint=endpoint)
    finally:
        _reset_shared_clients()
        # transformers builds one shared HfApi lazily (with the endpoint of that moment): drop the one built here.
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None:
            transformers_hub._hf_api = None


def _reset_shared_clients() -> None:
    """Drop objects that hold on to an endpoint or a connection: HTTP sessions, HfFileSystem, transformers' HfApi."""
    from huggingface_hub.utils import close_session

    close_session()
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None:
        transformers_hub._hf_api = None
    hf_file_system = sys.modules.get("huggingface_hub.hf_file_system")
    if hf_file_system is not None:
        hf_file_system.HfFileSystem.clear_instance_cache()
