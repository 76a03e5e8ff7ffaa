"""README.md states what the code does: its generated tables match the registry and recipe classes."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_generated_sections_are_current():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "scripts" / "readme_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    text = (ROOT / "README.md").read_text()
    assert tables.render(text) == text, "run: python scripts/readme_tables.py --write"


def test_readme_names_the_two_setup_commands_and_the_quickstart():
    text = (ROOT / "README.md").read_text()
    assert "make install" in text and "make test" in text
    assert "deltafit train recipes/quickstart.yaml" in text
