"""The README's generated sections match the code (run `python -m ops.docs` to refresh)."""

from ops.docs import README, SECTIONS, render


def test_readme_generated_sections_are_current() -> None:
    text = README.read_text()
    for name in SECTIONS:
        assert f"<!-- {name}:start -->" in text, f"README lacks the {name} block"
    assert render(text) == text, "README is out of date: run `python -m ops.docs`"
