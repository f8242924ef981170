"""Relative links in the documentation must point at files and #anchors that exist.

Checked: README.md, CHANGELOG.md and docs/**/*.md. A link is `[text](target)`, `![alt](target)` or a
reference definition `[id]: target`; links inside fenced code blocks and inline code are ignored, and so are
links with a scheme (http:, https:, mailto:, ...): there is no network here. A `#anchor` must match a
heading of the target Markdown file (GitHub's slugs: lower case, punctuation dropped, spaces to hyphens,
-1, -2 ... for repeats) or an explicit `<a id="...">` / `<a name="...">`.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_INLINE_CODE = re.compile(r"(`+)(?:.+?)\1")
# [text](target "title") and ![alt](target); text may hold one level of brackets (badges, images in links)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)(?:\s+[\"'(][^)]*)?\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_ATX = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_SETEXT = re.compile(r"^\s{0,3}(=+|-+)\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+[^>]*(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md, CHANGELOG.md and every Markdown file under docs/."""
    files = [root / "README.md", root / "CHANGELOG.md"]
    files += sorted((root / "docs").rglob("*.md"))
    return [f for f in files if f.is_file()]


def _lines_outside_code(text: str):
    """(line number, line) for every line outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            continue
        if fence is not None:
            if line.strip().startswith(fence) and set(line.strip()) <= {fence[0]}:
                fence = None
            continue
        yield number, line


def slugify(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)                          # inline HTML tags
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every #anchor a Markdown file defines."""
    text = path.read_text(encoding="utf-8")
    found: set[str] = set()
    counts: dict[str, int] = {}
    previous = ""
    for _, line in _lines_outside_code(text):
        found.update(_HTML_ANCHOR.findall(line))
        heading = None
        m = _ATX.match(line)
        if m:
            heading = m.group(2)
        elif _SETEXT.match(line) and previous.strip() and not previous.lstrip().startswith(("|", "-", "*", ">")):
            heading = previous.strip()
        if heading is not None:
            slug = slugify(heading)
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
        previous = line
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in a Markdown file, code excluded."""
    out = []
    for number, line in _lines_outside_code(path.read_text(encoding="utf-8")):
        m = _REF_DEF.match(line)
        if m:
            out.append((number, m.group(1)))
            continue
        stripped = _INLINE_CODE.sub(lambda c: " " * len(c.group(0)), line)
        out.extend((number, m.group(1)) for m in _LINK.finditer(stripped))
    return out


def _shown(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def broken_links(files, root: Path = ROOT) -> list[str]:
    """One message per broken relative link (file or #anchor missing) in the given Markdown files."""
    root = Path(root)
    problems = []
    anchor_cache: dict[Path, set[str]] = {}
    for path in map(Path, files):
        for number, target in links(path):
            target = target.strip("<>").strip()
            if not target or _SCHEME.match(target) or target.startswith("//"):
                continue
            where = f"{_shown(path, root)}:{number}: {target}"
            file_part, _, anchor = target.partition("#")
            file_part = unquote(file_part.split("?", 1)[0])
            if not file_part:
                dest = path
            elif file_part.startswith("/"):
                dest = root / file_part.lstrip("/")
            else:
                dest = path.parent / file_part
            dest = dest.resolve()
            if not dest.exists():
                problems.append(f"{where}: {_shown(dest, root)} does not exist")
                continue
            if anchor:
                if dest.is_dir() or dest.suffix.lower() not in (".md", ".markdown"):
                    problems.append(f"{where}: #{anchor} on something that is not a Markdown file")
                    continue
                if dest not in anchor_cache:
                    anchor_cache[dest] = anchors(dest)
                if unquote(anchor) not in anchor_cache[dest]:
                    problems.append(f"{where}: no heading or anchor #{anchor} in {dest.name}")
    return problems


def test_docs_links_resolve():
    files = doc_files()
    names = {f.relative_to(ROOT).as_posix() for f in files}
    assert {"README.md", "CHANGELOG.md", "docs/README.md", "docs/benchmarks/README.md"} <= names
    problems = broken_links(files)
    assert not problems, "broken links in the docs:\n" + "\n".join(problems)


def test_checker_finds_missing_file_and_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Warm start (H100)\n", encoding="utf-8")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md) [fine anchor](other.md#warm-start-h100) [here](#page)\n"
        "[missing file](missing.md)\n"
        "![missing image](img/chart.png)\n"
        "[missing anchor](other.md#cold-start)\n"
        "[missing local anchor](#nowhere)\n",
        encoding="utf-8",
    )
    problems = broken_links([page], root=tmp_path)
    assert len(problems) == 4, problems
    assert any("missing.md" in p for p in problems)
    assert any("chart.png" in p for p in problems)
    assert any("#cold-start" in p for p in problems)
    assert any("#nowhere" in p for p in problems)


def test_checker_accepts_valid_and_ignored_links(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.json").write_text("{}", encoding="utf-8")
    (tmp_path / "CHANGELOG.md").write_text("# Changelog\n\n## [0.1.0]\n\n## Notes\n\n## Notes\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "Title\n=====\n\n"
        "## `sd3plugin-bench`: what it measures\n\n"
        '<a id="custom"></a>\n\n'
        "[dir](sub/) [json](sub/data.json) [root-relative](/CHANGELOG.md#010) [repeat](CHANGELOG.md#notes-1)\n"
        "[title](sub/data.json \"a title\") [angle](<sub/data.json>)\n"
        "[setext](#title) [code heading](#sd3plugin-bench-what-it-measures) [html](#custom)\n"
        "[web](https://example.com/x.md#y) [mail](mailto:a@b.c)\n"
        "[ref]: sub/data.json\n\n"
        "`[not a link](nope.md)`\n\n"
        "```markdown\n[in a code block](nope.md)\n# not a heading\n```\n",
        encoding="utf-8",
    )
    assert broken_links([page], root=tmp_path) == []
    assert "not-a-heading" not in anchors(page)


def test_slugs_follow_github():
    assert slugify("Warm start and cold start (third session)") == "warm-start-and-cold-start-third-session"
    assert slugify("SD3.5-medium") == "sd35-medium"
    assert slugify("Where a step's time goes") == "where-a-steps-time-goes"
    assert slugify("Measuring: `sd3plugin-bench`") == "measuring-sd3plugin-bench"
    assert slugify("[0.1.0] - 2026-11-26") == "010---2026-11-26"
