"""Vision transformers found by what they compute: each block's rows against the model's own attention weights, the
prefix tokens (class, distillation, registers) told apart from the patches by the model's code, not by its name."""

from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

from vggattn.attention.adapters import TracedAdapter, find_blocks, locate_tokens  # noqa: E402
from vggattn.attention.trace import token_places, watch  # noqa: E402
from vggattn.view.hover import pages  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"

MODELS = {  # name: (timm name, keyword arguments: small and random, prefix tokens, grid)
    "vit": ("vit_tiny_patch16_224", {"img_size": 64}, 1, (4, 4)),
    "deit distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 64}, 2, (4, 4)),
    "vit + 4 registers": ("vit_tiny_patch16_224", {"img_size": 64, "reg_tokens": 4}, 5, (4, 4)),
    "dinov2 (non-square)": ("vit_small_patch14_dinov2", {"img_size": (42, 70), "depth": 3}, 1, (3, 5)),
    "dinov2 + 4 registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 56, "depth": 3}, 5, (4, 4)),
    "beit (relative position bias)": ("beit_base_patch16_224", {"img_size": 64, "depth": 2, "embed_dim": 96,
                                                                "num_heads": 3}, 1, (4, 4)),
    "eva02 (rotary positions)": ("eva02_tiny_patch14_224", {"img_size": 56, "depth": 2}, 1, (4, 4)),
}


def own_attention(model, x):
    """{block name: the softmax weights (1, heads, T, T) the model's own (unfused) attention computed}."""
    got, handles = {}, []
    for name, m in model.named_modules():
        if name.endswith(".attn") and hasattr(m, "attn_drop"):
            m.fused_attn = False
            handles.append(m.attn_drop.register_forward_pre_hook(lambda mod, a, n=name: got.setdefault(n, a[0])))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return got


@pytest.mark.parametrize("case", list(MODELS))
def test_every_blocks_rows_are_the_models_own_attention(case):
    name, kw, prefix, grid = MODELS[case]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kw).eval()
    h, w = kw["img_size"] if isinstance(kw["img_size"], tuple) else (kw["img_size"],) * 2
    x = torch.randn(1, 3, h, w)
    blocks = find_blocks(model, example=x)
    assert [b[0] for b in blocks] == [f"blocks.{i}.attn" for i in range(len(model.blocks))]
    want = own_attention(model, x)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True  # found again through scaled_dot_product_attention: hooks see no weights there
    _, seen = watch(model, x, [b[0] for b in blocks], {b[0] for b in blocks})
    locate_tokens(model, x, blocks, {n: s.input for n, s in seen.items()})
    for bname, module, adapter in blocks:
        assert isinstance(adapter, TracedAdapter)
        maps = adapter.maps(module, seen[bname].input, seen[bname].events)
        assert maps.grid == grid and maps.key_grid == grid and maps.heads == module.num_heads
        a = want[bname][0]  # (heads, T, T): patches after the prefix, row-major
        rows = maps.rows()[0]  # (heads, N, M) on the grid
        torch.testing.assert_close(rows, a[:, prefix:, prefix:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps.padding[0], a[:, prefix:, :prefix].sum(-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps.prefix[0], a[:, prefix:, :prefix], rtol=1e-5, atol=1e-6)
        # the prefix tokens' own rows (the class token's over the patches: DINO's view), grid then prefix
        torch.testing.assert_close(maps.prefix_rows[0], torch.cat([a[:, :prefix, prefix:], a[:, :prefix, :prefix]], -1),
                                   rtol=1e-5, atol=1e-6)
        assert maps.prefix_names[0] == "cls_token" and len(maps.prefix_names) == prefix
        assert "prefix tokens" in maps.meaning
        if "bias" in case:  # relative positions add logits: no Q and K make its rows
            assert maps.tokens_qk is None
            continue
        # every row (patches', then the prefix tokens') from Q and K: softmax over the grid's keys, then the prefix's
        q, k = maps.tokens_qk
        full = torch.softmax(q[0].double() @ k[0].double().transpose(-1, -2), -1)
        order = torch.cat([torch.arange(prefix, a.shape[-1]), torch.arange(prefix)])
        torch.testing.assert_close(full.float(), a[:, order][:, :, order], rtol=1e-5, atol=1e-6)


def test_a_fused_attention_is_read_without_its_weights_and_its_sums_are_the_weights_own():
    """Where the block's attention is one fused call (scaled_dot_product_attention on the CPU), the forward keeps each
    row's log normaliser and no N x M weights: every row, the mean row over the patches, the page's log Z and its
    sink (the rows' sum over every query: a second fused call with queries and keys swapped) equal the model's own
    unfused weights."""
    from vggattn.view.hover import page_layer

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, depth=2).eval()
    x = torch.randn(1, 3, 56, 56)
    blocks = find_blocks(model, example=x)
    want = own_attention(model, x)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    _, seen = watch(model, x, [b[0] for b in blocks], {b[0] for b in blocks})
    locate_tokens(model, x, blocks, {n: s.input for n, s in seen.items()})
    prefix = 5
    for name, module, adapter in blocks:
        event = seen[name].events[0]
        assert event.held is None and event.lse is not None  # no weights were made by the forward
        maps = adapter.maps(module, seen[name].input, seen[name].events)
        assert maps.lean and maps.weights is None
        a = want[name][0].double()  # (heads, T, T): the prefix first, then the patches
        torch.testing.assert_close(maps.rows()[0].double(), a[:, prefix:, prefix:], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(maps.mean_row()[0, :, 0].double(), a[:, prefix:, prefix:].mean(1), rtol=1e-5,
                                   atol=1e-7)
        torch.testing.assert_close(maps.prefix[0].double(), a[:, prefix:, :prefix], rtol=1e-5, atol=1e-7)
        layer = page_layer(name, maps)
        order = torch.cat([torch.arange(prefix, a.shape[-1]), torch.arange(prefix)])  # the page's: grid, then prefix
        logits = (torch.as_tensor(layer.q).double() @ torch.as_tensor(layer.k).double().transpose(-1, -2))
        torch.testing.assert_close(torch.as_tensor(layer.logz), torch.logsumexp(logits, -1), rtol=1e-6, atol=1e-5)
        mean = a[:, order][:, :, order].mean(1).mean(0)[:16]  # every query's and head's share of each patch
        assert layer.sink[0] == int(mean.argmax()) and abs(layer.sink[1] - float(mean.max())) < 1e-6
        torch.testing.assert_close(event.weights.double(), a[None], rtol=1e-5, atol=1e-7)  # made when asked for


def test_token_places_are_the_patch_centres_and_no_place_for_the_prefix():
    """The class token and registers are made from parameters: no place; a patch token sits inside its patch
    (its place read from the tangents through the patch embedding, random weights) in every block."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(48, 64), reg_tokens=3).eval()
    places = token_places(model, torch.randn(1, 3, 48, 64), ["blocks.0.attn", "blocks.11.attn"])
    for p in places.values():
        assert p.prefix == [0, 1, 2, 3] and p.hw == (48, 64)
        ys, xs = p.positions.y[4:].reshape(3, 4), p.positions.x[4:].reshape(3, 4)
        cy, cx = torch.arange(3)[:, None] * 16 + 7.5, torch.arange(4)[None] * 16 + 7.5
        assert float((ys - cy).abs().max()) < 8 and float((xs - cx).abs().max()) < 8


def test_explain_writes_the_prefix_tokens_weights_by_name(tmp_path):
    """vggattn-explain on a ViT with registers (random weights): each point's row per block on the grid and its
    weight on the class token and each register by name, which with the grid's weights make the whole row."""
    import json

    import numpy as np
    from PIL import Image

    from vggattn.analysis import analyze
    from vggattn.models.byo import describe
    from vggattn.view.export import point_readouts

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, reg_tokens=2, num_classes=3,
                              depth=2).eval()
    meta = describe("timm:vit_tiny_patch16_224", 64, ["a", "b", "c"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    result = analyze(model, meta, image)
    readouts = point_readouts(result, (40.0, 10.0))
    want = own_attention(model, result.input)
    for block in result.blocks:
        r = readouts[block.name]
        assert list(r["prefix"]) == ["cls_token", "reg_token[0]", "reg_token[1]"]
        q = block.query_index((40.0, 10.0))
        a = want[block.name][0].double().mean(0)  # (T, T), mean of heads
        np.testing.assert_allclose(list(r["prefix"].values()), a[3 + q, :3].numpy(), rtol=1e-5, atol=1e-7)
        assert r["prefix_share"] + float(a[3 + q, 3:].sum()) == pytest.approx(1.0, abs=1e-5)
    json.dumps(readouts)  # plain numbers


HF = {  # transformers' models (random, small), attention through scaled_dot_product_attention
    "hf vit": ("ViTConfig", "ViTForImageClassification", {}, 1),
    "hf dinov2 + 4 registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersForImageClassification",
                                {"num_register_tokens": 4}, 5),
}


class Logits(torch.nn.Module):
    """A transformers classifier as a model of images -> logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


@pytest.mark.parametrize("case", list(HF))
def test_transformers_vits_under_sdpa_give_their_own_attention(case):
    """transformers returns no attentions under SDPA; the rows come from the computation all the same, and equal
    the eager implementation's returned attentions (same weights) for every layer, with the prefix by name."""
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, kw, prefix = HF[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=128, image_size=56, patch_size=14, num_labels=3, **kw)
    config._attn_implementation = "eager"
    eager = getattr(transformers, model_cls)(config).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        want = eager(pixel_values=x, output_attentions=True).attentions  # per layer (1, heads, T, T)
    eager.config._attn_implementation = "sdpa"
    model = Logits(eager)
    blocks = find_blocks(model, example=x)
    assert len(blocks) == 2 and all(isinstance(a, TracedAdapter) for *_, a in blocks)
    _, seen = watch(model, x, [b[0] for b in blocks], {b[0] for b in blocks})
    assert all(ev.kind == "sdpa" for b in blocks for ev in seen[b[0]].events)
    locate_tokens(model, x, blocks, {n: s.input for n, s in seen.items()})
    for (bname, module, adapter), a in zip(blocks, want):
        maps = adapter.maps(module, seen[bname].input, seen[bname].events)
        assert maps.grid == (4, 4) and maps.heads == 4
        torch.testing.assert_close(maps.rows()[0], a[0][:, prefix:, prefix:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps.prefix[0], a[0][:, prefix:, :prefix], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps.prefix_rows[0][..., :16], a[0][:, :prefix, prefix:], rtol=1e-5, atol=1e-6)
        assert maps.prefix_names[0].endswith("cls_token")
        if prefix > 1:
            assert maps.prefix_names[1:] == [f"{maps.prefix_names[1].split('[')[0]}[{i}]" for i in range(prefix - 1)]


def test_explain_on_a_saved_transformers_model_and_one_sentence_for_an_unreachable_hub(tmp_path, monkeypatch):
    """`vggattn-explain --hf FOLDER` (a DINOv2 with registers saved with save_pretrained, random weights): every
    layer's rows on the patch grid and each point's weights on the class token and the registers by name; a Hub id
    while the Hub is unreachable is one sentence."""
    import json

    transformers = pytest.importorskip("transformers")
    from vggattn import explain
    from vggattn.models.checkpoint import CheckpointError
    from vggattn.models.byo import load_hf

    torch.manual_seed(0)
    config = transformers.Dinov2WithRegistersConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=128, image_size=56, patch_size=14,
                                                    num_register_tokens=4, num_labels=3,
                                                    id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    transformers.Dinov2WithRegistersForImageClassification(config).save_pretrained(tmp_path / "dino")
    image = ASSETS / "church.jpg"
    assert explain.main([str(image), "--hf", str(tmp_path / "dino"), "--out", str(tmp_path / "out"),
                         "--no-ablation"]) == 0
    folder = next((tmp_path / "out").glob("*/result.json")).parent
    result = json.loads((folder / "result.json").read_text())
    assert [b["grid"] for b in result["layers"]] == [[4, 4], [4, 4]]
    for layer in result["layers"]:  # the class token's and each register's own row: DINO's view of the image
        rows = layer["prefix_rows"]
        assert len(rows) == 5 and all(0 < r["share_on_patches"] < 1 for r in rows.values())
        assert all(abs(r["share_on_patches"] + sum(r["on_prefix"].values()) - 1) < 1e-5 for r in rows.values())
    cls_rows = __import__("numpy").load(folder / f"{result['layers'][0]['name']}_prefix_rows.npy")
    assert cls_rows.shape == (5, 4, 4)
    from PIL import Image
    assert Image.open(folder / "figure.png").size[1] == 320 * 3  # the point, the predictions and mean maps, the class token (no empty Grad-CAM row)
    for readouts in result["points"][0]["layers"].values():
        names = list(readouts["prefix"])
        assert names[0].endswith("cls_token") and [n.split(".")[-1] for n in names[1:]] == \
            [f"register_tokens[{i}]" for i in range(4)]
        assert 0 < readouts["prefix_share"] < 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not reachable from here"):
        load_hf("facebook/dinov2-with-registers-small")


def test_timm_at_another_input_size_offline(tmp_path, monkeypatch):
    """`--timm NAME --input-size S` with the hub unreachable: random weights with the warning, the transformer built
    for S (DINOv2 is made for 518 px; at 56 px its grid is 4x4), explain runs on it and names its registers."""
    import json

    from vggattn import explain
    from vggattn.models.byo import load_timm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, meta = load_timm("vit_small_patch14_reg4_dinov2", input_size=56)
    assert meta["input_size"] == 56 and meta["weights"] == "random" and "random weights" in meta["warning"]
    assert explain.main([str(ASSETS / "church.jpg"), "--timm", "vit_small_patch14_reg4_dinov2", "--input-size", "56",
                         "--out", str(tmp_path), "--no-ablation", "--layers", "blocks.0.attn", "blocks.11.attn"]) == 0
    result = json.loads((tmp_path / "church" / "result.json").read_text())
    assert [b["grid"] for b in result["layers"]] == [[4, 4], [4, 4]]
    assert len(result["layers"][0]["prefix_rows"]) == 5


def test_swin_rows_are_its_window_attention_with_the_shift_undone():
    """Swin's blocks take (B, H, W, C) grids (channels last), shift them cyclically and attend within windows: read
    from the computation, each query's row lies on the key cells of its (shifted) window in the image's own
    coordinates, and equals the model's own window attention weights, for plain and shifted blocks."""
    from timm.models.swin_transformer import window_partition

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, window_size=7,
                              depths=(2, 2, 2, 2), num_classes=3).eval()
    x = torch.randn(1, 3, 56, 56)
    blocks = find_blocks(model, example=x)
    names = [b[0] for b in blocks]
    assert names[:2] == ["layers.0.blocks.0", "layers.0.blocks.1"]
    want = {}
    for name, module, _ in blocks[:2]:  # the first stage: 14x14 tokens, 7x7 windows, shift 0 then 3
        module.attn.fused_attn = False
        module.attn.attn_drop.register_forward_pre_hook(lambda m, a, n=name: want.setdefault(n, a[0]))
    _, seen = watch(model, x, names[:2], set(names[:2]))
    for name, module, adapter in blocks[:2]:
        maps = adapter.maps(module, seen[name].input, seen[name].events)
        assert maps.grid == (14, 14) and maps.heads == module.attn.num_heads
        shift = module.shift_size
        cells = torch.arange(196).reshape(1, 14, 14, 1)
        cells = torch.roll(cells, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        cells = window_partition(cells, (7, 7)).reshape(-1, 49)  # (windows, 49): each window's cells in order
        expect = torch.zeros(module.attn.num_heads, 196, 196)
        a = want[name]  # (windows, heads, 49, 49)
        for w in range(cells.shape[0]):
            expect[:, cells[w][:, None], cells[w][None, :]] = a[w]
        torch.testing.assert_close(maps.rows()[0], expect, rtol=1e-5, atol=1e-6)
    assert any(blocks[1][1].shift_size)  # the second block is the shifted one


def test_maxvit_block_and_grid_rows_lie_where_their_windows_and_grid_cells_are():
    """MaxViT attends within windows (block) and within strided grid cells (grid), each stacked on the batch axis
    inside its block: found at the block that takes the image's grid, each query's row lies on the cells of its own
    window or grid cell in the image, and equals the model's own attention, at every stage."""
    from timm.models.maxxvit import grid_partition, window_partition

    torch.manual_seed(0)
    model = timm.create_model("maxvit_nano_rw_256", pretrained=False, img_size=64, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    blocks = find_blocks(model, example=x)
    names = [b[0] for b in blocks]
    assert len(names) == 14 and names[:2] == ["stages.0.blocks.0.attn_block", "stages.0.blocks.0.attn_grid"]
    want = {}
    for name, module, _ in blocks:
        attn = module.attn if hasattr(module, "partition_block") else module
        attn.fused_attn = False
        attn.attn_drop.register_forward_pre_hook(lambda m, a, n=name: want.setdefault(n, a[0]))
    _, seen = watch(model, x, names, set(names))
    for name, module, adapter in blocks:
        maps = adapter.maps(module, seen[name].input, seen[name].events)
        h, w = maps.grid
        cells = torch.arange(h * w).reshape(1, h, w, 1)
        if hasattr(module, "partition_block"):  # stage 3's window is its whole 2x2 grid: found at the attention
            part = window_partition if module.partition_block else grid_partition
            cells = part(cells, module.partition_size)
        cells = cells.reshape(want[name].shape[0], -1)  # (windows or grid cells, their cells in order)
        expect = torch.zeros(maps.heads, h * w, h * w)
        for i in range(cells.shape[0]):
            expect[:, cells[i][:, None], cells[i][None, :]] = want[name][i]
        torch.testing.assert_close(maps.rows()[0], expect, rtol=1e-5, atol=1e-6)


def test_the_apps_readouts_give_a_pinned_points_weights_on_the_prefix_tokens():
    """The app on a ViT with registers (random weights): a pinned point's readouts give its row's share on the
    prefix tokens and each one's weight by name (the model's own attention), not "not a distribution"."""
    import os
    import re

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from vggattn import app
    from vggattn.models.byo import describe

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, reg_tokens=2, depth=2,
                              num_classes=3).eval()
    meta = describe("timm:vit_tiny_patch16_224", 64, ["a", "b", "c"])
    ui = app.build_demo(model, meta).ui
    state = app.on_image(ui, model, meta, str(ASSETS / "church.jpg"))[ui.state]
    table = app.on_point(ui, state, 100, 30)[ui.readouts]
    want = own_attention(model, state.result.input)
    for layer in state.layers:
        line = next(x for x in table.splitlines() if x.startswith(f"| `{layer.name}`"))
        assert "not a distribution" not in line
        q = state.result.blocks[0].query_index((100, 30))
        a = want[layer.name][0].double().mean(0)[3 + q, :3]  # mean of heads: cls, reg 0, reg 1
        shown = [float(v) for v in re.findall(r"(?:cls_token|reg_token\[\d\]) ([0-9.]+)", line)]
        assert shown == pytest.approx(a.tolist(), abs=6e-4)  # three decimals
        assert f"{float(a.sum()):.0%} of the row on the prefix tokens" in line


def test_a_backbone_with_no_classifier_gets_the_attention_study_without_interventions(tmp_path, monkeypatch):
    """vggattn-study on timm's DINOv2 with registers (no classifier head, so no class names; random weights, offline,
    56 px): it runs, each layer has the patches' share on the class token and the registers and the token norms,
    and there is no top-1 and no intervention; the report and the app's markdown say why."""
    import json

    from conftest import noise_folder


    from vggattn import study
    from vggattn.study.report import NOT_SCORED, summary_markdown

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as here and in CI: random weights, nothing fetched
    noise_folder(tmp_path / "data")
    out = tmp_path / "study"
    assert study.main(["--timm", "vit_small_patch14_reg4_dinov2", "--input-size", "56", "--data", str(tmp_path / "data"),
                       "--out", str(out), "--workers", "0", "--sanity-images", "0", "--faithfulness-images", "0",
                       "--bootstrap", "50", "--layers", "blocks.0.attn", "blocks.11.attn"]) == 0
    s = json.loads((out / "study.json").read_text())
    assert s["scored"] is False and s["interventions"] == {} and s["class_names"] == ["a", "b"]
    for layer in s["layers"].values():
        assert layer["prefix"]["tokens"] == ["cls_token", *[f"reg_token[{i}]" for i in range(4)]]
        assert 0 < layer["prefix"]["total"] < 1 and layer["norms"]["max_over_median"] > 0
    assert NOT_SCORED in (out / "report.html").read_text() and NOT_SCORED in summary_markdown(s)


def test_the_study_gives_each_layers_share_on_the_class_token_and_registers(tmp_path):
    """run_study on a ViT with registers (random weights, six random images): per layer, the patches' mean weight on
    each prefix token by name, equal to the mean over images, heads and patch queries of the model's own attention,
    with CIs; the report's headline says it in words."""
    import numpy as np
    from PIL import Image

    from vggattn import study
    from vggattn.models.byo import describe
    from vggattn.study.report import headline

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, reg_tokens=2, depth=2,
                              num_classes=2).eval()
    meta = describe("timm:vit_tiny_patch16_224", 64, ["a", "b"])
    s = study.run_study(model, meta, tmp_path / "data", batch_size=4, workers=0, sanity_images=0, n_boot=50,
                        progress=False, faithfulness_images=0)
    from vggattn.data import eval_transform
    images = [eval_transform(meta)(Image.open(p).convert("RGB")) for p in sorted((tmp_path / "data").rglob("*.png"))]
    want, sinks = {n: [] for n in s["layers"]}, {n: [] for n in s["layers"]}
    for x in images:
        for n, a in own_attention(model, x[None]).items():
            want[n].append(a[0, :, 3:, :3].double().mean((0, 1)))  # heads and patch queries: (3,)
            sinks[n].append(float(a[0, :, 3:, 3:].double().mean((0, 1)).max()))  # the top patch's share of all
    for name, layer in s["layers"].items():
        p = layer["prefix"]
        assert p["tokens"] == ["cls_token", "reg_token[0]", "reg_token[1]"]
        expect = torch.stack(want[name]).mean(0)
        assert list(p["share"].values()) == pytest.approx(expect.tolist(), abs=1e-6)
        assert p["total"] == pytest.approx(float(expect.sum()), abs=1e-6)
        assert layer["sink_mass"] == pytest.approx(float(np.mean(sinks[name])), abs=1e-6)  # not renormalised
        assert all(lo <= p["share"][t] <= hi for t, (lo, hi) in p["share_ci95"].items())
        assert len(p["per_head"]["cls_token"]) == 3
    assert all("of their attention to the prefix tokens (cls_token" in line for line in headline(s))
    streams = {}  # the residual stream entering each block, per image, by hand
    hooks = [b.register_forward_pre_hook(lambda m, args, i=i: streams.setdefault(i, []).append(args[0][0].norm(dim=-1)))
             for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        for x in images:
            model(x[None])
    for h in hooks:
        h.remove()
    for i, (name, layer) in enumerate(s["layers"].items()):
        ratios = [(t / t[3:].median()).double() for t in streams[i]]  # tokens [cls, reg0, reg1, patches...]
        norms = layer["norms"]
        assert norms["max_over_median"] == pytest.approx(float(np.median([float(r[3:].max()) for r in ratios])), rel=1e-6)
        assert norms["prefix_over_median"]["cls_token"] == pytest.approx(float(np.median([float(r[0]) for r in ratios])),
                                                                          rel=1e-6)
        assert norms["high_norm_per_image"] == pytest.approx(np.mean([int((r[3:] > 4).sum()) for r in ratios]))
        own = layer["prefix_own"]
        assert list(own) == p["tokens"] and all(0 < v["on_patches"] < 1 and 0 < v["patch_entropy"] <= 1 for v in own.values())
    for run in ("all:no_registers", "all:cls_mean"):  # the registers removed as keys, the class row made the mean
        r = s["interventions"][run]
        lo, hi = r["top1_delta_ci95"]
        assert lo <= r["top1_delta"] <= hi
    from vggattn.study.report import write_study
    write_study(s, tmp_path / "out")  # the report and its figures, with the token interventions
    html = (tmp_path / "out" / "report.html").read_text()
    assert "all:no_registers (no token attends to the registers" in html and "high-norm patch entering it" in html


def test_explain_gives_the_norms_of_the_tokens_entering_each_block_and_flags_high_norm_patches():
    """Per transformer block, result.json holds the norm of each prefix token and the median and largest patch norm
    of the block's input, and lists the patches over 4x the median (Darcet et al.'s high-norm tokens): one patch
    token made large by hand is the one flagged."""
    import numpy as np
    from PIL import Image

    from vggattn.analysis import analyze
    from vggattn.models.byo import describe
    from vggattn.view.export import summarize

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, reg_tokens=2, depth=2,
                              num_classes=3).eval()
    meta = describe("timm:vit_tiny_patch16_224", 64, ["a", "b", "c"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))

    def loud(module, args):  # the patch at (1, 2) (token 3 + 6) enters block 1 ten times as large
        x = args[0].clone()
        x[:, 3 + 6] *= 10
        return (x,)

    handle = model.blocks[1].register_forward_pre_hook(loud)
    try:
        result = analyze(model, meta, image)
    finally:
        handle.remove()
    layers = {entry["name"]: entry for entry in summarize(result, [(10.0, 10.0)])["layers"]}
    for block in result.blocks:  # the norms are those of the tokens entering the block's attention
        norms = layers[block.name]["token_norms"]
        assert list(norms["prefix"]) == ["cls_token", "reg_token[0]", "reg_token[1]"]
        assert norms["patch_max"] >= norms["patch_median"] > 0
    assert layers["blocks.1.attn"]["token_norms"]["high_norm_patches"] == [[1, 2]]
    assert layers["blocks.0.attn"]["token_norms"]["high_norm_patches"] == []


@pytest.mark.parametrize("case", ["vit + 4 registers", "beit (relative position bias)"])
def test_the_pages_rows_of_patches_and_prefix_tokens_are_the_models_own(case):
    """What the page gets for a transformer: every patch's row over the grid and the prefix tokens (not
    renormalised), and each prefix token's own row, from Q and K (ViT) or as rows (BEiT's position bias), through
    the payload's bytes; equal to the model's own attention, mean of heads and per head."""
    import numpy as np
    from PIL import Image

    from vggattn.analysis import analyze
    from vggattn.models.byo import describe
    from vggattn.view.hover import PageLayer, decode, page_payload

    name, kw, prefix, grid = MODELS[case]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, **kw).eval()
    meta = describe(f"timm:{name}", kw["img_size"], ["a", "b", "c"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    result = analyze(model, meta, image)
    want = own_attention(model, result.input)
    stream_norms, hooks = {}, []  # the residual stream entering each block, by hand
    def keep(i):
        def hook(module, args):
            stream_norms.setdefault(f"blocks.{i}.attn", args[0][0].norm(dim=-1).numpy())
        return hook
    for i, b in enumerate(model.blocks):
        hooks.append(b.register_forward_pre_hook(keep(i)))
    with torch.no_grad():
        model(result.input)
    for h in hooks:
        h.remove()
    layers = pages(result)
    payload = page_payload(result, layers)
    n = grid[0] * grid[1]
    order = torch.cat([torch.arange(prefix, n + prefix), torch.arange(prefix)])  # the page's: grid, then prefix
    rolled = None
    for block, layer, sent in zip(result.blocks, layers, payload["layers"]):
        assert layer.kind == ("rows" if "bias" in case else "qk") and layer.tokens == prefix
        assert sent["prefix"][0] == "cls_token"
        a = want[block.name][0].double()[:, order][:, :, order]  # (heads, T, T) in the page's order
        back = PageLayer(layer.name, "", "", layer.grid, layer.key_grid, layer.heads, layer.kind, layer.normalise,
                         layer.scale, prefix_names=sent["prefix"])  # decoded from the payload's bytes
        if layer.kind == "qk":
            back.q, back.k = decode(sent, "q"), decode(sent, "k")
        else:
            back.rows_, back.prefix, back.prefix_rows = decode(sent, "rows"), decode(sent, "prefix_w"), \
                decode(sent, "prefix_rows")
        for i in (0, n - 1, n, n + prefix - 1):  # patches, the class token, the last register
            for head in (None, 1):
                expect = a.mean(0)[i] if head is None else a[head, i]
                np.testing.assert_allclose(back.full_row(i, head), expect.numpy(), rtol=1e-5, atol=1e-7)
                np.testing.assert_allclose(back.row(i, head), expect[:n].numpy(), rtol=1e-5, atol=1e-7)
        if "bias" not in case:  # the token norms entering the block, in the page's order: the grid's, then the prefix
            np.testing.assert_allclose(layer.norms, stream_norms[block.name][order.numpy()], rtol=1e-5)
            assert decode(sent, "norms", "float32").shape == (n + prefix,)
        if "bias" not in case:  # attention rollout (Abnar and Zuidema): (A + I) / 2 renormalised, multiplied up
            step = 0.5 * a.mean(0) + 0.5 * torch.eye(a.shape[-1], dtype=torch.float64)
            step = step / step.sum(-1, keepdim=True)
            rolled = step if rolled is None else step @ rolled
            np.testing.assert_allclose(layer.rollout, rolled.numpy(), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(decode(sent, "rollout", "float16"), rolled.numpy(), atol=1e-3)  # as sent
        weights = back.prefix_weights(3)
        assert list(weights)[0] == "cls_token"
        np.testing.assert_allclose(list(weights.values()), a.mean(0)[3, n:].numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["no_registers", "cls_mean"])
def test_token_interventions_equal_the_model_with_its_attention_changed_by_hand(mode):
    """Intervention(model, {every block: mode}) on a ViT with 2 registers (random weights): the logits equal the
    model's own forward with its attention changed in its own code (a hook on attn_drop): the registers' weights
    zeroed and each row renormalised, or the class token's row replaced by the mean of the patches' rows."""
    from vggattn.attention.adapters import Intervention, token_modes

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, reg_tokens=2, depth=3,
                              num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    blocks = find_blocks(model, example=x[:1])
    assert token_modes(blocks) == ["no_registers", "cls_mean"]
    with Intervention(model, {name: mode for name, *_ in blocks}), torch.no_grad():
        got = model(x)

    def by_hand(module, args, a):  # a: (B, heads, T, T), tokens [cls, reg0, reg1, patches...]
        a = a.clone()
        if mode == "no_registers":
            a[..., 1:3] = 0
            return a / a.sum(-1, keepdim=True)
        a[:, :, 0] = a[:, :, 3:].mean(-2)
        return a
    handles = []
    for name, m in model.named_modules():
        if name.endswith(".attn"):
            m.fused_attn = False
            handles.append(m.attn_drop.register_forward_hook(by_hand))
    with torch.no_grad():
        want, plain = model(x), None
    for h in handles:
        h.remove()
    with torch.no_grad():
        plain = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float((got - plain).abs().max()) > 1e-3  # the intervention changed the output


def test_hybrids_coatnet_and_cait_class_attention_are_their_own_attention():
    """CoAtNet's `Attention2d` (NCHW grids, relative position bias; the first block of a stage at its input width)
    and CaiT's `ClassAttn` (one query: the class token, over the patches and itself): rows equal the models' own
    attention (random weights, every block found). CaiT's talking-heads blocks are skipped with their reason."""
    torch.manual_seed(0)
    for name, kw in (("coatnet_nano_rw_224", {"img_size": 64}), ("cait_xxs24_224", {"img_size": 64, "depth": 2})):
        model = timm.create_model(name, pretrained=False, num_classes=5, **kw).eval()
        x = torch.randn(1, 3, 64, 64)
        blocks = find_blocks(model, example=x)
        want = own_attention(model, x)
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = True  # read again through scaled_dot_product_attention (with its bias as a mask)
        _, seen = watch(model, x, [b[0] for b in blocks], {b[0] for b in blocks})
        locate_tokens(model, x, blocks, {n: s.input for n, s in seen.items()})
        assert len(blocks) == (9 if name.startswith("coatnet") else 2)
        for bname, module, adapter in blocks:
            maps = adapter.maps(module, seen[bname].input, seen[bname].events)
            a = want[bname][0]  # (heads, queries, keys)
            if name.startswith("coatnet"):
                torch.testing.assert_close(maps.rows()[0], a, rtol=1e-5, atol=1e-6)
            else:  # the class token's one row: on the 4x4 patches, and on itself
                assert maps.per_image and maps.prefix_names == ["cls_token"]
                torch.testing.assert_close(maps.rows()[0], a[:, :, 1:], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(maps.prefix[0], a[:, :, :1], rtol=1e-5, atol=1e-6)


def test_the_registers_ab_compares_two_studies_image_by_image(tmp_path, capsys):
    """scripts/ab_registers.py on the studies of a ViT without and with registers (random weights, six random
    images): top-1 of each, and per layer the sink mass and the share on the prefix tokens, with the paired
    difference and its CI; the registered model's token interventions listed."""
    import importlib.util
    import json

    import numpy as np
    from PIL import Image

    from vggattn import study
    from vggattn.models.byo import describe

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    records = {}
    for arm, regs, scope in (("plain", 0, "none"), ("reg", 2, "all")):  # --interventions none and all
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, reg_tokens=regs, depth=2,
                                  num_classes=2).eval()
        meta = describe("timm:vit_tiny_patch16_224", 48, ["a", "b"])
        recs = study.Records(tmp_path / arm / "records")
        s = study.run_study(model, meta, tmp_path / "data", batch_size=3, workers=0, sanity_images=0, n_boot=50,
                            progress=False, faithfulness_images=0, records=recs, interventions=scope)
        (tmp_path / arm / "study.json").write_text(json.dumps(s))
        assert list(s["interventions"]) == ["baseline"] + ([] if scope == "none" else
                                                          [f"all:{m}" for m in ("off", "mean", "uniform",
                                                                                "no_registers", "cls_mean")])
        study.report.write_study(s, tmp_path / arm / "out")  # the report with no or few runs
        records[arm] = recs.load()
    spec = importlib.util.spec_from_file_location("ab_registers", Path(__file__).resolve().parents[1] / "scripts" /
                                                  "ab_registers.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    assert ab.main([str(tmp_path / "plain"), str(tmp_path / "reg")]) == 0
    out = capsys.readouterr().out
    a, b = records["plain"], records["reg"]
    assert f"| val top-1 | {100 * a['top1:baseline'].mean():.2f}% | {100 * b['top1:baseline'].mean():.2f}% |" in out
    for name in ("blocks.0.attn", "blocks.1.attn"):
        d = b[f"{name}:sink_mass"].mean() - a[f"{name}:sink_mass"].mean()
        assert f"| `{name}` sink mass (most attended patch's share) | {a[f'{name}:sink_mass'].mean():.3f} | " \
               f"{b[f'{name}:sink_mass'].mean():.3f} | {d:+.3f} [" in out
    assert "B under `all:no_registers`" in out and "B under `all:cls_mean`" in out


def test_pvt_v2_keys_sit_on_the_spatially_reduced_grid_and_rows_are_its_own():
    """timm's PVT-v2 reduces its keys with a strided conv (the attention SegFormer shares): each reduced key sits at
    the centre of the cells it pools (a coarser key grid), and every stage's rows equal the model's own attention."""
    import copy

    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    blocks = find_blocks(model, example=x)
    names = [b[0] for b in blocks]
    assert len(names) == 8
    want = own_attention(copy.deepcopy(model), x)  # unfused, on a copy: the model read below stays fused
    _, seen = watch(model, x, names, set(names))
    grids = []
    for name, module, adapter in blocks:
        maps = adapter.maps(module, seen[name].input, seen[name].events, seen[name].call)
        grids.append((maps.grid, maps.key_grid))
        torch.testing.assert_close(maps.rows()[0], want[name][0], rtol=1e-5, atol=1e-6)
    assert grids[0] == ((16, 16), (2, 2)) and grids[2] == ((8, 8), (2, 2)) and grids[-1] == ((2, 2), (2, 2))
