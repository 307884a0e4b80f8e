"""``spatialcore eval``: sample a generator on a prompt set with fixed seeds, judge every image, report.

    spatialcore eval --model runs/sft_tiny/pipeline --prompts synthetic:easy --out runs/eval_base
    spatialcore eval --model black-forest-labs/FLUX.1-dev --lora runs/grpo/policy \\
        --prompts geneval_metadata.jsonl --detector google/owlv2-base-patch16-ensemble --out runs/eval_rl

Sample ``j`` of prompt ``i`` starts from the noise of seed ``SeedSequence([seed, i, j])`` and runs the
deterministic ODE, so two checkpoints are compared on the same noise. Written to ``--out``:
``eval.json`` (the numbers), ``eval.md`` (the tables), ``grid.png`` (images framed by verdict: green
correct, orange objects found but a relation wrong, red an object missing), ``samples.jsonl`` (one
verdict per image) and ``images/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .judge import Task, Verdict, judge, load_tasks, make_detector


@dataclass
class EvalSettings:
    prompts: str = "synthetic:easy"
    n_prompts: int = 64
    per_prompt: int = 4
    seed: int = 0
    steps: int = 12
    size: int = 32
    guidance: float = 3.5
    max_sequence_length: int = 64
    detector: str = "oracle"
    threshold: float = 0.1
    batch: int = 16
    relation_sensitivity: bool = False  # also how much the relation word moves the layout (eval.sensitivity)


def trained_settings(model: str | Path) -> dict:
    """The sampling settings a generator was trained with, from the ``spatialcore_run.json`` that
    ``sft train`` writes beside its pipeline (empty for any other model): image size, T5 length (Flux
    pads the prompt to it, so another length is another input), guidance, ODE steps and the prompt preset."""
    path = Path(model) / "spatialcore_run.json"
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text()).get("config", {})
    out = {"size": cfg.get("image_size"), "max_sequence_length": cfg.get("max_sequence_length"),
           "guidance": cfg.get("guidance"), "steps": cfg.get("sample_steps")}
    data = cfg.get("data", {})
    if data.get("source") == "synthetic" and not data.get("synth"):
        out["prompts"] = f"synthetic:{data.get('preset')}"
    return {k: v for k, v in out.items() if v is not None}


def sample_seed(seed: int, i: int, j: int) -> int:
    return int(np.random.SeedSequence([seed, i, j]).generate_state(1)[0])


def summarize(tasks: list[Task], verdicts: list[Verdict], mu: list[float] | None = None,
              sigma: list[float] | None = None) -> dict:
    """The report's numbers from one task and one verdict per sample.

    objects_found: share of samples with every named object found; relation_accuracy: share of samples
    GenEval calls correct (objects found and every judged relation holds); per_relation: per relation
    type, the share of its judged instances that hold (an instance whose objects are missing counts as
    not holding); axis_and_order: see :func:`axis_and_order`; spatialscore: mean and std of mu over the samples
    and the mean predicted sigma.
    """
    n = len(verdicts)
    if n == 0 or len(tasks) != n:
        raise ValueError(f"{len(tasks)} tasks for {n} verdicts")
    per: dict[str, list[int]] = {}
    for t, v in zip(tasks, verdicts, strict=True):
        for (rtype, _), r in zip(t.relations, v.relations, strict=True):
            if r is not None:
                per.setdefault(rtype, [0, 0])
                per[rtype][0] += int(r)
                per[rtype][1] += 1
    found_objs = sum(sum(v.found) for v in verdicts)
    n_objs = sum(len(v.found) for v in verdicts)
    out = {
        "samples": n,
        "prompts": len({t.prompt for t in tasks}),
        "objects_found": sum(v.all_found for v in verdicts) / n,
        "object_recall": found_objs / n_objs,
        "relation_accuracy": sum(v.correct for v in verdicts) / n,
        "relation_accuracy_when_found": (sum(v.correct for v in verdicts if v.all_found) /
                                         max(1, sum(v.all_found for v in verdicts))),
        "per_relation": {k: {"accuracy": c / m, "n": m} for k, (c, m) in sorted(per.items())},
        "axis_and_order": axis_and_order(tasks, verdicts),
    }
    if mu is not None:
        out["spatialscore"] = _spatialscore_summary(mu, sigma)
    return out


_AXIS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}  # (axis: 0 = x, sign of A - B)


def axis_and_order(tasks: list[Task], verdicts: list[Verdict]) -> dict:
    """Which half of a directional relation a generator gets wrong. For every left of / right of / above /
    below instance whose two objects were found, with ``d = centre(A) - centre(B)`` of their top boxes (image y
    downwards): the *axis* is right when the larger of ``|dx|, |dy|`` lies on the relation's axis (horizontal
    for left/right; an exact diagonal is on neither); the *order* is right when, on a right axis, the sign of
    that offset is the relation's (A left of B: ``dx < 0``). A model that reads the relation word but not which
    object it binds to draws the right axis with the objects swapped half the time: axis near 1, order near
    0.5. Plain centres, not GenEval's shrunk offsets, so ``axis * order`` is close to, not equal to, the
    per-relation accuracy. ``n`` = 0 leaves the rates None. ``by_axis``: the same three numbers for the
    horizontal (left of / right of) and the vertical (above / below) relations apart: a generator can have learnt
    one axis's order and not the other's."""
    counts = {"horizontal": [0, 0, 0], "vertical": [0, 0, 0]}  # n, axis right, order right
    for t, v in zip(tasks, verdicts, strict=True):
        for rtype, idx in t.relations:
            if rtype not in _AXIS or len(idx) != 2 or not all(v.found[i] and v.boxes[i] for i in idx):
                continue
            (ax, ay), (bx, by) = ([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for b in (v.boxes[idx[0]][0], v.boxes[idx[1]][0]))
            d = (ax - bx, ay - by)
            want_axis, sign = _AXIS[rtype]
            c = counts["vertical" if want_axis else "horizontal"]
            c[0] += 1
            if abs(d[want_axis]) > abs(d[1 - want_axis]):
                c[1] += 1
                c[2] += int(d[want_axis] * sign > 0)

    def rates(n: int, axis: int, order: int) -> dict:
        return {"n": n, "axis_right": axis / n if n else None, "order_right_given_axis": order / axis if axis else None}

    return {**rates(*(sum(c[k] for c in counts.values()) for k in range(3))),
            "by_axis": {name: rates(*c) for name, c in counts.items()}}


def _spatialscore_summary(mu: list[float], sigma: list[float] | None) -> dict:
    m = np.asarray(mu, dtype=np.float64)
    return {"mu_mean": float(m.mean()), "mu_std": float(m.std()),
            "sigma_mean": float(np.mean(sigma)) if sigma is not None else None}


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _title(summary: dict) -> str:
    return f"Spatial evaluation of {summary['model']}" + (f" + {summary['lora']}" if summary.get("lora") else "")


def markdown(summary: dict, *, title: str) -> str:
    s = summary
    lines = [f"# {title}", "", f"{s['samples']} samples ({s['prompts']} prompts), judged by {s.get('detector', '?')}.",
             "", "| metric | value |", "|---|---|",
             f"| objects found (all named objects) | {s['objects_found']:.3f} |",
             f"| object recall | {s['object_recall']:.3f} |",
             f"| relation accuracy (GenEval: found and every relation holds) | {s['relation_accuracy']:.3f} |",
             f"| relation accuracy when all objects are found | {s['relation_accuracy_when_found']:.3f} |"]
    if "spatialscore" in s:
        sp = s["spatialscore"]
        lines.append(f"| SpatialScore mu (mean ± std over samples) | {sp['mu_mean']:.3f} ± {sp['mu_std']:.3f} |")
        if sp["sigma_mean"] is not None:
            lines.append(f"| SpatialScore predicted sigma (mean) | {sp['sigma_mean']:.3f} |")
    if "relation_sensitivity" in s:
        r = s["relation_sensitivity"]
        lines += [f"| relation word's pull on the pixels (flipped relation, same seed / new seed) | {r['pixel_ratio']:.3f} |",
                  f"| both a relation and its opposite drawn correctly from one seed | {r['both_correct']:.3f} |"]
        if "by_axis" in r:
            h, v = (r["by_axis"][a] or {} for a in ("horizontal", "vertical"))
            lines.append(f"| ... the pull by axis, horizontal / vertical | {_num(h.get('pixel_ratio'))} / "
                         f"{_num(v.get('pixel_ratio'))} |")
    ao = s.get("axis_and_order") or {}
    if ao.get("axis_right") is not None:
        lines += [f"| directional relations drawn on the right axis (both objects found, n = {ao['n']}) | {ao['axis_right']:.3f} |",
                  f"| ... and with the objects the right way round (0.5: the order is a coin flip) | "
                  f"{_num(ao['order_right_given_axis'])} |"]
        ax = ao.get("by_axis") or {}
        if ax:
            def pair(key: str) -> str:
                return " / ".join(_num(ax[a][key]) for a in ("horizontal", "vertical"))
            lines += [f"| ... by axis, horizontal / vertical: axis right | {pair('axis_right')} |",
                      f"| ... by axis, horizontal / vertical: order right given the axis | {pair('order_right_given_axis')} |"]
    lines += ["", "| relation | accuracy | n |", "|---|---|---|"]
    lines += [f"| {k} | {v['accuracy']:.3f} | {v['n']} |" for k, v in s["per_relation"].items()]
    return "\n".join(lines) + "\n"


def verdict_grid(images, verdicts: list[Verdict], per_prompt: int, labels: list[str], path: Path,
                 *, max_rows: int = 16) -> Path:
    """Rows of one prompt's samples, each framed green (correct), orange (found, relation wrong) or red
    (an object missing)."""
    from PIL import ImageOps

    from ..plots import image_grid

    framed = []
    for im, v in zip(images, verdicts, strict=True):
        colour = (40, 170, 60) if v.correct else (240, 150, 20) if v.all_found else (210, 40, 40)
        big = im.convert("RGB").resize((88, 88), resample=0)
        framed.append(ImageOps.expand(big, border=4, fill=colour))
    rows = [framed[i * per_prompt:(i + 1) * per_prompt] for i in range(len(labels))][:max_rows]
    return image_grid(rows, [lb[:44] for lb in labels[:max_rows]], path)


def run_eval(model: str, out: str | Path, settings: EvalSettings, *, lora: str | None = None,
             reward_model: str | None = None, device: str = "cpu", dtype: str = "float32") -> dict:
    """Sample, judge, score and write the report; returns the summary."""
    import torch

    from ..config import ConfigError
    from ..logs import info, progress
    from ..rl.sampler import FluxSampler, SamplerConfig, load_pipeline, to_pil

    s = settings
    tasks = load_tasks(s.prompts, n=s.n_prompts, seed=s.seed)
    if s.detector == "oracle" and any(t.tag != "synthetic" for t in tasks):
        raise ConfigError("--detector", "the pixel oracle reads only synthetic scenes: give a zero-shot detector "
                                        "(an OWLv2 or Grounding DINO folder or hub id)")
    detector = make_detector(s.detector, threshold=s.threshold, device=device)
    pipe = load_pipeline(model, dtype=getattr(torch, dtype), device=device)
    if lora:
        from ..rl.policy import load_policy_weights

        load_policy_weights(pipe, lora)
    sampler = FluxSampler(pipe, SamplerConfig(steps=s.steps, image_size=s.size, guidance=s.guidance, noise_level=0.0,
                                              max_sequence_length=s.max_sequence_length))
    jobs = [(i, j) for i in range(len(tasks)) for j in range(s.per_prompt)]
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, verdicts = [], []
    info(f"{len(tasks)} prompts x {s.per_prompt} seeds, {s.steps} ODE steps at {s.size} px, detector {detector.name}",
         who="eval")
    for start in progress(range(0, len(jobs), s.batch), desc="eval", unit="batch"):
        chunk = jobs[start:start + s.batch]
        with torch.no_grad():
            traj = sampler.sample([tasks[i].prompt for i, _ in chunk], [sample_seed(s.seed, i, j) for i, j in chunk],
                                  sde=False)
        for (i, j), im in zip(chunk, to_pil(traj.images), strict=True):
            im.save(out / "images" / f"{i:04d}_{j:02d}.png")
            images.append(im)
            verdicts.append(judge(im, tasks[i], detector))
    per_sample = [tasks[i] for i, _ in jobs]
    mu = sigma = None
    if reward_model:
        from ..reward.model import SpatialScore

        rm = SpatialScore.from_pretrained(reward_model).to(device).eval()
        m, sd = rm.score([t.prompt for t in per_sample], images)
        mu, sigma = m.float().tolist(), sd.float().tolist()
    summary = {**summarize(per_sample, verdicts, mu, sigma), "detector": detector.name, "model": str(model),
               "lora": lora, "settings": s.__dict__}
    if s.relation_sensitivity:
        from .sensitivity import relation_sensitivity

        summary["relation_sensitivity"] = relation_sensitivity(
            sampler, list(dict.fromkeys(t.prompt for t in tasks)), [sample_seed(s.seed, 0, j) for j in range(s.per_prompt)],
            batch=s.batch)
    with (out / "samples.jsonl").open("w") as f:
        for n, ((i, j), t, v) in enumerate(zip(jobs, per_sample, verdicts, strict=True)):
            rec = {"prompt": t.prompt, "prompt_index": i, "seed_index": j, "seed": sample_seed(s.seed, i, j),
                   "image": f"images/{i:04d}_{j:02d}.png", **v.to_dict()}
            if mu is not None:
                rec.update({"spatialscore_mu": mu[n], "spatialscore_sigma": sigma[n]})
            f.write(json.dumps(rec) + "\n")
    (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "eval.md").write_text(markdown(summary, title=_title(summary)))
    verdict_grid(images, verdicts, s.per_prompt, [t.prompt for t in tasks], out / "grid.png")
    info(f"objects found {summary['objects_found']:.3f}, relation accuracy {summary['relation_accuracy']:.3f} "
         f"({summary['samples']} samples) -> {out / 'eval.md'}", who="eval")
    return summary


def add_spatialscore(out: str | Path, reward_model: str, device: str = "cpu") -> dict:
    """Score the samples an evaluation saved in ``out`` (run without ``reward_model``) with a SpatialScore, as
    :func:`run_eval` would have: the same pixels (PNG is lossless), mu and sigma per sample into samples.jsonl, their
    summary into eval.json and eval.md; returns the summary."""
    import torch
    from PIL import Image

    from ..reward.model import SpatialScore

    out = Path(out)
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((out / "eval.json").read_text())
    rm = SpatialScore.from_pretrained(reward_model).to(device).eval()
    with torch.no_grad():
        m, sd = rm.score([r["prompt"] for r in recs], [Image.open(out / r["image"]).convert("RGB") for r in recs])
    mu, sigma = m.float().tolist(), sd.float().tolist()
    with (out / "samples.jsonl").open("w") as f:
        for r, a, b in zip(recs, mu, sigma, strict=True):
            f.write(json.dumps({**r, "spatialscore_mu": a, "spatialscore_sigma": b}) + "\n")
    summary["spatialscore"] = _spatialscore_summary(mu, sigma)
    (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "eval.md").write_text(markdown(summary, title=_title(summary)))
    return summary
