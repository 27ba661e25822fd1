"""Writing checkpoints: :func:`save_pretrained` (a local folder) and :func:`push_to_hub`.

Folders are written next to their target and renamed into place, so a crash never
leaves a half-written checkpoint and never damages an existing one; every file and folder
gets the umask's permissions (0644 / 0755 under umask 022). Uploads go through
``huggingface_hub.HfApi`` (``create_repo`` + one ``upload_folder`` commit) and take its
argument names (``private``, ``revision``, ``token``, ``commit_message``, ``commit_description``, ``create_pr``).

Example:
    >>> import coopnets, tempfile, torch
    >>> m = coopnets.create_model("coop_resnet18", num_classes=10)
    >>> folder = coopnets.save_pretrained(m, tempfile.mkdtemp() + "/r18")
    >>> sorted(p.name for p in folder.iterdir())
    ['README.md', 'config.json', 'model.safetensors']
    >>> oct((folder / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    True
    >>> m2 = coopnets.create_model(f"local-dir:{folder}", pretrained=True)
    >>> torch.equal(m2.state_dict()["exits.0.fc.weight"], m.state_dict()["exits.0.fc.weight"])
    True
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import safetensors.torch
import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from ..models.depth_adaptive import DepthAdaptiveModel
from .card import model_card
from .format import (
    CARD_NAME,
    CHECKPOINT_FILES,
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    apply_data_config,
    check_per_depth,
    checkpoint_config,
    parse_config,
    to_json_data,
)
from .location import HubLocation


def current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no other portable way)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_safetensors(state_dict: Mapping[str, torch.Tensor], path: Union[str, Path],
                      metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write a state dict as safetensors (tensors detached, contiguous, on the CPU); the one writer of coopnets.

    The file gets the umask's permissions like any other file (safetensors' writer goes
    through a private temporary file, which would leave it 0600).
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    os.chmod(path, 0o666 & ~current_umask())
    return Path(path)


def replace_folder_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` and move the result to ``target`` in one rename.

    An existing ``target`` stays untouched until the new folder is complete, and is
    restored if the swap fails; the temporary folder never outlives the call. The
    folder gets the usual permissions (not ``mkdtemp``'s 0700).
    """
    target = target.expanduser().absolute()
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a folder; choose another save_directory.")
        foreign = sorted(p.name for p in target.iterdir() if p.name not in CHECKPOINT_FILES)
        if foreign:
            raise FileExistsError(
                f"{target} holds other files ({', '.join(foreign[:5])}); save_pretrained replaces the whole "
                f"folder, so give it an empty or checkpoint-only folder (e.g. {target / 'model'})."
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        if target.exists():
            os.replace(target, backup)
        try:
            os.replace(tmp, target)
        except OSError:
            if backup.exists():
                os.replace(backup, target)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(backup, ignore_errors=True)
    return target


def write_checkpoint(folder: Path, state_dict: Optional[Mapping[str, torch.Tensor]], config: Dict[str, Any],
                     location: HubLocation) -> None:
    """Write the checkpoint files into ``folder`` (weights only when ``state_dict`` is given); the card names ``location``."""
    if state_dict is not None:
        write_safetensors(state_dict, folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    model_card(config, location).save(folder / CARD_NAME)


def save_pretrained(
    model: DepthAdaptiveModel,
    save_directory: Union[str, Path],
    per_depth: Optional[Sequence[Dict[str, Any]]] = None,
    training: Optional[Dict[str, Any]] = None,
    *,
    data_config: Optional[Dict[str, Any]] = None,
    repo_id: Optional[str] = None,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and the ``README.md`` model card, atomically.

    Args:
        model: the depth-adaptive model (saved as is; depth is not part of the weights).
        save_directory: the checkpoint folder (created; replaced if it holds a checkpoint).
        per_depth: measured per-depth rows (see :func:`coopnets.hub.format.checkpoint_config`).
        training: how the model was trained (see :func:`coopnets.hub.format.checkpoint_config`).
        data_config: preprocessing of the training data (see :func:`coopnets.hub.format.checkpoint_config`).
        repo_id: the Hub repo it will be published as (``ORG/NAME``), for the card's
            usage snippet; default: the local folder.

    Returns:
        The folder's absolute path.

    Example:
        >>> import coopnets, tempfile, json
        >>> m = coopnets.create_model("coop_resnet18", num_classes=10)
        >>> rows = [{"depth": 1, "accuracy": 0.9, "params": 1000, "device": "cpu", "batch_size": 1}]
        >>> path = coopnets.save_pretrained(m, tempfile.mkdtemp() + "/ckpt", per_depth=rows)
        >>> json.loads((path / "config.json").read_text())["coopnets"]["per_depth"][0]["accuracy"]
        0.9
    """
    config = checkpoint_config(model, per_depth, training, data_config)
    target = Path(save_directory).expanduser().absolute()
    location = HubLocation.hub(repo_id) if repo_id else HubLocation.local(target)
    state_dict = model.state_dict()
    return replace_folder_atomically(target, lambda tmp: write_checkpoint(tmp, state_dict, config, location))


def push_to_hub(
    model_or_folder: Union[DepthAdaptiveModel, str, Path],
    repo_id: str,
    per_depth: Optional[Sequence[Dict[str, Any]]] = None,
    training: Optional[Dict[str, Any]] = None,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload coopnets checkpoint",
    *,
    data_config: Optional[Dict[str, Any]] = None,
    commit_description: Optional[str] = None,
    create_pr: bool = False,
):
    """Publish a model, or a :func:`save_pretrained` folder, to the Hub repo ``repo_id``.

    Creates the repo if needed (``HfApi.create_repo(exist_ok=True, private=private)``) and
    uploads the three checkpoint files in one commit (``HfApi.upload_folder``). The card is
    rendered for ``repo_id``; ``per_depth``/``training``/``data_config`` (the preprocessing and
    label names, as for :func:`save_pretrained`), when given, replace those of a folder.

    Args:
        private: create the repo as private (``None``: the Hub's default for the namespace).
        revision: the branch to commit to (default ``main``).
        token: a Hub token with write access (default: ``HF_TOKEN`` / ``hf auth login``).
        commit_message, commit_description: the commit's summary and description.
        create_pr: open a pull request with the commit instead of committing to the branch
            (``revision`` must then be unset: pull requests target the default branch).

    Returns:
        huggingface_hub's ``CommitInfo`` (``.oid`` is the commit to pin as ``@revision``;
        ``.pr_url`` / ``.pr_revision`` with ``create_pr=True``).

    Example (needs a Hub account and network)::

        info = coopnets.push_to_hub(model, "someorg/coop_resnet18.digits", per_depth=rows,
                                    training={"method": "cooperative", "dataset": "digits"},
                                    data_config=splits.pretrained_cfg_fields())
        coopnets.create_model(f"hf-hub:someorg/coop_resnet18.digits@{info.oid}", pretrained=True)
    """
    if create_pr and revision not in (None, "main"):
        raise ValueError(f"create_pr=True opens a pull request against the default branch; drop revision={revision!r}.")
    with tempfile.TemporaryDirectory(prefix="coopnets-push-") as staging_root:
        staging = Path(staging_root) / "checkpoint"
        if isinstance(model_or_folder, DepthAdaptiveModel):
            save_pretrained(model_or_folder, staging, per_depth, training, data_config=data_config, repo_id=repo_id)
        else:
            _stage_folder(Path(model_or_folder), staging, repo_id, per_depth, training, data_config)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(
                folder_path=str(staging), repo_id=repo_id, revision=revision, commit_message=commit_message,
                commit_description=commit_description, create_pr=create_pr, allow_patterns=list(CHECKPOINT_FILES),
            )
        except OfflineModeIsEnabled as e:
            raise CheckpointError(
                f"publishing to {repo_id} needs the Hub but offline mode is on (HF_HUB_OFFLINE=1); unset it and retry."
            ) from e
        except (HfHubHTTPError, ConnectionError) as e:
            raise CheckpointError(
                f"publishing to {repo_id} on {api.endpoint} failed: {e}. Log in (`hf auth login`) or pass a "
                f"write token (token=... / --token / HF_TOKEN), and check that you may write to that namespace"
                + (f" and that branch {revision!r} exists" if revision else "") + "."
            ) from e


def _stage_folder(
    folder: Path, staging: Path, repo_id: str, per_depth: Optional[Sequence[Dict[str, Any]]],
    training: Optional[Dict[str, Any]], data_config: Optional[Dict[str, Any]] = None,
) -> None:
    """Copy a checkpoint folder to ``staging`` (config in the current format, updated; card rendered for ``repo_id``)."""
    missing = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} is not a coopnets checkpoint folder (missing {', '.join(missing)}). "
            f"Write one with coopnets.save_pretrained(model, folder) (coopnets train writes RUN_DIR/model)."
        )
    config = parse_config((folder / CONFIG_NAME).read_text(), HubLocation.local(folder))
    coop = config["coopnets"]
    if per_depth is not None:
        coop["per_depth"] = check_per_depth(per_depth, coop["num_depths"])
    if training is not None:
        coop["training"] = dict(training)
    apply_data_config(config, to_json_data(data_config, "data_config") if data_config else None)
    staging.mkdir(parents=True)
    shutil.copyfile(folder / WEIGHTS_NAME, staging / WEIGHTS_NAME)
    write_checkpoint(staging, None, config, HubLocation.hub(repo_id))
