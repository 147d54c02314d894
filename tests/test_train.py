"""Training and evaluation end to end on tiny data: generated images, a tiny model, CPU."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vggattn
from vggattn.training import evaluate, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--width", "0.125", "--hidden", "32", "--input-size", "32", "--batch-size", "8", "--workers", "0",
        "--lr", "3e-3", "--dropout", "0.0"]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """Three easily told apart classes of 40x30 images: red, green and blue blobs on noise."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 6)):
        for c, name in enumerate(("red", "green", "blue")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 90, (30, 40, 3)).astype(np.uint8)
                y, x = rng.integers(0, 15), rng.integers(0, 20)
                img[y:y + 15, x:x + 20, c] = 255
                Image.fromarray(img).save(d / f"{i}.png")
    (root / "names.md").write_text("| folder | name |\n|---|---|\n| red | Red thing |\n| green | Green thing |\n| blue | Blue thing |\n")
    return root


def run(data, out, *extra):
    return train.run(["--data", str(data), "--out", str(out), "--names", str(data / "names.md"), *TINY, *extra])


def test_loss_falls_and_checkpoint_loads(toy_data, tmp_path):
    result = run(toy_data, tmp_path, "--epochs", "6")
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0] * 0.8, losses
    assert len(result["history"]) == 6 and all(len(h["gammas"]) == 3 for h in result["history"])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert list(log[-1]["gammas"]) == ["features.14", "features.22", "features.30"]  # article names, not BN-shifted
    model, meta = vggattn.load_checkpoint(tmp_path / "best.safetensors")
    assert meta["class_names"] == ["Blue thing", "Green thing", "Red thing"]  # folder order: blue, green, red
    assert not meta["config"]["batch_norm"]  # folded on export: the article's layout
    assert set(model.state_dict()) == set(vggattn.vgg16_with_attention(3, width=0.125, hidden=32).state_dict())
    assert meta["training"]["best_epoch"] == result["best"]["epoch"]
    recipe = meta["training"]["recipe"]  # no path of this machine in a checkpoint that may be shared
    assert recipe["out"] == tmp_path.name and "/" not in json.dumps(recipe) and "data" not in meta["training"]
    # the folded export scores exactly what the BatchNorm model scored at its best epoch
    targets, top5 = evaluate.predict_folder(model, meta, toy_data / "val", workers=0)
    assert evaluate.metrics(targets, top5, meta["class_names"])["top1"] == pytest.approx(result["best"]["top1"])
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_continues_at_the_right_epoch_and_matches_an_uninterrupted_run(toy_data, tmp_path, monkeypatch):
    full = tmp_path / "full"
    run(toy_data, full, "--epochs", "3")

    cut = tmp_path / "cut"
    real_write_log = train.write_log

    def interrupt_after_two(path, history):
        real_write_log(path, history)
        if len(history) == 2:
            raise KeyboardInterrupt  # as if the run were stopped after epoch 2 was saved

    monkeypatch.setattr(train, "write_log", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(toy_data, cut, "--epochs", "3")
    monkeypatch.setattr(train, "write_log", real_write_log)
    assert torch.load(cut / "last.pt", weights_only=True)["epoch"] == 1  # 0-based: two epochs done

    resumed = run(toy_data, cut, "--epochs", "3", "--resume")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(cut / "last.pt", weights_only=True)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_bad_flags_fail_before_writing_anything(toy_data, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(train.TrainingError, match="--init imagenet needs"):
        run(toy_data, out, "--init", "imagenet")
    with pytest.raises(train.TrainingError, match="does not exist"):
        run(toy_data, out, "--resume")
    with pytest.raises(train.TrainingError, match="ImageFolder root"):
        run(tmp_path, out)
    assert not out.exists()
    # the command (vggattn-train) says it in one line and exits 2 (bad input, as every CLI)
    assert train.main(["--data", str(tmp_path), "--out", str(out), *TINY]) == 2
    assert not out.exists()


def test_no_attention_baseline_has_no_blocks(toy_data, tmp_path):
    run(toy_data, tmp_path, "--epochs", "1", "--no-attention")
    model, meta = vggattn.load_checkpoint(tmp_path / "best.safetensors")
    assert not meta["config"]["attention"] and not vggattn.attention_layer_names(model)


def test_ddp_two_cpu_processes(toy_data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vggattn.training.train",
           "--data", str(toy_data), "--out", str(tmp_path), "--names", str(toy_data / "names.md"), "--epochs", "2", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2" in proc.stderr and "parameters of all 2 ranks agree" in proc.stderr
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    model, meta = vggattn.load_checkpoint(tmp_path / "best.safetensors")
    # every rank saw half of each epoch: 48 images / (2 ranks x 8) = 3 steps per epoch
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 2 * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "last.pt", "log.jsonl"]


def test_evaluate_matches_a_hand_count(data_root):
    torch.manual_seed(0)
    model = vggattn.vgg16_with_attention(10, width=0.125, hidden=32).eval()
    meta = {"class_names": [f"c{i}" for i in range(10)], "input_size": 64,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    targets, top5 = evaluate.predict_folder(model, meta, data_root / "val", limit_per_class=2, workers=0)
    m = evaluate.metrics(targets, top5, meta["class_names"])
    folders = sorted(p for p in (data_root / "val").iterdir() if p.is_dir())
    right = total = 0
    with torch.no_grad():
        for label, folder in enumerate(folders):
            for f in sorted(folder.iterdir())[:2]:
                pred = model(vggattn.preprocess(Image.open(f), meta)).argmax(1).item()
                right += pred == label
                total += 1
    assert m["n"] == total == 20
    assert m["top1"] == right / total
    assert sum(sum(r) for r in m["confusion"]) == 20


def test_flops_comparison_counts_attention():
    r = evaluate.article_flops_comparison(224)
    assert r["vgg16_gflops"] == pytest.approx(30.94, rel=0.01)  # torchvision's VGG16: 15.47 GMACs
    # the three blocks by hand: 1x1 convs to Q, K (C/8) and V (C), Q K^T and the map times V
    def block(c, hw):
        n = hw * hw
        return 2 * n * c * (c // 8) * 2 + 2 * n * c * c + 2 * n * n * (c // 8) + 2 * n * n * c
    added = block(256, 56) + block(512, 28) + block(512, 14)
    assert r["attention_vgg16_gflops"] - r["vgg16_gflops"] == pytest.approx(added / 1e9, rel=1e-6)
    assert r["attention_vgg16_params"] - r["vgg16_params"] == 3 * 1 + 2 * (256 * 32 + 32) + (256 * 256 + 256) \
        + 2 * 2 * (512 * 64 + 64) + 2 * (512 * 512 + 512)


def test_flops_of_a_model_on_cpu_count_its_attention():
    with_attention = evaluate.count_flops(vggattn.vgg16_with_attention(10, width=0.125, hidden=32), 64)
    without = evaluate.count_flops(vggattn.vgg16_with_attention(10, width=0.125, hidden=32, attention=False), 64)
    n, c = 16 * 16, 32  # the first block at 64 px and width 1/8
    assert with_attention - without > 2 * n * n * (c + c // 8)


def test_init_imagenet_offline_is_a_clear_error(toy_data, tmp_path, monkeypatch):
    import urllib.error

    import torchvision.models

    def offline(**kw):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models, "vgg16", offline)
    out = tmp_path / "never"
    with pytest.raises(train.TrainingError, match="could not get torchvision's VGG16 weights"):
        run(toy_data, out, "--init", "imagenet", "--width", "1", "--no-batch-norm")
    assert not out.exists()


def test_recalibrate_bn_after_training(toy_data, tmp_path):
    run(toy_data, tmp_path, "--epochs", "2", "--input-size", "48", "--train-size", "32")
    before = torch.load(tmp_path / "last.pt", weights_only=True)
    result = run(toy_data, tmp_path, "--epochs", "2", "--input-size", "48", "--train-size", "32", "--resume", "--recalibrate-bn", "30")
    assert [h["epoch"] for h in result["history"]] == [1, 2]  # nothing retrained
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert last["bn_recalibration_images"] == 30 and 0 <= last["val_top1_bn_recalibrated"] <= 1
    model, meta = vggattn.load_checkpoint(tmp_path / "best.safetensors")
    if result["best"].get("bn_recalibrated"):
        assert meta["training"]["bn_recalibration_images"] == 30
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == before["epoch"]


def test_recalibrate_batchnorm_computes_plain_statistics():
    model = vggattn.vgg16_with_attention(3, width=0.125, hidden=8, batch_norm=True)
    xs = [torch.randn(4, 3, 32, 32) * 3 + 1 for _ in range(3)]
    ds = torch.utils.data.TensorDataset(torch.cat(xs), torch.zeros(12, dtype=torch.long))
    train.recalibrate_batchnorm(model, ds, torch.device("cpu"), train.contextlib.nullcontext, 4, 0)
    first_bn = model.features[1]
    with torch.no_grad():
        conv_out = model.features[0](torch.cat(xs))  # (12, C, 32, 32)
    torch.testing.assert_close(first_bn.running_mean, conv_out.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert first_bn.momentum == 0.1 and not model.training


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(toy_data, tmp_path, monkeypatch):
    real_forward = torch.nn.CrossEntropyLoss.forward
    calls = {"n": 0}

    def poisoned(self, logits, target):
        calls["n"] += 1
        loss = real_forward(self, logits, target)
        return loss * float("nan") if calls["n"] > 6 else loss  # 6 steps = epoch 1 (48 images / 8)

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", poisoned)
    with pytest.raises(train.TrainingError, match=r"loss became nan at epoch 2.*last good checkpoint is kept"):
        run(toy_data, tmp_path, "--epochs", "3")
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 0
    vggattn.load_checkpoint(tmp_path / "best.safetensors")
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1


def test_kill_9_mid_run_then_resume(toy_data, tmp_path):
    import signal
    import time

    cmd = [sys.executable, "-m", "vggattn.training.train", "--data", str(toy_data), "--out", str(tmp_path),
           "--names", str(toy_data / "names.md"), "--epochs", "8", *TINY]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def epochs_saved() -> int:  # last.pt is written atomically: whole or absent
        path = tmp_path / "last.pt"
        return torch.load(path, weights_only=True)["epoch"] + 1 if path.exists() else 0

    deadline = time.time() + 120
    while epochs_saved() < 2 and time.time() < deadline and proc.poll() is None:  # mid-run: two epochs saved
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed mid-run"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] + 1  # whole file: loads
    assert 1 <= done < 8
    vggattn.load_checkpoint(tmp_path / "best.safetensors")
    result = run(toy_data, tmp_path, "--epochs", "8", "--resume")
    assert [h["epoch"] for h in result["history"]] == list(range(1, 9))
    assert not list(tmp_path.glob(".*.tmp"))
    model, meta = vggattn.load_checkpoint(tmp_path / "best.safetensors")
    assert meta["training"]["epochs"] >= done


def test_init_from_a_checkpoint_warm_starts_the_same_function(toy_data, tmp_path):
    run(toy_data, tmp_path / "first", "--epochs", "2")
    first = tmp_path / "first" / "best.safetensors"
    source, meta = vggattn.load_checkpoint(first)
    args = train.parse_args(["--data", str(toy_data), "--out", str(tmp_path), *TINY, "--init", str(first)])
    torch.manual_seed(0)
    started = train.build_model(train.model_config(args, 3), args.init, torch.randn(32, 3, 32, 32)).eval()
    assert started.config.batch_norm  # BatchNorm back for training, set to the identity
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(started(x), source(x), rtol=1e-4, atol=1e-5)
    # the run itself starts where the first left off: its first epoch is not back at chance
    second = run(toy_data, tmp_path / "second", "--epochs", "1", "--lr", "1e-4", "--init", str(first))
    assert second["history"][0]["val_top1"] >= meta["training"]["val_top1"] - 0.2
    with pytest.raises(train.TrainingError, match="width"):
        run(toy_data, tmp_path / "third", "--epochs", "1", "--init", str(first), "--width", "0.25")
    with pytest.raises(train.TrainingError, match="no such file"):
        run(toy_data, tmp_path / "fourth", "--epochs", "1", "--init", str(tmp_path / "missing.safetensors"))


def test_resume_refuses_a_different_recipe(toy_data, tmp_path):
    run(toy_data, tmp_path, "--epochs", "1")
    with pytest.raises(train.TrainingError, match=r"different recipe.*--epochs 1 -> 5.*--lr 0.003 -> 0.01"):
        run(toy_data, tmp_path, "--epochs", "5", "--resume", "--lr", "1e-2")
