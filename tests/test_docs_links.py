"""The documentation's cross-references resolve: every relative link (``[text](path#anchor)``) in README.md
and docs/, every quoted section it cites in another page (a page name followed by a quoted heading, or by a
section sign and number), every repository path it quotes in inline code, and every docs page (and section)
that a source file cites. Anchors follow GitHub's rule for heading ids. Pure text processing: no imports of
the package, well under a second.
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
SOURCE_DIRS = ("alast_kernels", "csrc", "tests", "benchmarks", "python", "examples", ".ci")
SOURCE_SUFFIXES = {".py", ".cu", ".cuh", ".h", ".cpp", ".toml", ""}
# Top-level folders whose paths, quoted in a page's inline code, must exist in the repository.
TRACKED_ROOTS = ("alast_kernels/", "csrc/", "tests/", "benchmarks/", "python/", "examples/", "docs/", ".ci/")
GENERATED = {"alast_kernels/_build_info.py"}  # written by the build (gitignored), quoted by building.md

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")
_CODE = re.compile(r"`([^`\n]+)`")
# A page, then a quoted heading: README's "Tests", docs/alast.md, "Scoring ...", testing.md's "Measuring".
_PAGE = r"(?<![\w./-])(README(?:\.md)?|(?:[\w.-]+/)*[\w.-]+\.md)"
_QUOTED = re.compile(_PAGE + r"(?:'s|,)?\s+\"([^\"]+)\"")
_NUMBERED = re.compile(_PAGE + r"\s+§\s?(\d+)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return _FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    kept = [c for c in text if c.isalnum() or c in " -_" or unicodedata.category(c).startswith("M")]
    return "".join(kept).replace(" ", "-")


def _plain(heading: str) -> str:
    """A heading as prose quotes it: no code marks or emphasis, one space between words, lower case."""
    return " ".join(re.sub(r"[`*]", "", heading).split()).lower()


@lru_cache(maxsize=None)
def _headings(path: Path) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(GitHub anchors, plain heading texts) of a markdown file; repeated anchors get -1, -2, ... as on GitHub."""
    seen: Dict[str, int] = {}
    anchors, texts = [], []
    for line in _prose(path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = _slug(match.group(1))
        anchors.append(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
        texts.append(_plain(match.group(1)))
    return tuple(anchors), tuple(texts)


def _names(heading: str, section: str) -> bool:
    """Whether a quoted section name means this heading: the heading itself, without its number ("2."), or
    its start up to a word boundary ("GPU resources" for "GPU resources (static)")."""
    for text in (heading, re.sub(r"^\d+\.\s*", "", heading)):
        if text.startswith(section) and (len(text) == len(section) or not text[len(section)].isalnum()):
            return True
    return False


def _page(name: str, base: Path) -> Optional[Path]:
    """The file a page name means: README is the root README; a path is tried beside ``base``, then from the
    repository root, then under docs/."""
    if name in ("README", "README.md"):
        return ROOT / "README.md"
    for candidate in (base / name, ROOT / name, ROOT / "docs" / name):
        if candidate.is_file():
            return candidate
    return None


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if ROOT in path.parents else str(path)


def _section_problems(where: str, text: str, base: Path) -> List[str]:
    """Quoted and numbered section references in ``text`` (line breaks and comment marks joined)."""
    flat = " ".join(re.sub(r"^\s*(#|//|\*)?\s*", "", line) for line in text.splitlines())
    problems = []
    for match in _QUOTED.finditer(flat):
        page, section = _page(match.group(1), base), _plain(match.group(2))
        if page is None:
            problems.append(f"{where}: {match.group(0)!r} names a page that does not exist")
        elif page.suffix == ".md" and not any(_names(t, section) for t in _headings(page)[1]):
            problems.append(f"{where}: {match.group(0)!r}: {_rel(page)} has no such heading")
    for match in _NUMBERED.finditer(flat):
        page = _page(match.group(1), base)
        if page is None or not any(t.startswith(match.group(2) + ".") for t in _headings(page)[1]):
            problems.append(f"{where}: {match.group(0)!r}: no section {match.group(2)} there")
    return problems


def _link_problems(page: Path) -> List[str]:
    text = _prose(page.read_text())
    problems = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:: not checked offline
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if path and ROOT not in resolved.parents and resolved != ROOT:
            problems.append(f"{_rel(page)}: link {target!r} leaves the repository")
        elif not resolved.exists():
            problems.append(f"{_rel(page)}: link {target!r}: no such file")
        elif anchor and (resolved.suffix != ".md" or anchor not in _headings(resolved)[0]):
            problems.append(f"{_rel(page)}: link {target!r}: no heading with that anchor in {_rel(resolved)}")
    return problems


def _quoted_path_problems(page: Path) -> List[str]:
    problems = []
    for code in _CODE.findall(_prose(page.read_text())):
        path = code.split("::")[0].rstrip(".,:")
        if (not path.startswith(TRACKED_ROOTS) or " " in path or re.search(r"[*<>{}]", path)
                or path in GENERATED):
            continue
        if not (ROOT / path).exists():
            problems.append(f"{_rel(page)}: `{code}` is not a path in the repository")
    return problems


def _sources() -> List[Path]:
    files = [ROOT / "Makefile", ROOT / "setup.py", ROOT / "pyproject.toml", ROOT / "conftest.py"]
    for folder in SOURCE_DIRS:
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES]
    return [p for p in files if p.is_file() and p != Path(__file__).resolve()]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    problems = _link_problems(page)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_section_a_page_cites_exists(page):
    problems = _section_problems(_rel(page), _prose(page.read_text()), page.parent)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_repository_path_a_page_quotes_exists(page):
    problems = _quoted_path_problems(page)
    assert not problems, "\n".join(problems)


def test_every_docs_page_and_section_the_sources_cite_exists():
    problems = []
    for source in _sources():
        text = source.read_text(errors="replace")
        if not any(mark in text for mark in ("docs/", ".md", "README")):  # cites no page: nothing to check
            continue
        for name in sorted(set(re.findall(r"\bdocs/[\w./-]*\w\.(?:md|png)", text))):
            if not (ROOT / name).is_file():
                problems.append(f"{_rel(source)}: cites {name}, which does not exist")
        problems += _section_problems(_rel(source), text, ROOT)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("heading, anchor", [
    ("CPU: one training step of `vit_small_patch16_224`, steady state",
     "cpu-one-training-step-of-vit_small_patch16_224-steady-state"),
    ("Using it with…", "using-it-with"),
    ("The fine-tuning job (`make demo`)", "the-fine-tuning-job-make-demo"),
    ("1. One planned block", "1-one-planned-block"),
    ("ALaST's budgets ≥ 0.6× [see](x.md)", "alasts-budgets--06-see"),
])
def test_anchors_follow_githubs_rule(heading, anchor):
    assert _slug(heading) == anchor


def test_the_checks_catch_broken_references(tmp_path):
    """Each check fails on a reference that does not resolve (the harness can fail)."""
    page = ROOT / "docs" / "ops.md"
    broken = tmp_path / "page.md"
    broken.write_text("# Title\n\n[a](missing.md) [b](#no-such-heading) [c](" + str(page) + "#nowhere)\n"
                      "See ops.md, \"No such section\", and alast.md §9; `tests/no_such_file.py`.\n"
                      "```\n[in a fence](ignored.md)\n```\n")
    assert len(_link_problems(broken)) == 3
    assert len(_section_problems("page", broken.read_text(), ROOT / "docs")) == 2
    assert len(_quoted_path_problems(broken)) == 1
