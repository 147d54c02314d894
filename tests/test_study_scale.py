"""The study at scale: the batched statistics against the per-image ones, per-image records, a killed study
resumed, and torchrun with two CPU processes (gloo) against one process."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vggattn import study
from test_study import tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def brute_force(a: torch.Tensor, grid, key_grid, input_size: int) -> dict[str, float]:
    """The row statistics of one image's rows a (N, M), each written out from its definition, in float64."""
    from vggattn.attention.readouts import cell_centers

    a = a.double()
    n, m = a.shape
    mean_row = a.mean(0)
    u = a / a.norm(dim=1, keepdim=True)
    off_diag = ~torch.eye(n, dtype=torch.bool)
    mix = 0.5 * (a + mean_row)
    kl = lambda p, q: (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)  # noqa: E731
    size = (input_size, input_size)
    dist = torch.cdist(cell_centers(grid, size).double(), cell_centers(key_grid, size).double())  # (N, M)
    return {"sink_mass": float(mean_row.max()), "sink_index": int(mean_row.argmax()),
            "top1_weight": float(a.max(1).values.mean()),
            "cosine_distance": float((1 - (u @ u.t())[off_diag]).mean()) if n > 1 else 0.0,
            "jsd": float((0.5 * kl(a, mix) + 0.5 * kl(mean_row.expand_as(a), mix)).mean()),
            "entropy_frac": float(-torch.xlogy(a, a).sum(1).mean() / math.log(m)),
            "mean_distance_px": float((a * dist).sum(1).mean())}


def assert_batched_equal_brute_force(maps, input_size: int, **kw) -> dict:
    """Every image's batched statistics against `brute_force` of its rows (the mean of its heads' rows)."""
    got = study.batch_statistics(maps, input_size, **kw)
    rows = maps.rows().double().mean(1)  # (B, N or 1, M)
    n = maps.grid[0] * maps.grid[1]
    for b in range(len(rows)):
        ref = brute_force(rows[b].expand(n, -1), maps.grid, maps.key_grid, input_size)
        for key, value in ref.items():
            tol = 1e-4 if key == "mean_distance_px" else 1e-5
            assert abs(got[key][b] - value) <= tol * max(1.0, abs(value)), (key, b, got[key][b], value)
    return got


@pytest.mark.parametrize("grid,key_grid,heads,images,block", [((6, 7), (6, 7), 1, 5, 1 << 12),
                                                              ((16, 16), (16, 16), 1, 3, 1 << 22),
                                                              ((32, 32), (32, 32), 1, 1, 1 << 16),
                                                              ((8, 8), (4, 4), 1, 3, 1 << 10),
                                                              ((6, 6), (6, 6), 4, 2, 1 << 12)])
def test_batch_statistics_equal_the_per_image_ones(grid, key_grid, heads, images, block):
    """One pass, several images at once, keys on their own grid, several heads (their rows' mean), with a bias: the
    same numbers as each image's statistics written out from their definitions (distances 1e-4: float32 sums)."""
    from vggattn.attention.adapters import BlockMaps

    torch.manual_seed(0)
    n, m = grid[0] * grid[1], key_grid[0] * key_grid[1]
    q, k = torch.randn(images, heads, n, 8) * 2, torch.randn(images, heads, m, 8) * 2
    bias = torch.randn(images, heads, n, m) if heads > 1 else None
    maps = BlockMaps("t", q, k, grid, key_grid, scale=0.7, bias=bias)
    assert_batched_equal_brute_force(maps, 128, block_elements=block)


def test_records_merge_in_index_order_and_drop_repeats(tmp_path):
    records = study.Records(tmp_path / "r", rank=1)
    records.write({"index": np.array([4, 5]), "v": np.array([40.0, 50.0])})
    records.write({"index": np.array([0, 1]), "v": np.array([0.0, 10.0])})
    study.Records(tmp_path / "r", rank=0).write({"index": np.array([2, 3, 0]), "v": np.array([20.0, 30.0, 0.0])})
    merged = records.load()
    assert merged["index"].tolist() == [0, 1, 2, 3, 4, 5] and merged["v"].tolist() == [0, 10, 20, 30, 40, 50]
    assert records.done() == {0, 1, 2, 3, 4, 5} and not list((tmp_path / "r").glob(".*tmp"))
    assert study.shard(5, 1, 2) == [1, 3, 0] and study.shard(5, 0, 2) == [0, 2, 4]  # padded as DistributedSampler


def comparable(s: dict) -> dict:
    return {k: v for k, v in s.items() if k not in ("wall_s", "world_size")}


def assert_same_study(a: dict, b: dict) -> None:
    """Equal to float rounding. The runs compared batch alike (batches of other sizes round the convolutions
    otherwise: 4e-7 seen, enough to move a value across a histogram bin's edge or swap two near-tied ranks)."""
    def walk(x, y, path=""):
        if isinstance(x, dict):
            assert set(x) == set(y), path
            for key in x:
                walk(x[key], y[key], f"{path}.{key}")
        elif isinstance(x, list):
            assert len(x) == len(y), path
            for i, (u, w) in enumerate(zip(x, y)):
                walk(u, w, f"{path}[{i}]")
        elif isinstance(x, float):
            assert x == pytest.approx(y, rel=1e-9, abs=1e-12, nan_ok=True), path
        else:
            assert x == y, path
    walk(comparable(a), comparable(b))


def cli(ckpt, data, out, *extra, batch=2):
    return [sys.executable, "-m", "vggattn.study", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out),
            "--workers", "0", "--batch-size", str(batch), "--sanity-images", "3", "--bootstrap", "100", "--device", "cpu",
            *extra]


def one_thread_study(argv: list[str]) -> None:
    """vggattn.study in this process on one thread, as each torchrun rank runs (OMP_NUM_THREADS=1): the reference
    a distributed study must equal (no second interpreter to start)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert study.main(argv) == 0
    finally:
        torch.set_num_threads(threads)


def kill_after_two_batches(study_args: list[str], out: Path) -> None:
    """Run vggattn.study with these arguments (and --out) until two batches are recorded, then SIGKILL it; check that
    just those two records are there and no study.json."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    hanging = [sys.executable, str(Path(__file__).with_name("study_hanging.py")), "2", *study_args, "--out", str(out)]
    proc = subprocess.Popen(hanging, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # wait until it has recorded two batches
            if "STUDY_HANGING" in line:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert len(list((out / "records").glob("part-*.npz"))) == 2 and not (out / "study.json").exists()


def test_a_killed_study_resumes_to_the_same_study(tmp_path):
    """SIGKILL after two batches are recorded; --resume studies only the rest and writes the study.json of an
    uninterrupted run."""
    _, _, ckpt, data = tiny_checkpoint(tmp_path, per_class=4)  # 12 images, 6 batches of 2
    assert study.main(cli(ckpt, data, tmp_path / "whole")[3:]) == 0
    whole = json.loads((tmp_path / "whole" / "study.json").read_text())

    out = tmp_path / "killed"
    kill_after_two_batches(cli(ckpt, data, out)[3:], out)  # (its --out repeated: the same folder)
    done_before = study.Records(out / "records").done()
    assert done_before == {0, 1, 2, 3}
    assert study.main(cli(ckpt, data, out, "--resume")[3:]) == 0
    assert len(list((out / "records").glob("part-*.npz"))) == 6  # the four missing batches, nothing twice
    assert_same_study(json.loads((out / "study.json").read_text()), whole)
    # without --resume a study starts over (its old records are dropped)
    assert study.main(cli(ckpt, data, out)[3:]) == 0
    assert len(list((out / "records").glob("part-*.npz"))) == 6


def test_torchrun_two_cpu_processes_equal_one(tmp_path):
    """torchrun --nproc_per_node=2 (gloo): each rank a disjoint share (11 images: the sampler repeats one to pad),
    rank 0 merges; the same study.json as one process (both batch by one image, see `assert_same_study`)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not beside this Python (it comes with torch)")
    _, _, ckpt, data = tiny_checkpoint(tmp_path, per_class=4)
    (data / "c" / "3.png").unlink()  # 11 images: an odd count, so DistributedSampler pads
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}  # both runs: one thread each
    one_thread_study(cli(ckpt, data, tmp_path / "one", "--faithfulness-images", "3", batch=1)[3:])
    one = json.loads((tmp_path / "one" / "study.json").read_text())
    run = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "vggattn.study",
                          *cli(ckpt, data, tmp_path / "two", "--faithfulness-images", "3", batch=1)[3:]], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "study.json").read_text())
    assert two["world_size"] == 2 and two["images"] == 11
    parts = list((tmp_path / "two" / "records").glob("part-*.npz"))
    assert {p.name.split("-")[1] for p in parts} == {"r0", "r1"}  # both ranks wrote their share
    assert_same_study(two, one)


def brought_model_study(tmp_path, *, images: int, batch: int) -> list[str]:
    """vggattn.study's arguments for a brought model (tests/byo_models.py's 3-class classifier, seeded weights saved
    as a .pth) on `images` random images of classes a, b, c."""
    import byo_models

    _, _, _, data = tiny_checkpoint(tmp_path, per_class=4)
    for extra in sorted(data.glob("*/*.png"))[images:]:
        extra.unlink()
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    torch.manual_seed(0)
    torch.save(byo_models.classifier().state_dict(), tmp_path / "w.pth")
    return ["--model", "byo_models:classifier", "--checkpoint", str(tmp_path / "w.pth"), "--input-size", "32",
            "--classes", str(tmp_path / "classes.txt"), "--data", str(data), "--workers", "0", "--batch-size",
            str(batch), "--sanity-images", "3", "--bootstrap", "100", "--device", "cpu"]


def test_a_killed_study_of_any_model_resumes_to_the_same_study(tmp_path):
    """The study of a brought model (--model) keeps per-image records too: SIGKILL after two batches, --resume
    studies only the rest and writes the study.json of an uninterrupted run."""
    args = brought_model_study(tmp_path, images=12, batch=2)  # 6 batches of 2
    assert study.main([*args, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "study.json").read_text())
    out = tmp_path / "killed"
    kill_after_two_batches(args, out)
    assert study.Records(out / "records").done() == {0, 1, 2, 3}
    assert study.main([*args, "--out", str(out), "--resume"]) == 0
    assert len(list((out / "records").glob("part-*.npz"))) == 6  # the four missing batches, nothing twice
    assert_same_study(comparable(json.loads((out / "study.json").read_text())), comparable(whole))
    assert whole["layers"]["features.4"]["family"] == "Non-local block (Wang et al. 2018)"


def test_torchrun_two_cpu_processes_study_any_model_as_one(tmp_path):
    """The study of a brought model under torchrun --nproc_per_node=2: each rank its share of 11 images, rank 0
    merges; the same study.json as one process."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not beside this Python (it comes with torch)")
    args = brought_model_study(tmp_path, images=11, batch=1)  # 11 images: DistributedSampler pads one
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).parent)}  # byo_models, in every rank
    one_thread_study([*args, "--out", str(tmp_path / "one")])
    run = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "vggattn.study", *args, "--out",
                          str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    one, two = (json.loads((tmp_path / o / "study.json").read_text()) for o in ("one", "two"))
    assert two["world_size"] == 2 and two["images"] == 11
    assert {p.name.split("-")[1] for p in (tmp_path / "two" / "records").glob("part-*.npz")} == {"r0", "r1"}
    assert_same_study(two, one)


def random_model(which: str, classes: list[str]) -> tuple[torch.nn.Module, dict]:
    """The article's model (tiny) or a brought one (the zoo's non-local ResNet), random weights whose blocks change
    their input, with a meta for 64 px inputs and these classes."""
    from conftest import tiny_meta, tiny_model
    from vggattn.models.zoo import nonlocal_resnet

    meta = {**tiny_meta(input_size=64, num_classes=len(classes)), "class_names": classes}
    if which == "article":
        return tiny_model(num_classes=len(classes)), meta
    torch.manual_seed(0)
    model = nonlocal_resnet(len(classes)).eval()
    with torch.no_grad():
        model.nonlocal3.W[1].weight.fill_(0.5)  # the block does something (it starts as the identity)
    return model, {**meta, "source": "vggattn.models.zoo:nonlocal_resnet"}


@pytest.mark.parametrize("which", ["article", "nonlocal_resnet"])
def test_every_model_gets_batched_statistics_contribution_and_faithfulness(which, data_root):
    """The one engine on the article's model and on a brought one, 4 Imagenette images: a real batch's statistics
    equal each image's written out from its rows; contribution and the output's distances for every block (each
    one's output has its input's shape); the faithfulness measures for every block."""
    from vggattn.models.byo import blocks_of
    from vggattn.attention.trace import watch

    split = data_root / "val"
    model, meta = random_model(which, sorted(p.name for p in split.iterdir() if p.is_dir()))
    blocks = blocks_of(model, meta)
    ds, _ = study.load_split(split, meta, 4)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        _, seen = watch(model, x, [name for name, *_ in blocks])
        maps_of = {name: adapter.maps(module, seen[name].input) for name, module, adapter in blocks}
    for maps in maps_of.values():
        assert maps.query is not None and len(maps.query) == 4  # Q and K of the whole batch: batched statistics
        assert_batched_equal_brute_force(maps, 64)
    s = study.run_study(model, meta, split, limit=4, batch_size=4, workers=0, sanity_images=2, n_boot=20,
                        faithfulness_images=2, progress=False)
    assert list(s["layers"]) == [name for name, *_ in blocks]
    for layer in s["layers"].values():
        assert layer["contribution"] > 0 and 0 <= layer["cosine_distance_output"] <= 2, layer
    f = s["faithfulness"]
    assert f["images"] == 2 and set(f["layers"]) == set(s["layers"])
    for layer in f["layers"].values():
        assert all(math.isfinite(p["mean"]) and p["mean"] >= 0 for curve in layer["deletion"].values() for p in curve)
        assert 0 < layer["sink"]["output_share"] and layer["sink"]["value_norm_ratio"] > 0
