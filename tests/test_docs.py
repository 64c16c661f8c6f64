"""README.md and docs/*.md: every relative link and #anchor resolves, and the README stays a short front door.

The README holds no figure that changes at every commit (test counts, CI durations: docs/contributing.md has the
latter, measured once); the checks below keep it that way.
"""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOC_PAGES = sorted((REPO / "docs").glob("*.md"))
README_MAX_LINES = 150

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target), target optionally followed by a "title"; nested brackets in the text (an
# image inside a link) are matched from the innermost pair, which is the one that carries a target.
LINK = re.compile(r"!?\[(?:[^\[\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
TEST_COUNT = re.compile(r"\b\d[\d,]*\s+(?:\w+\s+)?tests?\b", re.I)  # "392 tests", "12 passing tests"
CI_DURATION = re.compile(r"\btook\s+(?:about\s+|~)?[\d.]+\s*(?:minutes?|mins?|hours?|h|seconds?|s)\b", re.I)


def prose_lines(text: str):
    """`(line number, line)` for every line outside fenced code blocks, with inline code spans blanked."""
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
            yield number, INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*\*|__|(?<!\w)[*_]|[*_](?!\w))", "", text)  # emphasis markers, not snake_case underscores
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 ... suffixes for repeated headings."""
    seen, found = {}, set()
    in_fence = None
    for line in path.read_text(encoding="utf-8").splitlines():
        fence = FENCE.match(line)
        if fence:
            if in_fence is None:
                in_fence = fence.group(1)
            elif fence.group(1) == in_fence:
                in_fence = None
            continue
        match = HEADING.match(line) if in_fence is None else None
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(path: Path) -> list:
    """`"file:line: target (why)"` for each relative link of `path` that names a missing file or anchor."""
    problems = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(line):
            target = match.group(1)
            if SCHEME.match(target) or target.startswith("//"):
                continue  # an absolute URL: not checked offline
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
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
    text = README.read_text(encoding="utf-8")
    linked = {(README.parent / m.group(1).partition("#")[0]).resolve() for _, line in prose_lines(text)
              for m in LINK.finditer(line)}
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


def test_the_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section: here\n\n## A section: here\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md#a-section-here) [repeated](other.md#a-section-here-1) [self](#page) [web](https://x.y/z)\n"
        "[missing file](nothing.md) ![missing image](images/none.png)\n"
        "[missing anchor](other.md#no-such-section) [missing self anchor](#nowhere)\n"
        "`[in code](nothing.md)`\n```\n[in a fence](nothing.md)\n```\n")
    problems = broken_links(page)
    assert len(problems) == 4, problems
    assert [p.split(": ", 1)[1].split(" (")[0] for p in problems] == [
        "nothing.md", "images/none.png", "other.md#no-such-section", "#nowhere"]


def test_the_readme_checks_catch_counts_and_durations():
    assert TEST_COUNT.findall("The test suite (392 tests on tiny configurations)")
    assert CI_DURATION.findall("`bash .ci/run` on a clean clone took 15.5 minutes here")
    assert not TEST_COUNT.findall("tests/test_docs.py tests the links") and not CI_DURATION.findall("it takes time")
