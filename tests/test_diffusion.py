"""A diffusion pipeline's word maps (vggattn.diffusion, `vggattn-explain --diffusers`): a tiny Stable Diffusion
pipeline with random weights and a tokenizer vocabulary written here; the step-by-step loop gives the pipeline's own
image, and each step's and layer's map of a word is the sum of AttnProcessor's own probabilities recorded during the
pipeline's own run."""

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
T = pytest.importorskip("transformers")

WORDS = ["a", "red", "blue", "dog", "cat", "on", "grass"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tokenizer():
    """A CLIP BPE tokenizer whose vocabulary is the letters and WORDS (every word's merges, left to right)."""
    vocab, merges = ["<|startoftext|>", "<|endoftext|>"], []
    vocab += list(LETTERS) + [c + "</w>" for c in LETTERS]
    for w in WORDS:
        symbols = list(w[:-1]) + [w[-1] + "</w>"]
        cur = symbols[0]
        for s in symbols[1:]:
            if (cur, s) not in merges:
                merges.append((cur, s))
            cur += s
            if cur not in vocab:
                vocab.append(cur)
    return T.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=10), len(vocab)


def tiny_pipeline(folder):
    torch.manual_seed(0)
    tokenizer_, n = tokenizer()
    text = T.CLIPTextModel(T.CLIPTextConfig(vocab_size=n, hidden_size=32, intermediate_size=37, num_attention_heads=2,
                                            num_hidden_layers=2, max_position_embeddings=10, eos_token_id=1,
                                            bos_token_id=0, pad_token_id=1))
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=8)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer_, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    return folder / "pipe"


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("diffusion"))


def test_each_steps_word_map_is_the_pipelines_own_attention_probabilities(pipeline_folder):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from vggattn.diffusion import generate, load_pipeline

    pipe = load_pipeline(pipeline_folder)
    prompt, steps = "a red dog on grass", 3
    run = generate(pipe, prompt, steps=steps, seed=5, guidance=7.5)
    assert len(run.steps) == steps and run.latent_grid == (16, 16) and run.image.size == (32, 32)
    assert run.tokens[:2] == ["<|startoftext|>", "a</w>"]
    # the pipeline's own run, with its probabilities kept as AttnProcessor makes them
    cross = {n: m for n, m in pipe.unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention}
    kept = {n: [] for n in cross}
    for name, m in cross.items():
        m.set_processor(AttnProcessor())
        own = m.get_attention_scores
        m.get_attention_scores = lambda *a, own=own, name=name, **k: kept[name].append(own(*a, **k)) or kept[name][-1]
    image = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, generator=torch.Generator().manual_seed(5),
                 output_type="np").images[0]
    assert np.abs(np.asarray(run.image, dtype=np.int16) - np.round(image * 255).astype(np.int16)).max() <= 1
    dog = run.token_indices("dog")
    assert [run.tokens[i] for i in dog] == ["dog</w>"]
    for name, probs in kept.items():
        layer = f"unet.{name}"
        assert len(probs) == steps
        for step, p in enumerate(probs):  # (2 * heads, N, T): the unconditional half first
            heads = p.shape[0] // 2
            want = p[heads:, :, dog].sum((0, 2)).reshape(run.grids[layer]).double().numpy()
            np.testing.assert_allclose(run.layer_map("dog", layer, step), want, rtol=1e-4, atol=1e-6)
    # DAAM's map: every layer upsampled to the latent grid, summed over layers and steps
    total = run.word_map("dog")
    assert total.shape == (16, 16)
    np.testing.assert_allclose(total, sum(run.word_map("dog", step=s) for s in range(steps)), rtol=1e-6)
    with pytest.raises(ValueError, match="not in the prompt"):
        run.token_indices("cat")


def test_explain_writes_a_words_maps_for_a_pipeline(pipeline_folder, tmp_path):
    from vggattn import explain

    out = tmp_path / "out"
    assert explain.main(["--diffusers", str(pipeline_folder), "--prompt", "a blue cat", "--word", "cat", "--word",
                         "blue", "--steps", "2", "--seed", "1", "--out", str(out)]) == 0
    got = json.loads((out / "words.json").read_text())
    assert got["prompt"] == "a blue cat" and got["steps"] == 2 and set(got["words"]) == {"cat", "blue"}
    assert got["words"]["cat"]["tokens"] == ["cat</w>"]
    daam = np.load(out / "cat.npy")
    per_step = np.load(out / "cat_steps.npy")
    assert daam.shape == (16, 16) and per_step.shape == (2, 16, 16)
    np.testing.assert_allclose(daam, per_step.sum(0), rtol=1e-6)
    for layer in got["layers"]:
        assert np.load(out / f"cat_{layer}.npy").ndim == 2
    assert (out / "image.png").is_file() and (out / "words.png").is_file()
    # a word not in the prompt: said, exit code 2
    assert explain.main(["--diffusers", str(pipeline_folder), "--prompt", "a blue cat", "--word", "dog", "--steps",
                         "1", "--out", str(tmp_path / "bad")]) == 2


def test_explain_writes_the_words_live_page_and_an_a_b_of_two_prompts(pipeline_folder, tmp_path, browser):
    from test_tokens import check_page

    from vggattn import explain
    from vggattn.diffusion import generate, load_pipeline

    out = tmp_path / "out"
    assert explain.main(["--diffusers", str(pipeline_folder), "--prompt", "a red dog", "--word", "dog", "--steps", "2",
                         "--html", "--compare-prompt", "a blue dog", "--out", str(out)]) == 0
    run = generate(load_pipeline(pipeline_folder), "a red dog", steps=2, seed=0)
    found = run.token_maps()
    assert found.names == ["<|startoftext|>", "a", "red", "dog", "<|endoftext|>"]
    # a word's map is its column: the weight each place gives it, per head, summed over the steps
    layer = run.layers[0]
    np.testing.assert_allclose(found.map("dog")[layer], run.layer_map("dog", layer) / found.rows[layer].shape[0],
                               rtol=1e-4)
    check_page(browser, out / "words.html", found, "dog")
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((out / "words-compare.html").as_uri())
    page.wait_for_function("window.vggattnTokens && window.vggattnTokens.ready", timeout=30_000)
    captions = page.locator("figcaption").all_inner_texts()
    assert captions[:3] == ["a red dog", "a blue dog", "B minus A (each map as shares of its total)"]
    page.locator('.tile[data-name="red"]').click()  # a word only A has
    assert "the token is on one side only" in page.locator("figcaption").nth(2).inner_text()
    assert not errors
    page.close()


def test_a_word_the_tokenizer_split_is_one_word_its_pieces_summed(pipeline_folder):
    from vggattn.app.words import words_of
    from vggattn.diffusion import generate, load_pipeline

    run = generate(load_pipeline(pipeline_folder), "a reddog cats", steps=1, seed=0)
    assert run.tokens[1:8] == ["a</w>", "re", "d", "dog</w>", "ca", "t", "s</w>"]
    assert run.words() == [("a", [1]), ("reddog", [2, 3, 4]), ("cats", [5, 6, 7])]
    assert words_of(run) == ["a", "reddog", "cats"] and run.token_indices("cats") == [5, 6, 7]
    found = run.token_maps()
    assert found.names == ["<|startoftext|>", "a", "reddog", "cats", "<|endoftext|>"]
    layer = run.layers[0]
    np.testing.assert_allclose(found.rows[layer][:, 2], run.steps[0][layer][:, :, 2:5].sum(-1), rtol=1e-5)


def test_the_words_page_generates_and_shows_a_words_maps(pipeline_folder):
    import gradio as gr

    from vggattn.app import words
    from vggattn.diffusion import load_pipeline

    pipe = load_pipeline(pipeline_folder)
    demo = words.build_words_demo(pipe, str(pipeline_folder))
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"prompt", "generate", "word", "step", "word-map", "word-layer-0"} <= ids
    run, image, choice, slider, note = words.on_generate(pipe, "a red dog", 1, 2, 7.5)
    assert [c[1] if isinstance(c, (tuple, list)) else c for c in choice["choices"]] == ["a", "red", "dog"]
    assert slider["maximum"] == 2 and "DAAM" in note and image.size == (256, 256)  # 32 px, shown 8x
    shown = words.word_pictures(run, "dog", 0)
    assert shown[0]["visible"] and "all steps" in shown[0]["label"]
    layers = [u for u in shown[1:] if u["visible"]]
    assert len(layers) == len(run.layers) and all(u["value"].shape == (256, 256, 3) for u in layers)
    one = words.word_pictures(run, "dog", 2)
    assert "step 2 of 2" in one[0]["label"]
    with pytest.raises(gr.Error, match="prompt"):
        words.on_generate(pipe, "  ", 0, 2, 7.5)


def test_the_app_serves_a_pipeline_and_refuses_a_missing_folder(tmp_path):
    from vggattn import app

    assert app.main(["--diffusers", str(tmp_path / "none")]) == 2


def test_the_word_study_over_a_prompt_file(pipeline_folder, tmp_path):
    from vggattn import diffusion, study

    (tmp_path / "prompts.txt").write_text("a red dog\na blue cat\n\na red cat on grass\n")
    out = tmp_path / "words"
    assert study.main(["--diffusers", str(pipeline_folder), "--prompts", str(tmp_path / "prompts.txt"), "--out",
                       str(out), "--steps", "1"]) == 0
    got = json.loads((out / "study.json").read_text())
    assert "<td>red</td><td>2</td>" in (out / "report.html").read_text()
    assert got["prompts"] == 3 and got["words"]["red"]["prompts"] == 2 and got["words"]["grass"]["prompts"] == 1
    # one prompt: each place's row sums to 1 over its tokens, so its words' shares add up to 1 in every layer,
    # and a word's share is the mean over places and heads of its column
    pipe = diffusion.load_pipeline(pipeline_folder)
    one = diffusion.word_study(pipe, ["a red dog"], steps=1, resamples=10)
    for layer in one["layers"]:
        assert sum(w["per_layer"][layer][0] for w in one["words"].values()) == pytest.approx(1, abs=1e-3)
    run = diffusion.generate(pipe, "a red dog", steps=1, seed=0)
    red = run.token_indices("red")[0]
    layer = one["layers"][0]
    assert one["words"]["red"]["per_layer"][layer][0] == pytest.approx(float(run.steps[0][layer][:, :, red].mean()),
                                                                        abs=1e-4)
    for w in got["words"].values():
        mean, low, high = w["share"]
        assert low <= mean <= high
    (tmp_path / "none.txt").write_text("\n")
    assert study.main(["--diffusers", str(pipeline_folder), "--prompts", str(tmp_path / "none.txt"), "--out",
                       str(out)]) == 2


def test_the_words_page_at_a_phones_width(pipeline_folder, browser):
    """The pipeline's page at 390x844 with touch: the prompt typed and Generate tapped, the picture, the word's map and
    each layer's shown whole on screen (tests/test_browser.py's phone checks find nothing cut or past an edge)."""
    from server import serving
    from test_browser import PHONE, PHONE_PROBLEMS, settled
    from vggattn.app import words
    from vggattn.diffusion import load_pipeline

    with serving(words.build_words_demo(load_pipeline(pipeline_folder), str(pipeline_folder))) as url:
        view = browser.new_page(viewport=PHONE, has_touch=True)
        view.goto(url)
        view.locator("#prompt textarea").fill("a red dog")
        view.locator("#generate").tap()
        view.locator("#word-map img").wait_for(state="visible", timeout=60_000)
        view.locator("#word-layer-0 img").wait_for(state="visible", timeout=30_000)
        settled(view)
        problems = [p for p in view.evaluate(PHONE_PROBLEMS) if p != "0 views shown"]  # one page, no tabs
        assert not problems, problems
        assert "Error" not in view.locator("body").inner_text()
        view.close()
