"""The local Hub test double answers huggingface_hub and transformers as the Hub would. These tests drive it only
through their public API, so that other tests can trust it for push/pull round trips."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info
from huggingface_hub.utils import get_session, hf_raise_for_status
from huggingface_hub.utils.sha import git_hash

from .conftest import tiny_random_config
from .hub_server import USERS, local_hub  # noqa: F401  (local_hub is a fixture)


@pytest.fixture
def model_folder(tmp_path):
    """A text file, a file in a subfolder and small weights that go to LFS by their name."""
    folder = tmp_path / "model"
    (folder / "notes").mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden_size": 8}\n')
    (folder / "notes" / "readme.txt").write_text("a file in a subfolder\n")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    return folder


def files_in(folder):
    files = (path for path in Path(folder).rglob("*") if path.is_file())
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in files}


def upload(folder, repo_id, **kwargs):
    return HfApi().upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload model", **kwargs)


def test_whoami_needs_a_valid_token(local_hub):
    assert HfApi().whoami()["name"] == local_hub.user
    assert HfApi(token=USERS["bob"]).whoami()["name"] == "bob"
    with pytest.raises(HfHubHTTPError, match="Invalid user token") as error:
        HfApi(token="hf_not_a_token").whoami()
    assert error.value.response.status_code == 401


def test_upload_then_snapshot_download_gives_the_same_files(local_hub, model_folder):
    repo_id = HfApi().create_repo("alice/round-trip").repo_id
    info = upload(model_folder, repo_id)

    assert local_hub.commits(repo_id)[-1].id == info.oid
    assert len(local_hub.commits(repo_id)) == 2  # the repo's initial commit and the upload
    tree = {entry.path: entry for entry in HfApi().list_repo_tree(repo_id, recursive=True)}
    assert tree["model.safetensors"].lfs is not None and tree["config.json"].lfs is None
    assert sum(request.startswith("PUT ") for request in local_hub.requests) == 1  # the LFS file, and only it
    snapshot = Path(snapshot_download(repo_id))
    downloaded = files_in(snapshot)
    assert downloaded.pop(".gitattributes").startswith(b"*.bin filter=lfs")
    assert downloaded == files_in(model_folder)
    # The cache names blobs by ETag as on the real Hub: sha256 for LFS files, git blob id for the others.
    weights_sha256 = hashlib.sha256(downloaded["model.safetensors"]).hexdigest()
    assert (snapshot / "model.safetensors").resolve().name == weights_sha256
    assert (snapshot / "config.json").resolve().name == git_hash(downloaded["config.json"])


def test_uploading_the_same_folder_again_makes_no_commit(local_hub, model_folder, caplog):
    repo_id = HfApi().create_repo("alice/no-op").repo_id
    first = upload(model_folder, repo_id)
    requests_before = len(local_hub.requests)

    again = upload(model_folder, repo_id)

    assert "No files have been modified since last commit" in caplog.text
    assert again.oid == first.oid and len(local_hub.commits(repo_id)) == 2
    new_requests = local_hub.requests[requests_before:]
    assert not [request for request in new_requests if "/commit/" in request or request.startswith("PUT ")]
    (model_folder / "config.json").write_text('{"hidden_size": 16}\n')
    changed = upload(model_folder, repo_id)
    assert [commit.id for commit in local_hub.commits(repo_id)][-2:] == [first.oid, changed.oid]
    assert Path(hf_hub_download(repo_id, "config.json")).read_text() == '{"hidden_size": 16}\n'
    assert Path(hf_hub_download(repo_id, "config.json", revision=first.oid)).read_text() == '{"hidden_size": 8}\n'
    assert sum(request.startswith("PUT ") for request in local_hub.requests) == 1  # the weights went up once


def test_branch_uploads_and_downloads_by_revision(local_hub, model_folder):
    api = HfApi()
    repo_id = api.create_repo("alice/branches").repo_id
    on_main = upload(model_folder, repo_id)
    api.create_branch(repo_id, branch="dev")
    api.create_branch(repo_id, branch="dev", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as error:
        api.create_branch(repo_id, branch="dev")
    assert error.value.response.status_code == 409

    on_dev = api.upload_file(path_or_fileobj=b"dev only\n", path_in_repo="dev.txt", repo_id=repo_id, revision="dev")

    assert Path(hf_hub_download(repo_id, "dev.txt", revision="dev")).read_bytes() == b"dev only\n"
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo_id, "dev.txt")
    dev_history = [commit.commit_id for commit in api.list_repo_commits(repo_id, revision="dev")]
    assert dev_history == [commit.id for commit in reversed(local_hub.commits(repo_id, "dev"))]  # newest first
    assert dev_history[:2] == [on_dev.oid, on_main.oid]
    assert local_hub.commits(repo_id)[-1].id == on_main.oid
    assert "dev.txt" not in api.list_repo_files(repo_id, revision=on_main.oid)
    assert "dev.txt" in api.list_repo_files(repo_id, revision=on_dev.oid)


def test_deleting_a_file_and_committing_on_a_stale_parent(local_hub, model_folder):
    api = HfApi()
    repo_id = api.create_repo("alice/edits").repo_id
    first = upload(model_folder, repo_id)

    deleted = api.delete_file("notes/readme.txt", repo_id)

    assert not api.file_exists(repo_id, "notes/readme.txt")
    assert api.file_exists(repo_id, "notes/readme.txt", revision=first.oid)
    with pytest.raises(RemoteEntryNotFoundError):
        api.delete_file("notes/readme.txt", repo_id)
    with pytest.raises(HfHubHTTPError) as error:
        api.upload_file(path_or_fileobj=b"late\n", path_in_repo="late.txt", repo_id=repo_id, parent_commit=first.oid)
    assert error.value.response.status_code == 412
    assert local_hub.commits(repo_id)[-1].id == deleted.oid


def test_creating_an_existing_repo_conflicts_unless_exist_ok(local_hub):
    api = HfApi()
    url = api.create_repo("alice/twice")
    assert api.create_repo("alice/twice", exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo("alice/twice")
    assert error.value.response.status_code == 409


def test_private_repo_is_invisible_to_others(local_hub, model_folder):
    repo_id = HfApi().create_repo("alice/secret", private=True).repo_id
    upload(model_folder, repo_id)

    assert HfApi().model_info(repo_id).private
    for stranger in (HfApi(token=False), HfApi(token=USERS["bob"])):
        assert not stranger.repo_exists(repo_id)
        with pytest.raises(RepositoryNotFoundError):
            stranger.model_info(repo_id)
    for token in (False, USERS["bob"]):
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(repo_id, "config.json", token=token)


def test_writes_need_a_token_with_rights_to_the_namespace(local_hub, model_folder):
    repo_id = HfApi().create_repo("alice/guarded").repo_id
    for token, status in ((False, 401), (USERS["bob"], 403)):
        with pytest.raises(HfHubHTTPError) as error:
            upload(model_folder, repo_id, token=token)
        assert error.value.response.status_code == status and not isinstance(error.value, RepositoryNotFoundError)
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token=False).create_repo("alice/anonymous")
    assert error.value.response.status_code == 401
    assert len(local_hub.commits(repo_id)) == 1 and "alice/anonymous" not in local_hub.repos


def test_missing_file_revision_and_repo_raise_their_hub_errors(local_hub, model_folder):
    api = HfApi()
    repo_id = api.create_repo("alice/errors").repo_id
    upload(model_folder, repo_id)

    assert api.file_exists(repo_id, "notes/readme.txt") and not api.file_exists(repo_id, "missing.txt")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/no-such-repo", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("alice/no-such-repo")
    paths_info = api.get_paths_info(repo_id, ["notes", "config.json", "missing.txt"])
    assert [(entry.path, type(entry).__name__) for entry in paths_info] == [
        ("notes", "RepoFolder"),
        ("config.json", "RepoFile"),
    ]


def test_lfs_upload_of_wrong_content_is_rejected(local_hub):
    repo_id = HfApi().create_repo("alice/lfs").repo_id
    content = b"\0weights" * 100
    upload_info = UploadInfo.from_bytes(content)
    [action], errors, _ = post_lfs_batch_info(
        upload_infos=[upload_info], token=local_hub.token, repo_type="model", repo_id=repo_id
    )
    href = action["actions"]["upload"]["href"]
    assert not errors

    with pytest.raises(HfHubHTTPError) as error:
        hf_raise_for_status(get_session().put(href, content=content[::-1]))  # same size, other sha256
    assert error.value.response.status_code == 400
    hf_raise_for_status(get_session().put(href, content=content))
    [stored], _, _ = post_lfs_batch_info(
        upload_infos=[upload_info], token=local_hub.token, repo_type="model", repo_id=repo_id
    )
    assert "actions" not in stored  # nothing left to upload


ONLINE_CHILD = "import sys; from huggingface_hub import snapshot_download; print(snapshot_download(sys.argv[1]))"
OFFLINE_CHILD = """
import sys
from pathlib import Path
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

cached, not_cached = sys.argv[1:]
print(snapshot_download(cached))
print(Path(hf_hub_download(cached, "config.json")).read_text(), end="")
for download in (lambda: snapshot_download(not_cached), lambda: hf_hub_download(not_cached, "config.json")):
    try:
        download()
    except LocalEntryNotFoundError as error:
        print(type(error).__name__)
"""


def run_child(code, *args, **environment):
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env={**os.environ, **environment}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_child_processes_find_the_hub_through_the_environment_and_the_cache_offline(local_hub, model_folder):
    api = HfApi()
    cached = api.create_repo("alice/cached", private=True).repo_id
    not_cached = api.create_repo("alice/not-cached").repo_id
    upload(model_folder, cached)
    upload(model_folder, not_cached)

    [online_snapshot] = run_child(ONLINE_CHILD, cached)
    requests_before = len(local_hub.requests)
    offline = run_child(OFFLINE_CHILD, cached, not_cached, HF_HUB_OFFLINE="1")

    assert online_snapshot.startswith(os.environ["HF_HUB_CACHE"])
    assert files_in(online_snapshot)["model.safetensors"] == (model_folder / "model.safetensors").read_bytes()
    assert offline == [online_snapshot, '{"hidden_size": 8}', "LocalEntryNotFoundError", "LocalEntryNotFoundError"]
    assert local_hub.requests[requests_before:] == []


def test_push_to_hub_then_from_pretrained_loads_the_same_model(local_hub):
    from onepeace_hf.modeling_onepeace import OnePeaceModel

    torch.manual_seed(0)
    model = OnePeaceModel(tiny_random_config()).eval()
    model.push_to_hub("alice/tiny-onepeace", private=True)

    loaded = OnePeaceModel.from_pretrained("alice/tiny-onepeace")

    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], msg=name)
    [weights] = HfApi().get_paths_info("alice/tiny-onepeace", "model.safetensors")
    assert weights.lfs is not None
