"""Checkpoints as folders and Hub ids: save_pretrained -> load, a Hub id through huggingface_hub (its
download patched, and for real from a local cache with HF_HUB_OFFLINE=1), an unknown id offline."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vggattn
from conftest import tiny_meta, tiny_model
from vggattn.models import hub



@pytest.fixture
def saved(tmp_path):
    model = tiny_model()
    meta = {**tiny_meta(input_size=64), "training": {"dataset": "imagenette2-224", "val_top1": 0.9001}}
    return model, meta, hub.save_pretrained(model, meta, tmp_path / "vgg16att-tiny")


def test_save_pretrained_then_load_gives_identical_logits_and_a_hub_card(saved):
    model, meta, folder = saved
    loaded, loaded_meta = vggattn.load_checkpoint(folder, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    x = torch.randn(2, 3, 64, 64)
    model = model.to(memory_format=torch.channels_last)  # as load_checkpoint leaves it: the same kernels
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded_meta["class_names"] == meta["class_names"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: vggattn\n") and "- imagenette2-224" in card and "value: 0.9001" in card


def test_a_hub_id_resolves_through_huggingface_hub(saved, monkeypatch):
    model, _, folder = saved
    calls = []

    def download(repo_id, filename, **kw):
        calls.append((repo_id, filename))
        return str(folder / filename)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    loaded, _ = vggattn.load_checkpoint("someone/vgg16att-birds", device="cpu")
    assert calls == [("someone/vgg16att-birds", "model.safetensors")]
    x = torch.randn(1, 3, 64, 64)
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def load_offline(hf_home: Path, repo_id: str) -> subprocess.CompletedProcess:
    code = ("import vggattn\n"
            "try:\n"
            f"    model, meta = vggattn.load_checkpoint({repo_id!r}, device='cpu')\n"
            "    print('loaded', meta['class_names'][0])\n"
            "except vggattn.CheckpointError as e:\n"
            "    print('error:', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_offline_a_cached_id_loads_and_an_unknown_one_is_one_sentence(saved, tmp_path):
    _, meta, folder = saved
    snapshot = tmp_path / "hf" / "hub" / "models--someone--vgg16att-birds" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    shutil.copy(folder / "model.safetensors", snapshot / "model.safetensors")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    cached = load_offline(tmp_path / "hf", "someone/vgg16att-birds")
    assert cached.stdout.strip() == f"loaded {meta['class_names'][0]}", cached.stderr
    unknown = load_offline(tmp_path / "hf", "nobody/nothing")
    assert unknown.returncode == 0, unknown.stderr
    line = unknown.stdout.strip()
    assert line.startswith("error: could not get nobody/nothing from the Hugging Face Hub") and "\n" not in line
    assert "Traceback" not in unknown.stdout + unknown.stderr


def test_the_app_starts_from_a_hub_style_folder(saved, tmp_path):
    """`vggattn-app --checkpoint FOLDER` in its own process serves the page."""
    import time
    import urllib.request

    from server import free_port

    _, _, folder = saved
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vggattn.app", "--checkpoint", str(folder), "--port", str(port),
                             "--device", "cpu"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, page = time.time() + 90, ""
        while time.time() < deadline and proc.poll() is None and "vggattn" not in page:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
            except OSError:
                time.sleep(0.5)
        assert "vggattn" in page, proc.stderr.read() if proc.poll() is not None else "no page in 90 s"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(vggattn.CheckpointError, match="checkpoint not found"):
        vggattn.load_checkpoint("runs/best.safetensors")


def test_from_pretrained_round_trip(saved, tmp_path):
    _, meta, folder = saved
    model = hub.from_pretrained(folder)
    assert model.meta["class_names"] == meta["class_names"]
    again = hub.from_pretrained(hub.save_pretrained(model, model.meta, tmp_path / "again"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), model(x)) and again.meta["class_names"] == meta["class_names"]


def test_push_to_hub_uploads_a_folder_that_loads_back(saved, tmp_path, monkeypatch):
    """push_to_hub through a stand-in for huggingface_hub's HfApi (no Hub from here): the repo is created,
    the uploaded folder holds the weights and the card, and what was uploaded loads to identical logits."""
    import huggingface_hub

    model, meta, _ = saved
    hub_side, calls = tmp_path / "hub", []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", repo_id))
            shutil.copytree(folder_path, hub_side / repo_id)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = hub.push_to_hub(model, meta, "me/vgg16att-tiny", private=True)
    assert url == "https://huggingface.co/me/vgg16att-tiny"
    assert calls == [("token", None), ("create", "me/vgg16att-tiny", True, True), ("upload", "me/vgg16att-tiny")]
    uploaded = hub_side / "me" / "vgg16att-tiny"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "model.safetensors"]
    assert "library_name: vggattn" in (uploaded / "README.md").read_text()
    loaded, loaded_meta = vggattn.load_checkpoint(uploaded, device="cpu")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.to(memory_format=torch.channels_last)(x))
    assert loaded_meta["class_names"] == meta["class_names"]


def test_the_model_module_does_no_io():
    """The model is maths: loading, saving and the Hub live in checkpoint.py and hub.py (no import circle)."""
    import ast

    source = (Path(vggattn.__file__).parent / "models" / "vgg.py").read_text()
    imported = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"checkpoint", "hub", "safetensors", "huggingface_hub"}, imported
    assert not any(hasattr(vggattn.VGG16WithAttention, m) for m in ("from_pretrained", "save_pretrained", "push_to_hub"))


def test_save_pretrained_with_a_bare_meta(tmp_path):
    """A meta without input size, config or class names (or none at all) saves: the model's config, and what a
    checkpoint without metadata loads with (224 px, ImageNet normalisation, numbered classes)."""
    model = vggattn.vgg16_with_attention(3, width=0.125, hidden=16).eval()
    for meta in ({"training": {"note": "bare"}}, None):
        folder = hub.save_pretrained(model, meta, tmp_path / str(meta is None))
        loaded, got = vggattn.load_checkpoint(folder)
        assert got["input_size"] == 224 and got["class_names"] == ["class 0", "class 1", "class 2"]
        assert got["config"]["num_classes"] == 3 and "224 px" in (folder / "README.md").read_text()
    assert got["training"] == {} and hub.from_pretrained(tmp_path / "False").meta["training"] == {"note": "bare"}
