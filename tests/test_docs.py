"""Every ```python block in docs/*.md and README.md runs: the blocks of one file in order, in one namespace, in a
temporary working directory. A block marked ``<!-- illustrative -->`` on the line above its fence is skipped."""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Tuple

import pytest

from conftest import ROOT

MARKER = "<!-- illustrative -->"
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
DOCS = sorted(ROOT.glob("docs/*.md")) + [ROOT / "README.md"]


def python_blocks(path: Path) -> List[Tuple[int, str, bool]]:
    """(first line number, code, illustrative) of each ```python block of ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match or not match.group(2):
            index += 1
            continue
        indent, lang, start = match.group(1), match.group(2), index
        end = start + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if lang == "python":
            illustrative = start > 0 and lines[start - 1].strip() == MARKER
            code = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[start + 1:end])
            blocks.append((start + 2, code, illustrative))
        index = end + 1
    return blocks


def test_docs_use_only_the_python_fence():
    """A ```py or ```Python block would escape the test below: only ```python is executed."""
    odd = []
    for path in DOCS:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            match = FENCE.match(line)
            lang = match.group(2) if match else ""
            if lang != "python" and lang.lower() in ("py", "python", "python3", "pycon", "ipython"):
                odd.append(f"{path.name}:{number}")
    assert not odd, f"use ```python (or mark the block illustrative and keep ```python): {odd}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for lineno, code, illustrative in python_blocks(path):
        if illustrative:
            continue
        try:
            exec(compile(code, f"{path.name}:{lineno}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{path.relative_to(ROOT)}: the block at line {lineno} failed: "
                                 f"{type(err).__name__}: {err}\n(fix it, or mark it {MARKER!r})") from err


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_index_links_every_doc_and_notebook():
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    linked = set(LINK.findall(index))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}
    notebooks = {f"notebooks/{p.name}" for p in (ROOT / "docs" / "notebooks").glob("*.ipynb")}
    assert not (pages | notebooks) - linked, f"add to docs/index.md: {sorted((pages | notebooks) - linked)}"


def test_relative_links_resolve():
    """Links between pages point at files that exist. A guide that docs/index.md lists may still be being written
    (helpers land their pages separately), so a link to one of those is allowed to wait for it."""
    planned = {f"docs/{target}" for target in LINK.findall((ROOT / "docs" / "index.md").read_text(encoding="utf-8"))}
    broken = []
    for path in [p for p in DOCS if p.name != "index.md"]:
        for target in LINK.findall(path.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:") or (path.parent / target).exists():
                continue
            if (path.parent / target).resolve().relative_to(ROOT.resolve()).as_posix() not in planned:
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, broken
