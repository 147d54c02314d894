"""The package as a user installs it: a wheel of `vggattn` alone, its console scripts run from
outside the checkout (the wheel is installed into a folder of its own; its dependencies come from
the test's environment)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["vggattn-app", "vggattn-train", "vggattn-evaluate", "vggattn-explain", "vggattn-study", "vggattn-plots"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp / "dist"), "-q"], capture_output=True, text=True, cwd=tmp)
    assert build.returncode == 0, build.stderr
    for leftover in ("build", "vggattn.egg-info"):  # setuptools builds in the source tree
        shutil.rmtree(ROOT / leftover, ignore_errors=True)
    wheel = next((tmp / "dist").glob("vggattn-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                              str(tmp / "site"), str(wheel), "-q"], capture_output=True, text=True, cwd=tmp)
    assert install.returncode == 0, install.stderr
    return wheel, tmp / "site", tmp


def test_the_wheel_holds_the_library_only(installed):
    wheel, _, _ = installed
    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert top == {"vggattn", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}


def run_outside(site: Path, cwd: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_import_comes_from_the_installed_wheel(installed):
    _, site, tmp = installed
    out = run_outside(site, tmp, sys.executable, "-c", "import vggattn; print(vggattn.__file__)")
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(site)
    assert all((site / "vggattn" / "web" / name).is_file() for name in ("hover.js", "hover.css", "hover.html"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_scripts_answer_help(installed, script):
    _, site, tmp = installed
    out = run_outside(site, tmp, str(site / "bin" / script), "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and "--" in out.stdout
