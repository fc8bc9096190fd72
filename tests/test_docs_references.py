"""The repository stands alone: every document it refers to is in it.

Source files, configs, the Makefile and the Markdown pages cite documents by path (``docs/methods.md#mms``,
``leaderboards/reading.md``) and Markdown pages link to files. Each such reference must name a file inside the
repository, relative to the referring file's folder or to the repository root, and a ``#section`` must be a
heading of that document (GitHub's anchors). URLs and files of other repositories (``owner/name:path``) are not
checked; the few names that are not document references (files the suite writes, a path joined in code) are
listed in ``EXEMPT`` with the reason.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED_SUFFIXES = {".py", ".yaml", ".yml", ".md"}
SCANNED_NAMES = {"Makefile"}
SKIPPED_FOLDERS = {".git", ".venv", "runs", "perf", "wandb", "__pycache__", ".pytest_cache", ".cache"}

# (referring file, reference) pairs that are not references to a document of this repository, with the reason.
EXEMPT = {
    # files the suite writes at run time
    ("README.md", "summary.md"): "make tune writes runs/tune/<study>/summary.md",
    ("benchmark/tune.py", "summary.md"): "make tune writes runs/tune/<study>/summary.md",
    ("tests/test_tune.py", "summary.md"): "the study summary the test checks",
    ("benchmark/run_report.py", "summary.md"): "every finished run writes <run folder>/summary.md",
    ("tests/test_user_path.py", "summary.md"): "the run summary the test checks",
    ("benchmark/perf/__init__.py", "report.md"): "make perf writes perf/report.md",
    ("benchmark/perf/report.py", "report.md"): "make perf writes perf/report.md",
    ("benchmark/perf/__main__.py", "report.md"): "make perf writes perf/report.md",
    ("tests/test_perf.py", "report.md"): "the perf report written into tmp_path",
    ("tests/test_report.py", "README.md"): "the leaderboard page written into tmp_path",
    ("README.md", "perf/report.md"): "make perf writes it",
    ("docs/perf.md", "perf/report.md"): "make perf writes it",
    ("benchmark/leaderboard_page.py", "reading.md"): "the file name of the hand-written reading in the leaderboard folder",
    # a path built from parts in code
    ("tests/test_bad_input_catalogue.py", "reliability.md"): 'PROJECT_ROOT / "docs" / "reliability.md"',
    # a file of another repository named without its owner/name: prefix
    ("leaderboards/README.md", "docs/results.md"): "yyliu01/TraCoCo's results page, a source in reported.csv",
    ("tests/test_report.py", "docs/results.md"): "the same source, in a test row",
}
# This file plants bad references in its fixtures.
CHECKER = "tests/test_docs_references.py"

# A document path: not preceded by a path, URL or ``owner/name:`` character, ending in .md, optional #anchor.
DOCUMENT = re.compile(r"(?<![\w./:@-])((?:\.\.?/)*[\w.-]+(?:/[\w.-]+)*\.md)(#[\w-]+)?(?![\w/])")
# A relative path that leaves its folder and names a file (it has an extension), e.g. ../notes/results.csv.
# (Folders such as the default data location ../shared/datasets/ACDC are not documents and are not checked.)
PARENT_FILE = re.compile(r"(?<![\w./:@-])((?:\.\./)+[\w./-]*\.[A-Za-z0-9]+)(?![\w/])")
# A Markdown link or image target: [text](target) / ![alt](target).
LINK = re.compile(r"\]\(([^()\s]+)\)")


def scanned_files(root: Path) -> list[Path]:
    """The repository's tracked (and new, not ignored) files of the scanned kinds; a plain walk outside git."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(root), "ls-files", "--cached", "--others", "--exclude-standard"],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()
        candidates = [root / name for name in listed]
    except (OSError, subprocess.CalledProcessError):
        candidates = [
            path for path in root.rglob("*")
            if not SKIPPED_FOLDERS.intersection(path.relative_to(root).parts[:-1])
        ]
    return sorted(
        path for path in candidates
        if path.is_file() and (path.suffix in SCANNED_SUFFIXES or path.name in SCANNED_NAMES)
    )


def heading_anchors(document: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens,
    repeated headings numbered -1, -2, ..."""
    anchors: set[str] = set()
    in_code = False
    for line in document.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_code or not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        anchor, number = slug, 0
        while anchor in anchors:
            number += 1
            anchor = f"{slug}-{number}"
        anchors.add(anchor)
    return anchors


def resolve(root: Path, referrer: Path, target: str) -> Path | None:
    """The file ``target`` names from ``referrer``: relative to its folder, else to the root; None if neither
    exists inside the repository."""
    bases = [referrer.parent] if target.startswith(("./", "../")) else [referrer.parent, root]
    for base in bases:
        path = (base / target).resolve()
        if path.exists() and path.is_relative_to(root.resolve()):
            return path
    return None


def references(text: str, markdown: bool) -> list[tuple[int, str, str]]:
    """(line number, path, anchor) of every document reference, and of every link target in Markdown."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for match in DOCUMENT.finditer(line):
            found.append((number, match.group(1), (match.group(2) or "")[1:]))
        for match in PARENT_FILE.finditer(line):
            if not match.group(1).endswith(".md"):  # documents are taken above
                found.append((number, match.group(1), ""))
        if markdown:
            for match in LINK.finditer(line):
                target = match.group(1)
                if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.endswith(".md") or ".md#" in target:
                    continue  # a URL / mailto, or a document the pattern above already took
                path, _, anchor = target.partition("#")
                found.append((number, path, anchor))
    return list(dict.fromkeys(found))  # a link to ../x.py is found twice


def broken_references(root: Path) -> list[str]:
    """One line per reference that does not resolve inside ``root``: file:line: reference (why)."""
    root = root.resolve()
    problems = []
    for file in scanned_files(root):
        relative = file.relative_to(root).as_posix()
        if relative == CHECKER:
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        for number, target, anchor in references(text, markdown=file.suffix == ".md"):
            if (relative, target) in EXEMPT:
                continue
            where = f"{relative}:{number}: {target}{'#' + anchor if anchor else ''}"
            if not target:  # a link to a section of the same page
                resolved = file
            else:
                resolved = resolve(root, file, target)
            if resolved is None:
                problems.append(f"{where} (no such file in the repository)")
            elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
                problems.append(f"{where} (no heading with that anchor)")
    return problems


def test_every_referenced_document_is_in_the_repository():
    problems = broken_references(REPO)
    assert not problems, "references to documents that are not in the repository:\n" + "\n".join(problems)


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A small repository (no git: the walk) with good references and one bad reference of each kind."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text(
        "# Notes\n\n## A section\n\n```\n## not a heading\n```\n\nSee [the code](../pkg/module.py) and [up](#notes).\n"
    )
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "module.py").write_text(
        '"""Spec: docs/notes.md#a-section; upstream owner/repo:docs/results.md; https://example.org/x.md."""\n'
        "# The private notes: methods.md section 3.\n"
        "# A missing section: docs/notes.md#not-a-heading.\n"
        "# Outside the repository: ../shared/docs/datasets.md.\n"
        "# Data stay outside: ../shared/datasets/ACDC; a file there does not: ../shared/reference/results.csv.\n"
    )
    (tmp_path / "config.yaml").write_text("# a preset (docs/notes.md)\nlr: 0.01  # see docs/gone.md\n")
    (tmp_path / "Makefile").write_text("help:  ## see docs/notes.md#a-section\n")
    (tmp_path / "README.md").write_text("[notes](docs/notes.md#a-section), ![plot](missing.png), [ok](#x)\n\n## X\n")
    return tmp_path


def test_planted_bad_references_are_each_reported(planted: Path):
    assert broken_references(planted) == [
        "README.md:1: missing.png (no such file in the repository)",
        "config.yaml:2: docs/gone.md (no such file in the repository)",
        "pkg/module.py:2: methods.md (no such file in the repository)",
        "pkg/module.py:3: docs/notes.md#not-a-heading (no heading with that anchor)",
        "pkg/module.py:4: ../shared/docs/datasets.md (no such file in the repository)",
        "pkg/module.py:5: ../shared/reference/results.csv (no such file in the repository)",
    ]


def test_a_planted_bad_reference_fails_the_repository_check(planted: Path):
    """The check passes on the clean tree and fails once one bad reference is added."""
    (planted / "pkg" / "module.py").write_text('"""Spec: docs/notes.md#a-section."""\n')
    (planted / "config.yaml").write_text("lr: 0.01\n")
    (planted / "README.md").write_text("[notes](docs/notes.md#a-section)\n")
    assert broken_references(planted) == []
    (planted / "pkg" / "other.py").write_text("# layout: datasets.md 2.2\n")
    assert broken_references(planted) == ["pkg/other.py:1: datasets.md (no such file in the repository)"]
