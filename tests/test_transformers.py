"""transformers' vision models read by what they compute, each against the library's own eager attention (the
`attentions` it returns with output_attentions=True) with the same weights on the same input: every layer's rows on
the image's grid, the weights on tokens with no place (class, distillation, registers, YOLOS' detection tokens) by
name, keys on a reduced grid (SegFormer, PVTv2), shifted windows (Swin), and DETR's encoder over its backbone's grid.
Random small configs, read under SDPA where the model offers it."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vggattn.attention.adapters import find_blocks, locate_tokens  # noqa: E402
from vggattn.attention.trace import watch  # noqa: E402
from vggattn.models.output import image_model  # noqa: E402

T = transformers
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56,
           patch_size=14)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
PYRAMID = dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
               strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], num_labels=3)
SWIN = dict(image_size=56, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=7, num_labels=3)


def resnet():
    return T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1],
                          out_features=["stage4"])


def detr(config_cls, model_cls):
    return model_cls, lambda: getattr(T, config_cls)(
        use_timm_backbone=False, backbone_config=resnet(), use_pretrained_backbone=False, d_model=32,
        encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, num_queries=5)


# name: ((model class, config), input size, tokens with no place: (their indices among the tokens, their names' last
# parts))
CASES = {
    "vit": (("ViTForImageClassification", lambda: T.ViTConfig(**VIT, num_labels=3)), 56, ([0], ["cls_token"])),
    "deit distilled": (("DeiTForImageClassificationWithTeacher", lambda: T.DeiTConfig(**VIT, num_labels=3)), 56,
                       ([0, 1], ["cls_token", "distillation_token"])),
    "beit": (("BeitForImageClassification", lambda: T.BeitConfig(**VIT, num_labels=3, use_relative_position_bias=True)),
             56, ([0], ["cls_token"])),
    "data2vec-vision": (("Data2VecVisionForImageClassification", lambda: T.Data2VecVisionConfig(
        **VIT, num_labels=3, use_relative_position_bias=True)), 56, ([0], ["cls_token"])),
    "dinov2 backbone": (("Dinov2Model", lambda: T.Dinov2Config(**VIT)), 56, ([0], ["cls_token"])),
    "dinov2 + registers": (("Dinov2WithRegistersForImageClassification", lambda: T.Dinov2WithRegistersConfig(
        **VIT, num_labels=3, num_register_tokens=2)), 56,
        ([0, 1, 2], ["cls_token", "register_tokens[0]", "register_tokens[1]"])),
    "clip classifier": (("CLIPForImageClassification", lambda: T.CLIPConfig(vision_config=VIT, text_config=TEXT,
                                                                           num_labels=3)), 56, ([0], ["class_embedding"])),
    "clip vision model": (("CLIPVisionModel", lambda: T.CLIPVisionConfig(**VIT)), 56, ([0], ["class_embedding"])),
    "siglip vision model": (("SiglipVisionModel", lambda: T.SiglipVisionConfig(**VIT)), 56, ([], [])),
    "yolos (detection tokens after the patches)": (("YolosForObjectDetection", lambda: T.YolosConfig(
        **{**VIT, "image_size": [56, 56]}, num_detection_tokens=3)), 56,
        ([0, 17, 18, 19], ["cls_token", "detection_tokens[0]", "detection_tokens[1]", "detection_tokens[2]"])),
    "segformer (keys on the reduced grid)": (("SegformerForImageClassification", lambda: T.SegformerConfig(**PYRAMID)),
                                             64, ([], [])),
    "pvtv2 (keys on the reduced grid)": (("PvtV2ForImageClassification", lambda: T.PvtV2Config(**PYRAMID)), 64,
                                         ([], [])),
    "detr encoder": (detr("DetrConfig", "DetrForObjectDetection"), 64, ([], [])),
    "conditional detr encoder": (detr("ConditionalDetrConfig", "ConditionalDetrForObjectDetection"), 64, ([], [])),
}


def build(spec, implementation: str, like=None):
    """The model class built from the config with that attention implementation (None where transformers offers
    none), with the weights of `like` when given."""
    model_cls, config = spec
    config = config()
    config._attn_implementation = implementation
    try:
        model = getattr(T, model_cls)(config).eval()
    except ValueError:  # e.g. no SDPA for this architecture
        return None
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model


def flat(attentions) -> list:
    return [t for a in attentions for t in (flat(a) if isinstance(a, (tuple, list)) else [a])]


def own_attentions(model, x):
    """The eager attentions the library returns, per layer (B, heads, queries, keys): the encoder's for DETR."""
    with torch.no_grad():
        out = model(pixel_values=x, output_attentions=True)
    return flat(out.encoder_attentions if getattr(out, "encoder_attentions", None) is not None else out.attentions)


def eager_and_read(spec, x):
    """(the eager attentions, vggattn's maps of every block found, in order) with the same weights, read from the
    model as fast as it runs (SDPA where transformers offers it, else eager)."""
    torch.manual_seed(0)
    eager = build(spec, "eager")
    want = own_attentions(eager, x)
    return want, read(build(spec, "sdpa", like=eager) or eager, x)


def read(model, x):
    """vggattn's maps of every block found, in order."""
    net = image_model(model)
    blocks = find_blocks(net, example=x)
    names = [b[0] for b in blocks]
    _, seen = watch(net, x, names, set(names))
    locate_tokens(net, x, blocks, {n: s.input for n, s in seen.items()})
    return [(name, adapter.maps(module, seen[name].input, seen[name].events, seen[name].call))
            for name, module, adapter in blocks]


@pytest.mark.parametrize("case", list(CASES))
def test_every_layers_rows_are_the_librarys_own_eager_attention(case):
    spec, size, (unplaced, names) = CASES[case]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    want, got = eager_and_read(spec, x)
    encoder = [(n, m) for n, m in got if ".decoder." not in n]
    assert len(encoder) == len(want), [n for n, _ in got]
    for (name, maps), a in zip(encoder, want):
        a = a[0]  # (heads, T, T_keys)
        placed = [i for i in range(a.shape[-2]) if i not in unplaced]
        kplaced = [i for i in range(a.shape[-1]) if i not in unplaced]
        assert maps.heads == a.shape[0] and maps.grid[0] * maps.grid[1] == len(placed), name
        torch.testing.assert_close(maps.rows()[0], a[:, placed][:, :, kplaced], rtol=1e-4, atol=1e-6)
        if unplaced:
            torch.testing.assert_close(maps.prefix[0], a[:, placed][:, :, unplaced], rtol=1e-4, atol=1e-6)
            assert [n.split(".")[-1] for n in maps.prefix_names] == names
        else:
            assert maps.prefix is None


@pytest.mark.parametrize("version", ["swin", "swinv2"])
def test_swin_rows_are_its_shifted_window_attention_on_the_images_cells(version):
    """transformers' Swin stacks windows on the batch axis inside each layer: found at the layer that takes the
    image's tokens, every query's row lies on the cells of its (shifted) window and equals the eager attention."""
    from transformers.models.swin.modeling_swin import window_partition

    config_cls, model_cls = {"swin": ("SwinConfig", "SwinForImageClassification"),
                             "swinv2": ("Swinv2Config", "Swinv2ForImageClassification")}[version]
    x = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    spec = (model_cls, lambda: getattr(T, config_cls)(**SWIN))
    torch.manual_seed(0)
    eager = build(spec, "eager")
    want = []  # per layer (windows, heads, 49, 49): each layer's own output with output_attentions
    hooks = [m.register_forward_hook(lambda mod, a, out: want.append(out[1]))
             for stage in getattr(eager, version).encoder.layers for m in stage.blocks]
    own_attentions(eager, x)
    for h in hooks:
        h.remove()
    got = read(build(spec, "sdpa", like=eager) or eager, x)
    layers = [m for stage in getattr(eager, version).encoder.layers for m in stage.blocks]
    assert len(got) == len(want) == len(layers), [n for n, _ in got]
    for (name, maps), a, layer in zip(got, want, layers):
        h, w = maps.grid
        assert maps.heads == a.shape[1], name
        cells = torch.arange(h * w).reshape(1, h, w, 1)
        shift = layer.shift_size
        if shift:
            cells = torch.roll(cells, shifts=(-shift, -shift), dims=(1, 2))
        cells = window_partition(cells, layer.window_size).reshape(a.shape[0], -1)  # each window's cells in order
        expect = torch.zeros(a.shape[1], h * w, h * w)
        for i in range(cells.shape[0]):
            expect[:, cells[i][:, None], cells[i][None, :]] = a[i]
        torch.testing.assert_close(maps.rows()[0], expect, rtol=1e-4, atol=1e-6)
    assert any(layer.shift_size for layer in layers)  # a shifted layer was among them


SAVED = {  # what people save and name with --hf: (model class, config, what the page shows, the output's field,
    # blocks)
    "segformer classifier": ("SegformerForImageClassification", lambda: T.SegformerConfig(**PYRAMID, image_size=64),
                             "its logits", "logits", 2),
    "pvtv2 (eager only)": ("PvtV2ForImageClassification", lambda: T.PvtV2Config(**PYRAMID, image_size=64),
                           "its logits", "logits", 2),
    "dinov2 backbone": ("Dinov2Model", lambda: T.Dinov2Config(**VIT), "its output", "pooler_output", 2),
    "clip dual model": ("CLIPModel", lambda: T.CLIPConfig(vision_config=VIT, text_config=TEXT),
                        "the vision tower's output", "pooler_output", 2),
    "detr detector": (*detr("DetrConfig", "DetrForObjectDetection"), "its output", "logits", 2),
}


@pytest.mark.parametrize("case", list(SAVED))
def test_a_saved_folder_loads_with_hf_and_every_layer_is_analysed(case, tmp_path):
    """`--hf FOLDER` as people save models: a classifier, a backbone, a dual image-text model (its vision tower), a
    detector, a model transformers offers no SDPA for (eager): loaded, every block found and analysed on a photo."""
    from PIL import Image

    from vggattn.analysis import analyze
    from vggattn.models.byo import blocks_of, load_hf

    model_cls, config, shows, field, count = SAVED[case]
    torch.manual_seed(0)
    getattr(T, model_cls)(config()).save_pretrained(tmp_path / "saved")
    model, meta = load_hf(str(tmp_path / "saved"))
    assert meta["shows"] == shows and (meta["class_names"] is not None) == (shows == "its logits")
    encoder = [n for n, *_ in blocks_of(model, meta) if ".decoder." not in n]
    assert len(encoder) == count, encoder
    image = Image.fromarray((torch.rand(48, 64, 3) * 255).byte().numpy())
    result = analyze(model, meta, image)
    assert [b.name for b in result.blocks][:count] == encoder and result.shows == field
    for block in result.blocks:
        rows = block.maps.rows()[0]
        assert torch.isfinite(rows).all() and rows.shape[-2] == block.maps.grid[0] * block.maps.grid[1]
    if meta["class_names"]:
        assert len(result.top_k()) == 3


def test_a_transformers_model_in_hand_is_read_through_its_output_object():
    """A transformers classifier in hand (its forward returns an ImageClassifierOutput): `in_hand` reads its logits
    and class names, keeps every block's own name, and `analyze` gives its top classes."""
    from PIL import Image

    from vggattn.analysis import analyze
    from vggattn.models.byo import in_hand

    torch.manual_seed(0)
    config = T.ViTConfig(**VIT, num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    vit = T.ViTForImageClassification(config).eval()
    model, meta = in_hand(vit)
    assert meta["input_size"] == 56 and meta["class_names"] == ["a", "b", "c"]
    assert dict(model.named_modules()).keys() - {""} == dict(vit.named_modules()).keys() - {""}
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(pixel_values=x).logits)
    result = analyze(model, meta, Image.new("RGB", (70, 56), "white"))
    assert set(result.top_k()) == {"a", "b", "c"} and len(result.blocks) == 2


def test_the_study_of_a_saved_transformers_backbone_takes_the_no_classifier_path(tmp_path):
    """vggattn-study --hf FOLDER on a saved Dinov2Model (no head): every layer's share on the class token and the
    registers, no top-1 and no interventions."""
    import json

    from conftest import noise_folder


    from vggattn import study

    torch.manual_seed(0)
    T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**VIT, num_register_tokens=2)).save_pretrained(
        tmp_path / "dino")
    noise_folder(tmp_path / "data")
    out = tmp_path / "study"
    assert study.main(["--hf", str(tmp_path / "dino"), "--data", str(tmp_path / "data"), "--out", str(out),
                       "--workers", "0", "--sanity-images", "0", "--faithfulness-images", "0", "--bootstrap", "50"]) == 0
    s = json.loads((out / "study.json").read_text())
    assert s["scored"] is False and s["interventions"] == {} and len(s["layers"]) == 2
    for layer in s["layers"].values():
        assert [t.split(".")[-1] for t in layer["prefix"]["tokens"]] == ["cls_token", "register_tokens[0]",
                                                                         "register_tokens[1]"]
        assert 0 < layer["prefix"]["total"] < 1


def test_a_model_in_hand_that_returns_a_dict_or_a_dataclass_is_read_through_it():
    """Any model whose forward returns a dict or a dataclass (not only transformers'): its logits stand for the
    output, and analyze gives its top classes and every block."""
    import dataclasses

    from PIL import Image

    from vggattn.analysis import analyze
    from vggattn.models.byo import in_hand

    @dataclasses.dataclass
    class Out:
        features: torch.Tensor
        logits: torch.Tensor

    class Net(torch.nn.Module):
        def __init__(self, as_dict):
            super().__init__()
            self.vit = T.ViTModel(T.ViTConfig(**VIT), add_pooling_layer=False)
            self.head, self.as_dict = torch.nn.Linear(32, 3), as_dict

        def forward(self, x):
            features = self.vit(pixel_values=x).last_hidden_state[:, 0]
            out = {"features": features, "logits": self.head(features)}
            return out if self.as_dict else Out(**out)

    for as_dict in (True, False):
        torch.manual_seed(0)
        net = Net(as_dict).eval()
        model, meta = in_hand(net, class_names=["a", "b", "c"], input_size=56)
        x = torch.randn(1, 3, 56, 56)
        with torch.no_grad():
            torch.testing.assert_close(model(x), net.head(net.vit(pixel_values=x).last_hidden_state[:, 0]))
        result = analyze(model, meta, Image.new("RGB", (56, 56), "gray"))
        assert set(result.top_k()) == {"a", "b", "c"} and len(result.blocks) == 2 and result.shows == "logits"


@pytest.mark.parametrize("case", ["segformer (keys on the reduced grid)", "detr encoder", "dinov2 + registers"])
def test_interventions_rerun_a_block_with_every_argument_it_was_given(case):
    """The app's ablation on blocks called with extra arguments (SegFormer's height and width, DETR's position
    embeddings by keyword): the block's own forward rebuilt from its rows gives its own output; "off" changes the
    model's output, and the model is as it was afterwards."""
    from vggattn.attention.adapters import Intervention

    spec, size, _ = CASES[case]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    net = image_model(build(spec, "sdpa") or build(spec, "eager"))
    blocks = find_blocks(net, example=x)
    name, module, adapter = blocks[0]
    _, seen = watch(net, x, [name])
    own = seen[name].output
    rebuilt = adapter.forward(module, seen[name].input, call=seen[name].call)
    first = lambda o: o if isinstance(o, torch.Tensor) else o[0]  # noqa: E731
    torch.testing.assert_close(first(rebuilt), first(own), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        base = net(x)
        with Intervention(net, {n: "off" for n, *_ in blocks}):
            off = net(x)
        again = net(x)
    assert not torch.allclose(off, base) and torch.equal(again, base)

