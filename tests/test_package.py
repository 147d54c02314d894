"""The package as a user installs it: the wheel of `vggattn` alone, installed with pip into a fresh
venv, its console scripts run from outside the checkout.

The fresh venv reaches this environment's site-packages through a .pth file, so pip resolves the
wheel's declared dependencies (torch, gradio, ...) against the pinned set already here instead of
downloading a 5.5 GB torch build; `vggattn` itself comes only from the wheel."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["vggattn-app", "vggattn-train", "vggattn-evaluate", "vggattn-explain", "vggattn-study", "vggattn-plots"]


def run(*cmd, cwd, timeout=300, pythonpath=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**env, "GRADIO_ANALYTICS_ENABLED": "False", "PIP_NO_INDEX": "1"})


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("package")
    build = run(sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "-w", tmp / "dist", "-q", cwd=tmp)
    assert build.returncode == 0, build.stderr
    for leftover in ("build", "vggattn.egg-info"):  # setuptools builds in the source tree
        shutil.rmtree(ROOT / leftover, ignore_errors=True)
    wheel = next((tmp / "dist").glob("vggattn-*.whl"))
    made = run(sys.executable, "-m", "venv", "--without-pip", tmp / "venv", cwd=tmp)  # this pip installs into it
    assert made.returncode == 0, made.stderr
    site = Path(run(tmp / "venv/bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=tmp).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # the dependencies, not vggattn
    install = run(sys.executable, "-m", "pip", "--python", tmp / "venv/bin/python", "install", "--no-index", wheel,
                  cwd=tmp)  # the dependencies are resolved, none downloaded
    assert install.returncode == 0, install.stdout + install.stderr
    for dependency in ("torch", "torchvision", "safetensors", "matplotlib"):  # pip checked each declared one
        assert f"Requirement already satisfied: {dependency}" in install.stdout, install.stdout
    return wheel, tmp / "venv", site, tmp


def test_the_wheel_holds_the_library_and_its_web_files_only(venv):
    wheel, *_ = venv
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"vggattn", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert {"vggattn/view/web/hover.js", "vggattn/view/web/hover.css", "vggattn/view/web/hover.html"} <= set(names)


def test_import_comes_from_the_fresh_venv(venv):
    _, env, site, tmp = venv
    out = run(env / "bin/python", "-c", "import vggattn, vggattn.app.ui; print(vggattn.__file__); "
              "print(vggattn.app.ui.WEB.joinpath('hover.js').is_file())", cwd=tmp)
    assert out.returncode == 0, out.stderr
    where, web = out.stdout.split()
    assert Path(where).is_relative_to(site) and web == "True"


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_scripts_answer_help(venv, script):
    _, env, _, tmp = venv
    out = run(env / "bin" / script, "--help", cwd=tmp)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and "--" in out.stdout


def test_app_script_without_the_app_extra_says_how_in_one_line(venv, tmp_path):
    """vggattn-app where Gradio is not installed (a stand-in package that fails to import, as a missing one
    does): one line naming the extra, exit 2, no traceback; its --help answers all the same."""
    _, env, _, tmp = venv
    stub = tmp_path / "hide" / "gradio"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'gradio'\", name='gradio')\n")
    out = run(env / "bin" / "vggattn-app", "--port", "0", cwd=tmp, pythonpath=tmp_path / "hide")
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert out.stderr.strip().count("\n") == 0 and 'pip install "vggattn[app]"' in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    helped = run(env / "bin" / "vggattn-app", "--help", cwd=tmp, pythonpath=tmp_path / "hide")  # flags need no Gradio
    assert helped.returncode == 0 and helped.stdout.startswith("usage: vggattn-app"), helped.stderr


def test_the_readmes_speak_to_users_not_of_issue_numbers():
    """README.md, docs/*.md, the card and bench/README.md say what things are; the tracker's numbering is not
    theirs."""
    import re

    root = Path(__file__).resolve().parent.parent
    docs = sorted(str(p.relative_to(root)) for p in (root / "docs").glob("*.md"))
    assert docs, "docs/*.md: no pages"
    for doc in ("README.md", *docs, "checkpoints/README.md", "bench/README.md"):
        text = (root / doc).read_text(encoding="utf-8")
        found = re.findall(r"(?i)\b(?:issue|task)s?\s*#?\d+|\bthe issue\b|\bissue's\b", text)
        assert not found, (doc, found[:5])


def package_imports() -> dict[str, set[str]]:
    """vggattn's modules ("app", "attention.adapters", ...) -> the vggattn modules each imports, at the top or inside
    a function (a lazy import is still a dependency); importing a submodule imports its packages first."""
    import ast

    pkg = ROOT / "vggattn"
    names = {}  # module name -> file
    for path in pkg.rglob("*.py"):
        parts = path.relative_to(pkg).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names[".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)] = path
    modules = set(names) - {""}

    def known(target: str) -> set[str]:
        """The modules an import of `target` runs: its packages and the longest known module it names."""
        parts = [p for p in target.split(".") if p]
        return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules

    graph = {}
    for name, path in names.items():
        if not name:
            continue
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                base = package[:len(package) - (node.level - 1)]
                if node.module:
                    deps |= known(".".join([*base, node.module]))
                else:
                    deps |= set().union(*(known(".".join([*base, a.name])) for a in node.names))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vggattn."):
                deps |= known(node.module.split(".", 1)[1])
            elif isinstance(node, ast.Import):
                deps |= set().union(set(), *(known(a.name.split(".", 1)[1]) for a in node.names if a.name.startswith("vggattn.")))
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}  # loading already
        graph[name] = deps - {name} - ancestors
    return graph


def test_no_import_circles_in_the_package():
    """No module of vggattn imports one that imports it back, directly or around a circle (lazy imports count)."""
    graph = package_imports()
    assert {"app", "app.ui", "analysis", "attention.trace", "attention.adapters", "study", "view.hover"} <= set(graph)

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])
    circles = sorted(name for name in graph if reaches(name, name))
    assert not circles, {n: sorted(graph[n]) for n in circles}


def test_sub_packages_import_each_other_one_way_and_the_view_runs_no_model():
    """Between the sub-packages: the view draws what analysis computed (view -> analysis, never back); training and
    the study sit above both and nothing below imports them. The view runs no model: none of its modules names
    what runs one (`analyze`, `ablate`, `switched_off`, `with_gradcam`, `analysed_b`, an `Intervention`)."""
    import ast

    graph = package_imports()
    top = lambda m: m.split(".")[0]  # noqa: E731
    between = {(top(m), top(n)) for m, deps in graph.items() for n in deps if top(m) != top(n)}
    assert ("analysis", "view") not in between and ("view", "analysis") in between
    for above in ("training", "study", "app", "explain", "notebook"):
        assert not {a for a, b in between if b == above} - {"app", "explain", "notebook", "study", "training",
                                                             "launcher"}, above
    runs = {"analyze", "ablate", "switched_off", "with_gradcam", "analysed_b", "Intervention", "twin_with_new_qk"}
    for path in (ROOT / "vggattn" / "view").glob("*.py"):
        named = {a.name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, ast.ImportFrom) for a in node.names}
        assert not named & runs, (path.name, named & runs)
