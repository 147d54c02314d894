"""The live view inline in Jupyter (JupyterLab, Notebook 7, VS Code): an anywidget whose view is the page of
`vggattn.view.live` (or the A/B page of `vggattn.view.compare`) in a frame, the app's own script answering the
pointer in the browser; no server, nothing fetched.

    import vggattn
    vggattn.show("checkpoints/vgg16att-imagenette-w05-256.safetensors", "assets/church.jpg", point=(120, 80))
    vggattn.show(model, "photo.jpg", compare="reinit")       # or "off", "mean", "uniform", another image, (model, meta)

Needs `pip install "vggattn[notebook]"` (anywidget).
"""

from __future__ import annotations

from pathlib import Path

try:
    import anywidget
    import traitlets
except ImportError as e:  # said when show() is called, not at `import vggattn`
    anywidget = traitlets = None
    _MISSING = e
else:
    _MISSING = None

ESM = """
function render({ model, el }) {
  const frame = document.createElement("iframe");
  frame.title = "vggattn live view";
  Object.assign(frame.style, {width: "100%", border: "0", height: model.get("height") + "px"});
  frame.srcdoc = model.get("html");
  model.on("change:html", () => { frame.srcdoc = model.get("html"); });
  // as tall as its page once drawn (the frame shares the notebook's origin: srcdoc), so nothing scrolls twice
  const fit = () => { try { frame.style.height = (frame.contentDocument.documentElement.scrollHeight + 16) + "px"; } catch (e) {} };
  frame.addEventListener("load", () => { fit(); setTimeout(fit, 500); setTimeout(fit, 2000); });
  el.appendChild(frame);
}
export default { render };
"""

if anywidget is not None:
    class LiveView(anywidget.AnyWidget):
        """One live view (or an A/B page) in a notebook's output."""

        _esm = ESM
        html = traitlets.Unicode("").tag(sync=True)
        height = traitlets.Int(900).tag(sync=True)


def _model(spec):
    """(model, meta) from a checkpoint path, "timm:NAME", "hf:NAME", a (model, meta) pair, a model in hand, or None
    (the shipped checkpoint)."""
    import torch.nn as nn

    if spec is None:
        from .models.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint

        return load_checkpoint(DEFAULT_CHECKPOINT, device="cpu")
    if isinstance(spec, tuple):
        return spec
    if isinstance(spec, nn.Module):
        from .models.byo import in_hand

        return in_hand(spec)
    from .models.byo import load_named

    return load_named(str(spec))


def show(model=None, image=None, *, point: tuple[float, float] | None = None, compare=None,
         layers: list[str] | None = None, title: str | None = None, tokens: bool = False) -> "LiveView":
    """The live view of `image` (a path or a PIL image) through `model` as a widget (display it, or leave it last in
    a cell). point: pinned when it shows (default: the centre). compare: an A/B page instead, against "reinit", "off",
    "mean", "uniform", another image (a path or PIL image), or another model ((model, meta), a checkpoint path,
    "timm:NAME"). tokens: the tokens page instead (a detector's queries as tiles: `vggattn.view.tokens_page`), A/B
    against another model or image with compare."""
    if anywidget is None:
        raise ImportError(f'vggattn.show needs anywidget: pip install "vggattn[notebook]" ({_MISSING})')
    from PIL import Image

    from .analysis import analyze
    from .data import open_image
    from .view.hover import pages
    from .view.live import about_model, live_html

    if image is None:
        raise ValueError("show(model, image): give an image (a path or a PIL image)")
    net, meta = _model(model)
    picture = image if isinstance(image, Image.Image) else open_image(image)
    name = title or (Path(image).name if not isinstance(image, Image.Image) else "image")
    if tokens:
        return _tokens_view(net, meta, picture, name, compare)
    result = analyze(net, meta, picture, layers)
    layers_a = pages(result)
    if compare is None:
        return LiveView(html=live_html(result, layers_a, title=name, about=about_model(meta), pin=point))
    from .analysis import COMPARE_KINDS as KINDS, analysed_b
    from .view.compare import Side, compare_html, layer_sides

    if isinstance(compare, str) and compare.startswith("layers:"):  # two layers of this model
        return LiveView(html=compare_html(*layer_sides(result, layers_a, compare), title=name, pin=point), height=1600)
    a = Side(about_model(meta), result, layers_a)
    if isinstance(compare, str) and compare in KINDS:
        result_b, label = analysed_b(net, meta, picture, compare, layers), KINDS[compare]
    elif isinstance(compare, Image.Image) or (isinstance(compare, (str, Path)) and Path(compare).is_file()
                                                 and Path(compare).suffix.lower() not in (".safetensors", ".pth", ".pt")):
        other = compare if isinstance(compare, Image.Image) else open_image(compare)
        result_b, label = analyze(net, meta, other, layers), Path(compare).name if not isinstance(compare, Image.Image) else "B"
        a.label = name
    else:
        net_b, meta_b = _model(compare)
        result_b, label = analyze(net_b, meta_b, picture), about_model(meta_b)
    b = Side(label, result_b, pages(result_b))
    return LiveView(html=compare_html(a, b, title=name, pin=point), height=1600)


def _tokens_view(net, meta, picture, name: str, compare) -> "LiveView":
    """`show(..., tokens=True)`: the tokens page, or its A/B against another model or image."""
    from PIL import Image

    from .data import open_image
    from .tokens import token_maps
    from .view.live import about_model
    from .view.tokens_page import tokens_html

    found = token_maps(net, meta, picture)
    if compare is None:
        return LiveView(html=tokens_html(found, picture, title=name, about=about_model(meta)))
    if isinstance(compare, Image.Image) or (isinstance(compare, (str, Path)) and Path(compare).is_file()
                                            and Path(compare).suffix.lower() not in (".safetensors", ".pth", ".pt")):
        other = compare if isinstance(compare, Image.Image) else open_image(compare)
        found_b, label = token_maps(net, meta, other), "B"
    else:
        net_b, meta_b = _model(compare)
        other, label = picture, about_model(meta_b)
        found_b = token_maps(net_b, meta_b, picture)
    return LiveView(html=tokens_html(found, picture, title=name, about=f"A: {about_model(meta)}; B: {label}",
                                     other=(found_b, other)), height=1400)
