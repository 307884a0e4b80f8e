"""SpatialScore: no vocabulary logits, save/load, tensor preprocessing, trainer resume and DDP."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from spatialcore.trainers.reward import RewardTrainConfig, train

from spatialcore.config import from_dict, load_config
from spatialcore.data.pairs import PairCollator, PairSet, chat_text
from spatialcore.data.synth import DIFFICULTIES, SynthConfig, synth_pair_set
from spatialcore.reward import LoraSpec, SpatialScore, last_token_index, preprocess_images

PROMPT = "the red circle is to the left of the blue square."


@pytest.fixture(scope="module")
def easy_pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "easy"
    synth_pair_set(out, 80, 0, from_dict(SynthConfig, {**DIFFICULTIES["easy"], "test_fraction": 0.2}),
                   progress=False, workers=1)
    return out


def _images():
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 255, (h, w, 3)).astype(np.uint8)) for h, w in ((56, 56), (64, 90))]


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [3, 2, 3]


def test_no_vocabulary_logits_ever(tiny_dir):
    model = SpatialScore.from_backbone(tiny_dir / "reward")
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
    model = SpatialScore.from_backbone(tiny_dir / "reward", lora=lora)
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

    model = SpatialScore.from_backbone(tiny_dir / "reward")
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
        torch.testing.assert_close(pv, ref["pixel_values"], rtol=0, atol=1e-5)
    # Scoring from tensors equals scoring from PIL images of the same pixels.
    model = SpatialScore.from_backbone(tiny_dir / "reward")
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
    base = {"model": str(tiny_dir / "reward"), "data": str(data), "out": str(out), "batch_size": 4, "max_steps": 6,
            "warmup_steps": 2, "eval_every": 3, "eval_pairs": 8, "save_every": 3, "log_every": 1, "lr": 1e-3,
            "threads": 1}
    base.update(kw)
    return from_dict(RewardTrainConfig, base)


def _weights(out):
    from safetensors.torch import load_file

    return load_file(out / "model" / "head.safetensors"), load_file(out / "model" / "backbone" / "model.safetensors")


def test_killed_run_resumes_to_the_same_weights(tiny_dir, easy_pairs, tmp_path):
    train(_cfg(tiny_dir, easy_pairs, tmp_path / "straight"))
    assert train(_cfg(tiny_dir, easy_pairs, tmp_path / "resumed", stop_after=3)) == {}
    assert not (tmp_path / "resumed" / "model").exists()
    train(_cfg(tiny_dir, easy_pairs, tmp_path / "resumed"))
    for a, b in zip(_weights(tmp_path / "straight"), _weights(tmp_path / "resumed"), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    straight = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in straight if "loss" in r}
    for r in resumed:
        if "loss" in r:
            assert abs(r["loss"] - loss[r["step"]]) < 1e-5
    assert (tmp_path / "resumed" / "accuracy.png").is_file() and (tmp_path / "resumed" / "eval.md").is_file()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_torchrun_two_processes_matches_one(tiny_dir, easy_pairs, tmp_path, parallel):
    """Same global batch: 2 ranks x 2 pairs reproduce 1 rank x 4 pairs. FSDP2 also stops and resumes
    mid-way (sharded optimizer state through the full checkpoint) and saves a loadable model."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun is installed with torch"
    one = _cfg(tiny_dir, easy_pairs, tmp_path / "one", batch_size=4, max_steps=4, save_every=2, eval_every=4)
    train(one)
    args = [torchrun, "--nproc_per_node", "2", "--master_port", "29533" if parallel == "ddp" else "29534", "-m",
            "spatialcore.cli", "reward", "train", f"model={tiny_dir / 'reward'}", f"data={easy_pairs}",
            f"out={tmp_path / 'two'}", "batch_size=2", "max_steps=4", "warmup_steps=2", "eval_every=4",
            "eval_pairs=8", "save_every=2", "log_every=1", "lr=1e-3", "threads=1", f"parallel={parallel}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if parallel == "fsdp2":
        proc = subprocess.run(args + ["stop_after=2"], capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not (tmp_path / "two" / "model").exists()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    la = [r["loss"] for r in a if "loss" in r]
    lb = [r["loss"] for r in b if "loss" in r]
    assert len(la) == len(lb) == 4
    np.testing.assert_allclose(lb, la, rtol=0, atol=1e-4)
    ims = _images()
    s1 = SpatialScore.from_pretrained(tmp_path / "one" / "model").score(PROMPT, ims)[0]
    s2 = SpatialScore.from_pretrained(tmp_path / "two" / "model").score(PROMPT, ims)[0]
    # Adam turns float-summation-order differences of near-zero gradients into ~lr steps
    torch.testing.assert_close(s2, s1, rtol=1e-2, atol=5e-3)


def test_reward_cli_eval_and_score(tiny_dir, easy_pairs, tmp_path):
    model = SpatialScore.from_backbone(tiny_dir / "reward")
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "spatialcore.cli", "reward", "eval", "--model", str(tmp_path / "m"),
                           "--data", str(easy_pairs), "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| overall | 1 perturbation | 2-3 perturbations |" in proc.stdout
    metrics = json.loads(out.read_text())
    assert 0 <= metrics["accuracy"] <= 1 and metrics["pairs"] == metrics["pairs_1"] + metrics["pairs_2_3"]
    proc = subprocess.run([sys.executable, "-m", "spatialcore.cli", "reward", "eval", "--model", str(tmp_path / "m"),
                           "--data", str(easy_pairs), "--shuffle-prompts"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    img = tmp_path / "a.png"
    _images()[0].save(img)
    proc = subprocess.run([sys.executable, "-m", "spatialcore.cli", "reward", "score", "--model", str(tmp_path / "m"),
                           "--prompt", PROMPT, str(img), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert rows[0]["image"] == str(img) and rows[0]["sigma"] > 0
    bad = subprocess.run([sys.executable, "-m", "spatialcore.cli", "reward", "train", "data=/nonexistent"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "'data'" in bad.stderr


def test_config_files_load():
    for name in ("tiny_cpu", "tiny_cpu_unseen", "qwen2_5_vl_7b"):
        cfg = load_config(RewardTrainConfig, f"configs/reward/{name}.yaml")
        assert cfg.max_steps > cfg.warmup_steps


def test_streaming_training_and_prompt_shuffle_control(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, "stream:easy", tmp_path / "s", max_steps=3, eval_every=3, save_every=3, eval_pairs=6,
               shuffle_prompts=True)
    metrics = train(cfg)
    assert metrics["pairs"] == 6 and metrics["pairs_1"] == 6
    with pytest.raises(Exception, match="unknown stream preset"):
        train(_cfg(tiny_dir, "stream:extreme", tmp_path / "x"))


def test_curriculum_advances_and_resumes(tiny_dir, tmp_path):
    stages = ["curriculum=[{relation_types: [left of]}, {relation_types: [left of, right of]}]"]
    base = dict(max_steps=6, eval_every=2, save_every=2, eval_pairs=4, advance_at=0.0)
    cfg = load_config(RewardTrainConfig, None, [*stages, *(f"{k}={v}" for k, v in base.items()),
                                                f"model={tiny_dir / 'reward'}", "data=stream:easy", "batch_size=2",
                                                "warmup_steps=1", "threads=1", f"out={tmp_path / 'a'}"])
    train(cfg)
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in recs if "stage" in r] == [0, 1, 2]
    # Stopped after the first stage change and resumed: same final weights as straight through.
    import dataclasses

    train(dataclasses.replace(cfg, out=str(tmp_path / "b"), stop_after=4))
    train(dataclasses.replace(cfg, out=str(tmp_path / "b")))
    for a, b in zip(_weights(tmp_path / "a"), _weights(tmp_path / "b"), strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    with pytest.raises(Exception, match="curriculum"):
        load_config(RewardTrainConfig, None, [*stages, "data=runs/pairs"])


def test_int8_weight_only_scoring(tiny_dir):
    torch.manual_seed(0)
    model = SpatialScore.from_backbone(tiny_dir / "reward")
    ims = [Image.fromarray(np.random.RandomState(i).randint(0, 255, (56, 56, 3)).astype(np.uint8)) for i in range(6)]
    before = model.score(PROMPT, ims)[0]
    model.quantize("int8")
    lin = model.backbone.language_model.layers[0].self_attn.q_proj
    assert type(lin.weight).__name__ == "Int8Tensor"  # torchao stores int8 weights with scales
    after = model.score(PROMPT, ims)[0]
    assert (after - before).abs().max() <= 0.05 * before.abs().max() + 1e-3
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="float8"):
            SpatialScore.from_backbone(tiny_dir / "reward").quantize("float8")


def test_int8_keeps_the_held_out_accuracy_of_a_trained_model(tiny_dir, tmp_path):
    """Train the tiny model on the pure-vision stage (one relation word; ~300 steps), then score the
    same held-out pairs with int8 weight-only: accuracy moves by at most one point."""
    from spatialcore.trainers.reward import held_out_pairs, synth_config

    from spatialcore.reward.evaluate import pair_metrics, pair_scores

    cfg = load_config(RewardTrainConfig, None, [
        f"model={tiny_dir / 'reward'}", "data=stream:easy", "stream={relation_types: [left of], p_sizes: 0.0, "
        "p_background: 0.0}", f"out={tmp_path / 'r'}", "max_steps=300", "warmup_steps=20", "lr=1e-3",
        "eval_every=300", "save_every=300", "eval_pairs=200", "threads=2", "seed=1"])
    trained = train(cfg)
    assert trained["accuracy"] >= 0.8, trained  # a model that learned something, not a coin
    pairs = held_out_pairs(synth_config(cfg.data, cfg.stream), cfg.seed, 200, "test")
    model = SpatialScore.from_pretrained(tmp_path / "r" / "model")
    full = pair_metrics(*pair_scores(model, pairs))
    assert abs(full["accuracy"] - trained["accuracy"]) < 1e-9  # the saved model is the evaluated one
    model.quantize("int8")
    q = pair_metrics(*pair_scores(model, pairs))
    assert abs(q["accuracy"] - full["accuracy"]) <= 0.01, (full["accuracy"], q["accuracy"])


def test_compile_switch_scores_like_eager_and_liger_needs_cuda(tiny_dir, capsys):
    torch.manual_seed(0)
    model = SpatialScore.from_backbone(tiny_dir / "reward")
    before = model.score(PROMPT, _images())[0]
    model.accelerate(compile=True)
    assert "torch.compile: 2 decoder layers" in capsys.readouterr().err
    after = model.score(PROMPT, _images())[0]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            model.accelerate(liger=True)
