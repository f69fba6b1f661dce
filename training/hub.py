"""Publishing an export folder to the Hugging Face Hub (huggingface_hub is an optional extra: `hub`).

The token comes only from the environment (HF_TOKEN) or the user's `hf auth login`; it is handed to
huggingface_hub (which sends it in the Authorization header) and never logged, stored or shown.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

INSTALL_HINT = ("publishing needs the huggingface_hub package: install it into ComfyUI's Python with "
                "`python -m pip install \"huggingface_hub>=0.20\"` (or `pip install comfyui-dojo[hub]`), then "
                "restart ComfyUI")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


PUBLISH_ENV = "DOJO_ALLOW_PUBLISH"
SETTINGS_FILE = "comfyui-dojo.json"   # in ComfyUI's user folder, beside (not inside) the per-user folders


class PublishError(RuntimeError):
    pass


def publish_allowed(user_directory: str | os.PathLike, environ=None) -> bool:
    """Publishing uploads with the server owner's token, so it is off until the owner opts in: the
    environment variable DOJO_ALLOW_PUBLISH=1, or {"allow_publish": true} in <user>/comfyui-dojo.json.
    That file sits at the top of the user folder, where ComfyUI's userdata API (which writes only inside
    a user's own subfolder) cannot create it, so queueing prompts is not enough to switch it on."""
    environ = os.environ if environ is None else environ
    if str(environ.get(PUBLISH_ENV, "")).strip().lower() in ("1", "true", "yes", "on"):
        return True
    path = Path(user_directory) / SETTINGS_FILE
    try:
        import json
        return json.loads(path.read_text("utf-8")).get("allow_publish") is True
    except (OSError, ValueError, AttributeError):
        return False


def publish_disabled_message(user_directory: str | os.PathLike) -> str:
    return (f"publishing is off on this ComfyUI (it would upload with the server owner's Hugging Face token). "
            f"The owner can allow it by starting ComfyUI with the environment variable {PUBLISH_ENV}=1, or by "
            f"writing {{\"allow_publish\": true}} into {Path(user_directory) / SETTINGS_FILE}. Nothing was uploaded.")


def check_repo_id(repo_id: str) -> str:
    repo_id = (repo_id or "").strip()
    if not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise PublishError(f"'{repo_id}' is not a Hugging Face repository id; write it as "
                           "your-user-name/model-name (or organisation/model-name)")
    return repo_id


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _is_connection_problem(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        if isinstance(exc, (ConnectionError, TimeoutError)) or any(
                word in name for word in ("Connect", "Timeout", "Offline", "Network", "Transport", "Proxy")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def publish_folder(folder: Path, repo_id: str, private: bool = True, commit_message: str = "") -> str:
    """create_repo(exist_ok) then upload_folder; returns the repository URL. Errors are PublishError with a
    message naming the repository and what to do; the local folder is only read."""
    repo_id = check_repo_id(repo_id)
    try:
        import huggingface_hub
    except ImportError as e:
        raise PublishError(INSTALL_HINT) from e
    token = huggingface_hub.get_token()  # HF_TOKEN, else the login saved by `hf auth login`
    if not token:
        raise PublishError(f"no Hugging Face token to publish {repo_id}: run `hf auth login` (or "
                           "`huggingface-cli login`) once, or set the HF_TOKEN environment variable before "
                           f"starting ComfyUI. The export in {folder.name} is kept.")
    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
    where = endpoint or "huggingface.co"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=commit_message or f"Upload {folder.name} from ComfyUI-Dojo")
    except Exception as e:  # noqa: BLE001  (every failure becomes a message the user can act on)
        status = _status(e)
        kept = f"The local export {folder.name} is left intact; run the node again when fixed."
        if status in (401, 403):
            raise PublishError(f"Hugging Face refused the token for {repo_id} (HTTP {status}): the token is "
                               "missing, expired or has no write access to that namespace. Create a token with "
                               "write access at https://huggingface.co/settings/tokens and log in again "
                               f"(`hf auth login`) or set HF_TOKEN. {kept}") from None
        if _is_connection_problem(e) or isinstance(e, OSError):
            raise PublishError(f"could not reach {where} to publish {repo_id} ({type(e).__name__}): you may be "
                               "offline, behind a proxy, or HF_HUB_OFFLINE is set. Check the connection and "
                               f"try again. {kept}") from None
        raise PublishError(f"publishing {repo_id} to {where} failed"
                           f"{f' (HTTP {status})' if status else ''}: {type(e).__name__}: {e}. {kept}") from None
    return str(url)
