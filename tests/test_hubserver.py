"""The real huggingface_hub client (and transformers) against the local Hub of tests/hubserver.py.

Nothing is mocked: every call below goes over HTTP to the server the ``hub`` fixture started.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    create_repo,
    hf_api,
    hf_hub_download,
    snapshot_download,
    upload_folder,
)
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

# What the environment looked like before any test used the `hub` fixture (checked again at the end).
_BEFORE = {"endpoint": constants.ENDPOINT, "offline": constants.HF_HUB_OFFLINE, "xet": constants.HF_HUB_DISABLE_XET,
           "cache": constants.HF_HUB_CACHE, "api": hf_api.api.endpoint,
           "env": {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_HOME")}}


def _card_text() -> str:
    """A README whose front matter has lists, a nested model-index, a quoted and a long folded string."""
    data = ModelCardData(
        license="apache-2.0", library_name="transformers", pipeline_tag="text-generation",
        tags=["hubprune", "pruned"], base_model="HuggingFaceTB/SmolLM2-135M-Instruct", model_name="tiny-pruned",
        eval_results=[EvalResult(task_type="text-generation", dataset_type="wikitext", dataset_name="WikiText",
                                 metric_type="perplexity", metric_value=16.25)],
        note="a: colon, and " + "a long sentence that PyYAML folds over several lines " * 3,
    )
    return f"---\n{data.to_yaml()}\n---\n\n# tiny-pruned\n\nA tiny test model.\n"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny random Llama saved with save_pretrained, plus a README with YAML front matter."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    (folder / "README.md").write_text(_card_text())
    return folder


def _local_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _upload(hub, folder: Path, repo_id: str, **kwargs):
    """Through the module-level functions, which use the HfApi that huggingface_hub builds at import."""
    create_repo(repo_id, exist_ok=True)
    return upload_folder(repo_id=repo_id, folder_path=folder, **kwargs)


def test_create_repo_public_and_private(hub):
    api = HfApi()
    public = api.create_repo(f"{hub.user}/public")
    private = api.create_repo(f"{hub.org}/secret", private=True)
    assert public.repo_id == "alice/public" and private.repo_id == "hubprune-org/secret"
    assert public.endpoint == hub.endpoint
    assert api.model_info("alice/public").private is False
    assert api.model_info("hubprune-org/secret").private is True
    assert api.list_repo_files("alice/public") == [".gitattributes"]  # the Hub's initial commit

    # Reads: public repos need no token; private ones are invisible to everyone outside the namespace.
    assert HfApi(token=False).model_info("alice/public").id == "alice/public"
    for api_other in (HfApi(token=False), HfApi(token=hub.other_token)):
        with pytest.raises(RepositoryNotFoundError):
            api_other.model_info("hubprune-org/secret")
        assert not api_other.repo_exists("hubprune-org/secret")

    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("alice/public")
    assert err.value.response.status_code == 409
    assert api.create_repo("alice/public", exist_ok=True).repo_id == "alice/public"

    api.delete_repo("alice/public")
    assert not api.repo_exists("alice/public")
    api.delete_repo("alice/public", missing_ok=True)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo("alice/public")


def test_upload_folder_is_one_commit_with_lfs_weights(hub, model_folder):
    info = _upload(hub, model_folder, "alice/tiny", commit_message="Upload tiny")
    commits = hub.server.commits("alice/tiny")
    assert [c.title for c in commits] == ["Upload tiny", "initial commit"]
    assert info.oid == commits[0].oid == HfApi().model_info("alice/tiny").sha
    assert "model.safetensors" in hub.server.lfs_paths("alice/tiny")
    assert hub.server.lfs_paths("alice/tiny") == {"model.safetensors"}
    assert any(m == "PUT" and "/_lfs/" in p for m, p in hub.server.requests)  # the bytes went through LFS
    assert {k: v for k, v in hub.server.files("alice/tiny").items() if k != ".gitattributes"} == \
        _local_files(model_folder)

    tree = {f.path: f for f in HfApi().list_repo_tree("alice/tiny", recursive=True)}
    weights = tree["model.safetensors"]
    assert weights.lfs is not None and weights.lfs.size == (model_folder / "model.safetensors").stat().st_size
    assert tree["config.json"].lfs is None


def test_hf_hub_download_and_snapshot_download_give_the_same_bytes(hub, model_folder):
    _upload(hub, model_folder, "alice/tiny")
    local = _local_files(model_folder)
    snapshot = Path(snapshot_download("alice/tiny"))
    for name, data in local.items():
        assert Path(hf_hub_download("alice/tiny", name)).read_bytes() == data
        assert (snapshot / name).read_bytes() == data
    assert str(snapshot).startswith(constants.HF_HUB_CACHE)  # the fixture's private cache
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/tiny", "missing.json")


def test_from_pretrained_through_the_endpoint_matches_the_local_folder(hub, model_folder):
    from transformers import AutoModelForCausalLM

    _upload(hub, model_folder, "alice/tiny")
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        local = AutoModelForCausalLM.from_pretrained(model_folder).eval()(ids).logits
        remote = AutoModelForCausalLM.from_pretrained("alice/tiny").eval()(ids).logits
    assert torch.equal(local, remote)
    assert any("/alice/tiny/resolve/" in p for _, p in hub.server.requests)


def test_transformers_push_to_hub_round_trip(hub, model_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder)
    model.push_to_hub(f"{hub.org}/pushed", private=True)
    assert HfApi().model_info(f"{hub.org}/pushed").private is True
    assert len(hub.server.commits(f"{hub.org}/pushed")) == 2
    again = AutoModelForCausalLM.from_pretrained(f"{hub.org}/pushed")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_model_card_load_and_card_data(hub, model_folder):
    _upload(hub, model_folder, "alice/tiny")
    card = ModelCard.load("alice/tiny")
    assert card.data.license == "apache-2.0"
    assert card.data.tags == ["hubprune", "pruned"]
    assert card.data.eval_results[0].metric_value == 16.25
    # The server parsed the same front matter into cardData (its YAML reader agrees with PyYAML's).
    front_matter = _card_text().split("---\n")[1]
    info = HfApi().model_info("alice/tiny")
    assert info.card_data.to_dict() == ModelCardData(**yaml.safe_load(front_matter)).to_dict()
    assert info.card_data.note.startswith("a: colon, and a long sentence")
    assert info.tags == ["hubprune", "pruned"] and info.pipeline_tag == "text-generation"


def test_invalid_front_matter_is_refused(hub):
    HfApi().create_repo("alice/bad-card")
    with pytest.raises(ValueError, match="Invalid metadata"):
        HfApi().upload_file(path_or_fileobj=b"---\nlicense: [mit\n---\n# card\n", path_in_repo="README.md",
                            repo_id="alice/bad-card")
    assert len(hub.server.commits("alice/bad-card")) == 1


def test_second_upload_lands_as_exactly_one_new_commit(hub, model_folder):
    api = HfApi()
    _upload(hub, model_folder, "alice/tiny")
    api.upload_file(path_or_fileobj=b"notes", path_in_repo="docs/notes.txt", repo_id="alice/tiny")
    before = api.list_repo_commits("alice/tiny")
    head = before[0].commit_id
    info = api.create_commit(
        "alice/tiny",
        [CommitOperationAdd("generation_config.json", b'{"max_new_tokens": 8}'),
         CommitOperationAdd("extra.safetensors", b"\x01" * 64),
         CommitOperationDelete("config.json"), CommitOperationDelete("docs/")],
        commit_message="Second upload", parent_commit=head,
    )
    after = api.list_repo_commits("alice/tiny")
    assert len(after) == len(before) + 1
    assert after[0].commit_id == info.oid and after[0].title == "Second upload" and after[1].commit_id == head
    files = hub.server.files("alice/tiny")
    assert files["generation_config.json"] == b'{"max_new_tokens": 8}' and files["extra.safetensors"] == b"\x01" * 64
    assert "config.json" not in files and "docs/notes.txt" not in files
    assert hub.server.files("alice/tiny", revision=head)["config.json"]  # the old commit is still there
    # A commit based on a stale parent is refused.
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit("alice/tiny", [CommitOperationAdd("x.txt", b"x")], commit_message="late",
                          parent_commit=head)
    assert err.value.response.status_code == 412


def test_create_pr_makes_a_pr_ref_and_leaves_main_unchanged(hub, model_folder):
    api = HfApi()
    _upload(hub, model_folder, "alice/tiny")
    main_before = hub.server.files("alice/tiny")
    sha_before = api.model_info("alice/tiny").sha
    info = api.create_commit("alice/tiny", [CommitOperationAdd("proposal.txt", b"please merge")],
                             commit_message="Proposal", create_pr=True)
    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    assert hub.server.files("alice/tiny") == main_before
    assert api.model_info("alice/tiny").sha == sha_before
    assert api.model_info("alice/tiny", revision="refs/pr/1").sha == info.oid
    assert Path(hf_hub_download("alice/tiny", "proposal.txt", revision="refs/pr/1")).read_bytes() == b"please merge"
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/tiny", "proposal.txt")
    refs = api.list_repo_refs("alice/tiny", include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"]
    assert [b.target_commit for b in refs.branches] == [sha_before]
    # Bob may open a pull request on alice's public repo, but not push to main.
    bob = HfApi(token=hub.other_token)
    ops = [CommitOperationAdd("bob.txt", b"hi"), CommitOperationAdd("bob.safetensors", b"\x02" * 32)]
    assert bob.create_commit("alice/tiny", ops, commit_message="Bob's idea", create_pr=True).pr_revision == "refs/pr/2"
    assert hub.server.lfs_paths("alice/tiny", revision="refs/pr/2") == {"model.safetensors", "bob.safetensors"}
    assert api.get_discussion_details("alice/tiny", 2).author == "bob"
    with pytest.raises(HfHubHTTPError) as err:
        bob.create_commit("alice/tiny", [CommitOperationAdd("bob.txt", b"main")], commit_message="Bob on main")
    assert err.value.response.status_code == 403
    pr = api.create_pull_request("alice/tiny", title="Empty PR")
    assert pr.num == 3 and pr.is_pull_request and api.model_info("alice/tiny", revision="refs/pr/3").sha == sha_before


def test_bad_or_missing_token_gives_401(hub):
    for token in ("hf_not_a_token", False):
        with pytest.raises(HfHubHTTPError) as err:
            HfApi(token=token).create_repo("alice/nope")
        assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_not_a_token").whoami()
    assert err.value.response.status_code == 401
    assert HfApi().whoami()["name"] == hub.user


def test_writing_to_bobs_namespace_as_alice_gives_403(hub):
    with pytest.raises(HfHubHTTPError) as err:
        HfApi().create_repo("bob/mine")
    assert err.value.response.status_code == 403
    HfApi(token=hub.other_token).create_repo("bob/mine")
    with pytest.raises(HfHubHTTPError) as err:
        HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="bob/mine")
    assert err.value.response.status_code == 403
    assert len(hub.server.commits("bob/mine")) == 1


def test_transient_503s_are_survived(hub, model_folder):
    api = HfApi()
    api.create_repo("alice/flaky")
    # The client retries preupload and the LFS PUT by itself (http_backoff) ...
    hub.server.fail_next(1, 503, path_contains="/preupload/")
    hub.server.fail_next(1, 503, path_contains="/_lfs/", method="PUT")
    api.upload_folder(repo_id="alice/flaky", folder_path=model_folder)
    failed = [p for p in hub.server.requests if "/preupload/" in p[1] or p[0] == "PUT"]
    assert len(failed) == 4  # two failed, two retried
    # ... but not the commit itself: that call fails, and calling again succeeds, as exactly one commit.
    hub.server.fail_next(1, 503, path_contains="/commit/")
    ops = [CommitOperationAdd("again.txt", b"again")]
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit("alice/flaky", ops, commit_message="again")
    assert err.value.response.status_code == 503
    api.create_commit("alice/flaky", [CommitOperationAdd("again.txt", b"again")], commit_message="again")
    assert [c.title for c in hub.server.commits("alice/flaky")][:2] == ["again", "Upload folder using huggingface_hub"]


@pytest.mark.parametrize("repo_type", ["space", "dataset"])
def test_space_and_dataset_repos(hub, repo_type, tmp_path):
    api = HfApi()
    hub.server.lfs_threshold = 1000  # large files go through LFS whatever their name
    url = api.create_repo("alice/demo", repo_type=repo_type, space_sdk="gradio" if repo_type == "space" else None)
    assert url.repo_type == repo_type and url.url.startswith(f"{hub.endpoint}/{repo_type}s/alice/demo")
    (tmp_path / "app.py").write_text("import gradio as gr\n")
    (tmp_path / "data.txt").write_text("row\n" * 1000)
    api.upload_folder(repo_id="alice/demo", repo_type=repo_type, folder_path=tmp_path)
    assert hub.server.lfs_paths("alice/demo", repo_type=repo_type) == {"data.txt"}
    info = api.repo_info("alice/demo", repo_type=repo_type)
    assert {s.rfilename for s in info.siblings} == {".gitattributes", "app.py", "data.txt"}
    if repo_type == "space":
        assert info.sdk == "gradio"
    path = hf_hub_download("alice/demo", "data.txt", repo_type=repo_type)
    assert Path(path).read_text() == "row\n" * 1000
    assert any(p.startswith(f"/{repo_type}s/alice/demo/resolve/") for _, p in hub.server.requests)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/demo")  # same name, other type


def test_resolve_headers_and_ranges(hub, model_folder):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    _upload(hub, model_folder, "alice/tiny")
    data = (model_folder / "model.safetensors").read_bytes()
    sha = HfApi().model_info("alice/tiny").sha
    meta = get_hf_file_metadata(hf_hub_url("alice/tiny", "model.safetensors"))
    assert meta.commit_hash == sha and meta.size == len(data)
    assert meta.etag == HfApi().model_info("alice/tiny", files_metadata=True).siblings[-1].lfs.sha256

    url = hf_hub_url("alice/tiny", "model.safetensors", revision=sha)
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request) as response:
        assert response.headers["X-Linked-Size"] == str(len(data))
        assert response.headers["X-Repo-Commit"] == sha
        assert response.headers["Content-Length"] == str(len(data))
    for header, expected in (("bytes=10-19", data[10:20]), ("bytes=-5", data[-5:]), ("bytes=100-", data[100:])):
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": header})) as response:
            assert response.status == 206 and response.read() == expected
            assert response.headers["Content-Range"].endswith(f"/{len(data)}")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Range": f"bytes={len(data)}-"}))
    assert err.value.code == 416
    config = json.loads(urllib.request.urlopen(hf_hub_url("alice/tiny", "config.json")).read())
    assert config["num_hidden_layers"] == 2


def test_the_fixture_put_everything_back():
    """Runs after the tests above (file order): nothing of the fixture's patching is left."""
    assert constants.ENDPOINT == _BEFORE["endpoint"] and hf_api.api.endpoint == _BEFORE["api"]
    assert constants.HF_HUB_OFFLINE == _BEFORE["offline"] and constants.HF_HUB_DISABLE_XET == _BEFORE["xet"]
    assert constants.HF_HUB_CACHE == _BEFORE["cache"]
    assert {k: os.environ.get(k) for k in _BEFORE["env"]} == _BEFORE["env"]
