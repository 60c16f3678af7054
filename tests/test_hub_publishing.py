"""Publishing on the Hub end to end over HTTP, against the local Hub test double (tests/hub_server.py): convert and
push, download with from_pretrained, re-push without a new commit, remote code without the package, offline use."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from onepeace_hf.conversion import convert_checkpoint
from onepeace_hf.hub import HubPushError, push_folder_to_hub
from onepeace_hf.sharded_safetensors import ChecksumMismatchError, write_checksum_manifest

from .conftest import CLASSIFY_CHECKPOINT, REFERENCE
from .hub_server import local_hub  # noqa: F401  (a fixture)


EXPECTED_PRETRAIN = REFERENCE / "expected_tiny_pretrain.safetensors"
EXPECTED_CLASSIFY = REFERENCE / "expected_tiny_classify_image.safetensors"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classify")
    convert_checkpoint(CLASSIFY_CHECKPOINT, folder, max_shard_size="300KB")
    return folder


def state_equal(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_python(code, *args, env=None):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_cli_push_then_from_pretrained_round_trip(local_hub, converted, tmp_path):
    from transformers import AutoModelForImageClassification, AutoProcessor

    repo = f"{local_hub.user}/onepeace-tiny-classify"
    pushed = subprocess.run(
        [sys.executable, "-m", "onepeace_hf.cli", "convert", "--checkpoint", str(CLASSIFY_CHECKPOINT),
         "--output-dir", str(tmp_path / "out"), "--max-shard-size", "300KB", "--push-to-hub", repo,
         "--commit-message", "First upload"], capture_output=True, text=True,
    )
    assert pushed.returncode == 0, pushed.stderr[-2000:]
    assert [c.title for c in local_hub.commits(repo)][-1] == "First upload"
    remote = AutoModelForImageClassification.from_pretrained(repo)
    assert state_equal(remote, AutoModelForImageClassification.from_pretrained(converted))
    assert type(AutoProcessor.from_pretrained(repo)).__name__ == "OnePeaceProcessor"
    with torch.no_grad():
        logits = remote.eval()(pixel_values=load_file(EXPECTED_PRETRAIN)["inputs.src_images"]).logits
    torch.testing.assert_close(logits, load_file(EXPECTED_CLASSIFY)["logits"], atol=1e-5, rtol=0)


def test_card_metadata_is_on_the_hub(local_hub, converted):
    from huggingface_hub import ModelCard

    repo = f"{local_hub.user}/card-check"
    push_folder_to_hub(converted, repo)
    card = ModelCard.load(repo)
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"


def test_repush_is_idempotent_and_branches_work(local_hub, converted, tmp_path):
    import shutil

    from huggingface_hub import hf_hub_download

    repo = f"{local_hub.user}/idempotent"
    push_folder_to_hub(converted, repo)
    commits = len(local_hub.commits(repo))
    push_folder_to_hub(converted, repo)
    assert len(local_hub.commits(repo)) == commits
    changed = tmp_path / "changed"
    shutil.copytree(converted, changed)
    (changed / "NOTES.md").write_text("branch only\n")
    write_checksum_manifest(changed)
    push_folder_to_hub(changed, repo, revision="notes", commit_message="on a branch")
    assert local_hub.commits(repo, "notes")[-1].title == "on a branch"
    assert len(local_hub.commits(repo)) == commits  # main is untouched
    assert open(hf_hub_download(repo, "NOTES.md", revision="notes")).read() == "branch only\n"


def test_repush_with_another_shard_layout_leaves_no_stale_weights(local_hub, converted, tmp_path):
    """Weight files of an earlier push would otherwise stay, and from_pretrained would load those."""
    from huggingface_hub import HfApi
    from transformers import AutoModelForImageClassification

    repo = f"{local_hub.user}/relayout"
    push_folder_to_hub(converted, repo)
    HfApi().upload_file(path_or_fileobj=b"kept\n", path_in_repo="NOTES.md", repo_id=repo)
    one_file = tmp_path / "one_file"
    convert_checkpoint(CLASSIFY_CHECKPOINT, one_file, dtype="bfloat16")
    push_folder_to_hub(one_file, repo)
    files = set(HfApi().list_repo_files(repo))
    local = {path.name for path in one_file.iterdir()}
    assert {name for name in files if "safetensors" in name} == {name for name in local if "safetensors" in name}
    assert "NOTES.md" in files  # not a weight file: left as it is
    remote = AutoModelForImageClassification.from_pretrained(repo)
    assert remote.dtype == torch.bfloat16
    assert state_equal(remote, AutoModelForImageClassification.from_pretrained(one_file))


def test_repush_of_another_kind_leaves_no_stale_processor_or_code_files(local_hub, converted, tmp_path):
    """A vision-branch folder pushed over a classifier: the classifier's tokenizer, processor and task code would
    otherwise stay, and AutoProcessor would build a processor the model does not match."""
    from huggingface_hub import HfApi
    from transformers import AutoProcessor

    from .test_conversion_kinds import write_vision_pickle

    repo = f"{local_hub.user}/another-kind"
    push_folder_to_hub(converted, repo)
    write_vision_pickle(tmp_path / "one-peace-vision.pkl")
    vision = tmp_path / "vision"
    convert_checkpoint(tmp_path / "one-peace-vision.pkl", vision)
    push_folder_to_hub(vision, repo)
    files = set(HfApi().list_repo_files(repo))
    assert {"processor_config.json", "tokenizer.json", "modeling_onepeace_tasks.py"}.isdisjoint(files), files
    assert files == {path.name for path in vision.iterdir()} | {".gitattributes"}
    assert type(AutoProcessor.from_pretrained(repo)).__name__ == "OnePeaceImageProcessor"


@pytest.mark.parametrize("problem, repo, environment, message", [
    ("invalid id", "not a valid/repo id", {}, "Repo id must use alphanumeric chars"),
    ("offline", "{user}/offline", {"HF_HUB_OFFLINE": "1"}, "offline mode is on"),
    ("not logged in", "{user}/anonymous", {"HF_TOKEN": ""}, "not logged in"),
    ("another namespace", "bob/theirs", {}, "logged in as alice, who is not bob"),
])
def test_cli_says_a_push_cannot_happen_before_converting(local_hub, tmp_path, problem, repo, environment, message):
    output = tmp_path / "out"
    if problem == "not logged in":  # no stored token to fall back on either
        environment = {**environment, "HF_HOME": str(tmp_path / "empty_home")}
    refused = subprocess.run(
        [sys.executable, "-m", "onepeace_hf.cli", "convert", "--checkpoint", str(CLASSIFY_CHECKPOINT),
         "--output-dir", str(output), "--push-to-hub", repo.format(user=local_hub.user), "-q"],
        capture_output=True, text=True, env={**os.environ, **environment},
    )
    assert refused.returncode == 1 and refused.stderr.startswith("error: Cannot push") and message in refused.stderr
    assert refused.stderr.count("\n") == 1 and not output.exists()


def test_card_of_a_branch_loads_from_that_branch(tmp_path):
    convert_checkpoint(CLASSIFY_CHECKPOINT, tmp_path / "v1", repo_id="alice/tiny", revision="v1.0")
    card = (tmp_path / "v1" / "README.md").read_text()
    assert 'from_pretrained("alice/tiny", revision="v1.0")' in card and '"alice/tiny")' not in card
    convert_checkpoint(CLASSIFY_CHECKPOINT, tmp_path / "main", repo_id="alice/tiny", revision="main")
    assert "revision=" not in (tmp_path / "main" / "README.md").read_text()


def test_push_refuses_a_tampered_folder(local_hub, converted, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(converted, folder)
    with open(folder / "config.json", "a") as file:
        file.write(" ")
    with pytest.raises(ChecksumMismatchError, match="checksum differs: config.json"):
        push_folder_to_hub(folder, f"{local_hub.user}/tampered")


def test_push_without_login_or_offline_says_what_to_do(local_hub, converted, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubPushError, match="not logged in.*hf auth login"):
        push_folder_to_hub(converted, f"{local_hub.user}/nope")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="offline mode is on"):
        push_folder_to_hub(converted, f"{local_hub.user}/nope", token=local_hub.token)


def test_push_without_a_network_says_so_in_one_line(local_hub, converted, monkeypatch):
    """huggingface_hub's HTTP client raises its own ConnectError, not an OSError (a 76-line traceback before)."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    with pytest.raises(HubPushError, match=f"Cannot reach the Hub at {closed}"):
        push_folder_to_hub(converted, f"{local_hub.user}/nope", token=local_hub.token)


def test_push_to_another_namespace_or_with_a_read_only_token_is_refused_clearly(local_hub, converted, monkeypatch):
    with pytest.raises(HubPushError, match="logged in as alice, who is not bob nor a member of an organization"):
        push_folder_to_hub(converted, "bob/not-mine")
    identity = local_hub._whoami("alice")
    # Where whoami cannot tell (here it claims a membership the Hub then denies), the Hub's 403 is explained.
    monkeypatch.setattr(local_hub, "_whoami", lambda user, **_: {**identity, "orgs": [{"name": "bob"}]})
    with pytest.raises(HubPushError, match="refused access"):
        push_folder_to_hub(converted, "bob/not-mine")
    read_only = {**identity, "auth": {"type": "access_token", "accessToken": {"role": "read"}}}
    monkeypatch.setattr(local_hub, "_whoami", lambda user, **_: read_only)
    with pytest.raises(HubPushError, match="your token is read-only"):
        push_folder_to_hub(converted, f"{local_hub.user}/mine")
    assert f"{local_hub.user}/mine" not in local_hub.repos


def test_model_and_processor_push_to_hub(local_hub, tiny_random_model_dir):
    from transformers import AutoModel, AutoProcessor

    repo = f"{local_hub.user}/pushed-by-methods"
    model = AutoModel.from_pretrained(tiny_random_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_random_model_dir)
    model.push_to_hub(repo)
    processor.push_to_hub(repo)
    assert state_equal(AutoModel.from_pretrained(repo), model)
    assert AutoProcessor.from_pretrained(repo).image_processor.size == processor.image_processor.size


REMOTE = """
import sys
sys.modules["onepeace_hf"] = None
from transformers import AutoModelForImageClassification, AutoProcessor
model = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True)
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
print(type(model).__name__, type(processor).__name__)
"""

OFFLINE = """
import sys, torch
from transformers import AutoModelForImageClassification
import onepeace_hf
model = AutoModelForImageClassification.from_pretrained(sys.argv[1])
print("loaded", sum(p.sum().item() for p in model.parameters()))
try:
    AutoModelForImageClassification.from_pretrained(sys.argv[2])
except OSError as error:
    print("error:", error)
"""


@pytest.mark.slow
def test_remote_code_from_the_hub_and_offline_cache(local_hub, converted):
    from transformers import AutoModelForImageClassification

    repo = f"{local_hub.user}/remote-code"
    push_folder_to_hub(converted, repo)
    remote = run_python(REMOTE, repo)
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert remote.stdout.split() == ["OnePeaceForImageClassification", "OnePeaceProcessor"]
    # The cache is populated now (the child used the same HF_HOME): offline loading works, an uncached repo fails.
    total = sum(p.sum().item() for p in AutoModelForImageClassification.from_pretrained(converted).parameters())
    offline = run_python(OFFLINE, repo, f"{local_hub.user}/never-downloaded", env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert float(offline.stdout.split("loaded")[1].split()[0]) == pytest.approx(total, rel=1e-6)
    message = offline.stdout.split("error:", 1)[1]  # transformers' own message (it does not name the repo)
    assert "couldn't find them in the cached files" in message and "offline mode" in message
