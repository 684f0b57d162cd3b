"""Finding model weights: a local file or folder, or a Hugging Face repo id when online.

Nothing here downloads behind the user's back on a machine without network access: a missing
file raises :class:`MissingWeightsError` that says what is missing and how to get it.
Only safetensors files are loaded (pickle checkpoints can execute code).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from imix2mix.errors import MissingWeightsError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


def looks_like_repo_id(source: str | Path) -> bool:
    """True for ``org/name`` strings that are not an existing local path."""
    text = str(source)
    return bool(_REPO_ID.match(text)) and not Path(text).expanduser().exists()


def _download_hint(what: str, repo_id: str, hint: str | None) -> str:
    extra = f" {hint}" if hint else ""
    return (
        f"Could not fetch {what} from the Hugging Face Hub repo '{repo_id}' (offline, or no access)."
        f"{extra} Either run on a machine with network access (`hf auth login` for gated repos),"
        f" or download the files once and pass their local path instead of the repo id."
    )


def resolve_file(
    source: str | Path,
    filename: str,
    *,
    what: str,
    subfolder: str | None = None,
    hint: str | None = None,
) -> Path:
    """Return a local path to ``filename`` given a file, a folder that holds it, or a repo id."""
    path = Path(str(source)).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / subfolder / filename if subfolder else path / filename
        if candidate.is_file():
            return candidate
        present = sorted(p.name for p in (candidate.parent.iterdir() if candidate.parent.is_dir() else []))
        raise MissingWeightsError(
            f"{what}: expected '{candidate}' but it does not exist"
            f" (folder holds: {', '.join(present[:20]) or 'nothing'})."
        )
    if not looks_like_repo_id(source):
        raise MissingWeightsError(f"{what}: '{source}' is neither an existing file or folder nor a Hugging Face repo id.")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError

    try:
        return Path(hf_hub_download(str(source), filename, subfolder=subfolder))
    except GatedRepoError as exc:
        raise MissingWeightsError(
            f"{what}: the Hugging Face repo '{source}' is gated. Accept its terms on the model page,"
            f" run `hf auth login`, or pass a local path to '{filename}'."
        ) from exc
    except Exception as exc:  # offline, DNS failure, 404: all mean "not here"
        raise MissingWeightsError(_download_hint(what, str(source), hint) + f" ({type(exc).__name__})") from exc


def resolve_dir(source: str | Path, *, what: str, hint: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """Return a local folder for a diffusers/transformers ``from_pretrained`` source."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MissingWeightsError(f"{what}: '{path}' is a file; a model folder (with config.json) is needed.")
    if not looks_like_repo_id(source):
        raise MissingWeightsError(f"{what}: '{source}' is neither an existing folder nor a Hugging Face repo id.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=allow_patterns))
    except Exception as exc:
        raise MissingWeightsError(_download_hint(what, str(source), hint) + f" ({type(exc).__name__})") from exc


def load_safetensors(path: str | Path, *, what: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors state dict; refuse pickle formats with a clear message."""
    path = Path(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise MissingWeightsError(
            f"{what}: '{path}' is a pickle checkpoint; only .safetensors files are loaded (pickle can run code)."
            " Convert it once with safetensors.torch.save_file."
        )
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:
        raise MissingWeightsError(f"{what}: '{path}' is not a readable safetensors file ({exc}).") from exc


def describe_key_mismatch(what: str, missing: list[str], unexpected: list[str], limit: int = 12) -> str:
    """One readable message for state-dict key mismatches."""
    parts = [f"{what}: checkpoint does not match the model."]
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:limit])}.")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:limit])}.")
    return " ".join(parts)
