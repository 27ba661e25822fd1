"""Pretrained checkpoints: save, publish on the Hugging Face Hub, download, load.

A checkpoint is a folder (a Hub repo, or a local directory) with three files:

``model.safetensors``
    The weights (the state dict at any depth: depth is run-time state). Loading never
    unpickles anything.
``config.json``
    timm's format (``architecture``, ``num_classes``, ``num_features``,
    ``pretrained_cfg``, ``model_args``), so ``timm.create_model("hf-hub:...")`` and
    ``local-dir:`` rebuild the model after ``import coopnets``, plus a ``coopnets``
    section: :meth:`DepthAdaptiveModel.coop_config` (backbone, plan, number of depths,
    exit positions and head kind, block depths, backbone kwargs), the measured per-depth
    table and how the model was trained.
``README.md``
    The model card (:mod:`coopnets.hub_card`).

Downloads go through ``huggingface_hub.hf_hub_download``, so ``HF_ENDPOINT``,
``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, tokens and ``@revision`` behave as in
every other Hub library. Loading is strict: the checkpoint's architecture, depth plan,
classes and state dict keys must match the model, and downloaded files are checked
against the Hub's hashes; every failure is a :class:`CheckpointError` that names the
checkpoint and says what to do.

Example:
    >>> import coopnets, tempfile, torch
    >>> m = coopnets.create_model("coop_resnet18", num_classes=10)
    >>> folder = coopnets.save_pretrained(m, tempfile.mkdtemp() + "/r18")
    >>> sorted(p.name for p in folder.iterdir())
    ['README.md', 'config.json', 'model.safetensors']
    >>> m2 = coopnets.create_model(f"local-dir:{folder}", pretrained=True)
    >>> torch.equal(m2.state_dict()["exits.0.fc.weight"], m.state_dict()["exits.0.fc.weight"])
    True
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import safetensors.torch
import timm
import torch
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from timm.models._pretrained import filter_pretrained_cfg

from ._registry import HUB_PREFIXES, is_model, list_models
from .models.depth_adaptive import DepthAdaptiveModel

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
CHECKPOINT_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)
FORMAT_VERSION = 1
PLAN_KEYS = ("plan", "num_depths", "exit_indices", "head", "head_width", "block_depths")
DATA_CONFIG_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation")

PUBLISH_HINT = (
    "Train one with `coopnets train ... --out RUN_DIR`, publish it with "
    "`coopnets push RUN_DIR --repo-id ORG/NAME`, then load it with "
    "coopnets.create_model('hf-hub:ORG/NAME', pretrained=True)."
)


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, found, downloaded or loaded; the message says what to do."""


# --- format ---------------------------------------------------------------------------
def _architecture(model: DepthAdaptiveModel) -> str:
    """The coop model name that rebuilds ``model``: its zoo entry, else ``coop_<backbone>``."""
    arch = model.pretrained_cfg.get("architecture", "")
    return arch if arch.startswith("coop_") else f"coop_{model.backbone_name}"


def _model_args(model: DepthAdaptiveModel) -> Dict[str, Any]:
    """Constructor arguments that rebuild ``model``'s exact structure (timm's ``model_args``)."""
    args: Dict[str, Any] = {"num_classes": model.num_classes, "plan": model.plan}
    if model.plan == "exits":
        args.update(exit_indices=list(model.exit_indices), head=model.head_kind)
        if model.head_width is not None:
            args["head_width"] = model.head_width
    else:
        args["block_depths"] = [list(d) for d in model.block_depths]
    args.update(model.backbone_kwargs)
    return args


def _check_per_depth(rows: Optional[Sequence[Dict[str, Any]]], num_depths: int) -> List[Dict[str, Any]]:
    """Per-depth rows sorted by depth; each must name a distinct depth in ``1..num_depths``."""
    checked = [dict(r) for r in rows or []]
    depths = [r.get("depth") for r in checked]
    if any(not isinstance(d, int) or not 1 <= d <= num_depths for d in depths) or len(set(depths)) != len(depths):
        raise ValueError(
            f"per_depth rows need distinct integer 'depth' values in 1..{num_depths}, got {depths}. "
            f"Build them with coopnets.profile(model, ...) and add 'accuracy' per depth."
        )
    return sorted(checked, key=lambda r: r["depth"])


def _plain(value: Any) -> Any:
    """JSON fallback for numpy/torch values (``tolist``) and paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serializable")


def checkpoint_config(
    model: DepthAdaptiveModel,
    per_depth: Optional[Sequence[Dict[str, Any]]] = None,
    training: Optional[Dict[str, Any]] = None,
    data_config: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The ``config.json`` of ``model``: timm's fields plus the ``coopnets`` section.

    Args:
        model: the depth-adaptive model.
        per_depth: measured rows, one per depth (``depth``, ``accuracy``, ``params``,
            ``flops``, ``latency_ms``, ``batch_size``, ``device``).
        training: how it was trained (``method``, ``dataset``, ``epochs``, ``seed``, ``command``...).
        data_config: preprocessing of the training data (``input_size``, ``mean``, ``std``,
            ``crop_pct``, ``interpolation``), stored in ``pretrained_cfg``.

    Example:
        >>> import coopnets
        >>> cfg = checkpoint_config(coopnets.create_model("coop_resnet18", num_classes=10))
        >>> cfg["architecture"], cfg["num_classes"], cfg["coopnets"]["num_depths"]
        ('coop_resnet18', 10, 4)
    """
    if not isinstance(model, DepthAdaptiveModel):
        raise TypeError(f"expected a coopnets DepthAdaptiveModel, got {type(model).__name__}; wrap a timm model with coopnets.wrap(...).")
    unknown = set(data_config or {}) - set(DATA_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"data_config keys must be among {DATA_CONFIG_KEYS}, got {sorted(unknown)}.")
    architecture = _architecture(model)
    pretrained_cfg = filter_pretrained_cfg(dict(model.pretrained_cfg), remove_source=True)
    pretrained_cfg = {k: v for k, v in pretrained_cfg.items() if k not in ("tag", "state_dict")}
    pretrained_cfg.update(data_config or {}, architecture=architecture, num_classes=model.num_classes)
    config = {
        "architecture": architecture,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "pretrained_cfg": pretrained_cfg,
        "model_args": _model_args(model),
        "coopnets": {
            "format_version": FORMAT_VERSION,
            **model.coop_config(),
            "per_depth": _check_per_depth(per_depth, model.num_depths),
            "training": dict(training or {}),
        },
    }
    # tuples -> lists, numpy/torch numbers -> Python numbers, and a clear error now rather than a bad file later
    try:
        return json.loads(json.dumps(config, default=_plain))
    except TypeError as e:
        raise ValueError(f"checkpoint config of {architecture} is not JSON-serializable ({e}); pass plain numbers/strings in per_depth, training and backbone kwargs.") from e


# --- save -------------------------------------------------------------------------------
def _replace_folder_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` and move the result to ``target`` in one rename.

    An existing ``target`` stays untouched until the new folder is complete, and is
    restored if the swap fails; the temporary folder never outlives the call.
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


def _write_checkpoint(folder: Path, state_dict: Optional[Dict[str, torch.Tensor]], config: Dict[str, Any], model_id: str) -> None:
    from .hub_card import model_card

    if state_dict is not None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        safetensors.torch.save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    model_card(config, model_id).save(folder / CARD_NAME)


def save_pretrained(
    model: DepthAdaptiveModel,
    save_directory: Union[str, Path],
    per_depth: Optional[Sequence[Dict[str, Any]]] = None,
    training: Optional[Dict[str, Any]] = None,
    *,
    data_config: Optional[Dict[str, Any]] = None,
    repo_id: Optional[str] = None,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and the ``README.md`` model card.

    The folder is written next to ``save_directory`` and renamed into place, so a crash
    never leaves a half-written checkpoint and never damages an existing one.

    Args:
        model: the depth-adaptive model (saved as is; depth is not part of the weights).
        save_directory: the checkpoint folder (created; replaced if it holds a checkpoint).
        per_depth: measured per-depth rows (see :func:`checkpoint_config`).
        training: how the model was trained (see :func:`checkpoint_config`).
        data_config: preprocessing of the training data (see :func:`checkpoint_config`).
        repo_id: the Hub repo it will be published as (``ORG/NAME``), for the card's
            usage snippet; default: the local folder.

    Returns:
        The folder's absolute path.

    Example:
        >>> import coopnets, tempfile
        >>> m = coopnets.create_model("coop_resnet18", num_classes=10)
        >>> rows = [{"depth": 1, "accuracy": 0.9, "params": 1000, "device": "cpu", "batch_size": 1}]
        >>> path = coopnets.save_pretrained(m, tempfile.mkdtemp() + "/ckpt", per_depth=rows)
        >>> import json; json.loads((path / "config.json").read_text())["coopnets"]["per_depth"][0]["accuracy"]
        0.9
    """
    config = checkpoint_config(model, per_depth, training, data_config)
    target = Path(save_directory).expanduser().absolute()
    model_id = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{target}"
    state_dict = model.state_dict()
    return _replace_folder_atomically(target, lambda tmp: _write_checkpoint(tmp, state_dict, config, model_id))


# --- publish ------------------------------------------------------------------------------
def push_to_hub(
    model_or_folder: Union[DepthAdaptiveModel, str, Path],
    repo_id: str,
    per_depth: Optional[Sequence[Dict[str, Any]]] = None,
    training: Optional[Dict[str, Any]] = None,
    private: bool = False,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload coopnets checkpoint",
):
    """Publish a model, or a :func:`save_pretrained` folder, to the Hub repo ``repo_id``.

    Creates the repo if needed (``HfApi.create_repo(exist_ok=True)``) and uploads the
    three checkpoint files in one commit (``HfApi.upload_folder``). The card is rendered
    for ``repo_id``; ``per_depth``/``training``, when given, replace those of a folder.

    Returns:
        huggingface_hub's ``CommitInfo`` (``.oid`` is the commit to pin as ``@revision``).

    Example (needs a Hub account and network)::

        info = coopnets.push_to_hub(model, "someorg/coop_resnet18.digits", per_depth=rows,
                                    training={"method": "cooperative", "dataset": "digits"})
        coopnets.create_model(f"hf-hub:someorg/coop_resnet18.digits@{info.oid}", pretrained=True)
    """
    with tempfile.TemporaryDirectory(prefix="coopnets-push-") as staging_root:
        staging = Path(staging_root) / "checkpoint"
        if isinstance(model_or_folder, DepthAdaptiveModel):
            save_pretrained(model_or_folder, staging, per_depth, training, repo_id=repo_id)
        else:
            _stage_folder(Path(model_or_folder), staging, repo_id, per_depth, training)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(
                folder_path=str(staging), repo_id=repo_id, revision=revision, commit_message=commit_message,
                allow_patterns=list(CHECKPOINT_FILES),
            )
        except HfHubHTTPError as e:
            raise CheckpointError(
                f"publishing to {repo_id} on {api.endpoint} failed: {e}. Log in (`hf auth login`) or pass a "
                f"write token (token=... / --token / HF_TOKEN), and check that you may write to that namespace"
                + (f" and that branch {revision!r} exists" if revision else "") + "."
            ) from e


def _stage_folder(
    folder: Path, staging: Path, repo_id: str,
    per_depth: Optional[Sequence[Dict[str, Any]]], training: Optional[Dict[str, Any]],
) -> None:
    """Copy a checkpoint folder to ``staging`` with its config updated and its card rendered for ``repo_id``."""
    missing = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} is not a coopnets checkpoint folder (missing {', '.join(missing)}). "
            f"Write one with coopnets.save_pretrained(model, folder) (coopnets train writes RUN_DIR/model)."
        )
    config = _parse_config((folder / CONFIG_NAME).read_text(), f"local-dir:{folder}")
    coop = config["coopnets"]
    if per_depth is not None:
        coop["per_depth"] = _check_per_depth(per_depth, coop["num_depths"])
    if training is not None:
        coop["training"] = dict(training)
    staging.mkdir(parents=True)
    shutil.copyfile(folder / WEIGHTS_NAME, staging / WEIGHTS_NAME)
    _write_checkpoint(staging, None, config, f"hf-hub:{repo_id}")


# --- locate and download ------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointSource:
    """Where a checkpoint lives: a Hub repo (``repo_id`` + ``revision``) or a local ``folder``."""

    repo_id: Optional[str] = None
    revision: Optional[str] = None
    folder: Optional[Path] = None

    @classmethod
    def from_hub_id(cls, hub_id: str) -> "CheckpointSource":
        """``ORG/NAME`` or ``ORG/NAME@REVISION``."""
        repo_id, _, revision = hub_id.partition("@")
        return cls(repo_id=repo_id, revision=revision or None)

    def __str__(self) -> str:
        if self.folder is not None:
            return f"local-dir:{self.folder}"
        return f"hf-hub:{self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    def fetch(self, filename: str, cache_dir: Optional[Union[str, Path]] = None) -> Path:
        """Local path of ``filename``: in the folder, or downloaded (and verified) into the Hub cache."""
        if self.folder is not None:
            path = self.folder / filename
            if not path.is_file():
                raise CheckpointError(
                    f"{self}: {filename} not found in {self.folder}. A coopnets checkpoint folder holds "
                    f"{', '.join(CHECKPOINT_FILES)}; write one with coopnets.save_pretrained(model, folder)."
                )
            return path
        try:
            path = Path(hf_hub_download(self.repo_id, filename, revision=self.revision, cache_dir=cache_dir))
        except RepositoryNotFoundError as e:
            raise CheckpointError(
                f"{self}: repository {self.repo_id!r} not found on {constants.ENDPOINT} (or it is private/gated). "
                f"Check the id; for a private repo log in (`hf auth login`) or set HF_TOKEN; to use a mirror set HF_ENDPOINT."
            ) from e
        except RevisionNotFoundError as e:
            raise CheckpointError(
                f"{self}: revision {self.revision!r} does not exist in {self.repo_id}. Use a branch, tag or "
                f"commit of that repo, or drop '@{self.revision}' for the latest."
            ) from e
        except LocalEntryNotFoundError as e:
            why = "offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
            raise CheckpointError(
                f"{self}: {filename} is not in the local cache ({cache_dir or constants.HF_HUB_CACHE}) and {why}. "
                f"Download it once while online (unset HF_HUB_OFFLINE), point HF_HUB_CACHE/HF_HOME at a cache "
                f"that has it, or load a copied checkpoint folder with 'local-dir:PATH'."
            ) from e
        except EntryNotFoundError as e:
            raise CheckpointError(
                f"{self}: the repo has no {filename}, so it is not a coopnets checkpoint. Publish one with "
                f"coopnets.push_to_hub(model, {self.repo_id!r}) or `coopnets push RUN_DIR --repo-id {self.repo_id}`."
            ) from e
        except HfHubHTTPError as e:
            raise CheckpointError(f"{self}: downloading {filename} failed ({e}). Retry, or check HF_ENDPOINT and your token.") from e
        _verify_cached_file(path, self, filename)
        return path


def _file_hash(path: Path, etag: str) -> str:
    """Hash of ``path`` in the Hub's ETag scheme: sha256 (LFS, 64 hex) or git blob sha1 (40 hex)."""
    sha = hashlib.sha256() if len(etag) == 64 else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _verify_cached_file(pointer: Path, source: CheckpointSource, filename: str) -> None:
    """Check a cached download against its blob name (the Hub's ETag); remove it and raise if it differs."""
    blob = Path(os.path.realpath(pointer))
    etag = blob.name
    if blob.parent.name != "blobs" or len(etag) not in (40, 64):
        return  # no symlinked blob store (e.g. Windows without symlinks): nothing to compare with
    if _file_hash(blob, etag) != etag:
        for stale in (pointer, blob):
            stale.unlink(missing_ok=True)
        raise CheckpointError(
            f"{source}: the downloaded {filename} is corrupted (its hash does not match the Hub's {etag[:12]}...). "
            f"The damaged copy was removed from the cache; run again to download it afresh."
        )


def _parse_config(text: str, where: Union[str, CheckpointSource]) -> Dict[str, Any]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: {CONFIG_NAME} is not valid JSON ({e}); re-save the checkpoint with coopnets.save_pretrained.") from e
    if not isinstance(config, dict) or not isinstance(config.get("coopnets"), dict) or "architecture" not in config:
        raise CheckpointError(
            f"{where}: {CONFIG_NAME} has no 'coopnets' section, so this is not a coopnets checkpoint "
            f"(a plain timm model loads with timm.create_model). Save coopnets models with coopnets.save_pretrained."
        )
    version = config["coopnets"].get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{where}: checkpoint format version {version!r}; this coopnets reads version {FORMAT_VERSION}. Upgrade coopnets.")
    return config


def read_config(source: CheckpointSource, cache_dir: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """The checkpoint's ``config.json`` (downloaded and cached for a Hub repo)."""
    return _parse_config(source.fetch(CONFIG_NAME, cache_dir).read_text(), source)


def _source_of(model: DepthAdaptiveModel) -> CheckpointSource:
    """The checkpoint named by ``model.pretrained_cfg`` (``file`` for local-dir, else ``hf_hub_id``)."""
    cfg = model.pretrained_cfg
    arch = cfg.get("architecture") or _architecture(model)
    if cfg.get("file"):
        path = Path(cfg["file"])
        return CheckpointSource(folder=path if path.is_dir() else path.parent)
    if cfg.get("hf_hub_id") and arch.startswith("coop_"):
        return CheckpointSource.from_hub_id(cfg["hf_hub_id"])
    published = list_models(f"{arch}.*", pretrained=True)
    raise CheckpointError(
        f"{arch} has no published coopnets weights for this config (no hf_hub_id). "
        f"Published checkpoints: {', '.join(published) or 'none for this model yet'}. {PUBLISH_HINT} "
        f"For timm's ImageNet backbone weights instead, pass pretrained_backbone=True."
    )


# --- load ---------------------------------------------------------------------------------
def _check_compatible(model: DepthAdaptiveModel, config: Dict[str, Any], source: CheckpointSource) -> None:
    expected = {"architecture": _architecture(model), "num_classes": model.num_classes}
    expected.update({k: v for k, v in json.loads(json.dumps(model.coop_config())).items() if k in PLAN_KEYS})
    found = {"architecture": config["architecture"], "num_classes": config["num_classes"]}
    found.update({k: v for k, v in config["coopnets"].items() if k in PLAN_KEYS})
    diffs = [f"{k}: checkpoint {found.get(k)!r}, model {v!r}" for k, v in expected.items() if found.get(k) != v]
    if diffs:
        hint = (
            "To fine-tune on other classes, load it as saved and call model.reset_classifier(n)."
            if [d.split(":")[0] for d in diffs] == ["num_classes"]
            else f"Load it with coopnets.create_model('{source}', pretrained=True), which rebuilds the model from the checkpoint's config."
        )
        raise CheckpointError(f"{source} does not match the requested model ({'; '.join(diffs)}). {hint}")


def _load_weights(model: DepthAdaptiveModel, path: Path, source: CheckpointSource) -> None:
    try:
        state_dict = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupted files
        raise CheckpointError(
            f"{source}: {WEIGHTS_NAME} is truncated or corrupted ({e}). Download it again "
            f"(hf_hub_download(..., force_download=True)) or re-save the checkpoint."
        ) from e
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
        raise CheckpointError(
            f"{source}: the weights do not fit the model: {'; '.join(parts)}. The checkpoint was saved from a "
            f"differently configured model; load it with coopnets.create_model('{source}', pretrained=True), "
            f"which rebuilds the model from the checkpoint's config.json (model_args)."
        )
    model.load_state_dict(state_dict, strict=True)


def load_pretrained(model: DepthAdaptiveModel, cache_dir: Optional[Union[str, Path]] = None) -> DepthAdaptiveModel:
    """Load the coopnets checkpoint named by ``model.pretrained_cfg`` into ``model`` (strictly).

    The checkpoint is ``pretrained_cfg["file"]`` (a local folder) or
    ``pretrained_cfg["hf_hub_id"]`` (``ORG/NAME[@REVISION]``, downloaded with
    ``hf_hub_download`` into the Hub cache). Zoo entries call this for ``pretrained=True``.

    Raises:
        CheckpointError: no published weights, not found, offline without a cached copy,
            corrupted download, or a checkpoint that does not match the model.

    Example:
        >>> import coopnets
        >>> coopnets.create_model("coop_resnet18", pretrained=True)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        coopnets.pretrained.CheckpointError: coop_resnet18 has no published coopnets weights ...
    """
    source = _source_of(model)
    _check_compatible(model, read_config(source, cache_dir), source)
    _load_weights(model, source.fetch(WEIGHTS_NAME, cache_dir), source)
    return model


def create_from_hub(model_name: str, pretrained: bool = False, **kwargs: Any) -> DepthAdaptiveModel:
    """Build the model of a checkpoint ``hf-hub:ORG/NAME[@REV]`` or ``local-dir:PATH`` from its config.

    The structure comes from the checkpoint's ``config.json`` (``model_args``;
    ``kwargs`` override them); ``pretrained=True`` also loads its weights. Zoo
    architectures go through timm's registry; checkpoints of other wrapped backbones
    are rebuilt with :class:`DepthAdaptiveModel`. Called by
    ``coopnets.create_model("hf-hub:...")``.

    Example:
        >>> import coopnets, tempfile
        >>> path = coopnets.save_pretrained(coopnets.wrap("test_resnet", num_classes=3), tempfile.mkdtemp() + "/t")
        >>> coopnets.create_model(f"local-dir:{path}", pretrained=True).num_classes
        3
    """
    prefix, _, ref = model_name.partition(":")
    if f"{prefix}:" not in HUB_PREFIXES or not ref:
        raise ValueError(f"expected 'hf-hub:ORG/NAME[@REVISION]' or 'local-dir:PATH', got {model_name!r}.")
    if prefix == "local-dir":
        source = CheckpointSource(folder=Path(ref).expanduser().absolute())
        location = {"file": str(source.folder), "source": "local-dir"}
    else:
        source = CheckpointSource.from_hub_id(ref)
        location = {"hf_hub_id": ref, "source": "hf-hub"}
    cache_dir = kwargs.get("cache_dir")
    config = read_config(source, cache_dir)
    pretrained_cfg = {**config["pretrained_cfg"], **location}
    args = {**config["model_args"], **kwargs}
    arch = config["architecture"]
    if is_model(arch):
        return timm.create_model(arch, pretrained=pretrained, pretrained_cfg=pretrained_cfg, **args)
    args.pop("cache_dir", None)
    model = DepthAdaptiveModel(config["coopnets"]["backbone"], **args)
    model.pretrained_cfg = model.default_cfg = pretrained_cfg
    return load_pretrained(model, cache_dir) if pretrained else model


__all__ = [
    "CheckpointError",
    "CheckpointSource",
    "checkpoint_config",
    "create_from_hub",
    "load_pretrained",
    "push_to_hub",
    "read_config",
    "save_pretrained",
]
