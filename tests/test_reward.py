"""SpatialScore: no vocabulary logits, save/load, tensor preprocessing, trainer resume and DDP."""

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from runs import cli_args, records, step_records
from spatialcore.cli import main
from spatialcore.config import load_config
from spatialcore.data.pairs import PairSet
from spatialcore.reward import LoraSpec, SpatialScore, last_token_index, preprocess_images
from spatialcore.reward.preprocess import PairCollator, chat_text
from spatialcore.trainers.reward import RewardTrainConfig, train

PROMPT = "the red circle is to the left of the blue square."


def _images():
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 255, (h, w, 3)).astype(np.uint8)) for h, w in ((56, 56), (64, 90))]


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [3, 2, 3]


def test_no_vocabulary_logits_ever(tiny_dir):
    model = SpatialScore.from_backbone(tiny_dir / "reward", variance_head=True)
    vocab = model.backbone.config.text_config.vocab_size
    assert not any("lm_head" in n for n, _ in model.named_modules())
    widths = []
    hooks = [m.register_forward_hook(lambda mod, i, o: widths.append(o.shape[-1]))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    mu, sigma = model.score([PROMPT, PROMPT], _images())
    for h in hooks:
        h.remove()
    assert widths and max(widths) < vocab, "a vocabulary-sized projection ran"
    assert mu.shape == (2,) and (sigma > 0).all()


@pytest.mark.parametrize("lora", [None, LoraSpec(rank=4)])
def test_save_load_gives_identical_scores(tiny_dir, tmp_path, lora):
    torch.manual_seed(0)
    model = SpatialScore.from_backbone(tiny_dir / "reward", lora=lora, variance_head=True)
    with torch.no_grad():  # make the head and (for LoRA) the adapter non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n or n.startswith("head."):
                p.normal_(0, 0.1)
    a = model.score([PROMPT] * 2, _images())
    model.save_pretrained(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"spatialscore.json", "head.safetensors", "processor"} <= files
    assert ("adapter" if lora else "backbone") in files
    assert not list((tmp_path / "m").rglob("*.bin")) and not list((tmp_path / "m").rglob("*.pt"))
    b = SpatialScore.from_pretrained(tmp_path / "m").score([PROMPT] * 2, _images())
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-6)


def test_shuffled_prompt_scores_use_other_prompts(tiny_dir):
    from spatialcore.reward.evaluate import pair_scores

    model = SpatialScore.from_backbone(tiny_dir / "reward", variance_head=True)
    ims = _images()
    data = [{"id": str(i), "prompt": p, "chosen": ims[0], "rejected": ims[1], "n_perturbations": 1, "perturbations": []}
            for i, p in enumerate(["the red circle is above the blue square.", "a green star is below a pink ring.",
                                   "the cyan cross is left of the yellow arrow."])]
    plain = pair_scores(model, data)
    shuffled = pair_scores(model, data, shuffle_prompts=True)
    assert not torch.equal(plain[0], shuffled[0])
    assert sorted(plain[0].tolist()) == pytest.approx(sorted(shuffled[0].tolist()), abs=1e-5)


def test_tensor_preprocessing_matches_stock_processor(tiny_dir):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_dir / "reward")
    ip = proc.image_processor
    for im in _images() + [Image.new("RGB", (33, 120), (3, 200, 40))]:
        ref = ip(images=[im], return_tensors="pt")
        t = torch.from_numpy(np.asarray(im)).permute(2, 0, 1)[None].float() / 255
        pv, grid = preprocess_images(t, min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
        assert torch.equal(grid, ref["image_grid_thw"])
        torch.testing.assert_close(pv, ref["pixel_values"], rtol=0, atol=1e-5)  # float rounding of the normalisation
    # Scoring from tensors equals scoring from PIL images of the same pixels.
    model = SpatialScore.from_backbone(tiny_dir / "reward", variance_head=True)
    ims = [Image.fromarray(np.random.RandomState(i).randint(0, 255, (56, 56, 3)).astype(np.uint8)) for i in range(3)]
    t = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in ims]).float() / 255
    torch.testing.assert_close(model.score(PROMPT, t)[0], model.score(PROMPT, ims)[0], rtol=0, atol=1e-5)


def test_fast_collate_equals_stock_processor(tiny_dir, easy_pairs):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_dir / "reward")
    items = [PairSet(easy_pairs)[i] for i in range(4)]
    batch = PairCollator(proc)(items)["inputs"]
    texts = [chat_text(proc, it["prompt"]) for it in items] * 2
    ref = proc(text=texts, images=[it["chosen"] for it in items] + [it["rejected"] for it in items],
               return_tensors="pt", padding=True)
    for key in ("input_ids", "attention_mask", "image_grid_thw"):
        assert torch.equal(batch[key], ref[key]), key
    torch.testing.assert_close(batch["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-5)


def _cfg(tiny_dir, data, out, **kw):
    base = {"model": str(tiny_dir / "reward"), "data.source": str(data), "out": str(out), "batch_size": 4,
            "max_steps": 6, "optim.warmup_steps": 2, "eval_every": 3, "data.eval_pairs": 8, "save_every": 3,
            "log_every": 1, "optim.lr": 1e-3, "threads": 1}
    base.update(kw)
    return load_config(RewardTrainConfig, None, cli_args(base))


def _weights(out):
    from safetensors.torch import load_file

    return load_file(out / "model" / "head.safetensors"), load_file(out / "model" / "backbone" / "model.safetensors")


def test_reward_cli_eval_and_score(tiny_dir, easy_pairs, tmp_path, capsys):
    model = SpatialScore.from_backbone(tiny_dir / "reward", variance_head=True)
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "eval.json"
    assert main(["reward", "eval", "--model", str(tmp_path / "m"), "--data", str(easy_pairs), "--json", str(out)]) == 0
    assert "| overall | 1 perturbation | 2-3 perturbations |" in capsys.readouterr().out
    metrics = json.loads(out.read_text())
    assert 0 <= metrics["accuracy"] <= 1 and metrics["pairs"] == metrics["pairs_1"] + metrics["pairs_2_3"]
    assert main(["reward", "eval", "--model", str(tmp_path / "m"), "--data", str(easy_pairs), "--shuffle-prompts"]) == 0
    img = tmp_path / "a.png"
    _images()[0].save(img)
    capsys.readouterr()
    assert main(["reward", "score", "--model", str(tmp_path / "m"), "--prompt", PROMPT, str(img), "--json", "-"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["image"] == str(img) and rows[0]["sigma"] > 0


def test_wrong_paths_are_one_line_with_exit_2(tiny_dir, easy_pairs, tmp_path, capsys):
    """A user's wrong folder: one line naming the key, the path and what was expected; no traceback."""
    model = SpatialScore.from_backbone(tiny_dir / "reward", variance_head=True)
    model.save_pretrained(tmp_path / "m")
    cases = [
        (["reward", "train", "data.source=/nonexistent"], "'data.source': /nonexistent does not exist"),
        (["reward", "train", f"model={tmp_path / 'nothing'}", "data.source=stream:easy"], "'model'"),
        (["reward", "train", "data=runs/pairs"], "'data': is a section (source,"),
        (["reward", "train", "lr=1e-4"], "'lr': was replaced by 'optim.lr'"),
        (["reward", "eval", "--model", str(tiny_dir / "reward"), "--data", str(easy_pairs)],
         "raw backbone checkpoint"),
        (["reward", "eval", "--model", str(tmp_path), "--data", str(easy_pairs)], f"did you mean {tmp_path / 'm'}"),
        (["reward", "eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path)], "has no pairs.jsonl"),
        (["reward", "score", "--model", str(tmp_path / "m"), "--prompt", "x", str(tmp_path / "no.png")], "not found"),
        (["sample", "--model", str(tiny_dir), "--prompt", "x", "--out", str(tmp_path / "s")],
         f"did you mean {tiny_dir / 'flux'}"),
        (["sample", "--model", str(tiny_dir / "flux"), "--lora", str(tmp_path), "--prompt", "x", "--out",
          str(tmp_path / "s")], "'--lora'"),
        (["grpo", "train", f"model={tiny_dir / 'flux'}", "reward=spatialscore", f"reward_model={tiny_dir / 'reward'}"],
         "'reward_model'"),
        (["grpo", "train", "model=runs/not-there/flux"], "'model': runs/not-there/flux does not exist"),
    ]
    capsys.readouterr()
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (argv, err)


def test_config_files_load():
    for name in ("tiny_cpu", "tiny_cpu_unseen", "qwen2_5_vl_7b"):
        cfg = load_config(RewardTrainConfig, f"configs/reward/{name}.yaml")
        assert cfg.max_steps > cfg.optim.warmup_steps


def test_every_curriculum_ramps_its_rate_after_a_switch_unless_measured_without():
    """The rate ramps up again after each stage switch by default (a run on unseen objects fell onto the saddle at
    the switch without it), in every shipped curriculum config but the demo's SpatialScore, which was measured
    without a ramp and never fell."""
    from pathlib import Path

    from spatialcore.trainers.reward import PairDataConfig

    assert PairDataConfig().stage_warmup > 0
    for path in sorted(Path("configs/reward").glob("*.yaml")):
        cfg = load_config(RewardTrainConfig, path)
        if cfg.data.curriculum:
            assert (cfg.data.stage_warmup == 0) == (path.name == "tiny_cpu_grid.yaml"), path


def test_streaming_training_and_prompt_shuffle_control(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, "stream:easy", tmp_path / "s", max_steps=3, eval_every=3, save_every=3,
               **{"data.eval_pairs": 6, "data.shuffle_prompts": True})
    metrics = train(cfg)
    assert metrics["pairs"] == 6 and metrics["pairs_1"] == 6
    with pytest.raises(Exception, match="unknown stream preset"):
        train(_cfg(tiny_dir, "stream:extreme", tmp_path / "x"))


def test_curriculum_advances_and_resumes(tiny_dir, tmp_path, capfd):
    stages = ["data.curriculum=[{relation_types: [left of]}, {relation_types: [left of, right of]}]"]
    base = {"max_steps": 6, "eval_every": 2, "save_every": 2, "data.eval_pairs": 4, "data.advance_at": 0.0,
            "log_every": 1}
    cfg = load_config(RewardTrainConfig, None, [*stages, *(f"{k}={v}" for k, v in base.items()),
                                                f"model={tiny_dir / 'reward'}", "data.source=stream:easy",
                                                "batch_size=2", "optim.warmup_steps=1", "threads=1",
                                                f"out={tmp_path / 'a'}"])
    train(cfg)
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in recs if "stage" in r] == [0, 1, 2]
    # Stopped after the first stage change and resumed: same final weights as straight through.
    import dataclasses

    train(dataclasses.replace(cfg, out=str(tmp_path / "b"), stop_after=4))
    stopped = records(tmp_path / "b")
    capfd.readouterr()
    train(dataclasses.replace(cfg, out=str(tmp_path / "b")))
    assert "resumed from step 4 " in capfd.readouterr().err
    recs = records(tmp_path / "b")
    assert step_records(recs, "loss") == [1, 2, 3, 4, 5, 6] and step_records(recs, "eval_accuracy") == [2, 4, 6]
    assert [r for r in recs if r["step"] <= 4] == stopped  # kept as written (timestamps too): not trained again
    for a, b in zip(_weights(tmp_path / "a"), _weights(tmp_path / "b"), strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    with pytest.raises(Exception, match="curriculum"):
        load_config(RewardTrainConfig, None, [*stages, "data.source=runs/pairs"])


def test_a_stage_ends_at_its_own_threshold_or_its_step_limit(tiny_dir, tmp_path, capfd):
    """Stage 1 cannot be cleared (its own advance_at is 1.0, above what a random model scores on 8 pairs) and
    ends after its max_stage_steps; stage 2 (advance_at 0) ends at its first evaluation."""
    stages = ("data.curriculum=[{relation_types: [left of], advance_at: 1.0, max_stage_steps: 4}, "
              "{relation_types: [left of, right of], advance_at: 0.0}]")
    base = {"max_steps": 8, "eval_every": 2, "save_every": 100, "data.eval_pairs": 8, "data.advance_at": 1.0,
            "log_every": 1, "optim.lr": 0.0, "optim.head_lr": 0.0}
    cfg = load_config(RewardTrainConfig, None, [stages, *(f"{k}={v}" for k, v in base.items()),
                                                f"model={tiny_dir / 'reward'}", "data.source=stream:easy",
                                                "batch_size=2", "optim.warmup_steps=1", "threads=1",
                                                f"out={tmp_path / 'a'}"])
    train(cfg)
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["stage"], r["eval_accuracy"]) for r in recs if "stage" in r]
    assert [(step, stage) for step, stage, _ in evals] == [(2, 0), (4, 0), (6, 1), (8, 2)]
    assert all(acc < 1.0 for _, stage, acc in evals if stage == 0)
    assert "stage 2/3 from step 4 (stage 1 not cleared in its 4 steps)" in capfd.readouterr().err
    for bad, key in (("{advance_at: 2}", "data.curriculum[0].advance_at"), ("{max_stage_steps: 0}",
                                                                            "data.curriculum[0].max_stage_steps")):
        with pytest.raises(Exception, match=re.escape(key)):
            load_config(RewardTrainConfig, None, [f"data.curriculum=[{bad}]", "data.source=stream:easy"])


def test_int8_weight_only_scoring(tiny_dir):
    torch.manual_seed(0)
    model = SpatialScore.from_backbone(tiny_dir / "reward", variance_head=True)
    ims = [Image.fromarray(np.random.RandomState(i).randint(0, 255, (56, 56, 3)).astype(np.uint8)) for i in range(6)]
    before = model.score(PROMPT, ims)[0]
    model.quantize("int8")
    lin = model.backbone.language_model.layers[0].self_attn.q_proj
    assert type(lin.weight).__name__ == "Int8Tensor"  # torchao stores int8 weights with scales
    after = model.score(PROMPT, ims)[0]
    assert (after - before).abs().max() <= 0.05 * before.abs().max() + 1e-3
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="float8"):
            SpatialScore.from_backbone(tiny_dir / "reward", variance_head=True).quantize("float8")


def test_int8_keeps_the_held_out_accuracy_of_a_trained_model(tiny_dir, tmp_path):
    """Train the tiny model on the pure-vision stage (one relation word; ~300 steps), then score the
    same held-out pairs with int8 weight-only: accuracy moves by at most one point."""
    from spatialcore.reward.evaluate import pair_metrics, pair_scores
    from spatialcore.trainers.reward import held_out_pairs, synth_config

    cfg = load_config(RewardTrainConfig, None, [
        f"model={tiny_dir / 'reward'}", "data.source=stream:easy", "data.stream={relation_types: [left of], "
        "p_sizes: 0.0, p_background: 0.0}", f"out={tmp_path / 'r'}", "max_steps=300", "optim.warmup_steps=20",
        "optim.lr=1e-3", "eval_every=300", "save_every=300", "data.eval_pairs=200", "threads=2", "seed=1"])
    trained = train(cfg)
    assert trained["accuracy"] >= 0.8, trained  # a model that learned something, not a coin
    pairs = held_out_pairs(synth_config(cfg.data.source, cfg.data.stream), cfg.seed, 200, "test")
    model = SpatialScore.from_pretrained(tmp_path / "r" / "model")
    full = pair_metrics(*pair_scores(model, pairs))
    assert abs(full["accuracy"] - trained["accuracy"]) < 1e-9  # the saved model is the evaluated one
    model.quantize("int8")
    q = pair_metrics(*pair_scores(model, pairs))
    assert abs(q["accuracy"] - full["accuracy"]) <= 0.01, (full["accuracy"], q["accuracy"])


def test_patch_embedding_as_one_matmul_equals_the_stock_convolution(tiny_dir):
    """The vision tower's patch embedding runs as a matmul; the reference is transformers' own Conv3d
    forward of the same module, on an awkward number of patches, values and weight gradients."""
    model = SpatialScore.from_backbone(tiny_dir / "reward", variance_head=False)
    embeds = [m for m in model.backbone.modules() if type(m).__name__.endswith("VisionPatchEmbed")]
    assert len(embeds) == 1 and "forward" in vars(embeds[0]), "the patch embedding kept the stock forward"
    pe = embeds[0].double()  # float64: the two summation orders agree to rounding
    x = torch.randn(37, pe.in_channels * pe.temporal_patch_size * pe.patch_size ** 2, dtype=torch.float64)
    fast = pe(x)
    (fast * torch.arange(fast.numel()).view_as(fast).sin()).sum().backward()
    g_fast, pe.proj.weight.grad = pe.proj.weight.grad.clone(), None
    stock = type(pe).forward(pe, x)
    (stock * torch.arange(stock.numel()).view_as(stock).sin()).sum().backward()
    assert fast.shape == stock.shape == (37, pe.embed_dim)
    torch.testing.assert_close(fast, stock, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_fast, pe.proj.weight.grad, rtol=1e-12, atol=1e-12)


def test_compile_switch_scores_like_eager_and_liger_needs_cuda(tiny_dir, capsys):
    torch.manual_seed(0)
    model = SpatialScore.from_backbone(tiny_dir / "reward", variance_head=True)
    before = model.score(PROMPT, _images())[0]
    model.accelerate(compile=True)
    assert "torch.compile: 2 decoder layers" in capsys.readouterr().err
    after = model.score(PROMPT, _images())[0]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            model.accelerate(liger=True)


def test_a_nonfinite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tiny_dir, easy_pairs, tmp_path, monkeypatch):
    import spatialcore.kernels
    from spatialcore.errors import TrainingError

    real, calls = spatialcore.kernels.pair_loss, []

    def pair_loss(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(spatialcore.kernels, "pair_loss", pair_loss)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite pair loss at step 3"):
        train(_cfg(tiny_dir, easy_pairs, run, max_steps=4, save_every=2, eval_every=10))
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert not (run / "model").exists()
    assert step_records(records(run), "loss") == [1, 2]


# A hand-made pair set: each pair's perturbation list and whether the model (stubbed scores below)
# ranks it right (1), wrong (0) or ties (0.5).
HAND_PAIRS = [(["flip"], 1), (["swap"], 0), (["flip", "relation"], 1), (["binding"], 0.5),
              (["relation", "relation"], 0), (["swap", "flip", "binding"], 1)]
# Worked out by hand from the list above: (type, pairs with it, accuracy, pairs with only it, accuracy).
HAND_BY_TYPE = [("flip", 3, 1.0, 1, 1.0), ("swap", 2, 0.5, 1, 0.0), ("relation", 2, 0.5, 1, 0.0),
                ("binding", 2, 0.75, 1, 0.5)]


# Each hand pair's chosen scene: (objects, relations). By hand, with the outcomes above: three objects are pairs
# 0, 1, 5 (right, wrong, right: 2/3; 1 column pairs 0, 1: 1/2; 2-3 column pair 5: 1), four are pairs 2, 3 (right,
# tie: 3/4; 1 column the tie: 1/2; 2-3 column: 1), six is pair 4 (wrong, 2-3 column). Two relations: pairs 0, 1
# (1/2, all 1 column); three: pair 2 (right, 2-3); five: pairs 3, 5 (tie, right: 3/4; 1/2 and 1); nine: pair 4.
HAND_SIZES = [(3, 2), (3, 2), (4, 3), (4, 5), (6, 9), (3, 5)]
NAN = float("nan")
HAND_BY_OBJECTS = [(3, 3, 2 / 3, 0.5, 1.0), (4, 2, 0.75, 0.5, 1.0), (6, 1, 0.0, NAN, 0.0)]
HAND_BY_RELATIONS = [(2, 2, 0.5, 0.5, NAN), (3, 1, 1.0, NAN, 1.0), (5, 2, 0.75, 0.5, 1.0), (9, 1, 0.0, NAN, 0.0)]

# Each hand pair's violated relations. By hand, with the outcomes above (won 1, 0, 1, 0.5, 0, 1), in the vocabulary's
# order: left of in pairs 1, 2, 5 (2/3; alone pair 1: 0); above in pair 5 (1; never alone); in front of in pair 4
# (0; alone there); behind in pairs 0, 2, 5 (1; alone pair 0: 1); between in pair 3 (the tie, 1/2; alone there).
HAND_VIOLATED = [["behind"], ["left of"], ["behind", "left of"], ["between"], ["in front of", "in front of"],
                 ["left of", "behind", "above"]]
HAND_BY_VIOLATED = [("left of", 3, 2 / 3, 1, 0.0), ("above", 1, 1.0, 0, NAN), ("in front of", 1, 0.0, 1, 0.0),
                    ("behind", 3, 1.0, 1, 1.0), ("between", 1, 0.5, 1, 0.5)]


def _hand_pair_set(folder, sizes=None, violated=None):
    folder.mkdir()
    img = _images()[0]
    lines = []
    for i, (types, _) in enumerate(HAND_PAIRS):
        img.save(folder / f"c{i}.png")
        img.save(folder / f"r{i}.png")
        meta = {} if sizes is None or sizes[i] is None else {"chosen_scene": {
            "objects": [{"colour": "red", "kind": "circle"}] * sizes[i][0],
            "relations": [{"type": "left of", "args": []}] * sizes[i][1]}}
        if violated is not None:  # the violated relations after one that holds
            meta = {"chosen_scene": {"relations": [{"type": t, "args": []} for t in ["next to", *violated[i]]]},
                    "violated": list(range(1, len(violated[i]) + 1))}
        lines.append(json.dumps({"id": f"p{i}", "prompt": PROMPT, "chosen": f"c{i}.png", "rejected": f"r{i}.png",
                                 "n_perturbations": len(types), "perturbations": types, "split": "test",
                                 "meta": meta}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _hand_scores():
    mu_w = torch.tensor([1.0 if won == 1 else 0.0 if won == 0.5 else -1.0 for _, won in HAND_PAIRS])
    mu_l = torch.zeros(len(HAND_PAIRS))
    ones = torch.ones(len(HAND_PAIRS))
    return mu_w, ones, mu_l, ones, torch.tensor([len(t) for t, _ in HAND_PAIRS])


def test_per_perturbation_type_breakdown_by_value(tiny_dir, tmp_path, monkeypatch, capsys):
    from spatialcore.reward import evaluate

    data = PairSet(_hand_pair_set(tmp_path / "hand"), split="test")
    types = evaluate.perturbation_types(data)
    assert types == [t for t, _ in HAND_PAIRS]
    m = evaluate.pair_metrics(*_hand_scores(), types=types)
    got = [(r["type"], r["pairs"], r["accuracy"], r["pairs_alone"], r["accuracy_alone"]) for r in m["by_type"]]
    assert got == HAND_BY_TYPE
    assert m["accuracy"] == pytest.approx(3.5 / 6) and m["accuracy_1"] == pytest.approx(1.5 / 3)
    # `reward eval` prints it and writes it to --json (model scores stubbed with the ones above)
    model = SpatialScore.from_backbone(tiny_dir / "reward", variance_head=True)
    model.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(evaluate, "pair_scores", lambda *a, **k: _hand_scores())
    out = tmp_path / "eval.json"
    assert main(["reward", "eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "hand"),
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| perturbation type | pairs with it | accuracy | pairs with it alone | accuracy (alone) |" in printed
    assert "| binding | 2 | 0.750 | 1 | 0.500 |" in printed
    assert [r["type"] for r in json.loads(out.read_text())["by_type"]] == ["flip", "swap", "relation", "binding"]


def _eval_printed_with_hand_scores(tiny_dir, tmp_path, monkeypatch, capsys, folder: str) -> str:
    """What `reward eval` prints for the pair set ``tmp_path / folder``, its model's scores stubbed with
    ``_hand_scores()`` (the model, a plain tiny SpatialScore, is saved once under ``tmp_path / "m"``)."""
    from spatialcore.reward import evaluate

    if not (tmp_path / "m").exists():
        SpatialScore.from_backbone(tiny_dir / "reward", variance_head=False).save_pretrained(tmp_path / "m")
    monkeypatch.setattr(evaluate, "pair_scores", lambda *a, **k: _hand_scores())
    capsys.readouterr()
    assert main(["reward", "eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / folder)]) == 0
    return capsys.readouterr().out


def test_accuracy_by_scene_size_by_value(tiny_dir, tmp_path, monkeypatch, capsys):
    from spatialcore.reward import evaluate

    def rows(m, key):
        return [(r["key"], r["pairs"], r["accuracy"], r["accuracy_1"], r["accuracy_2_3"]) for r in m[key]]

    data = PairSet(_hand_pair_set(tmp_path / "hand", sizes=HAND_SIZES), split="test")
    sizes = evaluate.scene_sizes(data)
    assert sizes == HAND_SIZES and evaluate.scene_sizes(data, 2) == HAND_SIZES[:2]
    m = evaluate.pair_metrics(*_hand_scores(), sizes=sizes)
    for key, want in (("by_objects", HAND_BY_OBJECTS), ("by_relations", HAND_BY_RELATIONS)):
        assert rows(m, key) == [pytest.approx(row, nan_ok=True) for row in want]
    # one pair without its scene (a human-labelled pair among synthetic ones): no breakdown rather than a wrong one
    partial = PairSet(_hand_pair_set(tmp_path / "partial", sizes=HAND_SIZES[:-1] + [None]), split="test")
    assert evaluate.scene_sizes(partial) is None and "by_objects" not in evaluate.pair_metrics(*_hand_scores())
    printed = _eval_printed_with_hand_scores(tiny_dir, tmp_path, monkeypatch, capsys, "hand")
    assert "| objects | pairs | overall | 1 perturbation | 2-3 perturbations |" in printed
    assert "| 6 | 1 | 0.000 |   n/a | 0.000 |" in printed and "| 5 | 2 | 0.750 | 0.500 | 1.000 |" in printed
    assert "| objects |" not in _eval_printed_with_hand_scores(tiny_dir, tmp_path, monkeypatch, capsys, "partial")


def test_accuracy_by_violated_relation_by_value(tiny_dir, tmp_path, monkeypatch, capsys):
    """`reward eval` by the type of relation the rejected image violates, hand-worked (HAND_VIOLATED); a pair set
    that does not say which relations are violated gets no such table."""
    from spatialcore.reward import evaluate

    data = PairSet(_hand_pair_set(tmp_path / "hand", violated=HAND_VIOLATED), split="test")
    assert evaluate.violated_relations(data) == HAND_VIOLATED
    assert evaluate.violated_relations(data, 2) == HAND_VIOLATED[:2]
    m = evaluate.pair_metrics(*_hand_scores(), **evaluate.breakdowns(data))
    got = [(r["type"], r["pairs"], r["accuracy"], r["pairs_alone"], r["accuracy_alone"]) for r in m["by_violated"]]
    assert got == [pytest.approx(row, nan_ok=True) for row in HAND_BY_VIOLATED]
    assert "by_violated" not in evaluate.pair_metrics(*_hand_scores(), **evaluate.breakdowns(
        PairSet(_hand_pair_set(tmp_path / "sizes", sizes=HAND_SIZES), split="test")))
    printed = _eval_printed_with_hand_scores(tiny_dir, tmp_path, monkeypatch, capsys, "hand")
    assert "| violated relation | pairs with it | accuracy | pairs with it alone | accuracy (alone) |" in printed
    assert "| left of | 3 | 0.667 | 1 | 0.000 |" in printed and "| above | 1 | 1.000 | 0 |   n/a |" in printed


def test_reward_eval_with_the_pixel_oracle_by_value(tmp_path, capsys):
    """`reward eval --oracle` scores each image by the fraction of its prompt's relations the pixel oracle finds
    true. Hand-made: a red circle drawn left of a blue square (truth), the same drawn right of it (flipped), the
    same image on both sides (a tie), a two-relation prompt whose rejected image breaks one of the two."""
    from PIL import ImageDraw

    def draw(objects, size=56):
        img = Image.new("RGB", (size, size), (255, 255, 255))
        d = ImageDraw.Draw(img)
        for kind, colour, cx, cy in objects:
            box = [cx - 6, cy - 6, cx + 6, cy + 6]
            (d.ellipse if kind == "circle" else d.rectangle)(box, fill=colour)
        return img

    red, blue, green = (220, 30, 30), (30, 60, 220), (40, 170, 60)
    left = draw([("circle", red, 14, 28), ("square", blue, 42, 28)])
    right = draw([("circle", red, 42, 28), ("square", blue, 14, 28)])
    two = "the red circle is to the left of the blue square and the green square is above the blue square."
    good3 = draw([("circle", red, 14, 40), ("square", blue, 42, 40), ("square", green, 42, 12)])
    bad3 = draw([("circle", red, 14, 12), ("square", blue, 42, 12), ("square", green, 42, 40)])  # only "left" holds
    pairs = [(PROMPT, left, right, ["flip"]), (PROMPT, left, left, ["flip"]), (PROMPT, right, left, ["flip"]),
             (two, good3, bad3, ["relation"])]
    folder = tmp_path / "pairs"
    folder.mkdir()
    lines = []
    for i, (prompt, chosen, rejected, types) in enumerate(pairs):
        chosen.save(folder / f"c{i}.png")
        rejected.save(folder / f"r{i}.png")
        lines.append(json.dumps({"id": f"p{i}", "prompt": prompt, "chosen": f"c{i}.png", "rejected": f"r{i}.png",
                                 "n_perturbations": len(types), "perturbations": types, "split": "test"}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    from spatialcore.reward.evaluate import oracle_pair_scores

    mu_w, _, mu_l, _, n = oracle_pair_scores(PairSet(folder, split="test"))
    assert mu_w.tolist() == [1.0, 1.0, 0.0, 1.0] and mu_l.tolist() == [0.0, 1.0, 1.0, 0.5] and n.tolist() == [1] * 4
    out = tmp_path / "oracle.json"
    assert main(["reward", "eval", "--oracle", "--data", str(folder), "--json", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["accuracy"] == pytest.approx((1 + 0.5 + 0 + 1) / 4) and m["pairs"] == 4
    capsys.readouterr()
    # a prompt outside the synthetic grammar, and a model-only flag: one line each, exit 2
    lines[0] = lines[0].replace(PROMPT, "a cat on a mat")
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    for extra in ([], ["--shuffle-prompts"]):
        assert main(["reward", "eval", "--oracle", "--data", str(folder), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("a cat on a mat" in err[0] or "--shuffle-prompts" in err[0]), err


def test_a_hand_labelled_pair_set_without_synthetic_fields_trains_and_evaluates(tiny_dir, tmp_path, capsys):
    """Only id, prompt, chosen, rejected, split (as a human-labelled set has them, JPEG and PNG mixed): it
    loads without problems, trains, and its evaluation counts every test pair overall and none in the 1 vs 2-3
    columns (their count is unknown)."""
    folder = tmp_path / "human"
    (folder / "img").mkdir(parents=True)
    rng = np.random.RandomState(1)
    lines = []
    for i in range(6):
        for side in ("good", "bad"):
            im = Image.fromarray(rng.randint(0, 255, (40 + 8 * i, 48, 3)).astype(np.uint8))
            im.save(folder / "img" / f"{i}_{side}.{'jpg' if i % 2 else 'png'}")
        ext = "jpg" if i % 2 else "png"
        lines.append(json.dumps({"id": f"h{i}", "prompt": f"a mug to the left of a laptop, photo {i}",
                                 "chosen": f"img/{i}_good.{ext}", "rejected": f"img/{i}_bad.{ext}",
                                 "split": "test" if i < 2 else "train"}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    pairs = PairSet(folder, strict=True)
    assert len(pairs) == 6 and not pairs.problems and pairs[0]["n_perturbations"] == 0
    cfg = load_config(RewardTrainConfig, None, [f"model={tiny_dir / 'reward'}", f"data.source={folder}",
                                                f"out={tmp_path / 'run'}", "batch_size=2", "max_steps=2",
                                                "eval_every=2", "save_every=2", "optim.warmup_steps=0", "threads=1"])
    train(cfg)
    out = tmp_path / "eval.json"
    assert main(["reward", "eval", "--model", str(tmp_path / "run" / "model"), "--data", str(folder),
                 "--json", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["pairs"] == 2 and m["pairs_1"] == 0 and m["pairs_2_3"] == 0 and 0 <= m["accuracy"] <= 1
    bad = dict(json.loads(lines[0]), id="h9", n_perturbations=0)
    (folder / "pairs.jsonl").write_text("\n".join([*lines, json.dumps(bad)]) + "\n")
    with pytest.raises(ValueError, match="line 7: field 'n_perturbations' must be >= 1"):
        PairSet(folder, strict=True)


def test_reward_score_reads_each_images_own_prompt(tiny_dir, tmp_path, capsys):
    """`reward score --samples`: the samples.jsonl of `sample`/`eval` (paths relative to it) or an image
    folder's metadata.jsonl; each image is scored against its own prompt, exactly as one --prompt call would."""
    model = SpatialScore.from_backbone(tiny_dir / "reward", variance_head=True)
    model.save_pretrained(tmp_path / "m")
    run = tmp_path / "eval_out"
    (run / "images").mkdir(parents=True)
    prompts = [PROMPT, "the blue square is above the red circle."]
    for i, im in enumerate(_images()):
        im.save(run / "images" / f"{i}.png")
    (run / "samples.jsonl").write_text("".join(json.dumps({"prompt": p, "image": f"images/{i}.png", "seed": i}) + "\n"
                                               for i, p in enumerate(prompts)))
    assert main(["reward", "score", "--model", str(tmp_path / "m"), "--samples", str(run), "--json", "-"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == prompts
    for i, r in enumerate(rows):  # the same number as scoring that image alone against that prompt
        assert main(["reward", "score", "--model", str(tmp_path / "m"), "--prompt", prompts[i],
                     str(run / "images" / f"{i}.png"), "--json", "-"]) == 0
        assert abs(json.loads(capsys.readouterr().out)[0]["mu"] - r["mu"]) < 1e-4
    hf = tmp_path / "hf"
    hf.mkdir()
    _images()[1].save(hf / "b.png")
    (hf / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": prompts[1]}) + "\n")
    assert main(["reward", "score", "--model", str(tmp_path / "m"), "--samples", str(hf), "--json", "-"]) == 0
    assert abs(json.loads(capsys.readouterr().out)[0]["mu"] - rows[1]["mu"]) < 1e-4
    (hf / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": prompts[1]}) + "\n{\"image\": 3}\n")
    assert main(["reward", "score", "--model", str(tmp_path / "m"), "--samples", str(hf)]) == 2
    assert "line 2: needs 'image'" in capsys.readouterr().err
    assert main(["reward", "score", "--model", str(tmp_path / "m"), str(hf / "b.png")]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_the_variance_head_is_the_models_to_say(tiny_dir, easy_pairs, tmp_path):
    """Without a variance head the model's forward gives log_var None (the pair loss is then plain Bradley-Terry),
    scoring gives sigma 0 and the evaluation variance 0; with one, a finite log-variance per judgement. The folder
    records which, and read_meta is what reads it back."""
    from spatialcore.reward import read_meta
    from spatialcore.reward.evaluate import pair_scores

    items = [PairSet(easy_pairs)[i] for i in range(3)]
    for head in (False, True):
        model = SpatialScore.from_backbone(tiny_dir / "reward", variance_head=head)
        batch = PairCollator(model.processor)(items)["inputs"]
        mu, log_var = model(**batch)
        assert mu.shape == (6,) and (log_var is None) == (not head)
        if head:
            assert log_var.shape == (6,) and torch.isfinite(log_var).all()
        sigma = model.score(PROMPT, _images()[:2])[1]
        assert (sigma == 0).all() != head
        var_w = pair_scores(model, PairSet(easy_pairs), limit=3)[1]
        assert (var_w == 0).all() != head
        model.save_pretrained(tmp_path / str(head))
        assert read_meta(tmp_path / str(head))["variance_head"] is head
        assert SpatialScore.from_pretrained(tmp_path / str(head)).variance_head is head


def test_the_trainers_rate_is_the_schedules_at_every_step(tiny_dir, easy_pairs, tmp_path):
    """Each step's logged rate is optim.lr x the schedule's factor at that step (warm-up, then cosine), the same
    function every trainer uses."""
    from spatialcore.trainers.optim import lr_factor

    cfg = _cfg(tiny_dir, easy_pairs, tmp_path / "r", max_steps=6, **{"optim.warmup_steps": 2})
    train(cfg)
    lrs = [r["lr"] for r in records(tmp_path / "r") if "lr" in r]
    assert lrs == [cfg.optim.lr * lr_factor(cfg.optim, s, 6) for s in range(6)]
    assert lrs[0] == cfg.optim.lr / 2 and lrs[1] == lrs[2] == cfg.optim.lr and lrs[5] < lrs[4] < lrs[3] < lrs[2]


@pytest.mark.parametrize("guard,cut", [(True, 1.0), (False, 1.0), (True, 0.5)])
def test_the_saddle_guard_restarts_a_collapsed_stage(tiny_dir, tmp_path, monkeypatch, capfd, guard, cut):
    """A model forced onto the constant-output saddle right after a stage switch (every trainable weight and the
    optimizer's moments zeroed: all gradients are then exactly 0, loss log 2, margin 0, a fixed point) recovers
    when the guard restarts the stage from its first step's weights; with the guard off it stays there. With
    ``restart_lr_factor`` the restarted stage runs at that fraction of the schedule's rate."""
    from spatialcore.trainers import reward as reward_mod

    real = reward_mod.RewardTrainer.after_evaluation

    def collapse_at_the_switch(self, ev):
        stage = self.stage
        real(self, ev)
        if self.stage == 1 and stage == 0:  # the switch just happened (and its first weights were saved)
            with torch.no_grad():
                for p in self.params.values():
                    p.zero_()
            self.opt.state.clear()

    monkeypatch.setattr(reward_mod.RewardTrainer, "after_evaluation", collapse_at_the_switch)
    cfg = load_config(RewardTrainConfig, None, [
        f"model={tiny_dir / 'reward'}", "data.source=stream:easy", "data.curriculum=[{relation_types: [left of], "
        "advance_at: 0.0}]", "max_steps=12", "optim.warmup_steps=1", "eval_every=2", "save_every=100",
        "data.eval_pairs=8", "batch_size=4", "log_every=1", "threads=1", f"data.saddle_guard={str(guard).lower()}",
        "data.stage_warmup=2", "data.restart_warmup=4", f"data.restart_lr_factor={cut}", f"out={tmp_path / 'r'}"])
    train(cfg)
    margins = [(r["step"], r["eval_mean_margin"]) for r in records(tmp_path / "r") if "eval_mean_margin" in r]
    assert [s for s, _ in margins] == [2, 4, 6, 8, 10, 12]
    assert all(m == 0.0 for _, m in margins[1:3]), margins  # the collapse: exactly constant output
    from spatialcore.trainers.optim import lr_factor

    lrs = {r["step"]: r["lr"] for r in records(tmp_path / "r") if "lr" in r}
    full = {s: cfg.optim.lr * lr_factor(cfg.optim, s - 1, 12) for s in lrs}
    assert lrs[3] == full[3] / 2 and lrs[4] == full[4]  # the ramp after the switch (stage_warmup=2)
    # after the restart, the longer ramp (restart_warmup=4); without the guard, the schedule's rate
    assert [lrs[s] / full[s] for s in (7, 8, 9, 10, 11)] == ([0.25 * cut, 0.5 * cut, 0.75 * cut, cut, cut] if guard
                                                             else [1.0] * 5)
    err = capfd.readouterr().err
    if guard:
        assert "saddle guard: stage 2 sat at constant output" in err and "4-step rate ramp, restart 1 of 2" in err
        assert all(abs(m) > 1e-3 for _, m in margins[3:]), margins
    else:
        assert "saddle guard" not in err and all(m == 0.0 for _, m in margins[3:]), margins


def test_the_saddle_is_told_by_the_size_of_the_margins_not_their_mean():
    """The guard's sign of the saddle, on hand-made held-out scores at its default threshold: a collapsed model
    (margins of a few 1e-3 either way, as a real run's were) is at it; a model at chance whose outputs still differ
    (margins of +-5, mean 0) and a trained one are not."""
    from spatialcore.reward.evaluate import pair_metrics
    from spatialcore.trainers.reward import PairDataConfig, at_saddle

    def ev(margins):
        m = torch.tensor(margins)
        return {f"eval_{k}": v for k, v in pair_metrics(m, torch.zeros(len(m)), torch.zeros(len(m)),
                                                       torch.zeros(len(m)), torch.ones(len(m), dtype=torch.long)).items()}

    threshold = PairDataConfig().saddle_margin
    assert at_saddle(ev([5e-3, -2e-3, 4e-3, 3e-3, -1e-3, 2e-3]), threshold)  # mean 1.8e-3, above the old 1e-3
    assert not at_saddle(ev([5.0, -5.0, 5.0, -5.0]), threshold)  # at chance, not collapsed: signed mean exactly 0
    assert not at_saddle(ev([8.0, 12.0, 3.0, 9.0]), threshold)


def test_sigma_separates_the_mistakes_by_value():
    """The AUROC of the pair's sigma for wrong pairs and the accuracy per sigma quartile, on hand-made scores: wrong
    pairs with the larger sigma give 1, the smaller 0, and an exact tie of mu is neither right nor wrong."""
    from spatialcore.reward.evaluate import pair_metrics

    mu_w, mu_l = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5]), torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5])
    n = torch.tensor([1, 1, 2, 2, 1])
    var = torch.tensor([0.01, 0.04, 1.0, 0.25, 9.0]) / 2  # var_w = var_l: sigma = 0.1, 0.2, 1.0, 0.5, (tie)
    m = pair_metrics(mu_w, var, mu_l, var, n)
    assert m["sigma_auroc"] == 1.0 and m["accuracy_by_sigma"] == [1.0, 1.0, 0.0, 0.0]
    assert m["sigma_mean"] == pytest.approx((0.1 + 0.2 + 1.0 + 0.5) / 4)
    other = torch.tensor([1.0, 0.25, 0.01, 0.04, 9.0]) / 2  # now the right pairs are the uncertain ones
    flipped = pair_metrics(mu_w, other, mu_l, other, n)
    assert flipped["sigma_auroc"] == 0.0
    assert "sigma_auroc" not in pair_metrics(mu_w, torch.zeros(5), mu_l, torch.zeros(5), n)  # no sigma, no claim
    # the margin's own AUROC, the baseline: wrong pairs at |margin| 1 and 3 against right ones at 2 and 4: in 3 of the
    # 4 (wrong, right) combinations the wrong pair's margin is the smaller
    margins = pair_metrics(torch.tensor([2.0, 4.0, -1.0, -3.0, 0.0]), var, torch.zeros(5), var, n)
    assert margins["margin_auroc"] == pytest.approx(0.75)


def test_ece_is_confidence_against_accuracy_by_value():
    """ECE from the math: a head that says 0.9 for its ranking and is right 9 times in 10 scores 0, right 10 of 10
    it scores 0.1; sigma enters through the confidence (the same margins with var_w + var_l = 3 * 8 / pi say
    sigmoid(ln 9 / 2) = 3/4: right 9 in 10, under-confident by 0.15)."""
    from spatialcore.reward.evaluate import pair_metrics

    d = math.log(9.0)  # sigmoid(d) = 0.9
    n = torch.ones(10, dtype=torch.long)
    zero = torch.zeros(10)
    margin = torch.tensor([d] * 9 + [-d])
    m = pair_metrics(margin, zero, torch.zeros(10), zero, n)
    assert m["accuracy"] == pytest.approx(0.9) and m["ece"] == pytest.approx(0.0, abs=1e-6)
    assert [c["n"] for c in m["calibration"]] == [10] and m["calibration"][0]["conf_lo"] == pytest.approx(0.9)
    allright = pair_metrics(margin.abs(), zero, torch.zeros(10), zero, n)
    assert allright["ece"] == pytest.approx(0.1, abs=1e-6)
    var = torch.full((10,), 8 / math.pi * 3 / 2)  # per image: the pair's 1 + pi/8 (var_w + var_l) = 4
    wide = pair_metrics(margin, var, torch.zeros(10), var, n)
    assert wide["ece"] == pytest.approx(0.15, abs=1e-6)


@pytest.mark.parametrize("mode", ["joint", "calibrate"])
def test_variance_loss_gradients_by_the_formula(mode):
    """The reward trainer's loss against gradients written from the math (not autograd of the same expression):
    z = d / c, d = mu_w - mu_l, c = sqrt(1 + pi/8 (var_w + var_l)), loss = mean softplus(-z).
    joint: d loss / d mu_w = -sigmoid(-z) / c / B; calibrate: mu gets Bradley-Terry's -sigmoid(-d) / B. Both:
    d loss / d lv_w = sigmoid(-z) z (pi/16) var_w / c^2 / B (at the current mu)."""
    from spatialcore.trainers.reward import reward_pair_loss

    g = torch.Generator().manual_seed(5)
    B = 7
    mu = (torch.randn(2 * B, generator=g, dtype=torch.float64) * 3).requires_grad_()
    lv = (torch.randn(2 * B, generator=g, dtype=torch.float64) * 2).requires_grad_()
    reward_pair_loss(mu, lv, mode).backward()
    d, var = (mu[:B] - mu[B:]).detach(), lv.detach().exp()
    c = torch.sqrt(1 + math.pi / 8 * (var[:B] + var[B:]))
    z = d / c
    g_mu_w = -torch.sigmoid(-z) / c / B if mode == "joint" else -torch.sigmoid(-d) / B
    torch.testing.assert_close(mu.grad, torch.cat([g_mu_w, -g_mu_w]))
    common = torch.sigmoid(-z) * z * (math.pi / 16) / c**2 / B
    torch.testing.assert_close(lv.grad, torch.cat([common * var[:B], common * var[B:]]))
    # without a head: plain Bradley-Terry whatever the mode
    mu.grad = None
    reward_pair_loss(mu, None, mode).backward()
    torch.testing.assert_close(mu.grad, torch.cat([-torch.sigmoid(-d) / B, torch.sigmoid(-d) / B]))


def test_fit_log_var_learns_where_mu_fails_by_value():
    """Pairs whose images carry feature 0 = 1 are ranked right by mu half of the time (margin +-3), the others always
    (+3): at fixed mu the Gaussian loss falls toward log 2 as sigma grows on the first and is least at sigma 0 on the
    second, so the fitted log-variance must separate them, and sigma then flags the mistakes (every wrong pair is
    uncertain; a third of the right ones are too: AUROC about 1/3 * 1/2 + 2/3 = 0.83)."""
    from spatialcore.reward.calibrate import fit_log_var
    from spatialcore.reward.evaluate import pair_metrics

    g = torch.Generator().manual_seed(0)
    n = 200
    unsure = torch.arange(n) % 2 == 0
    h = torch.randn(n, 4, generator=g) * 0.1
    h[:, 0] = unsure.float()
    mu_w = torch.where(unsure & (torch.arange(n) % 4 == 0), -3.0, 3.0)
    mu_l = torch.zeros(n)
    w, b, history = fit_log_var(h, h, mu_w, mu_l)
    lv = h @ w + b
    assert lv[unsure].min() > lv[~unsure].max() + 1.0, (lv[unsure].min(), lv[~unsure].max())
    assert history[-1] < history[0]
    m = pair_metrics(mu_w, lv.exp(), mu_l, lv.exp(), torch.ones(n, dtype=torch.long))
    assert m["sigma_auroc"] > 0.75 and m["accuracy"] == 0.75
    with pytest.raises(ValueError, match=r"features \[N, H\]"):
        fit_log_var(h, h[:, :2], mu_w, mu_l)


def test_fit_log_var_is_the_same_at_any_feature_scale_and_never_worse_than_sigma_one():
    """Hidden states of another model differ in scale and offset: the fit on 200 * h + 50 (feature by feature
    different) gives the same log-variance per image as on h (features standardised, so the L2 penalty and the
    optimiser see the same problem), and the pair loss it reports, recomputed here from the formula at the returned
    row, is no worse than at sigma 1 (log-variance 0), the start."""
    from spatialcore.reward.calibrate import fit_log_var

    g = torch.Generator().manual_seed(3)
    n, dim = 300, 6
    h_w, h_l = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    mu_w = 2.0 * torch.randn(n, generator=g) + 1.0 + 3.0 * h_w[:, 1]  # mistakes where feature 1 is low
    mu_l = torch.zeros(n)
    scale, shift = torch.linspace(20.0, 200.0, dim), torch.linspace(-50.0, 50.0, dim)

    def pair_loss_at(lv_w, lv_l):
        z = (mu_w - mu_l).double() / torch.sqrt(1 + math.pi / 8 * (lv_w.double().exp() + lv_l.double().exp()))
        return float(-torch.nn.functional.logsigmoid(z).mean())

    fits = []
    for a, c in ((torch.ones(dim), torch.zeros(dim)), (scale, shift)):
        w, b, history = fit_log_var(h_w * a + c, h_l * a + c, mu_w, mu_l, l2=0.01)
        lv_w, lv_l = (h_w * a + c) @ w + b, (h_l * a + c) @ w + b
        assert history[0] == pytest.approx(pair_loss_at(torch.zeros(n), torch.zeros(n)), abs=1e-9)
        assert history[-1] == pytest.approx(pair_loss_at(lv_w, lv_l), abs=1e-4)
        assert history[-1] < history[0] - 0.01
        fits.append(torch.cat([lv_w, lv_l]))
    torch.testing.assert_close(fits[1], fits[0], atol=2e-3, rtol=1e-3)


def test_the_sigma_penalty_is_chosen_on_pairs_left_out():
    """Thirty features of pure noise on 120 pairs: a weak penalty learns the noise of the pairs it sees, so the
    cross-validated choice is a strong one (the weakest is the worst held out); one feature that tells the pairs mu
    gets wrong, on 200 pairs: the weak penalty is chosen. Fewer pairs than folds: leave one out; one pair: a clear
    error."""
    from spatialcore.reward.calibrate import choose_l2

    g = torch.Generator().manual_seed(1)
    n, dim = 120, 30
    h_w, h_l = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    l2, held_out = choose_l2(h_w, h_l, 1.0 + 2.0 * torch.randn(n, generator=g), torch.zeros(n))
    assert l2 >= 0.1 and max(held_out, key=held_out.get) == min(held_out)
    n = 200
    unsure = torch.arange(n) % 2 == 0
    h = torch.randn(n, 4, generator=g) * 0.1
    h[:, 0] = unsure.float()
    l2, _ = choose_l2(h, h, torch.where(unsure & (torch.arange(n) % 4 == 0), -3.0, 3.0), torch.zeros(n))
    assert l2 <= 0.01
    assert choose_l2(h[:3], h[:3], torch.ones(3), torch.zeros(3))[0] in held_out  # three pairs: leave one out
    with pytest.raises(ValueError, match="at least 2 pairs"):
        choose_l2(h[:1], h[:1], torch.ones(1), torch.zeros(1))


def test_reward_calibrate_fits_sigma_and_leaves_mu(tiny_dir, easy_pairs, tmp_path, capsys):
    """`reward calibrate` on a model without a variance head: the written model has one (sigma differs from image to
    image), its mu is the original's exactly, and --out is never the model itself nor a full folder without --force;
    one pair without --l2 is a one-line error."""
    plain = SpatialScore.from_backbone(tiny_dir / "reward", variance_head=False)
    plain.save_pretrained(tmp_path / "m")
    args = ["reward", "calibrate", "--model", str(tmp_path / "m"), "--data", str(easy_pairs), "--split", "test",
            "--steps", "30", "--out", str(tmp_path / "c")]
    assert main([*args, "--json", str(tmp_path / "c.json")]) == 0
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["pairs"] > 0 and result["loss_after"] < result["loss_before"]
    before, after = SpatialScore.from_pretrained(tmp_path / "m"), SpatialScore.from_pretrained(tmp_path / "c")
    assert after.variance_head and not before.variance_head
    images = _images()
    mu0, sigma0 = before.score([PROMPT, PROMPT], images)
    mu1, sigma1 = after.score([PROMPT, PROMPT], images)
    assert torch.equal(mu0, mu1) and torch.all(sigma0 == 0) and torch.all(sigma1 > 0) and sigma1[0] != sigma1[1]
    capsys.readouterr()
    for argv, key in ((args, "'--out'"), ([*args[:-1], str(tmp_path / "m"), "--force"], "must differ from --model"),
                      ([*args, "--steps", "0"], "'--steps'"), ([*args, "--force", "--l2", "-1"], "'--l2'"),
                      ([*args, "--force", "--limit", "1"], "cannot choose the penalty")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0], err
    assert main([*args, "--force"]) == 0


def test_calibrate_needs_the_variance_head(tmp_path):
    from spatialcore.config import ConfigError

    with pytest.raises(ConfigError, match="spatialscore.variance_loss"):
        load_config(RewardTrainConfig, None, ["spatialscore.variance_loss=calibrate", f"out={tmp_path}"])
