"""Where `policy.model_name` lives on disk: the one resolution every role (learner, generation, doctor) goes through.

A name is a local directory, or a hub id looked up in the Hugging Face cache (and downloaded there when the machine
may reach the Hub). Resolving once, up front, gives every role the same local path and the same one-line error, and
leaves transformers and vLLM nothing to fetch. Machines without network set HF_HUB_OFFLINE=1 and fill the cache
elsewhere (`hf download NAME`) or with `place_in_hf_cache`. No torch here: the CLI imports this before any role.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from rlq.errors import UserError

TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub would use with the environment as it is now.

    huggingface_hub reads HF_HUB_CACHE / HF_HOME once, at import; this reads them at call time (same precedence),
    so a cache chosen after the import (a test, a launcher that sets the env late) is the one searched.
    """
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub saw it at import, or as the environment says now."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or now.upper() in TRUE_VALUES


def resolve_model(name: str) -> str:
    """A local directory holding the model `name`: `name` itself when it is a directory, else its hub snapshot.

    A name that reads as a path (absolute, or starting with '.' or '~') must exist: it is never taken for a hub id.
    Any other name is a hub id: the cached snapshot if there is one (no network), else a download into the cache,
    unless the machine is offline. Every failure is a UserError of one line naming the model and what to do.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    if not name or not name.strip():
        raise UserError("policy.model_name is empty: set it to a local directory or a hub id (ORG/NAME)")
    path = Path(name).expanduser()
    if path.is_dir():
        return name if Path(name).is_dir() else str(path)
    if path.is_absolute() or name.startswith((".", "~")):
        raise UserError(f"model directory {name} does not exist")
    cache = hub_cache_dir()
    try:
        return snapshot_download(repo_id=name, cache_dir=cache, local_files_only=True)
    except HFValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"model {name!r} is neither a local directory nor a valid hub id ({first})") from None
    except LocalEntryNotFoundError:  # not cached, or cached incompletely (IncompleteSnapshotError)
        pass
    if hub_offline():
        raise UserError(
            f"model {name!r} is not a local directory and not in the HF cache {cache} (HF_HUB_OFFLINE=1): "
            f"download it on a machine with network (hf download {name}) into that cache, or point "
            "policy.model_name at a local directory"
        )
    try:
        return snapshot_download(repo_id=name, cache_dir=cache)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:  # not found, gated, no network
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot download model {name!r} into the HF cache {cache}: {first}") from None


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def place_in_hf_cache(model_dir: Path, repo_id: str, cache_dir: Path, revision: str = "main") -> Path:
    """Put a local model directory into a hub cache under `repo_id`, as `hf download` would have; the snapshot dir.

    For air-gapped nodes, tests and benchmarks: afterwards `resolve_model(repo_id)` (and transformers, vLLM) find
    it offline. The layout is huggingface_hub's: `models--ORG--NAME/blobs/<sha256>` (hard links to the source files
    where the filesystem allows, else copies), `snapshots/<commit>/<file>` as relative symlinks to the blobs, and
    `refs/<revision>` holding the commit. The commit is a sha1 of the file names and contents, so placing the same
    files twice gives the same snapshot. Hidden files (`.git`, `.cache`) are left out.
    """
    model_dir, cache_dir = Path(model_dir), Path(cache_dir)
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist")
    files = sorted(
        p
        for p in model_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(model_dir).parts)
    )
    digests = {p.relative_to(model_dir).as_posix(): _file_digest(p) for p in files}
    commit = hashlib.sha1("".join(f"{rel}\0{d}\n" for rel, d in digests.items()).encode()).hexdigest()
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for src in files:
        rel = src.relative_to(model_dir).as_posix()
        blob = blobs / digests[rel]
        if not blob.exists():
            tmp = blob.with_name(blob.name + ".incomplete")
            tmp.unlink(missing_ok=True)
            try:
                os.link(src, tmp)
            except OSError:  # another filesystem, or no hard links: copy
                shutil.copyfile(src, tmp)
            tmp.replace(blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:  # no symlinks here: huggingface_hub then keeps plain files in the snapshot too
            shutil.copyfile(blob, link)
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # no newline: huggingface_hub reads the file verbatim
    return snapshot
