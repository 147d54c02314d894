"""PyTorch's own attention read by what it computes: nn.MultiheadAttention (one native call, its fast path in eval)
inside torchvision's vision transformer and nn.TransformerEncoderLayer, each against the module's own weights
(need_weights=True, average_attn_weights=False) on the input it got; and a served model's parameters untouched while
its prefix tokens are named in another thread."""

import threading

import pytest
import torch
import torch.nn as nn

from vggattn.attention.adapters import find_blocks, locate_tokens
from vggattn.attention.trace import name_prefix, token_places, watch


def own_weights(model, x, blocks) -> dict:
    """{block: (B, heads, T, S)} as each nn.MultiheadAttention returns them when asked, on the input it got."""
    got = {}
    for name, module, _ in blocks:
        def forward(*args, _own=module.forward, _name=name, **kwargs):
            kwargs.update(need_weights=True, average_attn_weights=False)
            out = _own(*args, **kwargs)
            got[_name] = out[1]
            return out
        module.forward = forward
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the encoder layer's fast path never calls its attention module
    try:
        with torch.no_grad():
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for _, module, _ in blocks:
            del module.forward
    return got


def read(model, x, blocks) -> dict:
    """Each block's maps on a batch: the first image's from the watched forward's own events, every image's from its
    block run again with the arguments the model gave it (masks sliced per image): the two must agree."""
    names = [b[0] for b in blocks]
    _, seen = watch(model, x, names, set(names))
    locate_tokens(model, x, blocks, {n: s.input for n, s in seen.items()})
    _, first = watch(model, x[:1], names, set(names))
    out = {}
    for n, m, a in blocks:
        out[n] = a.maps(m, seen[n].input, call=seen[n].call)
        one = a.maps(m, first[n].input, first[n].events, first[n].call)
        torch.testing.assert_close(one.rows(), out[n].rows()[:1], rtol=1e-5, atol=1e-6)
    return out


def test_torchvisions_vision_transformer_rows_are_its_multihead_attentions_own():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    blocks = find_blocks(model, example=x[:1])
    assert [b[0] for b in blocks] == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    want, got = own_weights(model, x, blocks), read(model, x, blocks)
    for name, maps in got.items():
        w = want[name]  # (B, heads, 1 + 16, 1 + 16): the class token first
        assert maps.grid == (4, 4) and maps.prefix_names == ["class_token"]
        torch.testing.assert_close(maps.rows(), w[:, :, 1:, 1:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps.prefix, w[:, :, 1:, :1], rtol=1e-5, atol=1e-6)


class Encoder(nn.Module):
    """A conv stem, then nn.TransformerEncoder over its grid's tokens and a padding token that every query is kept
    from by key_padding_mask; batch first, or sequence first (T, B, C) as PyTorch's default and DETR's encoder."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.pad_token = nn.Parameter(torch.randn(1, 1, 16))
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)
        self.batch_first = batch_first

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = torch.cat([tokens, self.pad_token.expand(len(x), -1, -1)], 1)  # (B, N + 1, C)
        pad = torch.zeros(tokens.shape[:2], dtype=torch.bool)
        pad[:, -1] = True
        if self.batch_first:
            return self.head(self.encoder(tokens, src_key_padding_mask=pad)[:, 0])
        return self.head(self.encoder(tokens.transpose(0, 1), src_key_padding_mask=pad)[0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layers_rows_with_a_key_padding_mask_are_their_own(batch_first):
    """Every image of a batch of two, its padding mask sliced with it; sequence-first tokens (T, B, C) are read as
    (B, T, C) and handed back to the block transposed."""
    torch.manual_seed(0)
    model = Encoder(batch_first).eval()
    x = torch.randn(2, 3, 16, 16)
    blocks = find_blocks(model, example=x[:1])
    assert [b[0] for b in blocks] == [f"encoder.layers.{i}.self_attn" for i in range(2)]
    want, got = own_weights(model, x, blocks), read(model, x, blocks)
    for name, maps in got.items():
        w = want[name]  # (B, heads, 17, 17): the padding token last, never attended
        assert maps.grid == (4, 4) and maps.prefix_names == ["pad_token"]
        torch.testing.assert_close(maps.rows(), w[:, :, :16, :16], rtol=1e-5, atol=1e-6)
        assert float(maps.prefix.abs().max()) == 0.0
    with torch.no_grad():  # an intervention hands the block its tokens back as it took them
        from vggattn.attention.adapters import Intervention
        with Intervention(model, {blocks[0][0]: "uniform"}):
            changed = model(x)
        assert changed.shape == (2, 3) and not torch.allclose(changed, model(x))


def test_naming_prefix_tokens_never_changes_a_model_that_another_thread_serves():
    """name_prefix runs the model with each token-shaped parameter changed; another thread's forwards meanwhile see
    the model as it is (no parameter is swapped in place: the change is seen by the naming thread only)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, reg_tokens=2, num_classes=3,
                              depth=2).eval()
    x, fixed = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        base = model(fixed)
    names = [n for n, m in model.named_modules() if n.endswith(".attn")]
    done, outputs = threading.Event(), []

    def serve():
        with torch.no_grad():
            while not done.is_set():
                outputs.append(model(fixed))

    server = threading.Thread(target=serve)
    server.start()
    try:
        for _ in range(5):
            places = token_places(model, x, names)
            name_prefix(model, x, places)
    finally:
        done.set()
        server.join()
    assert places[names[0]].names == ["cls_token", "reg_token[0]", "reg_token[1]"]
    assert len(outputs) > 0 and all(torch.equal(o, base) for o in outputs)

