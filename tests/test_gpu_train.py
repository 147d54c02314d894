"""scripts/gpu_train.py's pieces on the CPU (GPU-side crops, the two-file export that travels back
from the GPU machine), and the temperature fit and calibration error they use."""

import importlib.util
from pathlib import Path

import pytest
import torch

import vggattn
from conftest import tiny_model

spec = importlib.util.spec_from_file_location("gpu_train", Path(__file__).resolve().parent.parent / "scripts" / "gpu_train.py")
gpu_train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_train)


def test_random_resized_crop_shapes_and_the_identity_crop():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 40, 40, 3), dtype=torch.uint8)
    out = gpu_train.random_resized_crop(images, 24)
    assert out.shape == (6, 3, 24, 24) and torch.isfinite(out).all()
    # the whole image at its own size (scale 1, ratio 1) is the image itself, possibly mirrored
    full = gpu_train.random_resized_crop(images, 40, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    want = gpu_train.whole_image(images, 40)
    for a, b in zip(full, want):
        assert torch.allclose(a, b, atol=1e-4) or torch.allclose(a, b.flip(-1), atol=1e-4)


def test_fit_temperature_recovers_a_known_temperature_and_lowers_ece():
    from vggattn.training.evaluate import expected_calibration_error as ece, fit_temperature

    torch.manual_seed(0)
    z = torch.randn(20000, 10) * 3
    labels = torch.distributions.Categorical(logits=z).sample()  # calibrated at T = 1 for logits z
    overconfident = z * 2.5  # the same model, overconfident: the right temperature is 2.5
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(2.5, rel=0.05)
    assert ece((overconfident / t).softmax(1), labels) < 0.02 < ece(overconfident.softmax(1), labels)


def test_exported_halves_join_into_the_same_checkpoint(tmp_path):
    model = tiny_model()
    meta = {"class_names": [f"c{i}" for i in range(10)], "input_size": 64, "mean": [0.5] * 3, "std": [0.2] * 3,
            "temperature": 1.5, "training": {}}
    bn_model = vggattn.VGG16WithAttention(10, width=0.125, hidden=32, batch_norm=True).eval()
    gpu_train.export_split(bn_model, meta, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"main.features.safetensors", "main.rest.safetensors"}
    gpu_train.join([tmp_path / "main.features.safetensors", tmp_path / "main.rest.safetensors"], tmp_path / "m.safetensors")
    loaded, loaded_meta = vggattn.load_checkpoint(tmp_path / "m.safetensors", device="cpu")
    assert loaded_meta["temperature"] == 1.5 and not loaded.config.batch_norm
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), vggattn.fold_batchnorm(bn_model)(x))
    del model
