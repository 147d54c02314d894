"""Faithfulness (vggattn.faithfulness) on hand-made attention where the answers are known, and in the study."""

import json
import math

import numpy as np
import pytest
import torch

from vggattn import faithfulness, study, study_report
from test_study import tiny_checkpoint


def test_deleting_a_cell_changes_the_output_by_exactly_its_share():
    """Values with mean zero: replacing a key's value by the mean takes its weighted value out of the output, so a
    one-hot row loses all of it, and a 0.7 / 0.3 row over two orthogonal values loses 0.7 of one of them."""
    n, c = 6, 4
    values = torch.zeros(n, c)
    values[0, 0], values[1, 1] = 1.0, 1.0
    values[2, 0], values[3, 1] = -1.0, -1.0  # the mean value is 0
    one_hot = torch.zeros(1, n)
    one_hot[0, 0] = 1.0
    delta = faithfulness.deletion_delta(one_hot, torch.tensor([[0]]), values, gamma=0.5)
    torch.testing.assert_close(delta, -0.5 * values[:1])  # the whole of gamma * v_0: its share is 1
    mixed = torch.zeros(1, n)
    mixed[0, 0], mixed[0, 1] = 0.7, 0.3
    out = 0.5 * (mixed @ values)  # what attention adds
    delta = faithfulness.deletion_delta(mixed, torch.tensor([[0]]), values, gamma=0.5)
    assert float(delta.norm() / out.norm()) == pytest.approx(0.7 / math.sqrt(0.7 ** 2 + 0.3 ** 2))
    nothing = faithfulness.deletion_delta(mixed, torch.tensor([[4]]), values, gamma=0.5)  # a key of weight 0
    assert float(nothing.abs().max()) == 0


def test_one_hot_rows_to_a_sink_are_a_broadcast_sink_and_deletion_finds_it():
    """Every query puts all its weight on key 0 (large logits): deleting its top key removes all of attention's
    addition (1.0), the bottom or a random key almost nothing; the sink is key 0, its term is the whole output
    (share 1: a broadcast sink); a linear tail's logit change is the deleted vector times the class weights."""
    torch.manual_seed(0)
    n, c = 16, 8
    q = torch.ones(n, 2)
    k = torch.zeros(n, 2)
    k[0] = 40.0  # logits 80 for key 0, 0 elsewhere: rows are one-hot to key 0 (to 1e-34)
    v = torch.randn(n, c)
    v -= v.mean(0)
    x = torch.randn(n, c)
    gamma = 0.3
    y = x + gamma * v[0]  # every output gets gamma * v_0
    weights = torch.randn(c, 3)
    tail = lambda tokens: tokens.sum(1) @ weights  # noqa: E731  (B, N, C) -> (B, 3): linear in the outputs
    top_class = 1
    got = faithfulness.image_faithfulness(q, k, v, x, y, gamma, tail, top_class, (torch.randn(n, 2), torch.randn(n, 2)),
                                          ks=(1, 4))
    assert got["del:top:1"] == pytest.approx(1.0, abs=1e-6) and got["del:mean_row:1"] == pytest.approx(1.0, abs=1e-6)
    assert got["del:bottom:1"] < 1e-6 and got["del:bottom:4"] < 1e-6
    assert got["sink_share"] == pytest.approx(1.0, abs=1e-6) and got["sink_mass"] == pytest.approx(1.0, abs=1e-6)
    assert got["sink_value_ratio"] == pytest.approx(float(v[0].norm() / v.norm(dim=1).mean()), rel=1e-5)
    # deleting key 0 for one query: its output changes by -gamma * v_0 (mean value 0), the logit by that times W
    assert got["logit:top:1"] == pytest.approx(abs(float((-gamma * v[0]) @ weights[:, top_class])), rel=1e-4)


def test_the_study_has_a_faithfulness_section_in_json_report_and_tab(tmp_path):
    _, _, ckpt, data = tiny_checkpoint(tmp_path, per_class=2)
    out = tmp_path / "study"
    assert study.main(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--workers", "0",
                       "--batch-size", "3", "--sanity-images", "0", "--bootstrap", "50", "--device", "cpu",
                       "--faithfulness-images", "4"]) == 0
    s = json.loads((out / "study.json").read_text())
    f = s["faithfulness"]
    assert f["images"] == 4 and f["ks"] == list(faithfulness.KS) and set(f["layers"]) == set(s["layers"])
    for layer in f["layers"].values():
        for what in ("deletion", "logit"):
            assert set(layer[what]) == set(faithfulness.SELECTIONS)
            for curve in layer[what].values():
                assert [p["k"] for p in curve] == list(faithfulness.KS)
                assert all(p["ci95"][0] <= p["mean"] + 1e-12 and p["mean"] <= p["ci95"][1] + 1e-12 for p in curve)
        assert all(p["mean"] >= 0 for curves in layer["deletion"].values() for p in curves)
        assert 0 <= layer["sink"]["output_share"] and layer["sink"]["value_norm_ratio"] > 0
    assert "Faithfulness" in (out / "report.html").read_text() and (out / "faithfulness.png").is_file()
    md = study_report.summary_markdown(s)
    assert "query-conditioned deletion" in md and "sink's anatomy" in md
    # a study made without it gains the section with --resume (only those images are run again)
    out2 = tmp_path / "later"
    args = ["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out2), "--workers", "0", "--batch-size", "3",
            "--sanity-images", "0", "--bootstrap", "50", "--device", "cpu"]
    assert study.main([*args, "--faithfulness-images", "0"]) == 0
    assert "faithfulness" not in json.loads((out2 / "study.json").read_text())
    assert study.main([*args, "--faithfulness-images", "4", "--resume"]) == 0
    again = json.loads((out2 / "study.json").read_text())
    assert again["faithfulness"]["images"] == 4
    np.testing.assert_allclose(again["faithfulness"]["layers"]["features.14"]["deletion"]["top"][0]["mean"],
                               f["layers"]["features.14"]["deletion"]["top"][0]["mean"], rtol=1e-6)
    assert again["interventions"] == s["interventions"]
