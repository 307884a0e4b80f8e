"""Fit a SpatialScore's sigma on pairs it never trained on, its mu and backbone held fixed.

Why a separate fit: with one comparison per image, the pair loss sees only (mu_w - mu_l) / c, so a model unsure of an
image can lower its margin or raise its sigma alike. Trained jointly, it lowers the margin (measured on unseen object
pairs: sigma ~0.04 against margins ~5, its AUROC for the model's mistakes 0.44, the win probability calibrated by mu
alone, ECE 0.018); trained with mu held fixed on its own training stream, sigma sees a mu that is already calibrated
there and has nothing to add. What sigma can add is where mu fails *off* its training data, so it is fitted there:

    h = the backbone's last-token hidden state (fixed), mu = <h, W[0]> + b[0] (fixed)
    log_var = <h, w> + b, fitted by Adam on   -mean log sigmoid((mu_w - mu_l) / sqrt(1 + pi/8 (var_w + var_l)))
    over the pairs of a split the model never trained on (for a synthetic set split by objects: ``val``), from
    w = 0, b = 0 (sigma 1).

The head's second row becomes (w, b) and the folder is written with ``variance_head: true``; mu is untouched, so every
ranking, and a reward that uses mu alone, stays as it was. Judge it on a third split (``test``): ``reward eval``
reports sigma's AUROC for the model's mistakes beside the margin's own.
"""

from __future__ import annotations

import torch

from ..kernels import pair_loss


def fit_log_var(h_w: torch.Tensor, h_l: torch.Tensor, mu_w: torch.Tensor, mu_l: torch.Tensor, *, steps: int = 500,
                lr: float = 0.05) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """The log-variance row ``(w [H], b [1])`` minimising the Gaussian pair loss at fixed mu (full batch, Adam),
    and the loss per step."""
    if h_w.shape != h_l.shape or h_w.ndim != 2 or mu_w.shape != (h_w.shape[0],) or mu_l.shape != mu_w.shape:
        raise ValueError(f"features [N, H] and mu [N] expected, got {tuple(h_w.shape)}, {tuple(h_l.shape)}, "
                         f"{tuple(mu_w.shape)}, {tuple(mu_l.shape)}")
    h_w, h_l, mu_w, mu_l = (t.detach().double() for t in (h_w, h_l, mu_w, mu_l))
    w = torch.zeros(h_w.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    history = []
    for _ in range(steps):
        loss = pair_loss(mu_w, h_w @ w + b, mu_l, h_l @ w + b, backend="torch")
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return w.detach().float(), b.detach().float(), history


def calibrate_sigma(model, dataset, *, steps: int = 500, lr: float = 0.05, batch_size: int = 16,
                    limit: int | None = None, progress: bool = False) -> dict:
    """Fit ``model``'s sigma on ``dataset`` (see the module docstring) in place: the head's second row replaced and
    ``model.variance_head`` set. Returns the pairs used and the pair loss before (sigma 1) and after."""
    from .evaluate import pair_features

    h_w, h_l, _ = pair_features(model, dataset, batch_size=batch_size, limit=limit, progress=progress)
    weight, bias = model.head.weight.detach().float().cpu(), model.head.bias.detach().float().cpu()
    mu_w, mu_l = h_w @ weight[0] + bias[0], h_l @ weight[0] + bias[0]
    w, b, history = fit_log_var(h_w, h_l, mu_w, mu_l, steps=steps, lr=lr)
    with torch.no_grad():
        model.head.weight[1].copy_(w.to(model.head.weight))
        model.head.bias[1:].copy_(b.to(model.head.bias))
    model.variance_head = True
    return {"pairs": int(h_w.shape[0]), "steps": steps, "loss_before": history[0], "loss_after": history[-1]}
