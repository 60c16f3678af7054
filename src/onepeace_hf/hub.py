"""Publishing a converted folder on the Hugging Face Hub through huggingface_hub's own API.

Re-running a push is safe: the repository and branch are created only when missing, and huggingface_hub skips files
the Hub already has (an unchanged folder makes no new commit). A folder with a SHA256SUMS manifest is checked
against it first, so that a file damaged since conversion is never published.
"""

import importlib
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

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
    if constants.is_offline_mode():
        raise HubPushError("Cannot push: offline mode is on (HF_HUB_OFFLINE=1). Unset it to publish.")
    token = token or get_token()
    if token is None:
        raise HubPushError("Cannot push: not logged in to the Hugging Face Hub. Run `hf auth login` or set HF_TOKEN.")
    api = HfApi(token=token)
    try:
        api.whoami()
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            revision=revision,
            commit_message=commit_message or f"Upload {folder.name} (converted with onepeace-hf)",
            ignore_patterns=[".*", "**/.*"],
        )
    except OfflineModeIsEnabled as error:
        raise HubPushError(f"Cannot push: offline mode is on ({error}).") from error
    except HfHubHTTPError as error:
        raise _http_error(error, repo_id) from error
    except _network_errors() as error:
        raise HubPushError(f"Cannot reach the Hub at {constants.ENDPOINT}: {error}") from error
    return PushResult(str(repo_url), commit.commit_url, revision or constants.DEFAULT_REVISION)
