import pickle

import pytest
import torch

import article_reference as article
import vggattn
from conftest import tiny_meta, tiny_model
from vggattn import CheckpointError, load_checkpoint, save_checkpoint


def test_roundtrip_keeps_weights_and_meta(tmp_path):
    model = tiny_model(num_classes=4)
    meta = {**tiny_meta(num_classes=4), "training": {"dataset": "toy", "epochs": 3, "val_top1": 0.5}}
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, meta, path)
    loaded, got = load_checkpoint(path, device="cpu")
    assert got["class_names"] == meta["class_names"] and got["input_size"] == 64
    assert got["training"]["epochs"] == 3 and got["config"]["width"] == 0.125
    assert not loaded.training
    x = torch.randn(2, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with torch.no_grad():  # loaded models run channels_last: the same function, other rounding
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


def test_article_pth_loads_with_imagenet_defaults(tmp_path):
    torch.manual_seed(0)
    ref = article.vgg16_with_attention().eval()  # the article's default: 1000 classes, full width
    for m in ref.modules():
        if isinstance(m, article.GlobalAttention):
            m.gamma.data.fill_(0.3)
    path = tmp_path / "article.pth"
    torch.save(ref.state_dict(), path)
    model, meta = load_checkpoint(path, device="auto")
    assert meta["input_size"] == 224 and meta["mean"] == [0.485, 0.456, 0.406]
    assert len(meta["class_names"]) == 1000 and meta["class_names"][0] == "tench"
    assert meta["config"]["width"] == 1.0 and meta["config"]["hidden"] == 4096
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_prefixed_state_dicts_load(tmp_path, prefix):
    model = tiny_model(num_classes=3)
    path = tmp_path / "prefixed.pth"
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
    loaded, meta = load_checkpoint(path)
    assert meta["config"]["num_classes"] == 3 and meta["config"]["width"] == 0.125 and meta["config"]["hidden"] == 32
    assert meta["class_names"] == ["class 0", "class 1", "class 2"]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_strict_errors_name_the_keys(tmp_path):
    sd = tiny_model().state_dict()
    bad = dict(sd)
    del bad["features.22.gamma"]
    bad["features.99.weight"] = torch.zeros(1)
    bad["features.14.conv_key.weight"] = torch.zeros(5, 32, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "missing keys ['features.22.gamma']" in msg
    assert "unexpected keys ['features.99.weight']" in msg
    assert "features.14.conv_key.weight: checkpoint (5, 32, 1, 1) vs model (4, 32, 1, 1)" in msg


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"features.0.weight": Payload(marker)}, f)
    torch.save({"x": Payload(marker)}, tmp_path / "evil_zip.pth")
    marker.unlink(missing_ok=True)  # torch.save ran __reduce__? it does not; be sure anyway
    for p in (path, tmp_path / "evil_zip.pth"):
        with pytest.raises(CheckpointError, match="weights-only"):
            load_checkpoint(p)
    assert not marker.exists()


def test_broken_files_give_clear_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_checkpoint(tiny_model(), tiny_meta(), good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(cut)
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)
    text = tmp_path / "notes.pth"
    text.write_text("hello, not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(text)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    cut_pth = tmp_path / "cut.pth"
    torch.save(tiny_model().state_dict(), tmp_path / "full.pth")
    cut_pth.write_bytes((tmp_path / "full.pth").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(cut_pth)


def test_other_architecture_is_named(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "resnet.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError, match="not an attention-VGG16 state_dict"):
        load_checkpoint(path)


def test_device_selection():
    assert vggattn.models.checkpoint.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match="no CUDA"):
            vggattn.models.checkpoint.resolve_device("cuda")
