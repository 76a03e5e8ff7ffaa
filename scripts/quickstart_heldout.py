"""Score the quickstart adapter on sentences the generator never wrote: valid JSON and exact records.

    python scripts/quickstart_heldout.py runs/quickstart/final          # the trained delta
    python scripts/quickstart_heldout.py runs/quickstart/final --base   # the untouched base model
    python scripts/quickstart_heldout.py runs/quickstart/final --data builtin:quickstart-eval

Default data: tests/fixtures/quickstart_heldout.jsonl and quickstart_heldout2.jsonl, 50 and 40
hand-written sentences (names, cities, jobs and phrasings outside deltafit/tasks.py's lists and
records, some with missing fields) rendered as the builtin prompts are. The second was written
after the generator and the recipe had been tuned against the first. Generation is greedy, through
`deltafit generate`'s own code (deltafit/generate.py). A record is exact when the generated text
parses as JSON and equals the reference dict.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = [str(ROOT / "tests" / "fixtures" / f"quickstart_heldout{n}.jsonl") for n in ("", "2")]


def parse(text: str):
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def score(rows: list[dict]) -> dict:
    """rows: {prompt, reference, prediction} as `deltafit generate --data` writes them."""
    valid = exact = 0
    misses = []
    for row in rows:
        got, want = parse(row["prediction"]), parse(row["reference"])
        valid += got is not None
        if got is not None and got == want:
            exact += 1
        else:
            misses.append(row)
    return {"n": len(rows), "valid_json": valid, "exact": exact, "misses": misses}


def data_file(data: str, folder: Path) -> str:
    """A JSONL path for --data; builtin:NAME is written out first."""
    if not data.startswith("builtin:"):
        return data
    from deltafit.tasks import load_builtin

    path = folder / f"{data.split(':', 1)[1]}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in load_builtin(data.split(":", 1)[1])), encoding="utf-8")
    return str(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint or run directory (e.g. runs/quickstart/final)")
    parser.add_argument("--base", action="store_true", help="score the untouched base model instead")
    parser.add_argument("--data", action="append", help="JSONL with prompt/completion, or builtin:NAME (repeatable; "
                        "default: both hand-written fixtures)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--show", action="store_true", help="print every miss")
    args = parser.parse_args(argv)

    for data in args.data or HELDOUT:
        result = score(generated(args, data))
        if args.show:
            for row in result["misses"]:
                print(f"- {row['prompt'].splitlines()[0]}\n  want {row['reference'].strip()}\n  got  "
                      f"{row['prediction'].strip()}")
        n = result["n"]
        print(f"{'base' if args.base else 'trained'} on {Path(data).name}: valid JSON {result['valid_json']}/{n}, "
              f"exact records {result['exact']}/{n} ({100 * result['exact'] / n:.0f}%)")
    return 0


def generated(args, data: str) -> list[dict]:
    """{prompt, reference, prediction} rows: greedy generation over `data`."""
    from deltafit.generate import Settings, run

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "predictions.jsonl"
        run(args.checkpoint, Settings(max_new_tokens=args.max_new_tokens, temperature=0.0),
            data=data_file(data, Path(tmp)), output=str(out), base=args.base, batch_size=args.batch_size)
        return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


if __name__ == "__main__":
    sys.exit(main())
