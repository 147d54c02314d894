"""README.md and docs/*.md: every code block runs, every relative link resolves, the README stays a landing page.

A block that cannot run here (it starts a server, trains, needs the network, a GPU or ../shared data) carries
`<!-- not run: <reason> -->` on the line right before its fence; it is reported as skipped with that reason.
Python blocks run in a fresh interpreter, shell blocks under `bash -e`, each in a temporary folder that links the
checkout's checkpoints/ and assets/, so they write nothing into the checkout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*```\s*([\w+-]*)\s*$")
MARK = re.compile(r"^\s*<!--\s*not run\s*:?(.*?)-->\s*$", re.IGNORECASE)
LINKED = ("checkpoints", "assets")  # what the blocks read, linked into their folder
TIMEOUT_S = 120
WORKERS = 2
README_MAX_LINES = 150


@dataclass
class Block:
    doc: Path
    index: int  # among the doc's fenced blocks, from 0
    line: int  # of the opening fence, from 1
    lang: str
    code: str
    mark: str | None  # the line before the fence, when it is a not-run mark

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}-{self.index}-{self.lang or 'text'}"


def blocks(doc: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, in order."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{doc.relative_to(ROOT)}:{i + 1}: a code block is never closed"
        before = lines[i - 1] if i else ""
        found.append(Block(doc, len(found), i + 1, opening.group(1).lower(), "\n".join(lines[i + 1:end]) + "\n",
                           before if MARK.match(before) else None))
        i = end + 1
    return found


ALL = [b for doc in DOCS for b in blocks(doc)]
RUNNABLE = [b for b in ALL if b.lang in PYTHON | SHELL]


def shell_code(block: Block) -> str:
    """A console block's commands are its `$ ` lines (the rest is their output); other shells run as they are."""
    if block.lang != "console":
        return block.code
    return "\n".join(line[2:] for line in block.code.splitlines() if line.startswith("$ ")) + "\n"


def run(block: Block, folder: Path) -> subprocess.CompletedProcess | None:
    """The block run in `folder` (None when it runs past TIMEOUT_S)."""
    for name in LINKED:
        (folder / name).symlink_to(ROOT / name, target_is_directory=True)
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               MPLBACKEND="Agg", OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if block.lang in PYTHON:
        command = [sys.executable, "-c", block.code]
    else:
        command = ["bash", "-e", "-c", shell_code(block)]
    try:
        return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None


@pytest.fixture(scope="module")
def started(request, tmp_path_factory):
    """The runnable blocks this session selected, started WORKERS at a time in test order when the first is
    tested (each block is mostly a fresh interpreter's imports and one forward, on one thread)."""
    chosen = [item.callspec.params["block"] for item in request.session.items
              if getattr(item, "originalname", None) == "test_code_block_runs"
              and item.callspec.params["block"].mark is None]
    pool = ThreadPoolExecutor(WORKERS)
    yield {b.id: pool.submit(run, b, tmp_path_factory.mktemp("block")) for b in chosen}
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_code_block_runs(block: Block, started):
    """Each python and shell block runs to exit code 0 (or is marked not run, with its reason)."""
    if block.mark is not None:
        reason = MARK.match(block.mark).group(1).strip()
        assert reason, f"{block.id}: a not-run mark without a reason"
        pytest.skip(f"{block.id}: not run: {reason}")
    done = started[block.id].result()
    assert done is not None, f"{block.id} (line {block.line}) ran past {TIMEOUT_S} s"
    assert done.returncode == 0, (
        f"{block.id} (line {block.line}) exited with {done.returncode}\n--- code\n{block.code}"
        f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")


def test_not_run_marks_have_reasons_and_blocks():
    """A not-run mark says why, and sits right before a code fence."""
    bad = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            mark = MARK.match(line)
            if mark is None:
                continue
            where = f"{doc.relative_to(ROOT)}:{i + 1}"
            if not mark.group(1).strip() or ":" not in line:
                bad.append(f"{where}: no reason")
            if i + 1 >= len(lines) or not FENCE.match(lines[i + 1]):
                bad.append(f"{where}: not right before a code fence")
    assert not bad, bad


def test_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def without_fences(text: str) -> str:
    """The text without its fenced code blocks (a `# comment` there is no heading, a `[a](b)` no link)."""
    return re.sub(r"(?ms)^\s*```.*?^\s*```\s*$", "", text)


def prose(text: str) -> str:
    """The text without its code: fenced blocks and inline code."""
    return re.sub(r"`[^`\n]*`", "", without_fences(text))


def anchors(doc: Path) -> set[str]:
    """GitHub's anchors for a markdown file's headings (a repeated heading gets -1, -2, ...)."""
    found: set[str] = set()
    for heading in re.findall(r"(?m)^#{1,6}\s+(.*?)\s*#*\s*$", without_fences(doc.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        n = 0
        while (slug if n == 0 else f"{slug}-{n}") in found:
            n += 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_relative_links_resolve(doc: Path):
    """Every relative link and image points at a file of the checkout (and at a heading, where it names one)."""
    text = prose(doc.read_text(encoding="utf-8"))
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    assert targets or doc.name != "README.md"
    broken = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif not file.is_relative_to(ROOT):
            broken.append(f"{target}: outside the checkout")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target}: no heading #{fragment} in {file.relative_to(ROOT)}")
    assert not broken, (str(doc.relative_to(ROOT)), broken)
