"""`spatialcore eval`: GenEval's position rule against a formula written from its source
(djghosh13/geneval, evaluation/evaluate_images.py, ``relative_position``), the judge and the report's
numbers by value on rendered scenes whose truth is known, the zero-shot detector path on a tiny random
OWLv2 built offline, and the command end to end."""

import json
import math
import random

import pytest
from PIL import Image

from spatialcore.cli import main
from spatialcore.data.geometry import geneval_relations
from spatialcore.eval.judge import OracleDetector, Task, Wanted, judge, task_from_geneval, task_from_prompt
from spatialcore.eval.report import summarize


def _reference(box_a, box_b, t=0.1):
    """GenEval's relative_position, written out per axis in plain Python."""
    ca = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    cb = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    size = [abs(box_a[2] - box_a[0]) + abs(box_b[2] - box_b[0]), abs(box_a[3] - box_a[1]) + abs(box_b[3] - box_b[1])]
    off = [ca[0] - cb[0], ca[1] - cb[1]]
    rev = [math.copysign(max(abs(o) - t * s, 0.0), o) if o else 0.0 for o, s in zip(off, size, strict=True)]
    if abs(rev[0]) < 1e-3 and abs(rev[1]) < 1e-3:
        return set()
    norm = math.hypot(*off)
    dx, dy = rev[0] / norm, rev[1] / norm
    return {name for name, hit in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                   ("below", dy > 0.5)) if hit}


def test_geneval_position_rule_matches_its_formula():
    assert geneval_relations([0, 40, 20, 60], [60, 40, 80, 60]) == {"left of"}
    assert geneval_relations([60, 0, 80, 20], [60, 60, 80, 80]) == {"above"}
    assert geneval_relations([0, 0, 20, 20], [60, 60, 80, 80]) == {"left of", "above"}  # a diagonal: both
    assert geneval_relations([0, 0, 20, 20], [1, 1, 21, 21]) == set()  # within the threshold: none
    assert geneval_relations([0, 30, 20, 50], [30, 0, 50, 20]) == {"left of", "below"}
    assert geneval_relations([0, 0, 20, 20], [30, 10, 50, 30]) == {"left of"}  # mostly horizontal
    rng = random.Random(0)
    for _ in range(3000):
        boxes = []
        for _ in range(2):
            x, y = rng.uniform(0, 100), rng.uniform(0, 100)
            boxes.append([x, y, x + rng.uniform(1, 40), y + rng.uniform(1, 40)])
        assert geneval_relations(*boxes) == _reference(*boxes), boxes


def _scene(prompt_seed: int):
    from spatialcore.config import from_dict
    from spatialcore.data.synth import DIFFICULTIES, SynthConfig, scene_sample

    return scene_sample(from_dict(SynthConfig, {**DIFFICULTIES["easy"], "size": 64}, "s"), "eval-test", prompt_seed)


def test_judge_and_report_by_value_on_rendered_scenes():
    """Three rendered scenes: judged against their own prompt (correct), the flipped relation (objects
    found, relation wrong), and a prompt naming an absent object (not found)."""
    from spatialcore.vocab import OPPOSITE

    (p1, im1, s1), (_, im2, s2), (_, im3, s3) = _scene(0), _scene(1), _scene(2)

    def sentence(rtype, a, b):  # a phrasing of the synthetic grammar
        verb = {"left of": "is to the left of", "right of": "is to the right of"}.get(rtype, f"is {rtype}")
        return f"the {a[0]} {a[1]} {verb} the {b[0]} {b[1]}"

    r2, r3 = s2.relations[0], s3.relations[0]
    r1 = s1.relations[0]
    both = f"{sentence(r1.type, *r1.args)} and {sentence(OPPOSITE[r1.type], *r1.args)}"  # the second is false
    tasks = [task_from_prompt(p1), task_from_prompt(sentence(OPPOSITE[r2.type], *r2.args)),
             task_from_prompt(sentence(r3.type, ("green", "star"), r3.args[1])), task_from_prompt(both)]
    det = OracleDetector()
    verdicts = [judge(im, t, det) for im, t in zip((im1, im2, im3, im1), tasks, strict=True)]
    assert [v.found for v in verdicts] == [[True, True], [True, True], [False, True], [True, True]]
    assert [v.relations for v in verdicts] == [[True], [False], [False], [True, False]]
    assert [v.correct for v in verdicts] == [True, False, False, False]
    box = verdicts[0].boxes[0][0]
    obj = s1.find((tasks[0].objects[0].colour, tasks[0].objects[0].kind))
    assert abs((box[0] + box[2]) / 2 / 64 - obj.cx) < 0.03 and abs((box[1] + box[3]) / 2 / 64 - obj.cy) < 0.03

    s = summarize(tasks, verdicts, mu=[1.0, 0.0, -1.0, 0.0], sigma=[0.5, 0.5, 1.0, 0.0])
    assert s["samples"] == 4 and s["prompts"] == 4
    assert s["objects_found"] == pytest.approx(3 / 4) and s["object_recall"] == pytest.approx(7 / 8)
    assert s["relation_accuracy"] == pytest.approx(1 / 4) and s["relation_accuracy_when_found"] == pytest.approx(1 / 3)
    instances = [(t, ok) for task, v in zip(tasks, verdicts, strict=True) for (t, _), ok in
                 zip(task.relations, ([1], [0], [0], [1, 0])[tasks.index(task)], strict=True)]
    expect = {}
    for t, ok in instances:
        c, n = expect.get(t, (0, 0))
        expect[t] = (c + ok, n + 1)
    assert s["per_relation"] == {k: {"accuracy": c / n, "n": n} for k, (c, n) in sorted(expect.items())}
    assert s["spatialscore"] == {"mu_mean": 0.0, "mu_std": pytest.approx(math.sqrt(1 / 2)), "sigma_mean": pytest.approx(1 / 2)}


def test_geneval_metadata_becomes_objects_and_relations():
    rec = {"tag": "position", "prompt": "a photo of a dog below a bench",
           "include": [{"class": "bench", "count": 1}, {"class": "dog", "count": 1, "position": ["below", 0]}]}
    t = task_from_geneval(rec)
    assert t.objects == [Wanted("bench"), Wanted("dog")] and t.relations == [("below", (1, 0))] and t.tag == "position"


def _tiny_owlv2(folder, tiny_dir):
    """A randomly initialised OWLv2 with the tiny CLIP tokenizer, saved like a hub checkpoint."""
    import torch
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    # OWLv2 masks a query whose first token id is 0; the tiny CLIP vocabulary starts with its start token
    # at 0 (real CLIP's is 49406), so ids are shifted by one.
    model = json.loads((tiny_dir / "flux" / "tokenizer" / "tokenizer.json").read_text())["model"]
    vocab = {"<unused>": 0, **{t: i + 1 for t, i in model["vocab"].items()}}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)
    cfg = Owlv2Config(text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
                                   "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                   "pad_token_id": tok.pad_token_id},
                      vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "image_size": 64, "patch_size": 16},
                      projection_dim=32)
    torch.manual_seed(0)
    Owlv2ForObjectDetection(cfg).save_pretrained(folder)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tok
                   ).save_pretrained(folder)


def test_zero_shot_detector_path_runs_offline_on_a_tiny_random_owlv2(tiny_dir, tmp_path):
    from spatialcore.eval.judge import ZeroShotDetector

    _tiny_owlv2(tmp_path / "owl", tiny_dir)
    det = ZeroShotDetector(str(tmp_path / "owl"), threshold=0.0)
    task = Task("a red circle left of a blue square", [Wanted("circle", "red"), Wanted("square", "blue")],
                [("left of", (0, 1))])
    _, im, _ = _scene(0)
    v = judge(im, task, det)
    # OWLv2 predicts one box per 16 px patch (4 x 4 on 64 px) and gives each its best query:
    # threshold 0 keeps all 16, split between the two objects
    assert sum(len(b) for b in v.boxes) == 16
    for boxes in v.boxes:
        for b in boxes:
            assert len(b) == 4 and b[0] <= b[2] and b[1] <= b[3]
    assert v.found == [len(b) > 0 for b in v.boxes]
    assert v.relations[0] is (v.all_found and all("left of" in geneval_relations(a, b) for a in v.boxes[0][:1]
                                                  for b in v.boxes[1][:1]))
    strict = judge(im, task, ZeroShotDetector(str(tmp_path / "owl"), threshold=1.01))
    assert strict.found == [False, False] and strict.relations == [False] and not strict.correct


def test_eval_command_end_to_end(tiny_dir, tmp_path, capsys):
    """Files written, numbers in eval.json recomputed from samples.jsonl, a GenEval prompt set with a
    zero-shot detector, and the pixel oracle refused on GenEval prompts (one line, exit 2)."""
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(tiny_dir / "flux"), "--n-prompts", "2", "-n", "2", "--steps", "2",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "eval.json").read_text())
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert summary["samples"] == len(rows) == 4 and len({r["seed"] for r in rows}) == 4
    assert summary["objects_found"] == sum(r["all_found"] for r in rows) / 4
    assert summary["relation_accuracy"] == sum(r["correct"] for r in rows) / 4
    assert all((out / r["image"]).is_file() for r in rows)
    assert (out / "grid.png").is_file() and "relation accuracy" in (out / "eval.md").read_text()
    again = tmp_path / "again"
    main(["eval", "--model", str(tiny_dir / "flux"), "--n-prompts", "2", "-n", "2", "--steps", "2", "--out", str(again)])
    assert [json.loads(x)["seed"] for x in (again / "samples.jsonl").read_text().splitlines()] == [r["seed"] for r in rows]
    assert Image.open(again / rows[0]["image"]).tobytes() == Image.open(out / rows[0]["image"]).tobytes()

    meta = tmp_path / "geneval.jsonl"
    meta.write_text(json.dumps({"tag": "position", "prompt": "a photo of a red circle left of a blue square",
                                "include": [{"class": "square", "color": "blue", "count": 1},
                                            {"class": "circle", "color": "red", "count": 1,
                                             "position": ["left of", 0]}]}) + "\n")
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_dir / "flux"), "--prompts", str(meta), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--detector" in err
    _tiny_owlv2(tmp_path / "owl", tiny_dir)
    assert main(["eval", "--model", str(tiny_dir / "flux"), "--prompts", str(meta), "-n", "2", "--steps", "2",
                 "--detector", str(tmp_path / "owl"), "--threshold", "0", "--out", str(tmp_path / "owl_eval")]) == 0
    s = json.loads((tmp_path / "owl_eval" / "eval.json").read_text())
    assert s["samples"] == 2 and s["per_relation"]["left of"]["n"] == 2


def test_eval_samples_as_the_generator_was_trained(tiny_dir, tmp_path, capsys):
    """Unset sampling options come from the pipeline's spatialcore_run.json (sft train writes one); options
    on the command line win."""
    import shutil

    model = tmp_path / "gen"
    shutil.copytree(tiny_dir / "flux", model)
    (model / "spatialcore_run.json").write_text(json.dumps({"config": {
        "image_size": 48, "max_sequence_length": 40, "guidance": 2.0, "sample_steps": 3,
        "data": {"source": "synthetic", "preset": "easy_grid", "synth": {}}}}))
    assert main(["eval", "--model", str(model), "--n-prompts", "1", "-n", "1", "--out", str(tmp_path / "a")]) == 0
    s = json.loads((tmp_path / "a" / "eval.json").read_text())["settings"]
    assert (s["size"], s["max_sequence_length"], s["guidance"], s["steps"], s["prompts"]) == \
        (48, 40, 2.0, 3, "synthetic:easy_grid")
    assert Image.open(tmp_path / "a" / "images" / "0000_00.png").size == (48, 48)
    assert "spatialcore_run.json" in capsys.readouterr().err
    assert main(["eval", "--model", str(model), "--n-prompts", "1", "-n", "1", "--size", "32", "--steps", "2",
                 "--prompts", "synthetic:easy", "--out", str(tmp_path / "b")]) == 0
    s = json.loads((tmp_path / "b" / "eval.json").read_text())["settings"]
    assert (s["size"], s["max_sequence_length"], s["steps"], s["prompts"]) == (32, 40, 2, "synthetic:easy")
    assert main(["eval", "--model", str(tiny_dir / "flux"), "--n-prompts", "1", "-n", "1", "--steps", "1",
                 "--out", str(tmp_path / "c")]) == 0
    s = json.loads((tmp_path / "c" / "eval.json").read_text())["settings"]
    assert (s["size"], s["max_sequence_length"], s["prompts"]) == (32, 64, "synthetic:easy")


@pytest.mark.parametrize("preset,size", [("easy", 64), ("medium", 64), ("easy_grid", 32)])
def test_the_judge_calls_every_rendered_scene_correct(preset, size):
    """Synthetic layouts hold each directional relation by GenEval's rule too, so the judge (pixel
    oracle boxes + GenEval's rule) and the scene graph agree on the renderer's own images."""
    from spatialcore.config import from_dict
    from spatialcore.data.synth import DIFFICULTIES, SynthConfig, scene_sample

    cfg = from_dict(SynthConfig, {**DIFFICULTIES[preset], "size": size}, "s")
    det = OracleDetector()
    wrong = []
    for k in range(120):
        prompt, image, _ = scene_sample(cfg, "judge-test", k, "test")
        if not judge(image, task_from_prompt(prompt), det).correct:
            wrong.append(prompt)
    assert not wrong, wrong[:3]


def test_axis_and_order_separates_a_swapped_pair_from_a_wrong_axis():
    """By value on hand-placed boxes: right axis and order, right axis swapped, a vertical pair for a horizontal
    relation... (image y downwards), and instances left out (an object missing, a relation without an axis)."""
    from spatialcore.eval.judge import Verdict
    from spatialcore.eval.report import axis_and_order

    def box(cx, cy):
        return [[cx - 1.0, cy - 1.0, cx + 1.0, cy + 1.0]]

    two = [Wanted("circle", "red"), Wanted("square", "blue")]
    cases = [("left of", (2, 5), (8, 5), True), ("left of", (8, 5), (2, 5), True), ("above", (5, 2), (5, 8), True),
             ("below", (2, 5), (8, 6), True), ("right of", (9, 5), (1, 5), False), ("next to", (2, 5), (8, 5), True)]
    tasks, verdicts = [], []
    for rel, a, b, found in cases:
        tasks.append(Task(prompt=rel, objects=two, relations=[(rel, (0, 1))]))
        verdicts.append(Verdict(found=[True, found], relations=[None], boxes=[box(*a), box(*b) if found else []]))
    none = {"n": 0, "axis_right": None, "order_right_given_axis": None}
    assert axis_and_order(tasks, verdicts) == {
        "n": 4, "axis_right": 3 / 4, "order_right_given_axis": 2 / 3,
        "by_axis": {"horizontal": {"n": 2, "axis_right": 1.0, "order_right_given_axis": 1 / 2},
                    "vertical": {"n": 2, "axis_right": 1 / 2, "order_right_given_axis": 1.0}}}
    assert axis_and_order(tasks[4:], verdicts[4:]) == {**none, "by_axis": {"horizontal": none, "vertical": none}}
    assert summarize(tasks, verdicts)["axis_and_order"]["n"] == 4


def test_samples_scored_afterwards_get_the_same_spatialscore(tiny_dir, tmp_path):
    """add_spatialscore on an evaluation run without a reward model (the demo scores the base generator's samples
    after SpatialScore has trained) gives what run_eval with the model gives: mu per sample and its summary."""
    from spatialcore.eval.report import EvalSettings, add_spatialscore, run_eval
    from spatialcore.reward.model import SpatialScore

    SpatialScore.from_backbone(tiny_dir / "reward", variance_head=True).save_pretrained(tmp_path / "ss")
    settings = EvalSettings(prompts="synthetic:easy_grid", n_prompts=3, per_prompt=2, steps=2, batch=4)
    now = run_eval(str(tiny_dir / "flux"), tmp_path / "now", settings, reward_model=str(tmp_path / "ss"))
    assert "spatialscore" not in run_eval(str(tiny_dir / "flux"), tmp_path / "later", settings)
    later = add_spatialscore(tmp_path / "later", str(tmp_path / "ss"))
    assert later == now
    rows = [[json.loads(x) for x in (tmp_path / d / "samples.jsonl").read_text().splitlines()] for d in ("now", "later")]
    assert rows[0] == rows[1] and len({r["spatialscore_mu"] for r in rows[0]}) > 1
    assert json.loads((tmp_path / "later" / "eval.json").read_text()) == now
    assert "SpatialScore mu" in (tmp_path / "later" / "eval.md").read_text()


def test_relation_sensitivity_by_value_and_by_axis(monkeypatch):
    """The numbers of eval.sensitivity computed by hand for a generator that follows its horizontal words and
    ignores its vertical ones: every image is a flat grey set by the seed (0.1 per seed), plus 0.02 when the
    prompt says "left of"; the judge (replaced) calls a horizontal image right always and a vertical one right
    only when the prompt says "above"."""
    import types

    import torch

    import spatialcore.eval.judge as judge_mod
    from spatialcore.eval.sensitivity import relation_sensitivity

    class Flat:
        def sample(self, prompts, seeds, sde):
            assert sde is False
            v = torch.tensor([0.1 * s + 0.02 * ("left of" in p) for p, s in zip(prompts, seeds, strict=True)])
            return types.SimpleNamespace(images=v.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone())

    def fake_judge(images, prompts):
        ok = [("left of" in p or "right of" in p or "above" in p) for p in prompts]
        return torch.ones(len(prompts)), torch.tensor(ok, dtype=torch.float)

    monkeypatch.setattr(judge_mod, "judge_synthetic", fake_judge)
    prompts = ["A red circle is to the left of a blue square.", "A blue square sits right of a red circle.",
               "A red circle is above a blue square.", "A blue square lies beneath a red circle.",
               "A red circle is above a blue square", "A red circle and a blue square."]  # the last: no relation
    r = relation_sensitivity(Flat(), prompts, [0, 1, 2], batch=5)
    d_seed = (0.2 + 0.1 + 0.1) / 3  # |v(s) - v(s - 1)| with the first seed against the last
    h, v = r["by_axis"]["horizontal"], r["by_axis"]["vertical"]
    assert r["pairs"] == 5 and r["seeds"] == 3 and h["pairs"] == 2 and v["pairs"] == 3
    assert h["pixel_ratio"] == pytest.approx(0.02 / d_seed, rel=1e-5) and v["pixel_ratio"] == pytest.approx(0, abs=1e-6)
    assert r["pixel_ratio"] == pytest.approx(0.02 * 2 / 5 / d_seed, rel=1e-5)
    assert (h["both_correct"], h["accuracy"], v["both_correct"], v["accuracy"]) == (1.0, 1.0, 0.0, 0.5)
    assert r["both_correct"] == pytest.approx(2 / 5) and r["accuracy"] == pytest.approx((4 + 3) / 10)
    only_h = relation_sensitivity(Flat(), prompts[:2], [0, 1], batch=8)
    assert only_h["by_axis"]["vertical"] is None and only_h["by_axis"]["horizontal"]["pairs"] == 2
