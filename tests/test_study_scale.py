"""The study at scale: the batched statistics against the per-image ones, per-image records, a killed study
resumed, and torchrun with two CPU processes (gloo) against one process."""

import json
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


@pytest.mark.parametrize("grid,images,block", [((6, 7), 5, 1 << 12), ((16, 16), 3, 1 << 22), ((32, 32), 1, 1 << 16)])
def test_batch_statistics_equal_the_per_image_ones(grid, images, block):
    """One pass, several images at once, the output's statistics from delta = gamma * A V: the same numbers as
    `attention_statistics` from the rows and V, image by image (distances 1e-4: those were float32 cdist)."""
    torch.manual_seed(0)
    n = grid[0] * grid[1]
    q, k = torch.randn(images, n, 8) * 2, torch.randn(images, n, 8) * 2
    x, v, gamma = torch.randn(images, n, 24), torch.randn(images, n, 24), -0.7
    delta = torch.stack([gamma * (study.softmax_rows(q[b], k[b])(0, n) @ v[b]) for b in range(images)])
    got = study.batch_statistics(q, k, grid, 128, x=x, delta=delta, block_elements=block)
    for b in range(images):
        ref = study.attention_statistics(study.softmax_rows(q[b], k[b]), grid, 128, x=x[b], value=v[b], gamma=gamma)
        for key, value in ref.items():
            tol = 1e-4 if key == "mean_distance_px" else 1e-5
            assert abs(got[key][b] - value) <= tol * max(1.0, abs(value)), (key, b, got[key][b], value)


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
    subprocess.run(cli(ckpt, data, tmp_path / "one", "--faithfulness-images", "3", batch=1), env=env, check=True,
                   capture_output=True, timeout=300)
    one = json.loads((tmp_path / "one" / "study.json").read_text())
    run = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "vggattn.study",
                          *cli(ckpt, data, tmp_path / "two", "--faithfulness-images", "3", batch=1)[3:]], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "study.json").read_text())
    assert two["world_size"] == 2 and two["images"] == 11
    parts = list((tmp_path / "two" / "records").glob("part-*.npz"))
    assert {p.name.split("-")[1] for p in parts} == {"r0", "r1"}  # both ranks wrote their share
    assert_same_study(two, one)


def test_runs_sharing_segments_equal_each_run_alone():
    """run_all computes the segments runs share once; each run's logits equal run_from's."""
    from conftest import tiny_model

    model = tiny_model(num_classes=4)
    torch.manual_seed(2)
    x = torch.randn(3, 3, 64, 64)
    layers = study.attention_indices(model)
    first = min(layers.values())
    _, entering = study.entering_blocks(model, model.features[:first](x), first, layers.values())
    runs = study.run_modes(layers)
    shared = study.run_all(model, entering, runs)
    assert set(shared) == set(runs) and len(runs) == 12
    for key, modes in runs.items():
        torch.testing.assert_close(shared[key], study.run_from(model, entering[min(modes)], min(modes), modes),
                                   rtol=0, atol=0, msg=key)


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
    for out, launcher in (("one", [sys.executable]), ("two", [str(torchrun), "--standalone", "--nproc_per_node=2"])):
        run = subprocess.run([*launcher, "-m", "vggattn.study", *args, "--out", str(tmp_path / out)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    one, two = (json.loads((tmp_path / o / "study.json").read_text()) for o in ("one", "two"))
    assert two["world_size"] == 2 and two["images"] == 11
    assert {p.name.split("-")[1] for p in (tmp_path / "two" / "records").glob("part-*.npz")} == {"r0", "r1"}
    assert_same_study(two, one)
