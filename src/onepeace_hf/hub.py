"""Publishing a converted folder on the Hugging Face Hub through huggingface_hub's own API.

Re-running a push is safe: the repository and branch are created only when missing, and huggingface_hub skips files
the Hub already has (an unchanged folder makes no new commit). Weight files of an earlier push that the folder no
longer has (another shard layout or dtype) are deleted in the same commit, so that `from_pretrained` cannot load them,
and so are the other files a conversion writes (processor files, remote code) when the folder lacks them.
A folder with a SHA256SUMS manifest is checked against it first, so that a file damaged since conversion is never
published.
"""

import contextlib
import importlib
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from .converted_folder import hub_delete_patterns
from .sharded_safetensors import MANIFEST_NAME, verify_checksum_manifest


class HubPushError(RuntimeError):
    """The push cannot happen (offline, not logged in, no access); the message says what to do."""


@dataclass
class PushResult:
    repo_url: str
    commit_url: str
    revision: str


def _network_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when it cannot connect: huggingface_hub has used requests (OSError subclasses),
    httpx and httpx2, whose transport errors are plain Exceptions."""
    errors = [OSError]
    for module_name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module_name).TransportError)
        except ImportError:
            continue
    return tuple(errors)


def _http_error(error: HfHubHTTPError, repo_id: str) -> HubPushError:
    status = error.response.status_code if error.response is not None else None
    if status in (401, 403):
        return HubPushError(f"The Hub refused access to {repo_id} ({status}): check that your token "
                            "(`hf auth login` or HF_TOKEN) has write permission for this namespace.")
    return HubPushError(f"Pushing to {repo_id} failed: {error}")


# The files from_pretrained loads weights from; those the pushed folder lacks are removed from the repository, as are
# the other files of an earlier conversion (processor files, remote code) so that none of another kind is left.
WEIGHT_FILE_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"]


@contextlib.contextmanager
def _hub_errors(repo_id: str):
    """huggingface_hub's errors as one-line `HubPushError`s that say what to do."""
    try:
        yield
    except OfflineModeIsEnabled as error:
        raise HubPushError(f"Cannot push: offline mode is on ({error}).") from error
    except HfHubHTTPError as error:
        raise _http_error(error, repo_id) from error
    except _network_errors() as error:
        raise HubPushError(f"Cannot reach the Hub at {constants.ENDPOINT}: {error}") from error


def check_push_access(repo_id: str, token: str | None = None) -> HfApi:
    """What can be checked before any work (a conversion of many GB): the repository id is valid, offline mode is
    off, and the Hub accepts the token. Returns the client to push with."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubPushError(f"Cannot push to {repo_id!r}: {error}") from None
    if constants.is_offline_mode():
        raise HubPushError("Cannot push: offline mode is on (HF_HUB_OFFLINE=1). Unset it to publish.")
    token = token or get_token()
    if token is None:
        raise HubPushError("Cannot push: not logged in to the Hugging Face Hub. Run `hf auth login` or set HF_TOKEN.")
    api = HfApi(token=token)
    with _hub_errors(repo_id):
        identity = api.whoami()
    _check_write_access(identity, repo_id)
    return api


def _check_write_access(identity: dict, repo_id: str) -> None:
    """Refuse what whoami already tells: a read-only token, or a namespace that is neither the user's nor one of
    their organizations' (the Hub gives write access to others' repositories only through organizations).
    Fine-grained tokens carry per-repository scopes and are left to the Hub to judge."""
    token = (identity.get("auth") or {}).get("accessToken") or {}
    if token.get("role") == "read":
        raise HubPushError(f"Cannot push to {repo_id}: your token is read-only. Create one with write access "
                           "(https://huggingface.co/settings/tokens) and log in with it (`hf auth login`).")
    namespace = repo_id.split("/")[0] if "/" in repo_id else None
    user = identity.get("name")
    organizations = {org.get("name") for org in identity.get("orgs") or []}
    if namespace is not None and user is not None and namespace not in {user, *organizations}:
        yours = ", ".join(sorted(organizations)) or "none"
        raise HubPushError(f"Cannot push to {repo_id}: you are logged in as {user}, who is not {namespace} nor a "
                           f"member of an organization of that name (yours: {yours}).")


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Create `repo_id` if needed (and the `revision` branch) and upload the folder's files in one commit."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No folder at {folder}.")
    if (folder / MANIFEST_NAME).is_file():
        verify_checksum_manifest(folder)
    api = check_push_access(repo_id, token)
    with _hub_errors(repo_id):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            revision=revision,
            commit_message=commit_message or f"Upload {folder.name} (converted with onepeace-hf)",
            ignore_patterns=[".*", "**/.*"],
            delete_patterns=WEIGHT_FILE_PATTERNS + hub_delete_patterns(),
        )
    return PushResult(str(repo_url), commit.commit_url, revision or constants.DEFAULT_REVISION)
