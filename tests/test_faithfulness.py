"""Faithfulness (vggattn.study.faithfulness) on hand-made attention where the answers are known, and in the study."""

import json
import math

import numpy as np
import pytest
import torch

from vggattn import study


from vggattn.study import report as study_report
from vggattn.study import faithfulness
from test_study import tiny_checkpoint


def deleted(rows: torch.Tensor, keys: list[list[int]]) -> torch.Tensor:
    """faithfulness.delete_keys of one head's rows (N, M) and each query's keys."""
    return faithfulness.delete_keys(rows[None], torch.tensor(keys), torch.empty(1, *rows.shape))[0]


def test_deleting_a_cell_changes_the_output_by_exactly_its_share():
    """Values with mean zero: replacing a key's value by the mean takes its weighted value out of the output, so a
    one-hot row loses all of it, and a 0.7 / 0.3 row over two orthogonal values loses 0.7 of one of them."""
    n, c = 6, 4
    values = torch.zeros(n, c)
    values[0, 0], values[1, 1] = 1.0, 1.0
    values[2, 0], values[3, 1] = -1.0, -1.0  # the mean value is 0
    one_hot = torch.zeros(1, n)
    one_hot[0, 0] = 1.0
    delta = deleted(one_hot, [[0]]) @ values - one_hot @ values
    torch.testing.assert_close(delta, -values[:1])  # the whole of v_0: its share is 1
    mixed = torch.zeros(1, n)
    mixed[0, 0], mixed[0, 1] = 0.7, 0.3
    out = mixed @ values  # what attention adds
    delta = deleted(mixed, [[0]]) @ values - out
    assert float(delta.norm() / out.norm()) == pytest.approx(0.7 / math.sqrt(0.7 ** 2 + 0.3 ** 2))
    nothing = deleted(mixed, [[4]]) @ values - out  # a key of weight 0
    assert float(nothing.abs().max()) == 0
    assert deleted(mixed, [[0, 1]]).sum() == pytest.approx(1.0)  # the row keeps its mass, spread over the keys


def test_one_hot_rows_to_a_sink_are_a_broadcast_sink_and_deletion_finds_it():
    """Every query puts all its weight on key 0: deleting its top key removes all of attention's addition (1.0), the
    bottom key nothing; the sink is key 0, its term is the whole output (share 1: a broadcast sink), its value's norm
    against the mean one as made; a linear tail's logit change is the deleted vector times the class weights."""
    torch.manual_seed(0)
    grid, c = (4, 4), 8
    n = grid[0] * grid[1]
    rows = torch.zeros(1, n, n)
    rows[..., 0] = 1.0
    v = torch.randn(n, c)
    v -= v.mean(0)
    x = torch.randn(n, c)
    gamma = 0.3

    def forward(r: torch.Tensor) -> torch.Tensor:  # (V, 1, N, M) -> the block's outputs x + gamma * A V, (V, C, 4, 4)
        return (x + gamma * (r[:, 0] @ v)).transpose(1, 2).reshape(len(r), c, *grid)

    weights = torch.randn(c, 3)
    top_class = 1  # a tail linear in the outputs: logit = sum over positions of y_q . W[:, top_class]
    grad = weights[:, top_class][None, :, None, None].expand(1, c, *grid)
    got = faithfulness.image_faithfulness(forward, rows, torch.softmax(torch.randn(1, n, n), -1), grad, grid, grid,
                                          ks=(1, 4))
    assert got["del:top:1"] == pytest.approx(1.0, abs=1e-5) and got["del:mean_row:1"] == pytest.approx(1.0, abs=1e-5)
    assert got["del:bottom:1"] < 1e-5 and got["del:bottom:4"] < 1e-5
    assert got["sink_share"] == pytest.approx(1.0, abs=1e-5) and got["sink_mass"] == pytest.approx(1.0, abs=1e-6)
    assert got["sink_value_ratio"] == pytest.approx(float(v[0].norm() / v.norm(dim=1).mean()), rel=1e-5)
    # deleting key 0 for one query: its output changes by -gamma * v_0 (mean value 0), the logit by that times W
    assert got["logit:top:1"] == pytest.approx(abs(float((-gamma * v[0]) @ weights[:, top_class])), rel=1e-4)


def test_the_first_order_logit_change_is_the_change_for_a_small_deletion():
    """The logit measure is first order: in a small net (conv, the article's block, a ReLU tail), deleting one query's
    top key changes the top-1 logit, run through the rest of the network, by what the gradient says."""
    import vggattn
    from vggattn.attention.adapters import find_blocks

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), vggattn.GlobalAttention(16), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
    model[1].gamma.data.fill_(1.0)
    x = 3 * torch.randn(1, 3, 6, 6)
    (name, block, adapter), = find_blocks(model, ["1"])
    xin, grad = faithfulness.output_gradients(model, x, [name])[name]
    with torch.no_grad():
        rows = adapter.maps(block, xin).rows()[0]  # (1, N, N)
        assert rows.max() > 0.3  # sharp rows: the top key carries much of a query's output
        top, q = int(model(x).argmax()), int(rows[0].max(1).values.argmax())
        changed = rows.clone()
        changed[:, q] = deleted(rows[0, q:q + 1], [[int(rows[0, q].argmax())]])
        y, y_changed = (adapter.forward(block, xin, rows=r[None]) for r in (rows, changed))
        exact = float(model[2:](y_changed)[0, top] - model[2:](y)[0, top])
    first_order = float((grad * (y_changed - y)).sum())
    assert abs(exact) > 1e-3 and first_order == pytest.approx(exact, rel=0.1)


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


class First(torch.nn.Module):
    """A block's output, or the first of the outputs it returns (SAGAN's block returns (out, attention))."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        out = self.block(x)
        return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("family", ["article", "nonlocal-subsampled", "sagan", "biggan", "gcnet"])
def test_the_fast_path_from_attended_values_equals_the_blocks_own_forward(family, monkeypatch):
    """For a family adapter, faithfulness builds each replaced row's attended values directly (a deletion: the
    block's own, less the deleted keys' terms, plus their weight times the mean value) and runs only the block's
    output on them; every measure equals the one from the block's forward with the whole replaced rows."""
    import timm

    from conftest import tiny_model
    from vggattn.attention.adapters import find_blocks
    from vggattn.models import families

    torch.manual_seed(0)
    if family == "article":
        model = tiny_model()
    else:
        block = {"nonlocal-subsampled": lambda: families.NonLocalBlock2D(32, mode="embedded", sub_sample=True),
                 "sagan": lambda: families.SelfAttn(32), "biggan": lambda: families.BigGANAttention(32),
                 # a hidden layer of 16 channels: with timm's default 2, its LayerNorm of two numbers is a step
                 # function, and float32 rounding alone moves the output
                 "gcnet": lambda: timm.layers.GlobalContext(32, rd_ratio=0.5)}[family]()
        for p in block.parameters():  # no zero-initialised gamma or last conv: attention changes the output
            p.data.normal_(0, 0.3)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, 2, 1), First(block), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten(), torch.nn.Linear(32, 5)).eval()
    x = torch.randn(2, 3, 32, 32)
    blocks = find_blocks(model, example=x[:1])
    assert blocks and all(adapter.family for *_, adapter in blocks)
    random_blocks = {name: module for name, module, _ in blocks}
    fast = faithfulness.record(model, blocks, x, random_blocks, [0, 1], seed=0)
    monkeypatch.setattr(faithfulness, "TracedAdapter", object)  # every adapter takes the rows' path
    dense = faithfulness.record(model, blocks, x, random_blocks, [0, 1], seed=0)
    assert fast.keys() == dense.keys() and len(fast) > 1
    for key in fast:  # float32 rounding of two sums that differ in order: 1e-5 of attention's addition at most
        np.testing.assert_allclose(fast[key], dense[key], rtol=1e-3, atol=1e-5, err_msg=key)


def test_the_other_maps_keys_are_deleted_by_their_own_order():
    """A "value" map that ranks the keys as the weights' reverse deletes what "bottom" deletes; without other maps,
    "value" and "effect" fall back to the weights' "top"."""
    torch.manual_seed(0)
    rows = torch.softmax(torch.randn(1, 6, 6) * 3, -1)
    values = torch.randn(1, 6, 4)
    forward = lambda attended: attended.reshape(len(attended), 6, 4).permute(0, 2, 1).reshape(len(attended), 4, 2, 3)  # noqa: E731
    grad = torch.randn(1, 4, 2, 3)
    kinds = {"value": -rows[0], "effect": rows[0]}
    got = faithfulness.image_faithfulness(forward, rows, rows, grad, (2, 3), (2, 3), ks=(1, 4), values=values,
                                          kinds=kinds)
    for k in (1, 4):
        assert got[f"del:value:{k}"] == pytest.approx(got[f"del:bottom:{k}"])
        assert got[f"del:effect:{k}"] == pytest.approx(got[f"del:top:{k}"])
    plain = faithfulness.image_faithfulness(forward, rows, rows, grad, (2, 3), (2, 3), ks=(1,), values=values)
    assert plain["del:value:1"] == plain["del:effect:1"] == plain["del:top:1"]
