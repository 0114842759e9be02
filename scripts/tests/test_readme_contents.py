"""The README's Contents list every section (## and ###) and each link reaches its heading, by
GitHub's anchor rule (lower case, punctuation dropped, spaces as hyphens): a section added,
renamed or moved without its entry fails here instead of leaving a dead link."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def anchor(title: str) -> str:
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_contents_list_every_section_and_reach_it():
    text = README.read_text()
    contents = text[text.index("**Contents**") : text.index("\n## ")]
    links = re.findall(r"\]\(#([^)]+)\)", contents)
    headings = [anchor(h) for h in re.findall(r"^#{2,3} (.+)$", text, flags=re.M)]
    assert links == headings, "the Contents and the sections differ (or their order does)"
