"""Exploratory (docs/EXPERIMENTS.md, "the generator draws the axis, not the order"): pretrain the tiny T5 of a
generator on a text task that needs the composition the generator lacks, then freeze it.

Each object word of a synthetic ``easy_grid`` prompt (its colour and its shape) is labelled with its object's side
of the other object (left of / right of / above / below: the relation's direction for the subject, the opposite
one for the other object); the T5 encoder and a linear head are trained with cross-entropy on those tokens only.
The pipeline is copied with the trained T5; the transformer is then fine-tuned on it with ``sft train`` (the
command is in EXPERIMENTS). Not yet part of ``make generator``: one run moved the order; a result needs more.

    .venv/bin/python docs/experiments/pretrain_t5_sides.py BASE OUT [STEPS]     (e.g. assets/tiny_generator runs/genC/flux 1500)
"""
import shutil
import sys
import time

import torch
from diffusers import FluxPipeline

from spatialcore.data.captioned import CaptionedDataConfig, CaptionedItems
from spatialcore.data.captions import find_relation

SIDES = ["left of", "right of", "above", "below"]
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
COLOURS, SHAPES = ("red", "blue"), ("circle", "square")


def labelled_batch(items, tok, vocab, k0: int, n: int):
    """Token ids of prompts k0..k0+n of stream 7 and each object word's side (-100 elsewhere)."""
    prompts = [items(7, k)[0] for k in range(k0, k0 + n)]
    ids = tok(prompts, max_length=32, truncation=True, padding="max_length", return_tensors="pt")
    y = torch.full(ids.input_ids.shape, -100)
    for j, p in enumerate(prompts):
        rel = find_relation(p)[1]
        low = p.lower()
        subject = {min(COLOURS, key=low.find), min(SHAPES, key=low.find)}  # the words named first
        for w in COLOURS + SHAPES:
            y[j][ids.input_ids[j] == vocab[w]] = SIDES.index(rel if w in subject else OPPOSITE[rel])
    return ids, y


def main(base: str, out: str, steps: int = 1500) -> None:
    torch.manual_seed(0)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out)
    pipe = FluxPipeline.from_pretrained(out, torch_dtype=torch.float32)
    t5, tok = pipe.text_encoder_2, pipe.tokenizer_2
    items = CaptionedItems(CaptionedDataConfig(source="synthetic", preset="easy_grid"), image_size=32, seed=0)
    vocab = {w: tok(" " + w, add_special_tokens=False).input_ids[-1] for w in COLOURS + SHAPES}
    head = torch.nn.Linear(t5.config.d_model, len(SIDES))
    opt = torch.optim.AdamW(list(t5.parameters()) + list(head.parameters()), lr=1e-3)
    t5.train()
    t0 = time.time()
    for step in range(steps):
        ids, y = labelled_batch(items, tok, vocab, step * 64, 64)
        h = t5(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
        loss = torch.nn.functional.cross_entropy(head(h).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    t5.eval()
    with torch.no_grad():
        ids, y = labelled_batch(items, tok, vocab, 10**7, 512)  # prompts never trained on
        pred = head(t5(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state).argmax(-1)
        m = y != -100
        print(f"held-out side accuracy per object word {float((pred[m] == y[m]).float().mean()):.3f}")
    t5.save_pretrained(out + "/text_encoder_2")
    print(f"pipeline with the trained T5 -> {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]))
