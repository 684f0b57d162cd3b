"""Loading (and saving) SEVA network weights: safetensors only, built on the meta device so the
1.26 B parameters are allocated once, strict key check with a readable error."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from imix2mix.errors import MissingWeightsError
from imix2mix.hub import describe_key_mismatch, load_safetensors, resolve_file
from imix2mix.seva.config import SevaConfig
from imix2mix.seva.network import Seva

SEVA_REPO = "stabilityai/stable-virtual-camera"
SEVA_V11_FILENAME = "modelv1.1.safetensors"
SEVA_V10_FILENAME = "model.safetensors"
CONFIG_METADATA_KEY = "imix2mix.seva_config"
WHAT = "SEVA checkpoint"
GATED_HINT = (
    f"'{SEVA_REPO}' is gated: accept the license on its Hugging Face page and log in, or pass the local"
    f" path of {SEVA_V11_FILENAME}."
)


def config_from_metadata(path: Path) -> SevaConfig | None:
    """The SevaConfig stored by :func:`save_seva`, or None (official checkpoints carry none)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        text = (handle.metadata() or {}).get(CONFIG_METADATA_KEY)
    if text is None:
        return None
    fields = json.loads(text)
    return SevaConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def load_seva(
    source: str | Path = SEVA_REPO,
    *,
    filename: str = SEVA_V11_FILENAME,
    config: SevaConfig | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> Seva:
    """Load SEVA from a ``.safetensors`` file, a folder holding ``filename``, or the Hub repo.

    ``filename`` picks the version in a folder or repo (``model.safetensors`` is v1.0).
    ``config`` defaults to the one saved by :func:`save_seva`, else the official architecture.
    ``dtype`` None keeps the stored dtype (the official files are float32).
    """
    path = resolve_file(source, filename, what=WHAT, hint=GATED_HINT)
    state_dict = load_safetensors(path, what=f"{WHAT} '{path}'", device=device)
    config = config or config_from_metadata(path) or SevaConfig()
    with torch.device("meta"):
        network = Seva(config)
    expected = network.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise MissingWeightsError(describe_key_mismatch(f"{WHAT} '{path}'", missing, unexpected))
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} (model {tuple(v.shape)})"
        for k, v in expected.items()
        if state_dict[k].shape != v.shape
    ]
    if wrong_shape:
        raise MissingWeightsError(
            f"{WHAT} '{path}': {len(wrong_shape)} tensors have the wrong shape for this SevaConfig,"
            f" e.g. {', '.join(wrong_shape[:5])}."
        )
    if dtype is not None:
        for key in state_dict:  # one tensor at a time: never two full copies in memory
            state_dict[key] = state_dict[key].to(dtype)
    network.load_state_dict(state_dict, strict=True, assign=True)
    return network


def save_seva(network: Seva, path: str | Path) -> Path:
    """Write the weights as safetensors with the SevaConfig in the metadata (a file or a folder)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / SEVA_V11_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {CONFIG_METADATA_KEY: json.dumps(dataclasses.asdict(network.config))}
    tensors = {k: v.detach().contiguous() for k, v in network.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)
    return path
