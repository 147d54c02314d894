"""The app for a diffusion pipeline (`python app.py --diffusers FOLDER`): generate from a prompt and a seed, then see
where each word of the prompt is attended to, by layer and by step (`vggattn.diffusion`).

A word's map is DAAM's aggregation (Tang et al. 2022): the cross-attention of the conditional half of every step,
heads summed, each layer's map upsampled (bilinearly here; DAAM uses bicubic) to the latent grid and summed over
layers and steps. The step slider shows one step instead of all (0: all); the layer panels show the word's map in
each layer at that step (or summed over the steps).
"""

from __future__ import annotations

import gradio as gr
import numpy as np

from ..diffusion import Generation, generate
from ..view.render import map_levels, overlay, upsample

MAX_LAYERS = 16  # layer panels shown (a Stable Diffusion UNet has 16 cross-attention layers)
DISPLAY = 256  # px: a smaller generated image is shown enlarged (pixels repeated) to this size or more


def display_copy(image):
    """The generated image as shown: enlarged by a whole factor (nearest) when it is smaller than DISPLAY."""
    from PIL import Image

    factor = max(1, -(-DISPLAY // max(image.size)))
    return image if factor == 1 else image.resize((image.size[0] * factor, image.size[1] * factor),
                                                   Image.Resampling.NEAREST)


def words_of(run: Generation) -> list[str]:
    """The prompt's words, each once (a word the tokenizer split is one: `Generation.words`; its start, end and padding
    tokens left out)."""
    return list(dict.fromkeys(w for w, _ in run.words()))


def on_generate(pipe, prompt: str, seed, steps, guidance) -> tuple:
    """(the generation, its image, the word choices, the step slider, a note)."""
    if not prompt or not prompt.strip():
        raise gr.Error("Write a prompt first.")
    try:
        run = generate(pipe, prompt, steps=int(steps), seed=int(seed), guidance=float(guidance))
    except Exception as e:  # noqa: BLE001 (one sentence; the app keeps serving)
        raise gr.Error(f"The pipeline could not generate: {e}") from None
    words = words_of(run)
    note = (f"{len(run.steps)} steps, {len(run.layers)} cross-attention layers, tokens: "
            + " ".join(t.replace("</w>", "") for t in run.tokens if not t.startswith("<|")) + ". "
            "A word's map is DAAM's sum over heads, layers and steps (each layer upsampled bilinearly to the "
            "latent grid; DAAM uses bicubic), of the conditional half of classifier-free guidance.")
    return run, display_copy(run.image), gr.update(choices=words, value=words[0] if words else None), \
        gr.update(maximum=len(run.steps), value=0), note


def word_pictures(run: Generation | None, word: str | None, step: int = 0, opacity: float = 0.8,
                  colormap: str = "inferno") -> list:
    """DAAM's map of the word over the image (all steps, or step `step` from 1), then its map in each layer."""
    empty = [gr.update(value=None, visible=i == 0) for i in range(1 + MAX_LAYERS)]
    if run is None or not word:
        return empty
    one = None if not step else int(step) - 1
    base = np.asarray(display_copy(run.image).convert("RGB"), dtype=np.uint8)
    H, W = base.shape[:2]
    show = lambda m: overlay(base, upsample(map_levels(m), (W, H)), colormap, opacity)  # noqa: E731
    when = "all steps" if one is None else f"step {one + 1} of {len(run.steps)}"
    out = [gr.update(value=show(run.word_map(word, step=one)), label=f"{word}: DAAM over {len(run.layers)} layers, "
                                                                         f"{when}", visible=True)]
    for i in range(MAX_LAYERS):
        if i < len(run.layers):
            layer = run.layers[i]
            m = run.layer_map(word, layer, one)
            out.append(gr.update(value=show(m), label=f"{layer} ({m.shape[0]}×{m.shape[1]})", visible=True))
        else:
            out.append(gr.update(value=None, visible=False))
    return out


def build_words_demo(pipe, source: str = "") -> gr.Blocks:
    """The page for a diffusion pipeline: a prompt, a seed, steps and guidance; the image; a word's maps."""
    with gr.Blocks(title="vggattn · words") as demo:
        gr.Markdown(f"## vggattn · where each word of a prompt is attended to\n`{source}`: generate, then choose a "
                    "word; the maps are read from what the UNet computes at every step.")
        run = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                    steps = gr.Slider(1, 50, value=4, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Number(7.5, label="Guidance", elem_id="guidance")
                go = gr.Button("Generate", elem_id="generate")
                note = gr.Markdown(elem_id="words-note")
                word = gr.Radio([], label="Word", elem_id="word")
                step = gr.Slider(0, 1, value=0, step=1, label="Step (0: all steps, as DAAM sums them)",
                                 elem_id="step")
            image = gr.Image(label="Generated", interactive=False, elem_id="generated", height=320)
            daam = gr.Image(label="The word's map", interactive=False, elem_id="word-map", height=320)
        with gr.Row():
            layers = [gr.Image(interactive=False, elem_id=f"word-layer-{i}", height=200, min_width=140,
                               visible=False) for i in range(MAX_LAYERS)]
        outputs = [daam, *layers]
        go.click(lambda p, s, n, g: on_generate(pipe, p, s, n, g), [prompt, seed, steps, guidance],
                 [run, image, word, step, note], api_name="generate").then(
            word_pictures, [run, word, step], outputs, api_name=False)
        word.change(word_pictures, [run, word, step], outputs, api_name="word")
        step.change(word_pictures, [run, word, step], outputs, api_name="word_step")
    return demo
