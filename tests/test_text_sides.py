"""``spatialcore sft text-sides``: the side labels of each object word (checked against sentences read by hand), the
pipeline copy (only the T5 changes, in the pipeline's dtype, and stock diffusers loads it), the user's errors."""

import json
from pathlib import Path

import pytest
import torch

from spatialcore.cli import main
from spatialcore.trainers.text_sides import label_tokens, side_spans, world_prompts

# (prompt, {word: side}) read by hand: the subject's words take the relation, the other object's its opposite
BY_HAND = [
    ("A red circle is to the left of a blue square.", {"red": "left of", "circle": "left of", "blue": "right of",
                                                        "square": "right of"}),
    ("The blue square lies beneath the red circle.", {"blue": "below", "square": "below", "red": "above",
                                                      "circle": "above"}),
    ("A large blue square is placed over the medium red circle.", {"blue": "above", "square": "above",
                                                                   "red": "below", "circle": "below"}),
    ("The red circle is on the right side of a blue square.", {"red": "right of", "circle": "right of",
                                                               "blue": "left of", "square": "left of"}),
]


def _tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir / "flux" / "tokenizer_2")


def test_each_object_word_is_labelled_with_its_objects_side(tiny_dir):
    from spatialcore.trainers.text_sides import SIDES

    tok = _tokenizer(tiny_dir)
    ids, mask, labels, kept = label_tokens(tok, [p for p, _ in BY_HAND], 32)
    assert kept == [p for p, _ in BY_HAND]
    for j, (_, want) in enumerate(BY_HAND):
        got = {tok.decode([int(ids[j, t])]).strip(): SIDES[int(labels[j, t])]
               for t in range(ids.shape[1]) if labels[j, t] != -100}
        assert got == want, (BY_HAND[j][0], got)
        assert int((labels[j] != -100).sum()) == 4  # nothing else labelled (articles, sizes, the relation words)
        assert bool(mask[j][labels[j] != -100].all())


def test_a_prompts_relation_less_form_follows_it_with_its_objects_labelled_none(tiny_dir):
    """unstated: after each prompt, the same words with the directional phrase replaced by "and" (read by hand),
    every colour and shape word labelled none; without it nothing follows."""
    from spatialcore.trainers.text_sides import SIDES

    tok = _tokenizer(tiny_dir)
    prompts = [p for p, _ in BY_HAND] + ["A red circle is next to a blue square."]  # the last: not a direction
    ids, mask, labels, kept = label_tokens(tok, prompts, 32, unstated=True)
    assert kept == ["A red circle is to the left of a blue square.", "A red circle and a blue square.",
                    "The blue square lies beneath the red circle.", "The blue square and the red circle.",
                    "A large blue square is placed over the medium red circle.",
                    "A large blue square and the medium red circle.",
                    "The red circle is on the right side of a blue square.", "The red circle and a blue square."]
    for j in range(len(kept)):
        got = {tok.decode([int(ids[j, t])]).strip(): SIDES[int(labels[j, t])]
               for t in range(ids.shape[1]) if labels[j, t] != -100}
        want = BY_HAND[j // 2][1] if j % 2 == 0 else dict.fromkeys(BY_HAND[j // 2][1], "none")
        assert got == want, (kept[j], got)
    assert label_tokens(tok, prompts, 32)[3] == [p for p, _ in BY_HAND]


def test_prompts_without_one_directional_relation_between_two_objects_are_left_out():
    assert side_spans("A red circle is next to a blue square.") is None  # not a direction
    assert side_spans("A red circle is between a blue square and a green star.") is None  # three objects
    assert side_spans("A red circle is behind a blue square.") is None  # depth, not a side
    assert side_spans("A red circle is left of a blue square and a blue square is above a green star.") is None
    spans = side_spans("A red circle is to the left of a blue square.")
    assert [s[2] for s in spans] == ["left of", "right of"]


def test_world_prompts_keep_the_split():
    from spatialcore.config import from_dict
    from spatialcore.data.synth import DIFFICULTIES, SynthConfig, split_of

    cfg = from_dict(SynthConfig, {**DIFFICULTIES["easy_grid"], "size": 32}, "t")
    for split in ("train", "test"):
        prompts = world_prompts("easy_grid", split, 6, 0)
        assert len(prompts) == len(set(prompts)) == 6
        assert all(split_of(p, cfg) == split for p in prompts)


def test_the_copy_changes_only_the_t5_and_loads_with_stock_diffusers(tmp_path, capsys):
    """From the committed generator (a float16 pipeline: the T5 comes back in float16)."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    src, out = Path(__file__).resolve().parents[1] / "assets" / "tiny_generator", tmp_path / "sides"
    rc = main(["sft", "text-sides", "--model", str(src), "--out", str(out), "--json", str(tmp_path / "s.json"),
               "steps=30", "lr=3e-3", "train_prompts=64", "eval_prompts=8", "log_every=10", "threads=1"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary == json.loads((out / "text_sides.json").read_text())
    assert 0.0 <= summary["held_out_side_accuracy"] <= 1.0 and summary["last_loss"] < summary["first_loss"]
    before = {p.relative_to(src) for p in src.rglob("*") if p.is_file()}
    after = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    # the committed generator's own evaluation records judged it, not the copy
    assert {Path("eval.json"), Path("verdicts.jsonl")} <= before
    before -= {Path("eval.json"), Path("verdicts.jsonl")}
    assert after == before | {Path("text_sides.json")}
    for rel in before:
        if rel.parts[0] != "text_encoder_2":
            assert (src / rel).read_bytes() == (out / rel).read_bytes(), rel
    a = load_file(src / "text_encoder_2" / "model.safetensors")
    b = load_file(out / "text_encoder_2" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype == torch.float16 for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    pipe = FluxPipeline.from_pretrained(out)
    emb, _, _ = pipe.encode_prompt(BY_HAND[0][0], prompt_2=None, max_sequence_length=32)
    assert emb.shape[1] == 32 and torch.isfinite(emb).all()


def test_user_mistakes_are_one_line_errors(tiny_dir, tmp_path, capsys):
    rc = main(["sft", "text-sides", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "model" in err and "Traceback" not in err, err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("kept")
    rc = main(["sft", "text-sides", "--model", str(tiny_dir / "flux"), "--out", str(tmp_path / "full"), "steps=1"])
    err = capsys.readouterr().err
    assert rc == 1 and "--force" in err and (tmp_path / "full" / "x").read_text() == "kept", err
    rc = main(["sft", "text-sides", "--model", str(tiny_dir / "flux"), "--out", str(tiny_dir / "flux"), "steps=1"])
    assert rc == 2 and "out" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["steps=0", "batch_size=0", "preset=nowhere"])
def test_bad_keys_name_themselves(tiny_dir, tmp_path, capsys, bad):
    rc = main(["sft", "text-sides", "--model", str(tiny_dir / "flux"), "--out", str(tmp_path / "o"), bad])
    assert rc == 2 and bad.split("=")[0] in capsys.readouterr().err
