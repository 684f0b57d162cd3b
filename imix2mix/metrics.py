"""CLIP metrics of an edited scene (METHOD.md §5.3): CLIP Sim., CLIP Dir., CLIP Cons.

The math (:func:`clip_similarity`, :func:`clip_direction`, :func:`clip_consistency`,
:func:`scene_metrics`) works on embeddings and knows nothing of models.  :class:`ClipMetricsModel`
turns images and captions into L2-normalised embeddings with OpenAI CLIP ViT-L/14 (transformers).

* CLIP Sim.  = mean_i cos(φ(E_i), ψ(target caption))
* CLIP Dir.  = mean_i cos(φ(E_i) − φ(O_i), ψ(target caption) − ψ(source caption))
* CLIP Cons. = mean over all C(N, 2) unordered pairs of cos(φ(O_i) − φ(O_j), φ(E_i) − φ(E_j))

Without captions Sim. and Dir. are missing (None); Cons. needs only images.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from imix2mix.errors import MissingWeightsError
from imix2mix.hub import resolve_dir

CLIP_METRICS_REPO = "openai/clip-vit-large-patch14"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------
# Math on embeddings
# ---------------------------------------------------------------------------------------------


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def clip_similarity(edited: torch.Tensor, target_text: torch.Tensor) -> torch.Tensor:
    """Per view cos(φ(E_i), ψ(target)); ``edited`` [N, D], ``target_text`` [D]."""
    return _cosine(edited, target_text.expand_as(edited))


def clip_direction(
    edited: torch.Tensor, original: torch.Tensor, target_text: torch.Tensor, source_text: torch.Tensor
) -> torch.Tensor:
    """Per view cos(φ(E_i) − φ(O_i), ψ(target) − ψ(source))."""
    text_direction = (target_text - source_text).expand_as(edited)
    return _cosine(edited - original, text_direction)


def view_pairs(num_views: int) -> list[tuple[int, int]]:
    return list(itertools.combinations(range(num_views), 2))


def clip_consistency(edited: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """cos(φ(O_i) − φ(O_j), φ(E_i) − φ(E_j)) for every unordered pair (i < j), in :func:`view_pairs` order."""
    pairs = view_pairs(edited.shape[0])
    if not pairs:
        return torch.zeros(0, dtype=torch.float64)
    first, second = (torch.tensor(index) for index in zip(*pairs))
    return _cosine(original[first] - original[second], edited[first] - edited[second])


@dataclass(frozen=True)
class ViewMetrics:
    """One view's scores; ``clip_cons`` is the mean over the pairs that include this view."""

    clip_sim: float | None
    clip_dir: float | None
    clip_cons: float | None


@dataclass(frozen=True)
class SceneMetrics:
    clip_sim: float | None
    clip_dir: float | None
    clip_cons: float | None
    views: tuple[ViewMetrics, ...]
    pair_consistency: tuple[float, ...]  # in view_pairs(N) order

    def to_dict(self) -> dict:
        return asdict(self)


def scene_metrics(
    edited: torch.Tensor,
    original: torch.Tensor,
    target_text: torch.Tensor | None = None,
    source_text: torch.Tensor | None = None,
) -> SceneMetrics:
    """All three metrics from L2-normalised embeddings (``edited``/``original`` [N, D])."""
    num_views = edited.shape[0]
    sims = clip_similarity(edited, target_text) if target_text is not None else None
    dirs = (
        clip_direction(edited, original, target_text, source_text)
        if target_text is not None and source_text is not None
        else None
    )
    pairs = view_pairs(num_views)
    cons = clip_consistency(edited, original)
    per_view_cons = []
    for view in range(num_views):
        mine = [float(cons[p]) for p, pair in enumerate(pairs) if view in pair]
        per_view_cons.append(float(np.mean(mine)) if mine else None)
    views = tuple(
        ViewMetrics(
            clip_sim=None if sims is None else float(sims[v]),
            clip_dir=None if dirs is None else float(dirs[v]),
            clip_cons=per_view_cons[v],
        )
        for v in range(num_views)
    )
    return SceneMetrics(
        clip_sim=None if sims is None else float(sims.mean()),
        clip_dir=None if dirs is None else float(dirs.mean()),
        clip_cons=float(cons.mean()) if len(pairs) else None,
        views=views,
        pair_consistency=tuple(float(c) for c in cons),
    )


# ---------------------------------------------------------------------------------------------
# The CLIP model
# ---------------------------------------------------------------------------------------------


class ClipMetricsModel:
    """Normalised CLIP image/text embeddings (transformers ``CLIPModel`` + tokenizer)."""

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, *, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, source: str | Path = CLIP_METRICS_REPO, *, device: torch.device | str = "cpu") -> "ClipMetricsModel":
        folder = resolve_dir(source, what="CLIP ViT-L/14 (metrics)", hint="It is public: `hf download openai/clip-vit-large-patch14`.")
        try:
            model = CLIPModel.from_pretrained(folder, use_safetensors=True)
            tokenizer = CLIPTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise MissingWeightsError(f"CLIP ViT-L/14 (metrics): '{folder}' is not a CLIP model folder with safetensors weights ({exc}).") from exc
        return cls(model, tokenizer, device=device)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    def to(self, device: torch.device | str) -> "ClipMetricsModel":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def embed_images(self, images: list[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """H×W×3 uint8 arrays (or a [B, 3, H, W] tensor in [0, 1]) → [B, D] unit vectors.

        Each image is bicubic-resized to the CLIP input size as a whole (no crop), then normalised
        with the CLIP mean and std, as in the IN2N ``ClipSimilarity`` the paper's code copied.
        """
        if isinstance(images, torch.Tensor):
            batch = [img for img in images.float()]
        else:
            batch = [torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0 for img in images]
        size = self.image_size
        pixels = torch.cat(
            [F.interpolate(img[None], size=(size, size), mode="bicubic", align_corners=False) for img in batch]
        )
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        pixels = ((pixels - mean) / std).to(self.device, self.model.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt")
        pooled = self.model.text_model(input_ids=tokens.input_ids.to(self.device)).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1).cpu()

    def score(
        self,
        edited: list[np.ndarray],
        originals: list[np.ndarray],
        source_caption: str | None = None,
        target_caption: str | None = None,
    ) -> SceneMetrics:
        """Metrics of one scene: edited views E_i against the original views O_i (same order)."""
        if len(edited) != len(originals):
            raise ValueError(f"{len(edited)} edited views but {len(originals)} originals")
        edited_emb = self.embed_images(edited)
        original_emb = self.embed_images(originals)
        target = source = None
        if target_caption:
            target = self.embed_texts([target_caption])[0]
        if source_caption:
            source = self.embed_texts([source_caption])[0]
        return scene_metrics(edited_emb, original_emb, target, source)
