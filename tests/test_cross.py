"""Attention between the image and other tokens (vggattn.attention.cross), read by what the code computes and checked
against each library's own attention with the same weights on the same input: transformers' DETR and Conditional
DETR decoders (object queries over the encoder's grid: `cross_attentions` of the eager model), and PyTorch's own
`nn.MultiheadAttention` both ways (learned queries over a CNN's grid; the grid's places over tokens with no place,
as a diffusion model's latents over a prompt's words), `need_weights=True, average_attn_weights=False`."""

import pytest
import torch
import torch.nn as nn

import vggattn
from vggattn.attention.adapters import find_blocks

H, W = 96, 128  # not square: a key order transposed would show


def detr(config_cls: str, model_cls: str, implementation: str, like=None):
    T = pytest.importorskip("transformers")
    config = getattr(T, config_cls)(
        use_timm_backbone=False, use_pretrained_backbone=False, d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5,
        backbone_config=T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1],
                                       out_features=["stage4"]))
    config._attn_implementation = implementation
    try:
        model = getattr(T, model_cls)(config).eval()
    except ValueError:  # no SDPA offered for it
        return None
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model


@pytest.mark.parametrize("config_cls, model_cls", [("DetrConfig", "DetrForObjectDetection"),
                                                   ("ConditionalDetrConfig", "ConditionalDetrForObjectDetection")])
def test_a_detr_decoders_object_queries_over_the_encoders_grid_are_its_own_cross_attentions(config_cls, model_cls):
    torch.manual_seed(0)
    eager = detr(config_cls, model_cls, "eager")
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = eager(pixel_values=x, output_attentions=True).cross_attentions  # per layer (B, heads, queries, HW)
    model = detr(config_cls, model_cls, "sdpa", like=eager) or eager  # read as fast as it runs
    _, maps = vggattn.capture(model, x)
    cross = [m for m in maps.values() if m.query_names is not None]
    assert [m.name for m in cross] == [f"model.decoder.layers.{i}.encoder_attn" for i in range(2)]
    encoder = maps["model.encoder.layers.0.self_attn"]
    for m, a in zip(cross, want):
        assert m.query_names == [f"query {i}" for i in range(5)] and m.key_names is None
        assert m.key_grid == encoder.grid == (H // 32, W // 32)
        torch.testing.assert_close(m.rows(), a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m.rows().sum(-1), torch.ones(2, 2, 5))
        assert "the other tokens (queries) over the image's places (keys)" in m.meaning
    # the page and the study take blocks over positions: cross-attention only where asked for
    names = [n for n, *_ in find_blocks(vggattn.models.output.image_model(model), example=x[:1])]
    assert not any(".decoder." in n for n in names)


class Queries(nn.Module):
    """A CNN's grid, then learned queries attending to it (a detector's decoder in PyTorch's own attention)."""

    def __init__(self, c=16, t=4, batch_first=True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.queries = nn.Parameter(torch.randn(t, c))
        self.attn = nn.MultiheadAttention(c, 2, batch_first=batch_first)
        self.head = nn.Linear(c, 3)

    def tokens(self, x):
        f = self.stem(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        return self.queries.expand(len(x), -1, -1), f

    def forward(self, x):
        q, f = self.tokens(x)
        out, _ = self.attn(q, f, f, need_weights=False)
        return self.head(out.mean(1))


class Words(nn.Module):
    """A CNN's grid whose places attend to tokens with no place (a diffusion model's latents over a prompt)."""

    def __init__(self, c=16, t=6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.words = nn.Parameter(torch.randn(1, t, c))
        self.attn = nn.MultiheadAttention(c, 2, batch_first=True)
        self.head = nn.Linear(c, 3)

    def tokens(self, x):
        return self.stem(x).flatten(2).transpose(1, 2), self.words.expand(len(x), -1, -1)

    def forward(self, x):
        f, words = self.tokens(x)
        out, _ = self.attn(f, words, words, need_weights=False)
        return self.head((f + out).mean(1))


def own_weights(model, x):
    with torch.no_grad():
        a, b = model.tokens(x)
        return model.attn(a, b, b, need_weights=True, average_attn_weights=False)[1]  # (B, heads, nq, nk)


@pytest.mark.parametrize("model_cls", [Queries, Words])
def test_pytorchs_own_attention_between_a_grid_and_tokens_either_way(model_cls):
    """Learned queries over a CNN's grid (rows (B, heads, T, M)), and the grid's places over tokens with no place
    (rows (B, heads, N, T)), each equal to nn.MultiheadAttention's own weights."""
    torch.manual_seed(0)
    model = model_cls().eval()
    x = torch.randn(2, 3, 32, 48)
    _, maps = vggattn.capture(model, x)
    m = maps["attn"]
    if model_cls is Queries:
        assert m.query_names == [f"query {i}" for i in range(4)] and m.key_names is None and m.key_grid == (8, 12)
        assert "the other tokens (queries) over the image's places (keys)" in m.meaning
    else:
        assert m.key_names == [f"token {i}" for i in range(6)] and m.query_names is None and m.grid == (8, 12)
        assert m.rows().shape == (2, 2, 96, 6)
        assert "the image's places (queries) over the other tokens (keys)" in m.meaning
    torch.testing.assert_close(m.rows(), own_weights(model, x), rtol=1e-4, atol=1e-6)


def test_tokens_among_themselves_are_no_cross_attention():
    """Self-attention among tokens with no place (object queries with each other) is named and skipped."""

    class Among(Queries):
        def forward(self, x):
            q, _ = self.tokens(x)
            out, _ = self.attn(q, q, q, need_weights=False)
            return self.head(out.mean(1) + self.stem(x).mean((2, 3)))

    with pytest.raises(ValueError, match="neither its queries nor its keys sit on the image"):
        vggattn.capture(Among().eval(), torch.randn(1, 3, 32, 32))


def unet_and_transformer():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()
    dit = diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=2,
                                       cross_attention_dim=32, norm_num_groups=8).eval()
    return {"unet": unet, "transformer2d": dit}


class Denoiser(nn.Module):
    """A diffusion model's denoiser at one step, as a model of one input: latents -> noise, the prompt's embedding
    and the step fixed (what a pipeline's loop calls)."""

    def __init__(self, net, context, step=10):
        super().__init__()
        self.net, self.step = net, step
        self.register_buffer("context", context)

    def forward(self, x):
        ctx = self.context.expand(len(x), -1, -1)
        if hasattr(self.net, "time_embedding"):  # a UNet takes the step
            return self.net(x, self.step, encoder_hidden_states=ctx).sample
        return self.net(x, encoder_hidden_states=ctx).sample


@pytest.mark.parametrize("which", ["unet", "transformer2d"])
def test_a_diffusion_models_places_over_the_prompts_tokens_are_its_processors_own_probabilities(which):
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    net = unet_and_transformer()[which]
    model = Denoiser(net, torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(2, 4 if which == "unet" else 16, 16, 16, generator=torch.Generator().manual_seed(3))
    every = [n for n, m in net.named_modules() if isinstance(m, Attention)]  # the self-attentions too
    cross = [n for n in every if net.get_submodule(n).is_cross_attention]
    assert cross and len(every) > len(cross)
    def use(processor):
        for m in net.modules():
            if isinstance(m, Attention):
                m.set_processor(processor)
    use(AttnProcessor())  # the processor that computes its probabilities: kept as it makes them
    probs = {}
    for name in every:
        module = net.get_submodule(name)
        own = module.get_attention_scores
        module.get_attention_scores = lambda *a, own=own, name=name, **k: probs.setdefault(name, own(*a, **k))
    with torch.no_grad():
        model(x)
    for name in every:
        del net.get_submodule(name).get_attention_scores
    for processor in (AttnProcessor(), AttnProcessor2_0()):  # read as computed, and from the fused call
        use(processor)
        _, maps = vggattn.capture(model, x)
        for name in every:
            m = maps[f"net.{name}"]
            want = probs[name]  # (B * heads, N, T or N)
            if name in cross:
                assert m.key_names == [f"token {i}" for i in range(7)] and m.query_names is None
            else:  # the latent's places over each other, on the same grid (the up blocks' too)
                assert m.key_names is None and m.key_grid == m.grid
            rows = m.rows()
            assert m.grid[0] * m.grid[1] == want.shape[1]
            torch.testing.assert_close(rows.reshape(want.shape), want, rtol=1e-4, atol=1e-6)


def test_sams_two_way_mask_decoder_both_ways_is_its_own_attention():
    """transformers' SAM: the mask decoder's tokens (the IoU and mask tokens, the prompt's point) over the image
    embedding's grid and the grid over the tokens, (B, 1, T, C) per point batch, placed on the mask decoder's own
    grid; each equal to the weights its SamAttention returns (eager), read from the model under SDPA."""
    T = pytest.importorskip("transformers")

    def build(implementation, like=None):
        vision = T.SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                                   image_size=64, patch_size=8, output_channels=32, window_size=4,
                                   global_attn_indexes=[1], num_pos_feats=16)
        config = T.SamConfig(vision_config=vision,
                             prompt_encoder_config=T.SamPromptEncoderConfig(hidden_size=32, image_size=64, patch_size=8),
                             mask_decoder_config=T.SamMaskDecoderConfig(hidden_size=32, num_hidden_layers=2,
                                                                        num_attention_heads=2, mlp_dim=64,
                                                                        iou_head_hidden_dim=32))
        config._attn_implementation = implementation
        model = T.SamModel(config).eval()
        if like is not None:
            model.load_state_dict(like.state_dict())
        return model

    class Prompted(nn.Module):  # an image and one point, as a model of the image
        def __init__(self, sam):
            super().__init__()
            self.sam = sam
            self.register_buffer("points", torch.tensor([[[[20.0, 30.0]]]]))

        def forward(self, x):
            return self.sam(pixel_values=x, input_points=self.points.expand(len(x), -1, -1, -1),
                            multimask_output=False).pred_masks

    torch.manual_seed(0)
    eager = build("eager")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    own = {}

    def keep(name):
        def hook(module, args, out):  # (returns None: the output stays the module's)
            own.setdefault(name, out[1])
        return hook
    handles = [m.register_forward_hook(keep(n)) for n, m in eager.named_modules() if type(m).__name__ == "SamAttention"]
    Prompted(eager)(x)
    for h in handles:
        h.remove()
    _, maps = vggattn.capture(Prompted(build("sdpa", like=eager)), x)
    decoder = {n[len("sam."):]: m for n, m in maps.items() if ".mask_decoder." in f".{n}"}
    directions = {n: (m.query_names is not None, m.key_names is not None) for n, m in decoder.items()}
    assert directions["mask_decoder.transformer.layers.0.cross_attn_token_to_image"] == (True, False)
    assert directions["mask_decoder.transformer.layers.0.cross_attn_image_to_token"] == (False, True)
    assert "mask_decoder.transformer.final_attn_token_to_image" in decoder
    for name, m in decoder.items():
        assert (m.key_grid if m.query_names else m.grid) == (8, 8)  # the image embedding's grid
        assert (m.query_names or m.key_names)[:6] == ["IoU token"] + [f"mask token {i}" for i in range(4)] + \
            ["prompt token 0"]  # the point (and the padding point SAM adds to a prompt with no box)
        torch.testing.assert_close(m.rows(), own[name].reshape(m.rows().shape), rtol=1e-4, atol=1e-6)
