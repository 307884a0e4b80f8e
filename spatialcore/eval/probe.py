"""Does a generator's text path carry which object is a relation's subject? A linear probe on its embeddings.

For synthetic prompts of two objects ("A red circle is left of a blue square"), the label is whether the object
whose colour word is ``colour`` is named first (the relation's subject). Features: the T5 embedding at that colour
word's token, and the pooled CLIP embedding. A logistic regression (L-BFGS, a small L2 penalty, features
standardised on the training part) is fitted on the first 3/4 of the prompts and scored on the rest:

    accuracy = mean over held-out prompts of [ (w . f + b > 0) == label ]

Where to draw an object is the exclusive-or of this feature and the relation's direction, so a text path whose
probe is near 1 gives the transformer what it needs, and one near 0.5 has lost it.

    python -m spatialcore.eval.probe MODEL [MODEL ...] [--prompts 800]
"""

from __future__ import annotations

import argparse

import torch


def subject_probe(pipe, prompts: list[str], *, colour: str = "red", batch: int = 100,
                  max_sequence_length: int = 32) -> dict:
    """Held-out accuracy of the probe on the T5 token of ``colour`` and on the pooled CLIP vector (module
    docstring); prompts naming ``colour`` once among its T5 tokens, with another object, are used."""
    from .judge import task_from_prompt

    tok = pipe.tokenizer_2
    word = tok(" " + colour, add_special_tokens=False).input_ids[-1]
    t5, pooled, label = [], [], []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            emb, pool, _ = pipe.encode_prompt(chunk, prompt_2=None, max_sequence_length=max_sequence_length)
            ids = tok(chunk, max_length=max_sequence_length, truncation=True, padding="max_length",
                      return_tensors="pt").input_ids
            for j, p in enumerate(chunk):
                at = (ids[j] == word).nonzero()
                objects = task_from_prompt(p).objects  # in the prompt's order: the subject first
                if len(at) != 1 or len(objects) < 2 or not all(o.colour for o in objects):
                    continue
                t5.append(emb[j, at[0, 0]].float())
                pooled.append(pool[j].float())
                label.append(float(objects[0].colour == colour))
    if len(label) < 8:
        raise ValueError(f"only {len(label)} prompts name {colour!r} once beside another coloured object")
    y = torch.tensor(label)
    return {"t5_token": _probe(torch.stack(t5), y), "clip_pooled": _probe(torch.stack(pooled), y), "n": len(label)}


def _probe(x: torch.Tensor, y: torch.Tensor) -> float:
    n = len(y) * 3 // 4
    x = (x - x[:n].mean(0)) / (x[:n].std(0) + 1e-6)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x[:n] @ w + b, y[:n]) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((((x[n:] @ w + b) > 0).float() == y[n:]).float().mean())


def main(argv: list[str] | None = None) -> None:
    from diffusers import FluxPipeline

    from ..data.captioned import CaptionedDataConfig, CaptionedItems

    ap = argparse.ArgumentParser(prog="python -m spatialcore.eval.probe", description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="Flux pipeline folders")
    ap.add_argument("--prompts", type=int, default=800, help="synthetic easy_grid prompts (3/4 fit, 1/4 scored)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    items = CaptionedItems(CaptionedDataConfig(source="synthetic", preset="easy_grid"), image_size=32, seed=0)
    prompts = [items(0, k)[0] for k in range(args.prompts)]
    for m in args.models:
        r = subject_probe(FluxPipeline.from_pretrained(m, torch_dtype=torch.float32), prompts)
        print(f"{m}: is 'red' the subject? T5 token {r['t5_token']:.3f}, CLIP pooled {r['clip_pooled']:.3f} "
              f"({r['n'] - r['n'] * 3 // 4} of {r['n']} prompts held out)")


if __name__ == "__main__":
    main()
