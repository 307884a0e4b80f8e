"""Pretraining a miniature generator's T5 on where each object goes: ``spatialcore sft text-sides``.

Why: in a prompt "A red circle is left of a blue square", which object goes left is the exclusive-or of *which
object a word names* (subject or not) and *the direction* — no single word tells it. A randomly initialised T5
carries both (a linear probe reads the subject off the colour word's embedding), yet a tiny transformer trained
on top never learns to combine them: it draws the relation's axis and flips a coin for the order
(docs/EXPERIMENTS.md). Real text encoders arrive pretrained on language; this gives the miniature one a
language task that needs the same composition, so each object word's embedding says its own side.

The task. A prompt with exactly one directional relation ``r`` (left of / right of / above / below) between a
subject ``a`` and an object ``b``: every T5 token inside ``a``'s noun phrase (its colour and shape words) is
labelled ``r``, every token inside ``b``'s is labelled ``opposite(r)``; other tokens are unlabelled. With
``unstated`` (the default) the prompt's relation-less form ("A red circle and a blue square.", what a web caption
that lost its relation says) comes beside it, both noun phrases labelled ``none``: a T5 taught the four sides only
embeds such a caption's objects next to one direction's (measured: 3.1 from "below" against 9-14 from the other
three and 10 between left and right, docs/EXPERIMENTS.md), and a generator trained on web-like captions then
learns that this direction's words say nothing. With ``h_t``
the encoder's last hidden state at token ``t`` and a linear head ``(W, c)`` (discarded afterwards):

    L = - 1/|T| * sum_{t in T} log softmax(W h_t + c)[y_t]        (T: the labelled tokens of the batch)

minimised over the T5 and the head with AdamW; the batch's prompts are drawn with replacement from the
preset's training prompts. Held out: the same labels on the preset's test prompts, accuracy of
``argmax(W h_t + c)`` over labelled tokens. The output is a copy of the pipeline with only ``text_encoder_2``
replaced (CLIP, the transformer, the VAE and the tokenizers are the input's, byte for byte; the input's evaluation
records ``eval.json`` / ``verdicts.jsonl`` are left out: they judged the input); fine-tune the
transformer on it with ``sft train`` (frozen text encoders keep what this taught).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from ..atomic import atomic_dir
from ..config import ConfigError, param

SIDES = ("left of", "right of", "above", "below", "none")  # none: a caption that states no relation
STALE = ("eval.json", "verdicts.jsonl", "text_sides.json")  # not copied: they describe the input pipeline
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass
class TextSidesConfig:
    model: str | None = param(None, help="the Flux pipeline folder whose text_encoder_2 is trained")
    out: str | None = param(None, help="where the copy of the pipeline with the trained T5 is written")
    preset: Literal["easy", "medium", "hard", "easy_grid"] = param("easy_grid", help="the synthetic world's prompts")
    seed: int = param(0, min=0)
    steps: int = param(1500, min=1)
    batch_size: int = param(64, min=1, help="prompts per step")
    lr: float = param(1e-3, min=0.0)
    weight_decay: float = param(0.0, min=0.0)
    max_sequence_length: int = param(32, min=8, max=512, help="T5 tokens (the generator's max_sequence_length)")
    train_prompts: int = param(2000, min=1, help="distinct training prompts drawn (fewer if the world has fewer)")
    eval_prompts: int = param(512, min=1, help="held-out prompts for the side accuracy")
    log_every: int = param(100, min=1)
    threads: int = param(0, min=0, help="torch threads (0: torch's default)")
    unstated: bool = param(True, help="also teach each prompt's relation-less form ('A and B'), its objects "
                                      "labelled none (module docstring)")

    def require_paths(self) -> None:
        """The keys a run needs and the defaults leave empty (checked when it starts, not when it loads)."""
        if not self.model:
            raise ConfigError("model", "needs the Flux pipeline folder to start from (--model)")
        if not self.out:
            raise ConfigError("out", "needs an output folder (--out)")


def world_prompts(preset: str, split: str, n: int, seed: int, *, max_draws: int | None = None) -> list[str]:
    """Up to ``n`` distinct prompts of ``preset`` that fall in ``split`` (the split rule of the pair sets and of
    held-out evaluation), drawn without rendering, in draw order; fewer when 2,000 draws in a row bring no new
    one."""
    from ..config import from_dict
    from ..data.scene import random_scene, write_prompt
    from ..data.synth import DIFFICULTIES, SynthConfig, split_of

    cfg = from_dict(SynthConfig, {**DIFFICULTIES[preset], "size": 32}, "preset")
    spec = cfg.spec()
    out: dict[str, None] = {}
    last_new = 0
    for draw in range(max_draws or 50 * n):
        if draw - last_new > 2000:  # a small world (easy_grid: a few hundred prompts) has given all it has
            break
        rng = random.Random(f"spatialcore-text-sides:{seed}:{draw}")
        scene = random_scene(spec, rng)
        prompt = write_prompt(scene, rng)
        key = prompt if cfg.split_by == "prompt" else "|".join(sorted(f"{o.colour} {o.kind}" for o in scene.objects))
        if split_of(key, cfg) == split and prompt not in out:
            out[prompt] = None
            last_new = draw
            if len(out) == n:
                break
    return list(out)


def side_spans(prompt: str) -> list[tuple[int, int, str]] | None:
    """(start, end, side) character spans of the two noun phrases of a prompt with one directional relation: the
    subject's side is the relation, the object's its opposite. None for prompts with another relation, several
    relations, or a noun phrase that cannot be told apart from the other."""
    from ..data.scene import parse_prompt

    rels = parse_prompt(prompt)
    if len(rels) != 1 or rels[0].type not in SIDES or len(rels[0].args) != 2:
        return None
    (ca, ka), (cb, kb) = rels[0].args
    if (ca, ka) == (cb, kb):
        return None
    return _noun_spans(prompt, (((ca, ka), rels[0].type), ((cb, kb), _OPPOSITE[rels[0].type])))


def _noun_spans(prompt: str, objects) -> list[tuple[int, int, str]] | None:
    """(start, end, side) of each ``((colour, kind), side)`` noun phrase, None when one is not found exactly once."""
    low = prompt.lower()
    spans = []
    for (colour, kind), side in objects:
        hits = [m.span() for m in re.finditer(rf"\b{re.escape(colour)}\s+{re.escape(kind)}\b", low)]
        if len(hits) != 1:
            return None
        spans.append((*hits[0], side))
    return spans


def unstated_spans(prompt: str) -> tuple[str, list[tuple[int, int, str]]] | None:
    """The relation-less form of a prompt ``side_spans`` labels (its directional phrase replaced by "and", as
    ``data.caption_drop`` makes web-like captions) and its two noun phrases' spans, labelled ``none``."""
    from ..data.captions import drop_relation
    from ..data.scene import parse_prompt

    if side_spans(prompt) is None or (bare := drop_relation(prompt)) is None:
        return None
    (ca, ka), (cb, kb) = parse_prompt(prompt)[0].args
    spans = _noun_spans(bare, (((ca, ka), "none"), ((cb, kb), "none")))
    return None if spans is None else (bare, spans)


def label_tokens(tokenizer, prompts: list[str], max_length: int, *, unstated: bool = False):
    """Token ids, attention mask and per-token side labels (index into SIDES; -100 where unlabelled) of
    ``prompts``; prompts without a usable relation (``side_spans`` None) are left out. With ``unstated``, each
    kept prompt's relation-less form follows it (``unstated_spans``). Returns (input_ids, attention_mask,
    labels, kept prompts)."""
    kept = []
    for p in prompts:
        if (s := side_spans(p)) is None:
            continue
        kept.append((p, s))
        if unstated and (bare := unstated_spans(p)) is not None:
            kept.append(bare)
    if not kept:
        return None
    enc = tokenizer([p for p, _ in kept], max_length=max_length, truncation=True, padding="max_length",
                    return_tensors="pt", return_offsets_mapping=True)
    labels = torch.full(enc.input_ids.shape, -100, dtype=torch.long)
    for j, (_, spans) in enumerate(kept):
        for t, (s, e) in enumerate(enc.offset_mapping[j].tolist()):
            if e <= s or not enc.attention_mask[j, t]:
                continue
            for a, b, side in spans:
                if s < b and e > a:  # the token overlaps the noun phrase
                    labels[j, t] = SIDES.index(side)
    return enc.input_ids, enc.attention_mask, labels, [p for p, _ in kept]


def _side_logits(t5, head, ids, mask):
    return head(t5(input_ids=ids, attention_mask=mask).last_hidden_state)


def side_accuracy(t5, head, labelled) -> float:
    """Accuracy of the head's side over the labelled tokens of ``labelled`` (what ``label_tokens`` returns)."""
    ids, mask, y, _ = labelled
    with torch.no_grad():
        pred = _side_logits(t5, head, ids, mask).argmax(-1)
    m = y != -100
    return float((pred[m] == y[m]).float().mean())


def train(cfg: TextSidesConfig, *, overwrite: bool = False) -> dict:
    """Train ``cfg.model``'s T5 on the sides task and write the pipeline copy to ``cfg.out`` (an existing
    non-empty folder only with ``overwrite``); returns the summary also written to ``out/text_sides.json``."""
    from transformers import AutoTokenizer, T5EncoderModel

    from ..logs import info, progress

    cfg.require_paths()
    src, out = Path(cfg.model), Path(cfg.out)
    if not (src / "text_encoder_2").is_dir() or not (src / "tokenizer_2").is_dir():
        raise ConfigError("model", f"{src} is not a Flux pipeline folder (no text_encoder_2/ and tokenizer_2/)")
    if out.resolve() == src.resolve():
        raise ConfigError("out", "must differ from model (the input pipeline is kept as it is)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (--force replaces it)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(src / "tokenizer_2")
    if not tok.is_fast:
        raise ConfigError("model", f"{src / 'tokenizer_2'} has no fast tokenizer (token offsets are needed)")
    t5 = T5EncoderModel.from_pretrained(src / "text_encoder_2", torch_dtype="auto")
    saved_dtype = t5.dtype  # trained in float32, written back in the pipeline's own dtype
    t5 = t5.float()
    train_p = world_prompts(cfg.preset, "train", cfg.train_prompts, cfg.seed)
    test_p = world_prompts(cfg.preset, "test", cfg.eval_prompts, cfg.seed)
    data = label_tokens(tok, train_p, cfg.max_sequence_length, unstated=cfg.unstated)
    held_out = label_tokens(tok, test_p, cfg.max_sequence_length, unstated=cfg.unstated)
    if data is None or held_out is None:
        raise ConfigError("preset", f"{cfg.preset}'s prompts have no single directional relation between two "
                                    "distinct objects to label")
    ids, mask, labels, kept = data
    stated = sum(side_spans(p) is not None for p in kept)
    info(f"{stated} training prompts ({len(train_p) - stated} without one directional relation left out)"
         f"{f' and their {len(kept) - stated} relation-less forms' if cfg.unstated else ''}, {len(test_p)} held out; "
         f"T5 {sum(p.numel() for p in t5.parameters()):,} parameters, {cfg.steps} steps", who="text-sides")
    head = torch.nn.Linear(t5.config.d_model, len(SIDES) if cfg.unstated else len(SIDES) - 1)  # none: last
    opt = torch.optim.AdamW([*t5.parameters(), *head.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    t5.train()
    losses, t0 = [], time.time()
    for step in progress(range(1, cfg.steps + 1), desc="text-sides", total=cfg.steps):
        rows = torch.randint(len(kept), (cfg.batch_size,), generator=gen)
        y = labels[rows]
        logits = _side_logits(t5, head, ids[rows], mask[rows])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            info(f"step {step}/{cfg.steps} | loss {sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]):.4f}",
                 who="text-sides")
    t5.eval()
    acc = side_accuracy(t5, head, held_out)
    summary = {"config": asdict(cfg), "train_prompts": stated, "unstated_forms": len(kept) - stated,
               "held_out_prompts": len(test_p),
               "held_out_side_accuracy": acc, "first_loss": losses[0], "last_loss": losses[-1],
               "seconds": round(time.time() - t0, 1)}
    with atomic_dir(out) as tmp:
        # the input's own evaluation records (eval.json, verdicts.jsonl of a committed generator) describe the input
        shutil.copytree(src, tmp, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if Path(d) == src and n in STALE])
        shutil.rmtree(tmp / "text_encoder_2")
        t5.to(saved_dtype).save_pretrained(tmp / "text_encoder_2")
        (tmp / "text_sides.json").write_text(json.dumps(summary, indent=2) + "\n")
    info(f"held-out side accuracy per object token {acc:.3f} -> {out}", who="text-sides")
    return summary
