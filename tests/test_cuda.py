"""CUDA paths (marked `cuda`; skipped without a GPU): capture, the fused SDPA path against the
article's math, a training step with fp16 AMP, `--device auto`, the app's analysis and the study.

    make gpu-check        # these tests, then bench/gpu_timings.py
"""

import numpy as np
import pytest
import torch
from PIL import Image

import vggattn
from conftest import tiny_meta, tiny_model
from test_train import run, toy_data  # noqa: F401  (fixture)
from vggattn import study
from vggattn.attention.adapters import find_blocks
from vggattn.analysis import analyze
from vggattn.models.checkpoint import resolve_device
from vggattn.attention.trace import watch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (make gpu-check runs these on one)")]


@pytest.fixture(autouse=True)
def full_fp32():
    """Comparisons with the CPU in true fp32: cuDNN convolutions default to TF32 (10-bit mantissa),
    which moves peaked softmax weights of the 256 px model by up to 4e-3."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def shipped_or_tiny():
    if vggattn.DEFAULT_CHECKPOINT.is_file():
        return vggattn.load_checkpoint(device="cpu")
    return tiny_model(), tiny_meta(input_size=64)


def test_device_auto_picks_cuda():
    assert resolve_device("auto").type == "cuda"
    model, _ = vggattn.load_checkpoint(device="auto")
    assert next(model.parameters()).device.type == "cuda"


def test_capture_on_cuda_equals_cpu():
    """The one capture (watch + the adapters' maps) on CUDA reads the rows it reads on the CPU."""
    model, meta = shipped_or_tiny()
    x = torch.randn(2, 3, meta["input_size"], meta["input_size"])

    def rows(m, x):
        blocks = find_blocks(m)
        with torch.no_grad():
            out, seen = watch(m, x, [n for n, *_ in blocks])
            maps = [a.maps(mod, seen[n].input) for n, mod, a in blocks]
            return out, [mp.rows([0, mp.grid[0] * mp.grid[1] // 2, mp.grid[0] * mp.grid[1] - 1]) for mp in maps]
    logits_cpu, rows_cpu = rows(model, x)
    logits_gpu, rows_gpu = rows(model.to("cuda"), x.cuda())
    model.to("cpu")
    torch.testing.assert_close(logits_gpu.cpu(), logits_cpu, rtol=1e-3, atol=1e-4)
    for a, b in zip(rows_cpu, rows_gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("autocast", [False, True])
def test_sdpa_path_on_cuda_matches_the_articles_math(autocast):
    torch.manual_seed(0)
    block = vggattn.GlobalAttention(64).cuda()
    block.gamma.data.fill_(0.7)
    x = torch.randn(2, 64, 28, 20, device="cuda")
    with torch.no_grad():
        want = block.forward_reference(x)
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            got = block(x)
    tol = 3e-2 if autocast else 1e-4
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_training_step_with_fp16_amp(toy_data, tmp_path, caplog):  # noqa: F811
    caplog.set_level("INFO")
    result = run(toy_data, tmp_path / "run", "--epochs", "2", "--device", "cuda", "--precision", "auto")
    assert "autocast torch.float16" in caplog.text
    losses = [h["train_loss"] for h in result["history"]]
    assert all(np.isfinite(losses))
    model, _ = vggattn.load_checkpoint(tmp_path / "run" / "best.safetensors", device="cuda")
    assert all(abs(g) > 0 for g in vggattn.gammas(model).values())  # gamma received gradients


def test_analysis_on_cuda_equals_cpu():
    model, meta = shipped_or_tiny()
    image = Image.open(vggattn.DEFAULT_CHECKPOINT.parent.parent / "assets" / "church.jpg")
    cpu = analyze(model, meta, image)
    gpu = analyze(model.to("cuda"), meta, image)
    model.to("cpu")
    assert list(cpu.top_k(5)) == list(gpu.top_k(5))
    torch.testing.assert_close(gpu.probs, cpu.probs, rtol=1e-3, atol=1e-4)
    for c, g in zip(cpu.blocks, gpu.blocks):
        np.testing.assert_allclose(g.row_map((60, 80)), c.row_map((60, 80)), rtol=1e-3, atol=1e-4)
        assert c.query_index((60, 80)) == g.query_index((60, 80))
        np.testing.assert_allclose(g.contribution, c.contribution, rtol=1e-3, atol=1e-4)


def test_study_on_cuda_equals_cpu(tmp_path):
    model, meta = tiny_model(num_classes=3), tiny_meta(input_size=64, num_classes=3)
    meta["class_names"] = ["a", "b", "c"]
    rng = np.random.default_rng(0)
    for c in meta["class_names"]:
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    kw = dict(workers=0, sanity_images=2, n_boot=100, progress=False)
    cpu = study.run_study(model, meta, tmp_path, **kw)
    gpu = study.run_study(model.to("cuda"), meta, tmp_path, **kw)
    for name, layer in cpu["layers"].items():
        for stat in study.STATS:
            assert gpu["layers"][name][stat] == pytest.approx(layer[stat], rel=1e-3, abs=1e-5), (name, stat)
    assert set(gpu["interventions"]) == set(cpu["interventions"])  # (a random model's near-ties may flip top-1)
