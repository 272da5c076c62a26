"""Every file the code, tests and docs cite exists in the repository, and the README stays documentation."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this file is left out: its self-test holds a citation of a file that does not exist, on purpose
SOURCES = sorted({*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), ROOT / "README.md", *ROOT.glob("docs/*.md")}
                 - {Path(__file__).resolve()})
REPO_FOLDERS = ("assets", "docs", "tests", "prompts")
README_LIMIT = 14_000  # characters: the user's documentation, not a lab notebook


def cited(text: str, markdown: bool = True) -> set[str]:
    """Markdown files named anywhere, repo paths (assets/, docs/, tests/, prompts/), and in markdown the targets
    of links and images."""
    names = set(re.findall(r"[\w./-]*\w\.md\b", text))
    names |= set(re.findall(rf"(?<![\w/.-])(?:\.\./)?(?:{'|'.join(REPO_FOLDERS)})/[\w./-]*\w", text))
    if markdown:
        names |= {t for t in re.findall(r"\]\(([^)#\s]+)", text) if not t.startswith("http")}
    return names


def exists(name: str, source: Path) -> bool:
    if "/" not in name:  # a bare markdown name: somewhere in the repository
        return any(ROOT.rglob(name))
    return (source.parent / name).exists() or (ROOT / name).exists()


def test_every_cited_file_exists():
    missing = [f"{source.relative_to(ROOT)}: {name}" for source in SOURCES
               for name in cited(source.read_text(), source.suffix == ".md") if not exists(name, source)]
    assert not missing, missing


def test_the_checker_sees_a_missing_file(tmp_path):
    absent = "docs/nothing-here" + ".md"  # in two parts, so that no scan of this file takes it for a citation
    text = f"see {absent} and [the table](docs/correctness.md) and tests/golden/SOURCES.md"
    assert cited(text) == {absent, "docs/correctness.md", "tests/golden/SOURCES.md"}
    assert [n for n in sorted(cited(text)) if not exists(n, ROOT / "README.md")] == [absent]


def test_no_issue_numbers_and_a_short_readme():
    numbered = [f"{s.relative_to(ROOT)}:{n}" for s in SOURCES
                for n, line in enumerate(s.read_text().splitlines(), 1) if re.search(r"\b[Ii]ssue \d+", line)]
    assert not numbered, numbered
    assert len((ROOT / "README.md").read_text()) <= README_LIMIT
