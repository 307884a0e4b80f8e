import json

from spatialcore.gpu import attention_backends, gpu_facts
from spatialcore.logs import MetricsFile, read_metrics, step_line


def test_metrics_round_trip_survives_torn_line(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsFile(path) as m:
        m.write({"step": 1, "loss": 0.5})
        m.write({"step": 2, "loss": 0.25})
    with open(path, "a") as fh:
        fh.write('{"step": 3, "lo')  # a writer killed mid-line
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2]
    assert all("time" in r for r in records)
    json.dumps(records)


def test_step_line():
    line = step_line(12, 400, loss=0.693147, kept=0.5, lr=3e-5, skipped=None, samples_s=123456.0)
    assert line == "step 12/400 | loss 0.6931 | kept 0.5000 | lr 3.000e-05 | samples_s 1.235e+05"


def test_gpu_facts_quiet_without_gpu():
    import torch

    facts = gpu_facts()
    if not torch.cuda.is_available():
        assert facts == []
    assert attention_backends()["sdpa"]
