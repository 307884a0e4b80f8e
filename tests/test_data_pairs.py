"""Pair-set loading: validation of broken inputs, skip/strict loading, resumable sharded sampler, collate."""

import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from spatialcore.cli import main
from spatialcore.config import from_dict
from spatialcore.data.pairs import PairSampler, PairSet, PairSetError, load_image, scan_pair_set
from spatialcore.data.synth import DIFFICULTIES, SynthConfig, synth_pair_set
from spatialcore.reward.preprocess import PairCollator


def _rec(i, chosen, rejected, **kw):
    return {"id": f"p{i}", "prompt": "the red circle is to the left of the blue square.", "chosen": chosen,
            "rejected": rejected, "n_perturbations": 1, "perturbations": ["flip"], "split": "train", **kw}


@pytest.fixture
def broken_set(tmp_path):
    d = tmp_path / "broken"
    (d / "img").mkdir(parents=True)
    good = Image.new("RGB", (64, 64), (200, 10, 10))
    good.save(d / "img/good.png")
    good.save(d / "img/good2.png")
    buf = d / "img/truncated.png"
    good.save(buf)
    buf.write_bytes(buf.read_bytes()[:60])
    (d / "img/zero.png").write_bytes(b"")
    (d / "img/text.png").write_text("this is not an image")
    Image.new("CMYK", (64, 64), (0, 200, 200, 0)).save(d / "img/cmyk.jpg")
    Image.new("P", (64, 64), 3).save(d / "img/palette.png")
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(d / "img/sixteen.png")
    Image.new("RGBA", (64, 64), (10, 200, 10, 128)).save(d / "img/rgba.png")
    Image.new("RGB", (1, 1)).save(d / "img/tiny.png")
    lines = [
        json.dumps(_rec(1, "img/good.png", "img/good2.png")),                 # 1 good
        json.dumps(_rec(2, "img/truncated.png", "img/good.png")),             # 2 truncated
        json.dumps(_rec(3, "img/zero.png", "img/good.png")),                  # 3 zero bytes
        json.dumps(_rec(4, "img/missing.png", "img/good.png")),               # 4 missing file
        json.dumps(_rec(5, "img/text.png", "img/good.png")),                  # 5 not an image
        '{"id": "p6", "prompt": "oops"',                                      # 6 bad JSON
        json.dumps({k: v for k, v in _rec(7, "img/good.png", "img/good.png").items() if k != "split"}),  # 7 missing
        json.dumps(_rec(8, "img/good.png", "img/good.png", n_perturbations="2")),  # 8 mistyped
        json.dumps(_rec(1, "img/good.png", "img/good.png")),                  # 9 duplicate id
        json.dumps(_rec(10, "img/cmyk.jpg", "img/palette.png")),              # 10 odd modes (warnings)
        json.dumps(_rec(11, "img/sixteen.png", "img/rgba.png")),              # 11 odd modes (warnings)
        json.dumps(_rec(12, "img/tiny.png", "img/good.png")),                 # 12 1x1 image
        json.dumps(_rec(13, "img/good.png", "img/good.png", split="dev")),    # 13 bad split
        "",                                                                   # 14 blank: ignored
        json.dumps(_rec(15, "../outside.png", "img/good.png")),               # 15 escapes the folder
        "[1, 2]",                                                             # 16 not an object
    ]
    (d / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return d


EXPECTED_ERRORS = {2: "unreadable", 3: "empty file", 4: "file not found", 5: "not an image", 6: "bad JSON",
                   7: "missing field", 8: "must be an integer", 9: "duplicate id", 12: "too small", 13: "split",
                   15: "inside the folder", 16: "JSON object"}


def test_validate_reports_every_problem_with_its_line(broken_set, capsys):
    assert main(["data", "validate", str(broken_set)]) == 1
    out = capsys.readouterr().out.splitlines()
    for line, fragment in EXPECTED_ERRORS.items():
        hits = [o for o in out if o.startswith(f"line {line}: ") and "warning" not in o]
        assert hits and any(fragment in h for h in hits), (line, fragment, out)
    for line in (10, 11):
        assert any(o.startswith(f"line {line}: warning:") for o in out)
        assert not any(o.startswith(f"line {line}: ") and "warning" not in o for o in out)
    assert not any(o.startswith(("line 1:", "line 14:")) for o in out)
    assert out[-1].startswith("3 good record(s), 12 bad record(s)")


def test_loader_skips_bad_records_and_strict_refuses(broken_set):
    with pytest.warns(UserWarning, match="skipped"):
        ds = PairSet(broken_set)
    assert [r.id for r in ds.records] == ["p1", "p10", "p11"]
    for i in range(len(ds)):
        item = ds[i]
        assert item["chosen"].mode == "RGB" and item["rejected"].mode == "RGB"
    sixteen = ds[2]["chosen"]
    assert abs(int(np.asarray(sixteen)[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1  # scaled, not clipped
    rgba = np.asarray(ds[2]["rejected"])[0, 0]
    assert rgba[1] > rgba[0]  # alpha composited on white keeps the green
    with pytest.raises(PairSetError, match="line 2"):
        PairSet(broken_set, strict=True)
    with pytest.raises(PairSetError, match="no pairs.jsonl"):
        PairSet(broken_set / "img")


def test_clean_set_validates(tmp_path, capsys):
    cfg = from_dict(SynthConfig, DIFFICULTIES["easy"])
    synth_pair_set(tmp_path / "s", 30, 0, cfg, progress=False, workers=1)
    assert main(["data", "validate", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.strip().endswith("0 error(s), 0 warning(s)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = PairSet(tmp_path / "s", split="train", strict=True)
    assert 0 < len(ds) <= 30 and all(r.split == "train" for r in ds.records)
    assert main(["data", "stats", str(tmp_path / "s"), "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["pairs"] == 30 and sum(data["splits"].values()) == 30
    assert data["relations_per_prompt"] == {"1": 30}
    assert (tmp_path / "s" / "stats.png").stat().st_size > 0


def test_sampler_shards_cover_every_record_once():
    for n, world in ((10, 3), (7, 2), (5, 8)):
        shards = [list(PairSampler(n, seed=1, rank=r, world_size=world)) for r in range(world)]
        flat = [i for s in shards for i in s]
        assert sorted(flat) == list(range(n))
        even = [list(PairSampler(n, seed=1, rank=r, world_size=world, even=True)) for r in range(world)]
        assert len({len(s) for s in even}) == 1 and len({i for s in even for i in s}) == sum(map(len, even))
    a = list(PairSampler(10, seed=1))
    s = PairSampler(10, seed=1)
    list(s)
    assert list(s) != a  # the next epoch is a new permutation


def test_sampler_resume_continues_with_the_next_batch():
    data = list(range(23))
    ref_sampler = PairSampler(len(data), seed=4, rank=1, world_size=2)
    loader = torch.utils.data.DataLoader(data, batch_size=3, sampler=ref_sampler)
    it = iter(loader)
    seen = [next(it).tolist() for _ in range(2)]
    state = ref_sampler.state_dict()
    rest = [b.tolist() for b in it]
    fresh = PairSampler(len(data), seed=4, rank=1, world_size=2)
    fresh.load_state_dict(state)
    resumed = [b.tolist() for b in torch.utils.data.DataLoader(data, batch_size=3, sampler=fresh)]
    assert resumed == rest
    assert seen[0] + seen[1] + [x for b in rest for x in b] == PairSampler(23, seed=4, rank=1, world_size=2).shard(0)
    with pytest.raises(ValueError, match="sampler state"):
        PairSampler(24, seed=4, rank=1, world_size=2).load_state_dict(state)


def test_collate_feeds_the_qwen_processor(tmp_path, tiny_dir):
    from transformers import AutoProcessor

    cfg = from_dict(SynthConfig, DIFFICULTIES["easy"])
    synth_pair_set(tmp_path / "s", 6, 0, cfg, progress=False)
    ds = PairSet(tmp_path / "s")
    batch = PairCollator(AutoProcessor.from_pretrained(tiny_dir / "reward"))([ds[i] for i in range(3)])
    inputs = batch["inputs"]
    assert inputs["input_ids"].shape[0] == 6 and inputs["image_grid_thw"].shape == (6, 3)
    assert batch["n_perturbations"].tolist() == [1, 1, 1] and len(batch["ids"]) == 3
    assert torch.equal(inputs["input_ids"][:3], inputs["input_ids"][3:])  # same prompts, chosen then rejected


def test_load_image_modes(tmp_path):
    Image.new("LA", (20, 20), (100, 0)).save(tmp_path / "la.png")
    Image.new("1", (20, 20), 1).save(tmp_path / "bw.png")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white
    assert load_image(tmp_path / "bw.png").getpixel((0, 0)) == (255, 255, 255)
    records, problems = scan_pair_set(tmp_path)
    assert records == [] and "no pairs.jsonl" in str(problems[0])


def _eval_folder(root, name, samples):
    """A `spatialcore eval` folder by hand: ``samples`` = (prompt index, correct, all found) per sample; each image
    a distinct colour so that a pair's files name their samples."""
    d = root / name
    (d / "images").mkdir(parents=True)
    with (d / "samples.jsonl").open("w") as f:
        for n, (i, correct, found) in enumerate(samples):
            image = f"images/{i:04d}_{n:02d}.png"
            Image.new("RGB", (32, 32), (n * 9 % 256, 40, 200)).save(d / image)
            f.write(json.dumps({"prompt": f"The red circle is left of the blue square, number {i}.", "prompt_index": i,
                                "seed_index": n, "seed": 1000 + n, "image": image, "found": [found, True],
                                "relations": [correct], "all_found": found, "correct": correct, "boxes": []}) + "\n")
    return d


def test_judged_pairs_pair_every_correct_sample_with_every_wrong_one_of_its_prompt(tmp_path, capsys):
    """Counted by hand: prompt 0 has 2 correct and 3 wrong samples (6 pairs), prompt 1 only correct ones (none),
    prompt 2 one of each (1); the other folder 1 x 2. Every pair: chosen correct, rejected not, the same prompt,
    the split of its folder; the set validates and loads; --per-prompt caps each prompt."""
    val = _eval_folder(tmp_path, "ev_val", [(0, True, True), (0, False, True), (0, True, True), (0, False, False),
                                            (0, False, True), (1, True, True), (1, True, True), (2, False, True),
                                            (2, True, True)])
    test = _eval_folder(tmp_path, "ev_test", [(0, False, True), (0, True, True), (0, False, False)])
    out = tmp_path / "pairs"
    assert main(["data", "judged", "--out", str(out), "--val", str(val), "--test", str(test)]) == 0
    recs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [r["split"] for r in recs].count("val") == 7 and [r["split"] for r in recs].count("test") == 2
    samples = {}
    for k, folder in enumerate((val, test)):
        for line in (folder / "samples.jsonl").read_text().splitlines():
            s = json.loads(line)
            samples[f"images/{k:02d}_{s['image'].split('/')[1]}"] = s
    pairs = set()
    for r in recs:
        w, lo = samples[r["chosen"]], samples[r["rejected"]]
        assert w["correct"] and not lo["correct"] and w["prompt"] == lo["prompt"] == r["prompt"]
        assert np.array_equal(np.asarray(Image.open(out / r["chosen"])), np.asarray(Image.open(
            (val if r["split"] == "val" else test) / w["image"])))
        assert r["meta"]["rejected_found"] == lo["all_found"]
        pairs.add((r["chosen"], r["rejected"]))
    assert len(pairs) == 9
    good, problems = scan_pair_set(out)
    assert len(good) == 9 and not [p for p in problems if p.severity == "error"]
    assert len(PairSet(out, split="test")) == 2
    assert main(["data", "judged", "--out", str(out), "--val", str(val), "--per-prompt", "2", "--force"]) == 0
    capped = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert sorted(r["meta"]["prompt_index"] for r in capped) == [0, 0, 2]


def test_judged_pairs_refuse_what_cannot_make_a_pair_set(tmp_path, capsys):
    only_right = _eval_folder(tmp_path, "right", [(0, True, True), (1, True, True)])
    other = _eval_folder(tmp_path, "other", [(0, True, True), (0, False, True)])
    out = str(tmp_path / "pairs")
    cases = [(["--test", str(only_right)], "--test.*no pair"),
             (["--val", str(other), "--test", str(other)], "--test.*both val and test"),
             (["--val", str(tmp_path)], "--val.*not a `spatialcore eval` folder"),
             ([], "at least one evaluation folder"),
             (["--test", str(other), "--per-prompt", "0"], "--per-prompt.*>= 1")]
    for args, message in cases:
        assert main(["data", "judged", "--out", out, *args]) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(message, err), (args, err)
    assert not (tmp_path / "pairs").exists()
