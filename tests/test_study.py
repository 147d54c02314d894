"""vggattn.study: statistics on hand-made attention with known answers, interventions against a
direct computation, the bootstrap CI on known cases, and the CLI end to end on a tiny model."""

import json
import shutil
import math

import numpy as np
import pytest
import torch
from PIL import Image

import vggattn
from conftest import tiny_meta, tiny_model
from vggattn import study
from vggattn.attention import adapters
from vggattn.study import report as study_report
from vggattn.attention.adapters import BlockMaps, Intervention, adapter_for
from vggattn.attention.readouts import js_divergence
from vggattn.attention.trace import watch


def stats_of(a: torch.Tensor, grid, input_size=64, **kw):
    """The study's statistics of one image's hand-made rows a (N, M), as one value each."""
    got = study.batch_statistics(BlockMaps("rows", None, None, grid, grid, weights=a[None, None]), input_size, **kw)
    return {key: value[0] for key, value in got.items()}


def test_one_hot_rows_to_one_cell_are_a_total_sink():
    n, grid = 16, (4, 4)
    a = torch.zeros(n, n)
    a[:, 5] = 1
    s = stats_of(a, grid)
    assert s["sink_mass"] == pytest.approx(1) and s["sink_index"] == 5
    assert s["cosine_distance"] == pytest.approx(0, abs=1e-9)
    assert s["top1_weight"] == pytest.approx(1) and s["jsd"] == pytest.approx(0, abs=1e-9)
    assert s["entropy_frac"] == pytest.approx(0, abs=1e-9)


def test_uniform_rows_have_full_entropy_and_no_sink():
    n, grid = 16, (4, 4)
    s = stats_of(torch.full((n, n), 1 / n), grid)
    assert s["entropy_frac"] == pytest.approx(1)
    assert s["sink_mass"] == pytest.approx(1 / n) and s["top1_weight"] == pytest.approx(1 / n)
    assert s["cosine_distance"] == pytest.approx(0, abs=1e-9) and s["jsd"] == pytest.approx(0, abs=1e-9)


def test_identity_rows_are_orthogonal_and_local():
    n, grid = 16, (4, 4)
    eye = torch.eye(n)
    s = stats_of(eye, grid)
    assert s["cosine_distance"] == pytest.approx(1)
    assert s["mean_distance_px"] == pytest.approx(0)
    assert s["entropy_frac"] == pytest.approx(0, abs=1e-9) and s["top1_weight"] == pytest.approx(1)
    expected_jsd = float(js_divergence(eye, torch.full((n,), 1 / n)).mean())  # the app's JSD, row by row
    assert s["jsd"] == pytest.approx(expected_jsd)


def test_mean_distance_on_two_cells():
    # a 1x2 grid at 8 px: cell centres 4 px apart; query 0 looks at cell 1, query 1 at itself
    a = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert stats_of(a, (1, 2), input_size=8)["mean_distance_px"] == pytest.approx(2.0)


def test_statistics_match_brute_force_and_do_not_depend_on_row_blocks():
    torch.manual_seed(0)
    grid, n = (5, 6), 30
    q, k = torch.randn(n, 4), torch.randn(n, 4)
    x, v = torch.randn(n, 12), torch.randn(n, 12)
    maps = BlockMaps("qk", q[None, None], k[None, None], grid, grid)
    a = torch.softmax(q @ k.t(), -1).double()
    out = a @ v.double()
    delta = (0.3 * out).float()[None]  # what the block adds: gamma * attention output
    big = {key: val[0] for key, val in study.batch_statistics(maps, 96, x=x[None], delta=delta).items()}
    small = {key: val[0] for key, val in study.batch_statistics(maps, 96, x=x[None], delta=delta,
                                                                block_elements=7).items()}
    for key in big:
        assert big[key] == pytest.approx(small[key], rel=1e-5, abs=1e-9), key
    u = a / a.norm(dim=1, keepdim=True)
    cos = u @ u.t()
    off_diag = ~torch.eye(n, dtype=torch.bool)
    assert big["cosine_distance"] == pytest.approx(float((1 - cos[off_diag]).mean()), rel=1e-6)
    uo = out / out.norm(dim=1, keepdim=True)
    assert big["cosine_distance_output"] == pytest.approx(float((1 - (uo @ uo.t())[off_diag]).mean()), rel=1e-5)
    ux = x.double() / x.double().norm(dim=1, keepdim=True)
    assert big["cosine_distance_input"] == pytest.approx(float((1 - (ux @ ux.t())[off_diag]).mean()), rel=1e-5)
    assert big["contribution"] == pytest.approx(float((0.3 * out.norm(dim=1) / x.double().norm(dim=1)).mean()), rel=1e-5)
    assert big["sink_mass"] == pytest.approx(float(a.mean(0).max()), rel=1e-6)


def test_spearman_of_rows():
    torch.manual_seed(1)
    a = torch.softmax(torch.randn(8, 8), -1)
    assert study.spearman_rows(lambda s, e: a[s:e], lambda s, e: a[s:e], 8) == pytest.approx(1)
    assert study.spearman_rows(lambda s, e: a[s:e], lambda s, e: -a[s:e], 8) == pytest.approx(-1)


def reference_block(m: vggattn.GlobalAttention, h: torch.Tensor, mode: str | None) -> torch.Tensor:
    """The article's math written out, with the N x N map replaced as `mode` says."""
    B, C, H, W = h.shape
    qq = m.conv_query(h).flatten(2).transpose(1, 2)  # (B, N, C')
    kk = m.conv_key(h).flatten(2)  # (B, C', N)
    vv = m.conv_value(h).flatten(2)  # (B, C, N)
    a = torch.softmax(torch.bmm(qq, kk), dim=-1)  # (B, N, N)
    if mode == "mean":
        a = a.mean(1, keepdim=True).expand_as(a)
    elif mode == "uniform":
        a = torch.full_like(a, 1 / a.shape[-1])
    out = torch.bmm(vv, a.transpose(1, 2)).reshape(B, C, H, W)
    return h if mode == "off" else h + m.gamma * out


@pytest.mark.parametrize("mode", ["off", "mean", "uniform"])
def test_intervention_equals_the_direct_computation_of_one_block(mode):
    torch.manual_seed(0)
    block = vggattn.GlobalAttention(16)
    block.gamma.data.fill_(1.0)
    x = 3 * torch.randn(2, 16, 5, 4)  # sharp, query-dependent rows
    with torch.no_grad():
        got, want, plain = adapter_for(block).forward(block, x, mode), reference_block(block, x, mode), block(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 0.1  # the replacement is a real change here


def by_hand(model, x: torch.Tensor, modes: dict[str, str]) -> torch.Tensor:
    """The article's model's logits with the blocks in `modes` replaced by `reference_block`."""
    with torch.no_grad():
        h = x
        for i, m in enumerate(model.features):
            mode = modes.get(f"features.{i}")
            h = reference_block(m, h, mode) if mode else m(h)
        return model.forward_head(h)


@pytest.mark.parametrize("modes", [{"features.22": "mean"}, {"features.30": "uniform"},
                                   {"features.14": "mean", "features.22": "mean", "features.30": "mean"},
                                   {"features.14": "uniform", "features.22": "off", "features.30": "mean"}])
def test_interventions_through_the_model_equal_the_direct_computation(modes):
    model = tiny_model()
    x = torch.randn(2, 3, 64, 48)
    got = study.intervention_logits(model, x, {"run": modes})["run"]
    torch.testing.assert_close(got, by_hand(model, x, modes), rtol=1e-5, atol=1e-6)


def test_branched_runs_equal_the_direct_computation_and_keep_the_baselines_blocks():
    model = tiny_model()
    x = torch.randn(2, 3, 64, 48)
    blocks = adapters.find_blocks(model)
    names = [name for name, *_ in blocks]
    runs = study.run_modes(names)
    logits, seen = study.branched_forward(model, x, blocks, runs)
    assert set(logits) == {"baseline", *runs}
    torch.testing.assert_close(logits["baseline"], by_hand(model, x, {}), rtol=1e-5, atol=1e-6)
    for key, modes in runs.items():
        torch.testing.assert_close(logits[key], by_hand(model, x, modes), rtol=1e-5, atol=1e-6, msg=key)
    _, watched = watch(model, x, names)
    for name in names:
        torch.testing.assert_close(seen[name].input, watched[name].input, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(seen[name].output, watched[name].output, rtol=1e-5, atol=1e-6)


class AroundTheBlock(torch.nn.Module):
    """A shortcut around an attention block: its input is added to its output, which branches of one batch
    cannot share."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.block = torch.nn.Conv2d(3, 16, 3, padding=1), vggattn.GlobalAttention(16)
        torch.nn.init.constant_(self.block.gamma, 0.5)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        h = self.stem(x)
        return self.head((self.block(h) + h).mean((2, 3)))


@pytest.mark.parametrize("images", [1, 2])
def test_a_model_that_mixes_branches_gets_one_forward_a_run(images):
    model = AroundTheBlock().eval()
    x = torch.randn(images, 3, 8, 8)
    blocks = adapters.find_blocks(model)
    runs = study.run_modes(["block"])
    logits, seen = study.branched_forward(model, x, blocks, runs)
    with torch.no_grad():
        torch.testing.assert_close(logits["baseline"], model(x))
        for key, modes in runs.items():
            h = model.stem(x)
            expected = model.head((reference_block(model.block, h, modes["block"]) + h).mean((2, 3)))
            torch.testing.assert_close(logits[key], expected, rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(seen["block"].input, model.stem(x).detach())


def test_a_model_that_mixed_branches_is_not_tried_again(monkeypatch):
    """The fallback is remembered per model: the next batch goes straight to one forward a run, with the same
    logits (a transformer's study tried the branched forward on every batch)."""
    model = AroundTheBlock().eval()
    x, blocks, runs = torch.randn(2, 3, 8, 8), adapters.find_blocks(model), study.run_modes(["block"])
    tries = []
    monkeypatch.setattr(study.Branches, "__init__", lambda self, *a, init=study.Branches.__init__: (
        tries.append(1), init(self, *a))[1])
    first, _ = study.branched_forward(model, x, blocks, runs)
    second, _ = study.branched_forward(model, x, blocks, runs)
    assert len(tries) == 1 and model in study._UNBRANCHED
    for key in first:
        torch.testing.assert_close(second[key], first[key])
    assert AroundTheBlock() not in study._UNBRANCHED  # per model, not once for all


def test_bootstrap_ci_on_known_cases():
    same = np.array([1, 0, 1, 1, 0] * 100)
    assert study.paired_bootstrap_ci(same, same) == (0.0, 0.0)
    assert study.paired_bootstrap_ci(np.ones(50), np.zeros(50)) == (1.0, 1.0)
    # n paired images where the intervention flips 10% right -> wrong and nothing else: the difference
    # is -0.1 with standard error sqrt(0.1 * 0.9 / n); the 95% percentile interval is about +-1.96 se
    n = 4000
    base = np.ones(n)
    after = base.copy()
    after[: n // 10] = 0
    lo, hi = study.paired_bootstrap_ci(after, base, n_boot=4000, seed=3)
    se = math.sqrt(0.1 * 0.9 / n)
    assert lo < -0.1 < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.12)


def test_evenly_spaced_subset():
    assert study.evenly_spaced(10, 0) == list(range(10))
    assert study.evenly_spaced(100, 5) == [0, 25, 50, 74, 99]


def make_split(root, folders, per_class=3, size=48):
    rng = np.random.default_rng(0)
    for f in folders:
        (root / f).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(root / f / f"{i}.png")
    return root


def tiny_checkpoint(tmp_path, per_class: int = 3):
    """A tiny 3-class model saved as a checkpoint, and an ImageFolder split of random images for it."""
    model, meta = tiny_model(num_classes=3), tiny_meta(input_size=64, num_classes=3)
    meta["class_names"] = ["a", "b", "c"]
    ckpt = tmp_path / "tiny.safetensors"
    vggattn.save_checkpoint(model, meta, ckpt)
    return model, meta, ckpt, make_split(tmp_path / "val", meta["class_names"], per_class=per_class)


def test_class_folders_match_by_wnid_or_name_and_a_mismatch_is_one_sentence(tmp_path):
    meta = {**tiny_meta(num_classes=3), "class_names": ["tench", "church", "golf ball"],
            "class_ids": ["n01", "n02", "n03"]}
    assert study.class_mapping(["n03", "n01"], meta) == [2, 0]
    assert study.class_mapping(["church", "tench"], meta) == [1, 0]
    with pytest.raises(study.StudyError, match=r"class folders \['violin'\] match none") as e:
        study.class_mapping(["tench", "violin"], meta)
    assert "\n" not in str(e.value)


def test_study_end_to_end_on_a_tiny_model(tmp_path):
    model, meta, ckpt, data = tiny_checkpoint(tmp_path)
    out = tmp_path / "study"
    assert study.main(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--workers", "0",
                       "--batch-size", "4", "--sanity-images", "3", "--bootstrap", "200", "--device", "cpu",
                       "--ship"]) == 0
    s = json.loads((out / "study.json").read_text())
    assert s["images"] == 9 and s["checkpoint"] == "tiny.safetensors"
    assert list(s["layers"]) == ["features.14", "features.22", "features.30"]
    for layer in s["layers"].values():
        for key in ("sink_mass", "top1_weight", "cosine_distance", "jsd", "entropy_frac", "mean_distance_px",
                    "contribution", "cosine_distance_input", "cosine_distance_output"):
            assert math.isfinite(layer[key]), key
        assert 0 < layer["sink_mass"] <= 1 and 0 <= layer["entropy_frac"] <= 1
        assert sum(map(sum, layer["sink_heatmap"])) == 9 and set(layer["per_class"]) == {"a", "b", "c"}
    expected = {"baseline"} | {f"{name}:{m}" for name in [*s["layers"], "all"] for m in ("off", "mean", "uniform")}
    assert set(s["interventions"]) == expected and len(expected) == 13
    # baseline and all:off against the model run directly on the same images
    ds, targets = study.load_split(data, meta)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    base = (by_hand(model, x, {}).argmax(1).numpy() == targets).mean()
    off = (by_hand(model, x, {name: "off" for name in s["layers"]}).argmax(1).numpy() == targets).mean()
    assert s["interventions"]["baseline"]["top1"] == pytest.approx(base)
    assert s["interventions"]["all:off"]["top1"] == pytest.approx(off)
    r = s["interventions"]["all:off"]
    assert r["top1_delta"] == pytest.approx(off - base) and r["top1_delta_ci95"][0] <= r["top1_delta"] <= r["top1_delta_ci95"][1]
    assert s["sanity"]["images"] == 3 and set(s["sanity"]["layers"]) == set(s["layers"])
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "http://" not in page and "https://" not in page  # + faithfulness
    for name in ("sink_heatmaps.png", "distributions.png", "interventions.png", "cosine_distance.png", "faithfulness.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert json.loads(study.study_path(ckpt).read_text())["images"] == 9  # --ship: beside the checkpoint


def test_limit_and_mismatch_through_the_cli(tmp_path, caplog):
    _, _, ckpt, data = tiny_checkpoint(tmp_path, per_class=4)
    args = ["--checkpoint", str(ckpt), "--workers", "0", "--sanity-images", "0", "--bootstrap", "50", "--device", "cpu"]
    assert study.main([*args, "--data", str(data), "--out", str(tmp_path / "o"), "--limit", "5"]) == 0
    assert json.loads((tmp_path / "o" / "study.json").read_text())["images"] == 5
    bad = make_split(tmp_path / "other", ["a", "violin"], per_class=1)
    assert study.main([*args, "--data", str(bad), "--out", str(tmp_path / "o2")]) == 2
    assert "match none of the checkpoint's classes" in caplog.text


def test_sink_note_flags_a_sink_dominated_layer_only():
    from vggattn.view.text import sink_note

    row = np.full((4, 4), 0.06 / 15)
    row[1, 2] = 0.94
    note = sink_note(row, (6, 0.8))
    assert note.startswith("query-independent here: 94% of this row on cell (1, 2)") and "80% of all attention" in note
    assert sink_note(row, (6, 0.3)) == ""  # the image's layer is not sink-dominated
    other = sink_note(np.roll(row, 1, axis=1), (6, 0.7))  # this row looks elsewhere
    assert other.startswith("sink-dominated image: cell (1, 2) takes 70%")


def test_the_shipped_study_is_found_beside_the_resolved_checkpoint(tmp_path, monkeypatch):
    """A Hub id resolves to huggingface_hub's cached file: the app's Dataset tab reads the study beside that file,
    never ./owner/name.study.json; --ship refuses an id (it would write there) and writes beside a folder's weights."""
    import huggingface_hub

    cached = tmp_path / "cache" / "model.safetensors"
    cached.parent.mkdir()
    cached.write_bytes(b"x")
    (cached.parent / "model.study.json").write_text('{"images": 7}')
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name.study.json").write_text('{"images": -1}')  # what the raw id would point at
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(cached))
    assert study.load_study("owner/name") == {"images": 7}
    assert study.load_study(tmp_path / "nowhere.safetensors") is None

    assert study.main(["--checkpoint", "someone/else", "--data", str(tmp_path), "--out", str(tmp_path / "s"),
                       "--ship"]) == 2
    assert not (tmp_path / "someone").exists()
    _, _, ckpt, data = tiny_checkpoint(tmp_path, per_class=1)
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(ckpt, folder / "model.safetensors")
    assert study.main(["--checkpoint", str(folder), "--data", str(data), "--out", str(tmp_path / "s"), "--ship",
                       "--workers", "0", "--sanity-images", "0", "--bootstrap", "20", "--device", "cpu"]) == 0
    assert json.loads((folder / "model.study.json").read_text())["images"] == 3
    assert not (tmp_path / "folder.study.json").exists()


def test_the_default_checkpoints_shipped_study_covers_the_whole_val_split():
    shipped = study.load_study(vggattn.DEFAULT_CHECKPOINT)
    assert shipped["images"] == 3925 and sum(map(sum, shipped["layers"]["features.30"]["sink_heatmap"])) == 3925
    f = shipped["faithfulness"]
    assert f["images"] == 64 and set(f["layers"]) == {"features.14", "features.22", "features.30"}
    for layer in f["layers"].values():  # a query's own top keys make up its output far more than random ones
        assert layer["top_minus_random"]["ci95"][0] > 0.5


def test_dataset_tab_lists_a_layer_per_column():
    """The per-layer table in the app's Dataset tab is transposed: 14 statistics as rows, one column per layer (at
    1440 px its 14 columns had wrapped every header into two-letter lines)."""
    shipped = study.load_study(vggattn.DEFAULT_CHECKPOINT)
    table = study_report.summary_markdown(shipped).split("#### Per layer (mean over images)")[1].split("\n\n")[1]
    lines = table.splitlines()
    assert lines[0].split("|")[1:-1] == [" layer ", " features.14 ", " features.22 ", " features.30 "], lines[0]
    assert len(lines) == 2 + 13 and all(line.count("|") == 5 for line in lines)


def test_the_study_of_a_model_of_another_family(tmp_path, monkeypatch):
    """vggattn-study --model: a ResNet with a non-local block (keys pooled to a half grid): statistics on the key
    grid, every intervention through the adapters, the report written."""

    from safetensors.torch import save_file

    from vggattn.models.zoo import nonlocal_resnet

    torch.manual_seed(0)
    model = nonlocal_resnet(3)
    with torch.no_grad():
        model.nonlocal3.W[1].weight.fill_(0.5)  # the block does something (it starts as the identity)
    meta = {"class_names": ["a", "b", "c"], "input_size": 64}
    ckpt = tmp_path / "zoo.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt), metadata={"meta": json.dumps(meta)})
    (tmp_path / "zoo3.py").write_text("from vggattn.models.zoo import nonlocal_resnet\ndef make():\n    return nonlocal_resnet(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = make_split(tmp_path / "val", ["a", "b", "c"], per_class=2)
    out = tmp_path / "study"
    assert study.main(["--model", "zoo3:make", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out),
                       "--workers", "0", "--bootstrap", "50", "--device", "cpu"]) == 0
    s = json.loads((out / "study.json").read_text())
    layer = s["layers"]["nonlocal3"]
    assert layer["query_grid"] == [8, 8] and layer["grid"] == [4, 4] and np.array(layer["sink_heatmap"]).shape == (4, 4)
    assert 1 / 16 <= layer["sink_mass"] <= 1 and 0 < layer["entropy_frac"] <= 1 and "Non-local" in layer["family"]
    assert set(s["interventions"]) == {"baseline", *(f"{k}:{m}" for k in ("nonlocal3", "all") for m in study.MODES)}
    # each run's top-1 is the model's own accuracy, with that intervention, over the split
    from vggattn.data import eval_transform

    full_meta = {**meta, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    x = torch.stack([eval_transform(full_meta)(Image.open(p).convert("RGB")) for c in "abc"
                     for p in sorted((data / c).glob("*.png"))])
    y = torch.tensor([i for i in range(3) for _ in range(2)])
    model.eval()
    for key, modes in (("baseline", {}), ("nonlocal3:uniform", {"nonlocal3": "uniform"}),
                       ("nonlocal3:off", {"nonlocal3": "off"})):
        with torch.no_grad(), Intervention(model, modes):
            hits = (model(x).argmax(1) == y).float().mean().item()
        assert s["interventions"][key]["top1"] == pytest.approx(hits), key
    assert (out / "report.html").is_file()
    check = s["sanity"]["layers"]["nonlocal3"]  # 6 images <= the default 256: every one randomised
    assert s["sanity"]["images"] == 6 and -1 <= check["spearman_qk_reinit"] < 1 and -1 <= check["spearman_full_reinit"] < 1
    assert check["passes"] == (max(check["spearman_qk_reinit"], check["spearman_full_reinit"]) < study.SANITY_SPEARMAN_MAX)


def test_the_sanity_check_reinitialises_exactly_what_makes_each_familys_logits():
    """reinit_qk changes the parameters named by the adapter's qk_modules and nothing else; on a block whose rows do
    not depend on those parameters (all positions alike) the rows keep their ranks: Spearman 1, the check fails."""
    pytest.importorskip("timm", reason="timm is the optional extra vggattn[timm]")
    import byo_models
    from vggattn.attention.adapters import find_blocks, reinit_qk

    model = byo_models.every_family()
    for name, block, adapter in find_blocks(model):
        fresh = reinit_qk(block, adapter, seed=5)
        changed = {n for n, p in block.named_parameters() if not torch.equal(p, fresh.get_parameter(n))}
        owned = {n for n, _ in block.named_parameters() if n.split(".")[0] in adapter.qk_modules}
        assert changed == owned and owned, (name, changed, owned)
    block, adapter = model.blocks["sagan"], find_blocks(model, ["blocks.sagan"])[0][2]
    flat = torch.ones(1, 32, 6, 6)  # every position the same: every row uniform, whatever Q and K are
    rows = study.mean_head_rows(adapter.maps(block, flat))  # every query's row, the mean of the heads'
    other = study.mean_head_rows(adapter.maps(reinit_qk(block, adapter, 1), flat))
    assert study.spearman_rows(rows, other, 36) == pytest.approx(1.0)


def test_the_study_of_a_timm_model_offline(tmp_path, monkeypatch, data_root):
    """vggattn-study --timm botnet26t_256 --limit 4 on Imagenette val: random weights (no hub here), the ImageNet
    classes matched to the folders by wnid, every BottleneckAttn block studied."""
    pytest.importorskip("timm", reason="timm is the optional extra vggattn[timm]")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "study"
    assert study.main(["--timm", "botnet26t_256", "--data", str(data_root / "val"), "--out", str(out), "--limit", "4",
                       "--batch-size", "4", "--workers", "0", "--bootstrap", "20", "--device", "cpu"]) == 0
    s = json.loads((out / "study.json").read_text())
    assert s["images"] == 4 and s["checkpoint"] == "timm:botnet26t_256"
    assert len(s["layers"]) >= 2 and all("BottleneckAttn" in v["family"] for v in s["layers"].values())
    assert all(0 < v["sink_mass"] <= 1 for v in s["layers"].values())


def test_the_report_says_what_does_not_apply_instead_of_nan():
    """A layer whose rows are no distributions over its grid (a transformer's: a share on the prefix tokens) has
    no sink statistics: the headline says so in words and the table shows "—", never "nan%"."""
    from vggattn.study.report import headline, layer_table

    nan = float("nan")
    numbers = {"grid": [4, 4], "gamma": 0.5, "sink_mass": 0.25, "sink_dominated_share": 0.5,
               "sink_border_share": 1.0, "cosine_distance": 0.3, "cosine_distance_input": 0.2,
               "cosine_distance_output": 0.1, "top1_weight": 0.4, "jsd": 0.2, "entropy_frac": 0.8,
               "mean_distance_px": 12.0, "contribution": 0.01}
    tokens = {**numbers, "gamma": None, "sink_mass": nan, "sink_dominated_share": 0.0, "sink_border_share": 0.0,
              "cosine_distance": nan, "cosine_distance_input": nan, "top1_weight": nan, "jsd": nan,
              "entropy_frac": nan}
    study_dict = {"layers": {"cnn": numbers, "vit": tokens}, "interventions": {"baseline": {"top1": 0.9}}}
    cnn, vit = headline(study_dict)
    assert "takes 25% of all attention" in cnn and "cosine distance 0.30" in cnn
    assert "nan" not in vit.lower() and "no sink statistics" in vit and "no cosine distance" in vit
    table = layer_table(study_dict)
    assert table[2][3:6] == ["—", "—", "—"] and table[2][2] == "—" and "nan" not in str(table).lower()
    assert table[1][3:6] == ["0.250", "50%", "100%"]


def test_the_branched_forward_gives_a_block_every_argument_it_was_called_with():
    """A block called with more than its input (a keyword tensor made from the batch): the study's one forward for
    every intervention run gives each branch's block its own slice of it, stays branched, and each run's logits
    equal that run's own forward under `Intervention`."""
    import torch.nn as nn

    from vggattn.attention.adapters import find_blocks
    from vggattn.study import _UNBRANCHED, branched_forward, intervention_logits, run_modes

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.q, self.k, self.v = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c, c // 2, 1), nn.Conv2d(c, c, 1)

        def forward(self, x, *, shift):
            B, C, H, W = x.shape
            q, k = self.q(x).flatten(2).transpose(1, 2), self.k(x).flatten(2)
            a = torch.softmax(q @ k, -1)  # (B, N, N)
            out = (self.v(x).flatten(2) @ a.transpose(1, 2)).reshape(B, C, H, W)
            return x + 0.5 * out + shift

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block, self.head = nn.Conv2d(3, 8, 4, 4), Block(8), nn.Linear(8, 3)

        def forward(self, x):
            h = self.stem(x)
            return self.head(self.block(h, shift=x.mean((1, 2, 3), keepdim=True)).mean((2, 3)))

    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(2, 3, 16, 16)
    blocks = find_blocks(net, example=x[:1])
    assert [b[0] for b in blocks] == ["block"]
    runs = run_modes(["block"])
    logits, seen = branched_forward(net, x, blocks, runs)
    assert net not in _UNBRANCHED and seen["block"].input.shape == (2, 8, 4, 4)
    with torch.no_grad():
        want = {"baseline": net(x)} | intervention_logits(net, x, runs)
    assert set(logits) == set(want)
    for run, out in want.items():
        torch.testing.assert_close(logits[run], out, rtol=1e-5, atol=1e-6)
