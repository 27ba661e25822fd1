"""Where a checkpoint lives, parsed once: :class:`HubLocation`.

A checkpoint is named ``hf-hub:ORG/NAME[@REVISION]`` (a Hugging Face Hub repo, ``hf_hub:``
is accepted as in timm) or ``local-dir:PATH`` (a folder). Every part of coopnets that
takes such a name parses it here and passes the :class:`HubLocation` on; the string form
(``str(location)``) is the one spelling shown in messages, cards and usage snippets.

:meth:`HubLocation.fetch` gives the local path of one file of the checkpoint: the file in
the folder, or a download through ``huggingface_hub.hf_hub_download``, so ``HF_ENDPOINT``,
``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and tokens behave as in every other Hub
library. It takes huggingface_hub's download arguments (:data:`DOWNLOAD_ARGS`: ``cache_dir``,
``token``, ``force_download``, ``local_files_only``); :meth:`HubLocation.at_revision` applies a
``revision=`` argument (the same as ``@REV``). Downloads are checked against the Hub's
hashes; every failure is a :class:`~coopnets.hub.format.CheckpointError` that says what to do.

Example:
    >>> loc = HubLocation.parse("hf-hub:org/coop_resnet18.digits@v1")
    >>> loc.repo_id, loc.revision, str(loc)
    ('org/coop_resnet18.digits', 'v1', 'hf-hub:org/coop_resnet18.digits@v1')
    >>> HubLocation.parse("local-dir:/tmp/ckpt").folder
    PosixPath('/tmp/ckpt')
    >>> HubLocation.is_location("coop_resnet18"), HubLocation.is_location("hf_hub:org/x")
    (False, True)
    >>> str(HubLocation.parse("hf-hub:org/r18").at_revision("v2"))
    'hf-hub:org/r18@v2'
    >>> pop_download_args({"token": "hf_x", "force_download": True, "head": "conv"})
    {'token': 'hf_x', 'force_download': True}
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .format import CHECKPOINT_FILES, CheckpointError

HUB_PREFIXES = ("hf-hub:", "hf_hub:")
LOCAL_PREFIX = "local-dir:"
#: ``hf_hub_download``'s arguments that every coopnets loader takes and passes on (same names)
DOWNLOAD_ARGS = ("cache_dir", "token", "force_download", "local_files_only")


def pop_download_args(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Remove :data:`DOWNLOAD_ARGS` from ``kwargs`` (model options and download options share one call) and return them."""
    return {k: kwargs.pop(k) for k in DOWNLOAD_ARGS if k in kwargs}


@dataclass(frozen=True)
class HubLocation:
    """A checkpoint's place: a Hub repo (``repo_id`` + optional ``revision``) or a local ``folder``."""

    repo_id: Optional[str] = None
    revision: Optional[str] = None
    folder: Optional[Path] = None

    # --- parsing --------------------------------------------------------------------
    @staticmethod
    def is_location(name: str) -> bool:
        """Whether ``name`` is spelled as a checkpoint location (``hf-hub:``/``hf_hub:``/``local-dir:``)."""
        return isinstance(name, str) and name.startswith((*HUB_PREFIXES, LOCAL_PREFIX))

    @classmethod
    def parse(cls, name: str) -> "HubLocation":
        """Parse ``hf-hub:ORG/NAME[@REVISION]`` or ``local-dir:PATH``; anything else is a ``ValueError``."""
        if isinstance(name, str):
            if name.startswith(LOCAL_PREFIX) and name[len(LOCAL_PREFIX):]:
                return cls.local(name[len(LOCAL_PREFIX):])
            for prefix in HUB_PREFIXES:
                if name.startswith(prefix) and name[len(prefix):]:
                    return cls.hub(name[len(prefix):])
        raise ValueError(f"expected 'hf-hub:ORG/NAME[@REVISION]' or 'local-dir:PATH', got {name!r}.")

    @classmethod
    def hub(cls, hub_id: str, revision: Optional[str] = None) -> "HubLocation":
        """A Hub repo from ``ORG/NAME`` or ``ORG/NAME@REVISION`` (``revision`` overrides the suffix)."""
        repo_id, _, rev = hub_id.partition("@")
        return cls(repo_id=repo_id, revision=revision or rev or None)

    @classmethod
    def local(cls, folder: Union[str, Path]) -> "HubLocation":
        """A checkpoint folder on disk (made absolute)."""
        return cls(folder=Path(folder).expanduser().absolute())

    @classmethod
    def from_pretrained_cfg(cls, cfg: Mapping[str, Any]) -> Optional["HubLocation"]:
        """The checkpoint a timm ``pretrained_cfg`` names (``file`` folder, else ``hf_hub_id``), or ``None``."""
        if cfg.get("file"):
            path = Path(cfg["file"])
            return cls.local(path if path.is_dir() else path.parent)
        if cfg.get("hf_hub_id"):
            return cls.hub(cfg["hf_hub_id"])
        return None

    def at_revision(self, revision: Optional[str]) -> "HubLocation":
        """This location at ``revision`` (huggingface_hub's ``revision=`` argument; ``None``: unchanged).

        A revision that contradicts the one in the name (``@REV``) or a local folder is a ``ValueError``.
        """
        if revision is None or revision == self.revision:
            return self
        if self.folder is not None:
            raise ValueError(f"revision={revision!r} applies to hf-hub: checkpoints only; {self} is a local folder.")
        if self.revision is not None:
            raise ValueError(f"{self} already names revision {self.revision!r}; revision={revision!r} contradicts it. Give one of them.")
        return dataclasses.replace(self, revision=revision)

    # --- spelling -------------------------------------------------------------------
    def __str__(self) -> str:
        if self.folder is not None:
            return f"{LOCAL_PREFIX}{self.folder}"
        return f"hf-hub:{self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    @property
    def name(self) -> str:
        """Short display name: the repo's or folder's last path component."""
        return (self.folder.name if self.folder is not None else str(self.repo_id).rstrip("/").split("/")[-1])

    def pretrained_cfg_fields(self) -> Dict[str, str]:
        """The timm ``pretrained_cfg`` fields that point at this checkpoint (``file`` or ``hf_hub_id``)."""
        if self.folder is not None:
            return {"file": str(self.folder), "source": "local-dir"}
        return {"hf_hub_id": f"{self.repo_id}" + (f"@{self.revision}" if self.revision else ""), "source": "hf-hub"}

    # --- files ----------------------------------------------------------------------
    def fetch(self, filename: str, cache_dir: Optional[Union[str, Path]] = None, **download: Any) -> Path:
        """Local path of ``filename``: in the folder, or downloaded (and verified) into the Hub cache.

        ``download``: ``hf_hub_download``'s ``token``, ``force_download``, ``local_files_only``
        (ignored for a local folder)."""
        if self.folder is not None:
            path = self.folder / filename
            if not path.is_file():
                raise CheckpointError(
                    f"{self}: {filename} not found in {self.folder}. A coopnets checkpoint folder holds "
                    f"{', '.join(CHECKPOINT_FILES)}; write one with coopnets.save_pretrained(model, folder)."
                )
            return path
        try:
            path = Path(hf_hub_download(self.repo_id, filename, revision=self.revision, cache_dir=cache_dir, **download))
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
            why = ("offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "local_files_only=True was given"
                   if download.get("local_files_only") else f"the Hub at {constants.ENDPOINT} could not be reached"
                   + (f" ({' '.join(str(e.__cause__).split())})" if e.__cause__ is not None else ""))
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


def _verify_cached_file(pointer: Path, location: HubLocation, filename: str) -> None:
    """Check a cached download against its blob name (the Hub's ETag); remove it and raise if it differs."""
    blob = Path(os.path.realpath(pointer))
    etag = blob.name
    if blob.parent.name != "blobs" or len(etag) not in (40, 64):
        return  # no symlinked blob store (e.g. Windows without symlinks): nothing to compare with
    if _file_hash(blob, etag) != etag:
        for stale in (pointer, blob):
            stale.unlink(missing_ok=True)
        raise CheckpointError(
            f"{location}: the downloaded {filename} is corrupted (its hash does not match the Hub's {etag[:12]}...). "
            f"The damaged copy was removed from the cache; run again to download it afresh."
        )
