"""A diffusion pipeline's cross-attention from the latent's places to the prompt's words, per layer and per
denoising step, read by what the UNet computes (`vggattn.capture`), and a word's map aggregated the way DAAM does
(Tang et al. 2022, "What the DAAM: Interpreting Stable Diffusion Using Cross Attention").

    pipe = load_pipeline("my-pipeline")                      # a local folder saved with save_pretrained
    run = generate(pipe, "a red dog", steps=4, seed=0)       # Generation: the image, the tokens, every step's maps
    run.word_map("dog")                                      # (h, w) on the latent grid: DAAM's sum
    run.word_map("dog", step=2, layer="unet.mid_block...")   # one step, one layer
    python -m vggattn.study --diffusers FOLDER --prompts prompts.txt --out w/   # per word over prompts (`word_study`)

The loop is the Stable Diffusion pipeline's own (its text encoder, scheduler, classifier-free guidance and VAE), run
here step by step so that every UNet call is captured; only the conditional half of each guided batch is kept (as
DAAM does). DAAM's aggregation: each layer's map of a token (summed over heads) is upsampled to the latent's grid
(bilinear here; DAAM uses bicubic) and summed over layers and steps; a word of several tokens sums its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Denoiser(nn.Module):
    """The UNet at one step as a model of one input (latents -> predicted noise): the prompt's embeddings (one per
    image of the batch) and the step are held, so `vggattn.capture` can read it like any model."""

    def __init__(self, unet: nn.Module, context: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.context = context  # (B, T, C): the embeddings of each batch item's prompt
        self.step = torch.tensor(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x, self.step, encoder_hidden_states=self.context[:len(x)]).sample


@dataclass
class Generation:
    """One generation: its image, the prompt's tokens and each step's cross-attention of the conditional half."""

    prompt: str
    image: object  # PIL image
    tokens: list[str]  # the tokenizer's tokens of the prompt, padding included, in order
    ids: list[int]
    latent_grid: tuple[int, int]
    steps: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per step: {layer: (heads, N, T) rows}
    grids: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> its query grid
    word_ids: object = None  # the tokenizer, as a function word -> its ids

    @property
    def layers(self) -> list[str]:
        return list(self.grids)

    def words(self, special: bool = False) -> list[tuple[str, list[int]]]:
        """The prompt's words in order, each with the positions of its tokenizer pieces (CLIP's BPE ends a word's last
        piece with "</w>": "gir" "affe</w>" is the word "giraffe"); special: also the start token and the end token
        (the padding after it left out)."""
        out, pieces = [], []
        for i, t in enumerate(self.tokens):
            if t.startswith("<|"):
                if special:
                    out.append((t, [i]))
                if t == "<|endoftext|>":
                    break
                continue
            pieces.append(i)
            if t.endswith("</w>"):
                out.append(("".join(self.tokens[j] for j in pieces).replace("</w>", ""), pieces))
                pieces = []
        return out

    def token_indices(self, word: str) -> list[int]:
        """The positions of the word's tokens in the prompt (its first occurrence); a token name is taken as is."""
        if word in self.tokens:
            return [self.tokens.index(word)]
        for w, idx in self.words():
            if w == word:
                return idx
        want = self.word_ids(word)
        for i in range(len(self.ids) - len(want) + 1):
            if self.ids[i:i + len(want)] == want:
                return list(range(i, i + len(want)))
        words = [t.replace("</w>", "") for t in self.tokens if not t.startswith("<|")]
        raise ValueError(f"{word!r} is not in the prompt {self.prompt!r} (its tokens: {words})")

    def layer_map(self, word: str, layer: str, step: int | None = None) -> np.ndarray:
        """(h, w) on the layer's own grid: the word's column (its tokens summed) summed over heads, at one step or
        summed over all."""
        idx = self.token_indices(word)
        chosen = self.steps if step is None else [self.steps[step]]
        total = sum(s[layer][:, :, idx].sum((0, 2)) for s in chosen)  # (N,)
        return total.reshape(self.grids[layer]).double().numpy()

    def word_map(self, word: str, step: int | None = None, layer: str | None = None) -> np.ndarray:
        """(h, w) on the latent's grid: DAAM's map of the word (every layer's map upsampled to the latent grid and
        summed over layers, and over steps unless one is given)."""
        total = np.zeros(self.latent_grid)
        for name in ([layer] if layer else self.layers):
            m = torch.from_numpy(self.layer_map(word, name, step))[None, None]
            total += F.interpolate(m, size=self.latent_grid, mode="bilinear", align_corners=False)[0, 0].numpy()
        return total

    def token_maps(self):
        """This generation as a `vggattn.tokens.TokenMaps`: the start token, the prompt's words (`words`: a word split
        in pieces is one, its pieces' columns summed; a repeated one "a (2)") and the end token (the padding after it
        left out), each one's column in every layer (the weight the layer's places give it, per head, summed over the
        steps) as its map."""
        from .tokens import TokenMaps

        names, seen, groups = [], {}, []
        for word, idx in self.words(special=True):
            seen[word] = seen.get(word, 0) + 1
            names.append(word if seen[word] == 1 else f"{word} ({seen[word]})")
            groups.append(idx)
        rows = {}
        for layer in self.layers:
            total = sum(s[layer] for s in self.steps)  # (heads, N, T)
            rows[layer] = torch.stack([total[:, :, idx].sum(-1) for idx in groups], 1).float()  # (heads, T, N)
        return TokenMaps(names, rows, dict(self.grids), self.image.size,
                         shows=f"each word's column: the weight each place of a layer gives it, summed over the "
                               f"{len(self.steps)} steps (the padding after the end token left out)")


def load_pipeline(folder: str | Path):
    """A diffusers pipeline from a local folder (nothing is fetched)."""
    from diffusers import DiffusionPipeline

    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (give a pipeline saved with save_pretrained)")
    return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None)


@torch.no_grad()
def generate(pipe, prompt: str, *, steps: int = 4, seed: int = 0, guidance: float = 7.5, size: int | None = None
             ) -> Generation:
    """Generate from the prompt with the pipeline's parts, step by step, capturing every cross-attention layer's
    rows (latent places over the prompt's tokens) at each step."""
    from .capture import capture

    tok, unet, sched, vae = pipe.tokenizer, pipe.unet, pipe.scheduler, pipe.vae
    encode = lambda text: tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,  # noqa
                              return_tensors="pt").input_ids
    ids = encode(prompt)
    cond = pipe.text_encoder(ids)[0]
    guided = guidance > 1
    context = torch.cat([pipe.text_encoder(encode(""))[0], cond]) if guided else cond
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    side = (size or unet.config.sample_size * scale) // scale
    latents = torch.randn((1, unet.config.in_channels, side, side), generator=torch.Generator().manual_seed(seed))
    sched.set_timesteps(steps)
    latents = latents * sched.init_noise_sigma
    denoiser = Denoiser(unet, context)
    run = Generation(prompt, None, tok.convert_ids_to_tokens(ids[0].tolist()), ids[0].tolist(), (side, side),
                     word_ids=lambda w: tok(w, add_special_tokens=False).input_ids)
    for t in sched.timesteps:
        x = sched.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        denoiser.step = t
        noise, maps = capture(denoiser, x)
        cross = {n: m for n, m in maps.items() if m.key_names is not None and len(m.key_names) == len(run.ids)}
        run.steps.append({n: m.rows()[-1] for n, m in cross.items()})  # the conditional half (last)
        run.grids.update({n: m.grid for n, m in cross.items()})
        if guided:
            uncond, text = noise.chunk(2)
            noise = uncond + guidance * (text - uncond)
        latents = sched.step(noise, t, latents).prev_sample
    image = vae.decode(latents / vae.config.scaling_factor).sample
    pixels = ((image[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    from PIL import Image

    run.image = Image.fromarray(pixels)
    return run


def word_study(pipe, prompts: list[str], *, steps: int = 4, seed: int = 0, guidance: float = 7.5,
               resamples: int = 2000) -> dict:
    """Per word over a list of prompts: the share of the latent places' attention it receives (each place's row
    sums to 1 over the prompt's tokens; the mean over places, heads and steps), per cross-attention layer and over
    all of them, with bootstrap 95% intervals over the prompts that hold it. The start token and the padding
    (`<|startoftext|>`, `<|endoftext|>` after the prompt) are words here too: in Stable Diffusion they take most of
    the attention."""
    shares: dict[str, dict[str, list]] = {}
    layers: list[str] = []
    for i, prompt in enumerate(prompts):
        run = generate(pipe, prompt, steps=steps, seed=seed + i, guidance=guidance)
        layers = run.layers
        per_token = {layer: sum(s[layer].mean((0, 1)) for s in run.steps) / len(run.steps) for layer in layers}  # (T,)
        groups: dict[str, list[int]] = {}
        for word, idx in run.words(special=True):
            groups.setdefault(word, []).extend(idx)
        end = groups.get("<|endoftext|>", [len(run.tokens)])[0]
        groups["<|endoftext|>"] = list(range(end, len(run.tokens)))  # the end token and the padding after it
        for word, idx in groups.items():
            entry = shares.setdefault(word, {layer: [] for layer in layers} | {"all": []})
            values = [float(per_token[layer][idx].sum()) for layer in layers]
            for layer, v in zip(layers, values):
                entry[layer].append(v)
            entry["all"].append(sum(values) / len(values))
    rng = np.random.default_rng(seed)

    def mean_ci(values):
        v = np.asarray(values, dtype=np.float64)
        boot = v[rng.integers(0, len(v), (resamples, len(v)))].mean(1)
        return [round(float(v.mean()), 4), round(float(np.percentile(boot, 2.5)), 4),
                round(float(np.percentile(boot, 97.5)), 4)]
    return {"prompts": len(prompts), "steps": steps, "layers": layers,
            "words": {w: {"prompts": len(e["all"]), "share": mean_ci(e["all"]),
                          "per_layer": {layer: mean_ci(e[layer]) for layer in layers}}
                      for w, e in sorted(shares.items(), key=lambda kv: -np.mean(kv[1]["all"]))}}

