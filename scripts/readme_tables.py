"""Print the README's generated sections (methods table, recipe reference) from the code itself.

    python scripts/readme_tables.py            # print
    python scripts/readme_tables.py --write    # rewrite README.md between the markers

tests/test_readme.py fails when README.md and the code disagree, so the docs never drift.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def methods_table() -> str:
    from deltafit import deltas

    rows = ["| method | family | mergeable | what it trains |", "| --- | --- | --- | --- |"]
    for name, cls in deltas.all_methods().items():
        rows.append(f"| `{name}` | {cls.family} | {'yes' if cls.mergeable else 'no'} | {cls.description} |")
    return "\n".join(rows)


def recipe_reference() -> str:
    from deltafit import deltas
    from deltafit.deltas.base import DeltaConfig
    from deltafit.recipe import DataSpec, LogSpec, ModelSpec, TrainSpec, field_docs

    sections = [("model", ModelSpec), ("data", DataSpec), ("train", TrainSpec), ("log", LogSpec),
                ("delta (every method; each entry of a list of deltas)", DeltaConfig)]
    sections += [(f"delta (method: {name})", cls.Config) for name, cls in deltas.all_methods().items()]
    shared = set(DeltaConfig.model_fields) - {"method"}  # listed once, in the section above
    out = []
    for title, model in sections:
        own = shared if model is DeltaConfig else set()
        out += [f"**{title}**", "", "| key | default | meaning |", "| --- | --- | --- |"]
        out += [f"| `{k}` | `{d}` | {doc} |" for k, d, doc in field_docs(model)
                if k != "method" and (k in own or k not in shared)]
        out.append("")
    return "\n".join(out).rstrip()


SECTIONS = {"methods": methods_table, "recipe-reference": recipe_reference}


def render(text: str) -> str:
    for key, make in SECTIONS.items():
        pattern = re.compile(rf"(<!-- {key}:begin -->\n).*?(<!-- {key}:end -->)", re.S)
        text, found = pattern.subn(lambda m, make=make: m.group(1) + make() + "\n" + m.group(2), text)
        if not found:
            raise SystemExit(f"README.md lacks the <!-- {key}:begin/end --> markers")
    return text


if __name__ == "__main__":
    current = README.read_text()
    if "--write" in sys.argv:
        README.write_text(render(current))
    else:
        print(render(current))
