"""Rewards for Spatial-RL: a function of (images ``[B, 3, H, W]`` in [0, 1] on any device, prompts)
returning float32 ``[B]`` on the images' device. NaN marks a sample that could not be scored
(the advantage kernel excludes it).

* ``spatialscore``: the learned reward, ``mu`` of an in-process :class:`SpatialScore` (no grad,
  batched, images preprocessed where they live; optional int8/float8 weights).
* ``oracle``: the verifiable pixel reward of the data oracle made dense: each pixel is softly
  assigned to the palette colours (w_c = softmax_c of -|rgb - colour_c|^2 / 2 tau^2), and a
  relation's evidence ``geometry.relation_value`` is computed from per-colour positions, clipped
  2 s to [-1, 1] and averaged over the prompt's relations. ``form="moment"`` (default) uses for the
  four directions the first moments M_c = mean_p w_c(p) (pos_p - 1/2) (so "red left of blue" is
  4 (M_blue - M_red) along x: more red mass on the left and more blue on the right); ``"centroid"``
  uses the mass-normalised centroids everywhere, as ``pixel_score`` does. Unlike the hard colour
  masks both vary smoothly on the grey-ish images a random generator starts from. (The evaluation's own
  verdict as a reward, the upper bound of what a reward can tell the generator about the judged metric, is
  ``eval.judge.judge_reward``.)
* ``oracle_hard`` (evaluation): ``oracle.pixel_score`` on the PIL images (-1 when a named colour is
  absent) and :func:`oracle_accuracy`, the fraction of relations the hard pixel oracle calls true.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.geometry import DIRECTIONAL, relation_value
from ..data.oracle import pixel_score, prompt_relations, relations_true
from ..vocab import COLOURS

PALETTE = list(COLOURS)


def colour_centroids(images: torch.Tensor, tau: float = 60.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft palette assignment per pixel -> (mass ``[B, K]``, centroid ``[B, K, 2]`` as (x, y) in
    [0, 1], first moment ``[B, K, 2]`` = mean over pixels of w (pos - 1/2))."""
    B, _, H, W = images.shape
    pal = torch.tensor([COLOURS[c] for c in PALETTE], device=images.device, dtype=torch.float32)  # [K, 3]
    px = images.float().permute(0, 2, 3, 1) * 255.0  # [B, H, W, 3]
    d2 = ((px[..., None, :] - pal) ** 2).sum(-1)  # [B, H, W, K]
    w = torch.softmax(-d2 / (2 * tau * tau), dim=-1)
    mass = w.sum((1, 2))  # [B, K]
    xs = (torch.arange(W, device=images.device, dtype=torch.float32) + 0.5) / W
    ys = (torch.arange(H, device=images.device, dtype=torch.float32) + 0.5) / H
    mx, my = torch.einsum("bhwk,w->bk", w, xs), torch.einsum("bhwk,h->bk", w, ys)
    centroid = torch.stack([mx / mass, my / mass], -1)
    moment = torch.stack([mx - 0.5 * mass, my - 0.5 * mass], -1) / (H * W)
    return mass / (H * W), centroid, moment


def oracle_reward(images: torch.Tensor, prompts: list[str], *, tau: float = 60.0, form: str = "moment"
                  ) -> torch.Tensor:
    """Dense pixel-oracle reward in [-1, 1] (see module docstring); ``[B]`` float32."""
    if images.shape[0] != len(prompts):
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
    if form not in ("moment", "centroid"):
        raise ValueError(f"form must be 'moment' or 'centroid', got {form!r} (the judge's verdict is "
                         "eval.judge.judge_reward)")
    _, cent, mom = colour_centroids(images, tau)
    cent, mom = cent.cpu().numpy(), 2 * mom.cpu().numpy()  # 2 s = 4 (M_b - M_a) after the clip's 2x
    out = []
    for b, prompt in enumerate(prompts):
        vals = []
        for rel in prompt_relations(prompt):
            src = mom if form == "moment" and rel.type in DIRECTIONAL else cent
            pts = [tuple(src[b, PALETTE.index(colour)]) for colour, _ in rel.args]
            vals.append(float(np.clip(2 * relation_value(rel.type, pts), -1.0, 1.0)))
        out.append(float(np.mean(vals)))
    return torch.tensor(out, dtype=torch.float32, device=images.device)


def oracle_hard(images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(``pixel_score`` ``[B]``, fraction of relations judged true ``[B]``) with the hard pixel oracle."""
    from .sampler import to_pil

    pil = to_pil(images)
    scores = [pixel_score(im, prompt_relations(prompt)) for im, prompt in zip(pil, prompts, strict=True)]
    acc = [relations_true(im, prompt) for im, prompt in zip(pil, prompts, strict=True)]
    return torch.tensor(scores), torch.tensor(acc)


def lower_bound(mu: torch.Tensor, sigma: torch.Tensor, weight: float) -> torch.Tensor:
    """The lower confidence bound ``mu - weight x sigma`` of SpatialScore's Gaussian head."""
    return mu - weight * sigma


def order_flips(a: torch.Tensor, b: torch.Tensor) -> float:
    """The fraction of within-group pairs of samples that ``a`` and ``b`` (``[P, G]``) order differently: how much a
    sigma-aware score ``b`` reorders the groups that ``mu = a`` ranks. A pair counts when both samples are finite in
    both; a pair tied in one score and not in the other counts as reordered. NaN when no pair counts."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"two [P, G] scores of one shape expected, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    ok = torch.isfinite(a) & torch.isfinite(b)
    upper = torch.ones(a.shape[1], a.shape[1], dtype=torch.bool).triu(1)
    pairs = ok[:, :, None] & ok[:, None, :] & upper
    differ = torch.sign(a[:, :, None] - a[:, None, :]) != torch.sign(b[:, :, None] - b[:, None, :])
    n = int(pairs.sum())
    return float((differ & pairs).sum()) / n if n else float("nan")


class SpatialScoreReward:
    """A SpatialScore checkpoint as a reward, scored in batches without gradients: ``mu`` (``form="mu"``)
    or the lower confidence bound ``mu - sigma_weight x sigma`` (``form="lcb"``)."""

    def __init__(self, path: str, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 quantize: str = "none", batch_size: int = 32, liger: bool = False, compile: bool = False,
                 form: str = "mu", sigma_weight: float = 1.0):
        if form not in ("mu", "lcb"):
            raise ValueError(f"form must be 'mu' or 'lcb', got {form!r}")
        self.form, self.sigma_weight = form, sigma_weight
        from ..reward.model import SpatialScore

        self.model = SpatialScore.from_pretrained(path, dtype=dtype, device=device).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if quantize != "none":
            self.model.quantize(quantize)
        self.model.accelerate(liger=liger, compile=compile)
        self.batch_size = batch_size

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, sigma)`` float32 ``[B]`` on the images' device."""
        mu, sigma = self.model.score(prompts, images, batch_size=self.batch_size)
        return mu.to(images.device), sigma.to(images.device)

    def reward(self, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return mu if self.form == "mu" else lower_bound(mu, sigma, self.sigma_weight)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.reward(*self.scores(images, prompts))


def load_function(spec: str):
    """The callable named ``module:function`` (importable) or ``path/file.py:function``."""
    import importlib
    import importlib.util
    from pathlib import Path

    from ..config import ConfigError

    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ConfigError("reward.python.function", f"{spec!r} is not module:function or path/file.py:function")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ConfigError("reward.python.function", f"{path} is not a file")
            loaded = importlib.util.spec_from_file_location(f"spatialcore_user_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as err:
        raise ConfigError("reward.python.function", f"cannot import {target} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError("reward.python.function", f"{target} has no callable {attr!r}")
    return fn


class PythonReward:
    """A user's reward ``fn(images, prompts)``; its output is checked (B finite-or-NaN numbers) and returned
    as float32 on the images' device."""

    def __init__(self, spec: str):
        self.spec, self.fn = spec, load_function(spec)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from ..errors import RunError

        out = torch.as_tensor(self.fn(images, prompts), dtype=torch.float32)
        if out.shape != (len(prompts),):
            raise RunError(f"reward {self.spec} returned shape {tuple(out.shape)} for {len(prompts)} images "
                           f"(expected [{len(prompts)}])")
        return out.to(images.device)


class WeightedReward:
    """sum_k w_k r_k over named rewards; ``last`` holds each part's rewards of the latest call (for the logs).
    A sample any part could not score (NaN) is not scored."""

    def __init__(self, parts: dict[str, tuple[float, object]]):
        self.parts, self.last = parts, {}

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.last = {k: fn(images, prompts).float() for k, (_, fn) in self.parts.items()}
        return sum(w * self.last[k] for k, (w, _) in self.parts.items())
