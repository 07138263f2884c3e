"""`loop-ray bench` runs its sampler and weight-publication figures and writes its report."""

import json


def test_bench_sampler_and_weights_smoke(tmp_path):
    from loop_ray.cli.bench import main

    out = tmp_path / "bench"
    assert main(["--only", "sampler", "weights", "--no-sd2", "--repeats", "1", "--batch", "2", "--steps", "2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    for name in ("embedded", "tiny_sd", "tiny_sd3_flow"):
        r = report["sampler"][name]["throughput_ratio"]
        assert r["low"] <= r["median"] <= r["high"] and r["median"] > 0
    assert report["sampler"]["tiny_sd3_flow"]["images_per_s"] > 0
    assert report["weights"]["embedded"]["MB"] > 1.5  # the 0.45 M-parameter UNet in fp32
    table = (out / "bench.md").read_text()
    assert "| sampler, embedded" in table and "| sampler, tiny_sd3_flow" in table and "throughput ratio" in table
