"""README.md and docs/*.md: every relative link and #anchor resolves, and the README stays a short front door.

The README holds no figure that changes at every commit (test counts, CI durations: docs/contributing.md has the
latter, measured once); the checks below keep it that way.
"""

import functools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOC_PAGES = sorted((REPO / "docs").glob("*.md"))
README_MAX_LINES = 150

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# Every inline link or image, [text](target) or ![alt](target), ends in "](target)" (optionally with a "title"):
# matching that end alone also finds both targets of an image inside a link, [![alt](image)](page).
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^>\s]+)>?")  # [name]: target
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.I)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
TEST_COUNT = re.compile(r"\b\d[\d,]*\s+(?:\w+\s+)?tests?\b", re.I)  # "392 tests", "12 passing tests"
CI_DURATION = re.compile(
    r"\b(?:took|takes|taking|ran)\s+(?:about\s+|around\s+|~)?[\d.]+\s*(?:minutes?|mins?|hours?|h|seconds?|s)\b", re.I
)


def outside_fences(text: str):
    """`(line number, line)` for every line outside fenced code blocks."""
    in_fence = None
    for number, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line)
        if fence:
            if in_fence is None:
                in_fence = fence.group(1)
            elif fence.group(1) == in_fence:
                in_fence = None
            continue
        if in_fence is None:
            yield number, line


def prose_lines(text: str):
    """`(line number, line)` for every line outside fenced code blocks, with inline code spans blanked."""
    for number, line in outside_fences(text):
        yield number, INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, punctuation dropped, spaces to hyphens."""
    rendered = []
    # Code spans render verbatim (`__init__` keeps its underscores); elsewhere links render as their text and
    # emphasis markers vanish (not the underscores inside snake_case words).
    for index, part in enumerate(re.split(r"`+([^`]*)`+", heading)):
        if index % 2 == 0:
            part = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", part)
            part = re.sub(r"<[^>]+>", "", part)
            part = re.sub(r"(\*\*|__|(?<!\w)[*_]|[*_](?!\w))", "", part)
        rendered.append(part)
    text = "".join(rendered).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 ... suffixes for repeated headings."""
    seen, found = {}, set()
    for _, line in outside_fences(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(found)


def link_targets(text: str):
    """`(line number, target)` for every link and image of a markdown text outside code."""
    for number, line in prose_lines(text):
        for pattern in (LINK, REFERENCE, HTML_LINK):
            for match in pattern.finditer(line):
                yield number, match.group(1)


def broken_links(path: Path) -> list:
    """`"file:line: target (why)"` for each relative link of `path` that names a missing file or anchor."""
    problems = []
    for number, target in link_targets(path.read_text(encoding="utf-8")):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # an absolute URL: not checked offline
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path.resolve()
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{number}: {target}"
        if not resolved.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and resolved.suffix.lower() == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where} (no heading with anchor #{anchor} in {resolved.name})")
    return problems


@pytest.mark.parametrize("path", [README, *DOC_PAGES], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.partition("#")[0]).resolve()
              for _, target in link_targets(README.read_text(encoding="utf-8"))}
    assert [p.name for p in DOC_PAGES if p.resolve() not in linked] == []


def test_readme_is_short_and_holds_no_figures_that_change_every_commit():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    assert TEST_COUNT.findall(text) == []
    assert CI_DURATION.findall(text) == []


def test_readme_keeps_the_quickstart_commands_and_the_demo_screenshot():
    text = README.read_text(encoding="utf-8")
    # .ci/run and users run these verbatim.
    assert ('python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" && .venv/bin/python -m pytest -q tests'
            in text)
    assert ('python3 -m venv .venv && .venv/bin/pip install -q -e ".[train]" && '
            ".venv/bin/accelerate launch examples/train_flowmo/train.py" in text)
    assert "](docs/images/demo.png)" in text


def test_github_slugs():
    assert github_slug("On a SLURM cluster: preemption, requeue, several nodes") == \
        "on-a-slurm-cluster-preemption-requeue-several-nodes"
    assert github_slug("Distillation to K decoder passes (`--stage distill`, not in the paper)") == \
        "distillation-to-k-decoder-passes---stage-distill-not-in-the-paper"
    assert github_slug("1. Against the original implementation (CPU, float32, identical outputs)") == \
        "1-against-the-original-implementation-cpu-float32-identical-outputs"
    assert github_slug("`--overwrite` and **max_skipped_steps**") == "--overwrite-and-max_skipped_steps"
    assert github_slug("The `__init__` of [FlowMoModel](models.md), *briefly*") == "the-__init__-of-flowmomodel-briefly"


def test_the_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section: here\n\n## A section: here\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md#a-section-here) [repeated](other.md#a-section-here-1) [self](#page) [web](https://x.y/z)\n"
        "[missing file](nothing.md) ![missing image](images/none.png)\n"
        "[missing anchor](other.md#no-such-section) [missing self anchor](#nowhere)\n"
        "[![badge](badge.svg)](other.md#gone) <img src=\"pic.png\">\n"
        "[fine ref]: other.md#a-section-here\n[ref]: missing.md\n"
        "`[in code](nothing.md)`\n```\n[in a fence](nothing.md)\n```\n")
    problems = broken_links(page)
    assert [p.split(": ", 1)[1].split(" (")[0] for p in problems] == [
        "nothing.md", "images/none.png", "other.md#no-such-section", "#nowhere", "badge.svg", "other.md#gone",
        "pic.png", "missing.md"], problems


def test_the_readme_checks_catch_counts_and_durations():
    # Sentences the README held before it was cut down.
    assert TEST_COUNT.findall("The test suite (392 tests on tiny configurations, CPU only) takes about 6 minutes")
    assert CI_DURATION.findall("The test suite (392 tests on tiny configurations, CPU only) takes about 6 minutes")
    assert CI_DURATION.findall("`bash .ci/run` on a clean clone took 15.5 minutes here")
    assert not TEST_COUNT.findall("tests/test_docs.py tests the links") and not CI_DURATION.findall("it takes time")
