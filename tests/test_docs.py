"""The README and docs/ hold together: every relative link reaches a file and, with an anchor, a
heading of that file; every script a command names exists; the README stays short."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SCRIPT = re.compile(r"(?:^|[\s'\"=])((?:[\w-]+/)*[\w-]+\.py)\b")
MODULE = re.compile(r"python3? -m ([\w.]+)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    found, seen = set(), {}
    for heading in re.findall(r"^#+ (.*)$", text, re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def test_pages_exist():
    names = {page.name for page in PAGES}
    for topic in ("data", "training", "evaluation", "results", "scaling", "export", "serving",
                  "benchmarks"):
        assert f"{topic}.md" in names, topic


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_reach_a_file_and_a_heading(page):
    broken = []
    for match in LINK.finditer(FENCE.sub("", page.read_text())):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_name_scripts_that_exist(page):
    text = page.read_text()
    commands = [body for lang, body in FENCE.findall(text) if lang in ("bash", "sh", "")]
    commands += re.findall(r"`((?:\.venv/bin/)?python3? [^`]+)`", text)
    missing = set()
    for command in commands:
        for script in SCRIPT.findall(command):
            if not (ROOT / script).exists():
                missing.add(script)
        for module in MODULE.findall(command):
            if module.split(".")[0] in ("pip", "venv", "uvicorn", "pytest"):
                continue
            path = ROOT / module.replace(".", "/")
            if not (path.with_suffix(".py").exists() or (path / "__main__.py").exists()):
                missing.add(f"-m {module}")
    assert not missing, f"{page.name} names scripts that do not exist: {sorted(missing)}"


def test_readme_fits_on_two_screens():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
