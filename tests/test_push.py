"""Publishing a pruned folder through the real huggingface_hub client to the test suite's Hub server."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from hubprune import LayerPruner
from hubprune.cli import main
from hubprune.hub import push_folder
from hubprune.record import PruneRecord


@pytest.fixture()
def folder(tiny_model_dir, tmp_path):
    pruner = LayerPruner.from_pretrained(tiny_model_dir, device="cpu")
    pruner.scan(n_samples=2, seq_len=16, progress=False)
    out = pruner.prune(n_layers=2).save_pretrained(tmp_path / "tiny-4l")
    record = PruneRecord.load(out)
    record.evaluation = {
        "original": {"perplexity": 20.0, "tasks": {"piqa": {"acc_norm": 0.6, "chance": 0.5}}},
        "pruned": {"perplexity": 25.0, "tasks": {"piqa": {"acc_norm": 0.58, "chance": 0.5}}},
        "heldout": "held-out text",
    }
    record.save(out)
    return out


def test_push_is_one_commit_and_loads_back(hub, folder, caplog):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    repo = f"{hub.user}/tiny-4l"
    before = {p.name for p in folder.iterdir()}
    with caplog.at_level(logging.DEBUG):
        info = push_folder(folder, repo, private=True, token=hub.token)
    assert hub.token not in caplog.text
    commits = hub.server.commits(repo)
    assert len(commits) == 2  # the repo's initial commit, then ours
    files = hub.server.files(repo)
    assert {"model.safetensors", "config.json", "tokenizer.json", "hubprune.json", "hubprune_recipe.yaml",
            "hubprune_scan.png", "hubprune_scan.json", "README.md"} <= set(files)
    assert "model.safetensors" in hub.server.lfs_paths(repo)
    assert info.commit_url and {p.name for p in folder.iterdir()} == before  # nothing changed locally

    remote = AutoModelForCausalLM.from_pretrained(repo, token=hub.token).eval()
    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    torch.testing.assert_close(remote(ids).logits, local(ids).logits)

    card = ModelCard.load(repo, token=hub.token)
    assert {"hubprune", "pruned", "depth-pruning"} <= set(card.data.tags)
    assert card.data.library_name == "transformers" and card.data.model_name == repo
    results = {(r.dataset_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert results[("piqa", "acc_norm")] == 0.58 and results[("heldout", "perplexity")] == 25.0
    assert f'AutoModelForCausalLM.from_pretrained("{repo}")' in card.text  # rendered for the target repo id

    record = PruneRecord.load(folder)
    record.evaluation["pruned"]["perplexity"] = 24.0  # e.g. re-evaluated
    record.save(folder)
    push_folder(folder, repo, token=hub.token)
    assert len(hub.server.commits(repo)) == 3  # a second push is exactly one new commit
    assert json.loads(hub.server.files(repo)["hubprune.json"])["evaluation"]["pruned"]["perplexity"] == 24.0
    push_folder(folder, repo, token=hub.token)
    assert len(hub.server.commits(repo)) == 3  # nothing changed: the client makes no empty commit


def test_edited_readme_is_kept_unless_asked(hub, folder):
    repo = f"{hub.user}/kept"
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nMy notes.\n")
    push_folder(folder, repo, token=hub.token)
    assert hub.server.files(repo)["README.md"].decode().endswith("My notes.\n")
    push_folder(folder, repo, token=hub.token, replace_readme=True)
    assert "My notes." not in hub.server.files(repo)["README.md"].decode()


def test_pull_request_leaves_main_alone(hub, folder):
    repo = f"{hub.user}/pr"
    push_folder(folder, repo, token=hub.token)
    main_before = hub.server.commits(repo)[0]
    (folder / "notes.txt").write_text("a proposed change\n")
    info = push_folder(folder, repo, token=hub.token, create_pr=True, commit_message="retry with a new card")
    assert info.pr_url and hub.server.commits(repo)[0] == main_before


def test_a_large_folder_goes_up_through_upload_folder_then_its_card(hub, folder, monkeypatch):
    """At ``large_folder`` bytes and above: ``upload_folder`` (with hf_xet and a Xet server, batched and resumable;
    the suite's server speaks LFS, so huggingface_hub falls back to one commit), then the card in its own commit,
    on the pull request when one is asked for. The files are those of the one-commit push."""
    from huggingface_hub import HfApi

    calls = []
    upload_folder = HfApi.upload_folder
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(kw) or upload_folder(self, **kw))
    (folder / ".heal-checkpoints").mkdir()
    (folder / ".heal-checkpoints" / "state.bin").write_bytes(b"local only")
    push_folder(folder, f"{hub.user}/small", token=hub.token)
    assert not calls
    info = push_folder(folder, f"{hub.user}/large", token=hub.token, large_folder=1)
    assert len(calls) == 1
    commits = hub.server.commits(f"{hub.user}/large")
    assert len(commits) == 3 and commits[0].title.endswith(": model card")  # initial, the folder, the card
    small, large = hub.server.files(f"{hub.user}/small"), hub.server.files(f"{hub.user}/large")
    assert set(large) == set(small) and not any(p.startswith(".heal") for p in large)
    assert all(large[p] == small[p] for p in large if p != "README.md")
    assert f'from_pretrained("{hub.user}/large")' in large["README.md"].decode()
    assert "model.safetensors" in hub.server.lfs_paths(f"{hub.user}/large")
    assert info.commit_url and commits[0].oid in info.commit_url

    main_before = hub.server.commits(f"{hub.user}/large")[0]
    (folder / "notes.txt").write_text("a proposed change\n")
    info = push_folder(folder, f"{hub.user}/large", token=hub.token, create_pr=True, commit_message="a proposal",
                       large_folder=1)
    assert info.pr_url and hub.server.commits(f"{hub.user}/large")[0] == main_before
    proposal = hub.server.commits(f"{hub.user}/large", revision=info.pr_revision)
    assert proposal[0].title == "a proposal" and proposal[1] == main_before  # the card is main's: no commit for it
    assert "notes.txt" in hub.server.files(f"{hub.user}/large", revision=info.pr_revision)

    (folder / "notes.txt").unlink()
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nMy notes.\n")  # only the card changes
    info = push_folder(folder, f"{hub.user}/large", token=hub.token, create_pr=True, large_folder=1)
    assert info.pr_num == 2 and hub.server.commits(f"{hub.user}/large")[0] == main_before
    assert hub.server.files(f"{hub.user}/large", revision=info.pr_revision)["README.md"].decode().endswith("My notes.\n")


def test_errors(hub, folder, capsys):
    with pytest.raises(PermissionError, match="401"):
        push_folder(folder, f"{hub.user}/x", token="hf_not_a_token")
    with pytest.raises(PermissionError, match="403"):
        push_folder(folder, f"{hub.other_user}/x", token=hub.token)
    with pytest.raises(ValueError, match="not a valid repo id|no namespace"):
        push_folder(folder, "just-a-name", token=hub.token)
    rc = main(["push", str(folder), f"{hub.user}/cli", "--token", "hf_not_a_token", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "401" in err and "hf_not_a_token" not in err


def test_transient_5xx_is_retried(hub, folder):
    repo = f"{hub.user}/flaky"
    hub.server.fail_next(1, status=503, path_contains="/commit/")
    push_folder(folder, repo, token=hub.token)
    assert "model.safetensors" in hub.server.files(repo)


def test_persistent_5xx_says_what_to_run_again(hub, folder):
    hub.server.fail_next(10, status=502, path_contains="/commit/")
    with pytest.raises(ConnectionError, match="local folder is unchanged: run `hubprune push"):
        push_folder(folder, f"{hub.user}/down", token=hub.token, retries=1)


def test_cli_push_and_python_push_to_hub(hub, folder, tiny_model_dir, capsys):
    assert main(["push", str(folder), f"{hub.org}/tiny", "--token", hub.token, "-q"]) == 0
    assert "pushed" in capsys.readouterr().out
    pruned = LayerPruner.from_pretrained(tiny_model_dir, device="cpu").prune(layers=[0])
    pruned.push_to_hub(f"{hub.user}/api", token=hub.token)
    record = json.loads(hub.server.files(f"{hub.user}/api")["hubprune.json"])
    assert record["removed_layers"] == [0]


def test_prune_a_hub_model_by_id(hub, tiny_model_dir, tmp_path):
    """The Hub code path: a Hub id is resolved to a commit, its card's license is carried into the pruned card."""
    import shutil

    from huggingface_hub import HfApi, ModelCard

    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    (src / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n"
                                   "tags:\n- tiny\n---\n# tiny\n")
    repo = f"{hub.user}/tiny-base"
    api = HfApi(token=hub.token)
    api.create_repo(repo)
    commit = api.upload_folder(folder_path=src, repo_id=repo).oid
    pruner = LayerPruner.from_pretrained(repo, device="cpu")
    assert pruner.origin.kind == "hub" and pruner.origin.revision == commit
    out = pruner.prune(layers=[1]).save_pretrained(tmp_path / "pruned")
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert data["base_model"] == repo
    assert (data["license"], data["license_name"], data["license_link"]) == ("other", "tiny-license", "LICENSE")
    assert "tiny" in data["tags"]
    assert PruneRecord.load(out).base_revision == commit
