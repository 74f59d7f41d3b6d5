"""The docs' generated sections match the code (run `python -m ops.docs` to refresh), and the
README stays what a newcomer reads in two minutes."""

from ops.docs import SECTIONS, by_file, render
from tests.conftest import ROOT


def test_generated_sections_are_current() -> None:
    for path, names in by_file().items():
        text = path.read_text()
        for name in names:
            assert f"<!-- {name}:start -->" in text, f"{path.name} lacks the {name} block"
        assert render(text, names) == text, f"{path.name} is out of date: run `python -m ops.docs`"
    assert SECTIONS


def test_the_readme_is_short_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 12 * 1024
    import re

    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        assert (ROOT / target).exists(), target
