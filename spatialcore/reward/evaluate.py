"""Pairwise evaluation in the published table format: accuracy overall / 1 / 2-3 perturbations,
mean margin, calibration of the predicted pair probability, accuracy per perturbation type (flip, swap,
relation change, binding swap) and, for synthetic pairs, per scene size (objects, relations) and per type of the
violated relation, so users see what their reward model misses."""

from __future__ import annotations

import math

import torch

from ..kernels import pairwise_accuracy
from ..vocab import RELATIONS


def _pair_batches(model, dataset, *, batch_size: int, limit: int | None, progress: bool, shuffle_prompts: bool,
                  desc: str = "eval"):
    """The dataset's pairs as model inputs, winners first: ``(inputs on the model's device, k pairs, n_perturbations)``
    per batch of ``batch_size`` pairs."""
    from ..logs import progress as bar
    from .preprocess import PairCollator

    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise ValueError("no pairs to evaluate")
    collate = PairCollator(model.processor)
    prompt_of = list(range(n))
    if shuffle_prompts:
        prompt_of = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    model.eval()
    starts = range(0, n, batch_size)
    for s in bar(starts, desc=desc, unit="batch") if progress else starts:
        items = [dataset[i] for i in range(s, min(n, s + batch_size))]
        if shuffle_prompts:
            items = [{**it, "prompt": _field(dataset, prompt_of[i], "prompt")}
                     for i, it in zip(range(s, s + len(items)), items, strict=True)]
        batch = collate(items)
        yield {k: v.to(model.device) for k, v in batch["inputs"].items()}, len(items), batch["n_perturbations"]


@torch.no_grad()
def pair_scores(model, dataset, *, batch_size: int = 16, limit: int | None = None, progress: bool = False,
                shuffle_prompts: bool = False):
    """(mu_w, var_w, mu_l, var_l, n_perturbations) over the dataset's pairs, float32 CPU tensors.

    ``shuffle_prompts``: judge every pair against another pair's prompt (a fixed permutation),
    the control that shows whether the model reads the prompt at all.
    """
    outs = []
    for inputs, k, n_pert in _pair_batches(model, dataset, batch_size=batch_size, limit=limit, progress=progress,
                                           shuffle_prompts=shuffle_prompts):
        mu, lv = model(**inputs)
        var = lv.float().exp().cpu() if lv is not None else torch.zeros(mu.shape[0])  # no variance head: sigma 0
        outs.append((mu[:k].float().cpu(), var[:k], mu[k:].float().cpu(), var[k:], n_pert))
    return tuple(torch.cat(x) for x in zip(*outs, strict=True))


@torch.no_grad()
def pair_features(model, dataset, *, batch_size: int = 16, limit: int | None = None, progress: bool = False):
    """(h_w, h_l, n_perturbations): the backbone's last-token hidden states of each pair's images, the head's input
    (``[N, H]`` float32 CPU)."""
    outs = []
    for inputs, k, n_pert in _pair_batches(model, dataset, batch_size=batch_size, limit=limit, progress=progress,
                                           shuffle_prompts=False, desc="features"):
        h = model.features(**inputs).float().cpu()
        outs.append((h[:k], h[k:], n_pert))
    return tuple(torch.cat(x) for x in zip(*outs, strict=True))


def oracle_pair_scores(dataset, *, limit: int | None = None, progress: bool = False):
    """The pixel oracle in :func:`pair_scores`' place: an image's score is the fraction of its prompt's relations
    that the hard oracle calls true (``data.oracle.relations_true``); variance 0. On synthetic pairs this is the
    upper bound for a reward model (it reads the rendered layout). Prompts must be in the synthetic grammar."""
    from ..data.oracle import relations_true
    from ..logs import progress as bar

    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise ValueError("no pairs to evaluate")
    mu_w, mu_l, n_pert = [], [], []
    for i in bar(range(n), desc="oracle", unit="pair") if progress else range(n):
        item = dataset[i]
        mu_w.append(relations_true(item["chosen"], item["prompt"]))
        mu_l.append(relations_true(item["rejected"], item["prompt"]))
        n_pert.append(int(item["n_perturbations"] or 0))
    zeros = torch.zeros(n)
    return torch.tensor(mu_w), zeros, torch.tensor(mu_l), zeros.clone(), torch.tensor(n_pert)


def _field(dataset, i: int, name: str, default=None):
    """Field ``name`` of pair ``i``: a PairSet's record (no image decoded), or the item of any other dataset."""
    records = getattr(dataset, "records", None)
    return getattr(records[i], name) if records is not None else dataset[i].get(name, default)


def _first(dataset, n: int | None) -> range:
    return range(len(dataset) if n is None else min(n, len(dataset)))


def perturbation_types(dataset, n: int | None = None) -> list[list[str]]:
    """The ``perturbations`` list of each of the first ``n`` pairs (record order, as ``pair_scores``)."""
    return [list(_field(dataset, i, "perturbations", [])) for i in _first(dataset, n)]


def scene_sizes(dataset, n: int | None = None) -> list[tuple[int, int]] | None:
    """``(objects, relations)`` of each of the first ``n`` pairs' chosen scene (record order, as ``pair_scores``);
    None unless every pair is synthetic (its ``meta`` holds the scene)."""
    sizes = []
    for i in _first(dataset, n):
        scene = (_field(dataset, i, "meta") or {}).get("chosen_scene")
        if not isinstance(scene, dict) or "objects" not in scene or "relations" not in scene:
            return None
        sizes.append((len(scene["objects"]), len(scene["relations"])))
    return sizes


def violated_relations(dataset, n: int | None = None) -> list[list[str]] | None:
    """The types of the relations each of the first ``n`` pairs' rejected image violates (its ``meta``'s
    ``violated`` indices into the chosen scene's relations; record order, as ``pair_scores``); None unless every pair
    is synthetic and says which."""
    out = []
    for i in _first(dataset, n):
        meta = _field(dataset, i, "meta") or {}
        relations, violated = (meta.get("chosen_scene") or {}).get("relations"), meta.get("violated")
        if not isinstance(relations, list) or not isinstance(violated, list):
            return None
        out.append([relations[k]["type"] for k in violated])
    return out


def breakdowns(dataset, n: int | None = None) -> dict:
    """``pair_metrics``' keyword arguments for the first ``n`` pairs of ``dataset``: perturbation types, and for
    synthetic pairs the scene sizes and the violated relations."""
    return {"types": perturbation_types(dataset, n), "sizes": scene_sizes(dataset, n),
            "violated": violated_relations(dataset, n)}


def accuracy_by(mu_w, mu_l, n_pert, keys: list[int]) -> list[dict]:
    """The table's three accuracies over the pairs of each distinct key (ascending), ties counting half."""
    if len(keys) != len(mu_w):
        raise ValueError(f"{len(keys)} keys for {len(mu_w)} pairs")
    keys_t = torch.tensor(keys)
    rows = []
    for key in sorted(set(keys)):
        m = keys_t == key
        one, many = m & (n_pert == 1), m & (n_pert >= 2)
        rows.append({"key": key, "pairs": int(m.sum()), "accuracy": pairwise_accuracy(mu_w[m], mu_l[m]),
                     "accuracy_1": pairwise_accuracy(mu_w[one], mu_l[one]) if one.any() else float("nan"),
                     "accuracy_2_3": pairwise_accuracy(mu_w[many], mu_l[many]) if many.any() else float("nan")})
    return rows


def _type_order(types: list[list[str]], known: tuple[str, ...]) -> list[str]:
    seen = {t for ts in types for t in ts}
    return [t for t in known if t in seen] + sorted(seen - set(known))


def by_perturbation_type(mu_w, mu_l, types: list[list[str]], order: tuple[str, ...] | None = None) -> list[dict]:
    """Accuracy over the pairs whose rejected image carries each perturbation type (``with``: among
    others; ``alone``: its only perturbation), ties counting half as in the table. Any per-pair label lists do
    (``violated_relations``' too), listed in ``order`` (default: the perturbations') and then alphabetically."""
    from ..data.scene import PERTURBATIONS

    if len(types) != len(mu_w):
        raise ValueError(f"{len(types)} label lists for {len(mu_w)} pairs")
    rows = []
    for t in _type_order(types, PERTURBATIONS if order is None else order):
        with_t = torch.tensor([t in ts for ts in types])
        alone = torch.tensor([len(ts) > 0 and all(x == t for x in ts) for ts in types])
        rows.append({
            "type": t,
            "pairs": int(with_t.sum()),
            "accuracy": pairwise_accuracy(mu_w[with_t], mu_l[with_t]),
            "pairs_alone": int(alone.sum()),
            "accuracy_alone": pairwise_accuracy(mu_w[alone], mu_l[alone]) if alone.any() else float("nan"),
        })
    return rows


def pair_metrics(mu_w, var_w, mu_l, var_l, n_pert, *, bins: int = 5, types: list[list[str]] | None = None,
                 sizes: list[tuple[int, int]] | None = None, violated: list[list[str]] | None = None) -> dict:
    """The table's numbers plus margin and calibration; with ``types`` (each pair's perturbation list, see
    :func:`perturbation_types`) also ``by_type``; with ``sizes`` (:func:`scene_sizes`) also ``by_objects`` and
    ``by_relations``; with ``violated`` (:func:`violated_relations`) also ``by_violated``.

    Calibration is the model's confidence in its own ranking against how often that ranking is right:
    p = P(w beats l) of the (Gaussian) head, confidence = max(p, 1 - p) in ``bins`` equal bins over [0.5, 1],
    right = 1 when mu_w > mu_l (1/2 on an exact tie); ECE = sum over bins of n_bin |mean confidence - accuracy| / n.
    A model that says 0.9 and is right 9 times in 10 scores 0; one that always says 1.0 scores its error rate."""
    one = n_pert == 1
    many = n_pert >= 2
    z = (mu_w - mu_l) / torch.sqrt(1 + math.pi / 8 * (var_w + var_l))
    p = torch.sigmoid(z)
    conf = torch.maximum(p, 1 - p)
    win = (mu_w > mu_l).float() + 0.5 * (mu_w == mu_l).float()
    calib = []
    edges = torch.linspace(0.5, 1, bins + 1)
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        m = (conf >= lo) & ((conf < hi) | (k == bins - 1))
        if m.any():
            calib.append({"conf_lo": float(lo), "conf_hi": float(hi), "n": int(m.sum()),
                          "confidence": float(conf[m].mean()), "accuracy": float(win[m].mean())})
    ece = sum(c["n"] * abs(c["confidence"] - c["accuracy"]) for c in calib) / max(1, len(p))
    decided = win != 0.5
    return {**_sigma_metrics(var_w + var_l, win),
        # the baseline sigma has to beat: a small |margin| is the model's own sign of doubt
        "margin_auroc": sigma_auroc(-(mu_w - mu_l).abs()[decided], win[decided] == 0),
        "pairs": len(mu_w),
        "accuracy": pairwise_accuracy(mu_w, mu_l),
        "accuracy_1": pairwise_accuracy(mu_w[one], mu_l[one]) if one.any() else float("nan"),
        "accuracy_2_3": pairwise_accuracy(mu_w[many], mu_l[many]) if many.any() else float("nan"),
        "pairs_1": int(one.sum()), "pairs_2_3": int(many.sum()),
        "mean_margin": float((mu_w - mu_l).mean()),
        "mean_abs_margin": float((mu_w - mu_l).abs().mean()),  # ~0 only at constant output (the saddle guard's sign)
        "ece": float(ece),
        "calibration": calib,
        **({"by_type": by_perturbation_type(mu_w, mu_l, types)} if types is not None else {}),
        **({"by_violated": by_perturbation_type(mu_w, mu_l, violated, tuple(RELATIONS))}
           if violated is not None else {}),
        **({"by_objects": accuracy_by(mu_w, mu_l, n_pert, [o for o, _ in sizes]),
            "by_relations": accuracy_by(mu_w, mu_l, n_pert, [r for _, r in sizes])} if sizes is not None else {}),
    }


def sigma_auroc(sigma: torch.Tensor, wrong: torch.Tensor) -> float:
    """P(sigma of a wrong pair > sigma of a right one), ties counting 1/2 (Mann-Whitney): 0.5 when sigma says nothing
    about the model's mistakes, 1 when every wrong pair is less certain than every right one; NaN without both."""
    a, b = sigma[wrong].double(), sigma[~wrong].double()
    if not len(a) or not len(b):
        return float("nan")
    greater = (a[:, None] > b[None, :]).double().mean()
    return float(greater + 0.5 * (a[:, None] == b[None, :]).double().mean())


def _sigma_metrics(var: torch.Tensor, win: torch.Tensor, quantiles: int = 4) -> dict:
    """Whether the Gaussian head's sigma predicts the model's mistakes: the AUROC of the pair's sigma
    (sqrt(var_w + var_l)) for wrong pairs, and the accuracy per sigma quantile (lowest sigma first); {} when the
    model has no sigma. Exact ties of mu are left out (neither right nor wrong)."""
    if not bool((var > 0).any()):
        return {}
    sigma, decided = var.sqrt(), win != 0.5
    sigma, wrong, win = sigma[decided], win[decided] == 0, win[decided]
    order = torch.argsort(sigma, stable=True)
    parts = [part for part in torch.tensor_split(order, quantiles) if len(part)]
    return {"sigma_auroc": sigma_auroc(sigma, wrong), "sigma_mean": float(sigma.mean()),
            "accuracy_by_sigma": [float(win[part].mean()) for part in parts]}


def _fmt(x: float) -> str:
    return "  n/a" if x != x else f"{x:.3f}"


def format_table(metrics: dict, name: str = "SpatialScore") -> str:
    f = _fmt
    return "\n".join([
        "| model | overall | 1 perturbation | 2-3 perturbations | mean margin | ECE |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {name} | {f(metrics['accuracy'])} | {f(metrics['accuracy_1'])} | {f(metrics['accuracy_2_3'])} | "
        f"{metrics['mean_margin']:.3f} | {metrics['ece']:.3f} |",
        f"\n({metrics['pairs']} pairs: {metrics['pairs_1']} with 1 perturbation, {metrics['pairs_2_3']} with 2-3)",
        *([f"a small margin |mu_w - mu_l| for the model's mistakes: AUROC {f(metrics['margin_auroc'])}"]
          if "margin_auroc" in metrics else []),
        *([f"sigma (mean {metrics['sigma_mean']:.3g}) for the model's mistakes: AUROC {f(metrics['sigma_auroc'])}; "
           "accuracy by sigma quartile (lowest first) " + " / ".join(f(a) for a in metrics["accuracy_by_sigma"])]
          if "sigma_auroc" in metrics else []),
    ])


def format_by_type(metrics: dict, key: str = "by_type", label: str = "perturbation type") -> str:
    """The per-perturbation-type table, or with ``key="by_violated"`` the per-violated-relation one ("" when the
    metrics have none)."""
    rows = metrics.get(key)
    if not rows:
        return ""
    f = _fmt
    return "\n".join([
        f"| {label} | pairs with it | accuracy | pairs with it alone | accuracy (alone) |",
        "|---|---:|---:|---:|---:|",
        *(f"| {r['type']} | {r['pairs']} | {f(r['accuracy'])} | {r['pairs_alone']} | {f(r['accuracy_alone'])} |"
          for r in rows),
    ])


def format_by_size(metrics: dict) -> str:
    """Accuracy by the chosen scene's object and relation count ("" when the metrics have neither)."""
    f = _fmt
    parts = []
    for key, name in (("by_objects", "objects"), ("by_relations", "relations")):
        rows = metrics.get(key)
        if rows:
            parts.append("\n".join([
                f"| {name} | pairs | overall | 1 perturbation | 2-3 perturbations |", "|---:|---:|---:|---:|---:|",
                *(f"| {r['key']} | {r['pairs']} | {f(r['accuracy'])} | {f(r['accuracy_1'])} | {f(r['accuracy_2_3'])} |"
                  for r in rows)]))
    return "\n\n".join(parts)
