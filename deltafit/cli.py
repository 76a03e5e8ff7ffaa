"""The `deltafit` command line.

Each command is a few lines that call one function. torch, transformers and friends are imported
inside the commands, so `deltafit --help` answers instantly. User mistakes (`UserError`) print
one line and exit with code 2, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from deltafit.errors import Interrupted, UserError

app = typer.Typer(
    name="deltafit",
    help="Delta tuning from YAML recipes: train, evaluate and merge parameter-efficient fine-tunes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

BASE_MODEL_HELP = ("Base model to load instead of the recorded one (a PEFT adapter's base_model_name_or_path, "
                   "or a checkpoint's model.name), e.g. when it was trained against a local path.")
SET_HELP = "Override a recipe key, e.g. --set train.lr=1e-4 --set delta.r=16 (repeatable; values are YAML)."


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    # A string, not a Path: Path("") would silently mean the working directory.
    output: Optional[str] = typer.Option(
        None, "--output", "-o", help="Output directory (default: recipe's output_dir or runs/<name>).",
    ),
    resume: Optional[str] = typer.Option(
        None, "--resume",
        help="Continue from the latest step checkpoint in the output directory ('--resume'), or from a given one "
        "('--resume PATH').",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite",
        help="Train afresh in an output directory that holds an earlier run (its checkpoints are replaced).",
    ),
    allow_changes: bool = typer.Option(
        False, "--allow-changes",
        help="With --resume: continue although the recipe changed keys that shape the delta or the data order.",
    ),
):
    """Fine-tune the recipe's model with its delta method and save a delta-only checkpoint."""
    from deltafit.recipe import load_recipe
    from deltafit.train import fit

    if output is not None and not output.strip():
        raise UserError("--output is empty: give the run directory to write (or leave --output out for runs/<name>)")
    try:
        fit(load_recipe(recipe, set_ or []), Path(output) if output else None, resume, overwrite=overwrite,
            allow_changes=allow_changes)
    except Interrupted as e:  # the resume command repeats this one's recipe and overrides
        e.recipe_args = (str(recipe), *(arg for item in set_ or [] for arg in ("--set", item)))
        raise


@app.command("eval")
def eval_(
    checkpoint: Path = typer.Argument(
        ..., help="Checkpoint directory (or a run directory: its final checkpoint), PEFT adapter, or merged model.",
    ),
    data: Optional[str] = typer.Option(
        None, "--data", help="Evaluation file or hub dataset (default: the recipe's eval data; required for a merged "
        "model, which records none).",
    ),
    split: Optional[str] = typer.Option(None, "--split", help="Split of --data (or of the recipe's data) to score."),
    base: bool = typer.Option(
        False, "--base", help="Score the untouched base model on the same data (before/after comparison).",
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", min=1, help="Evaluation (and generation) batch size (default: the recipe's).",
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o",
        help="Write results JSON here (default: beside the checkpoint, <checkpoint>-eval[-base].json).",
    ),
    base_model: Optional[str] = typer.Option(None, "--base-model", help=BASE_MODEL_HELP),
    format_: Optional[str] = typer.Option(
        None, "--format", help="Data format alpaca, chat, completion or classification (default: the checkpoint's "
        "data.format; completion for a merged model).",
    ),
    generate: bool = typer.Option(
        False, "--generate", help="Also answer each distinct eval prompt greedily and score the answers against its "
        "references (gen_* keys); predictions go beside the results, <results>-predictions.jsonl.",
    ),
    metrics: Optional[str] = typer.Option(
        None, "--metrics", help="With --generate: comma list of exact_match, rouge (ROUGE-L F), bleu (sacreBLEU, "
        "0-100), json (valid / exact / field shares). Default: exact_match,rouge,bleu, plus json when every "
        "reference is a JSON object or array. rouge and bleu need pip install 'deltafit\\[metrics]'.",  # \\[: no markup
    ),
    max_new_tokens: Optional[int] = typer.Option(
        None, "--max-new-tokens", help="With --generate: most tokens per answer (default 128).",
    ),
    max_examples: Optional[int] = typer.Option(
        None, "--max-examples", help="With --generate: answer only the first N distinct prompts (default: all).",
    ),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", help="Override a data key for the eval data, e.g. --set data.text_column=sentence (repeatable; "
        "data.* keys only: the model and delta come from the checkpoint).",
    ),
):
    """Score a checkpoint: loss and perplexity (causal LM), or accuracy, F1 and MCC (classification);
    with --generate, exact match, ROUGE-L, BLEU and JSON scores of its answers too."""
    from deltafit.evaluate import GenerationRequest, evaluate_checkpoint
    from deltafit.report import print_results

    given = [name for name, value in (("--metrics", metrics), ("--max-new-tokens", max_new_tokens),
                                      ("--max-examples", max_examples)) if value is not None]
    if given and not generate:
        raise UserError(f"{given[0]} scores generated answers: add --generate (or leave {given[0]} out)")
    request = GenerationRequest(
        tuple(m.strip() for m in metrics.split(",") if m.strip()) if metrics is not None else None,
        128 if max_new_tokens is None else max_new_tokens, max_examples,
    ) if generate else None
    results, path = evaluate_checkpoint(str(checkpoint), data, split, base, batch_size, str(output) if output else None,
                                        base_model, request, format_, set_ or [])
    print_results(results, path)


@app.command()
def generate(
    checkpoint: Path = typer.Argument(
        ..., help="Checkpoint directory (or a run directory: its final checkpoint), PEFT adapter, or merged model.",
    ),
    prompt: Optional[List[str]] = typer.Option(
        None, "--prompt", "-p", help="Text to answer (repeatable), rendered as training rendered prompts; the tokens "
        "print as they are generated.",
    ),
    data: Optional[str] = typer.Option(
        None, "--data", help="Data file in the checkpoint's format: answer every row (batched) and write "
        "{prompt, reference, prediction} JSON lines.",
    ),
    output: Optional[str] = typer.Option(
        None, "--output", "-o", help="JSON lines file for --data (default: beside the checkpoint, "
        "<checkpoint>-generate[-base].jsonl).",
    ),
    chat: bool = typer.Option(
        False, "--chat", help="Chat on the terminal with the chat template: one user line per turn, the conversation "
        "kept; an empty line or end of input ends it.",
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Most tokens generated per answer."),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy (default); above 0: sample."),
    top_p: float = typer.Option(1.0, "--top-p", help="Sampling draws from the most likely tokens up to this "
                                "probability mass (0 < P <= 1)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling: the same seed, the same output."),
    base: bool = typer.Option(False, "--base", help="Generate with the untouched base model (before/after)."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Rows per batch with --data (default: the recipe's train.batch_size).",
    ),
    format_: Optional[str] = typer.Option(
        None, "--format", help="Render prompts as alpaca, chat or completion (default: the checkpoint's data.format; "
        "completion for a merged model).",
    ),
    base_model: Optional[str] = typer.Option(None, "--base-model", help=BASE_MODEL_HELP),
):
    """Generate text with a causal-LM checkpoint: for --prompt texts, every row of --data, or a --chat."""
    from deltafit.generate import Settings, run

    settings = Settings(max_new_tokens, temperature, top_p, seed)
    written = run(str(checkpoint), settings, prompt, data, output, chat, base, batch_size, base_model, format_)
    if written is not None:
        typer.echo(f"wrote {written[1]} predictions to {written[0]}", err=True)


@app.command()
def merge(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (or PEFT adapter) of a mergeable method."),
    output: Path = typer.Option(..., "--output", "-o", help="New directory for the merged transformers model."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="Save the merged weights as float32, bfloat16 or float16 (default: model.dtype, "
        "or the base's stored 16-bit dtype where model.dtype is float32).",
    ),
    base_model: Optional[str] = typer.Option(None, "--base-model", help=BASE_MODEL_HELP),
):
    """Fold the delta into the base weights, check merged == unmerged logits, save a plain model."""
    from deltafit.merge import merge_checkpoint
    from deltafit.report import print_merge

    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise UserError(f"--dtype '{dtype}' is not one of float32, bfloat16, float16")
    print_merge(merge_checkpoint(str(checkpoint), str(output), dtype, base_model))


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (or a run directory: its final checkpoint)."),
    output: Path = typer.Option(..., "--output", "-o", help="New directory for the exported adapter."),
    format_: str = typer.Option(
        "peft", "--format", help="Adapter format: peft (adapter_config.json + adapter_model.safetensors).",
    ),
):
    """Write a checkpoint as a PEFT adapter, loadable with PeftModel.from_pretrained."""
    from deltafit.peft_io import export_checkpoint
    from deltafit.report import console

    result = export_checkpoint(str(checkpoint), str(output), format_)
    console.print(f"exported [bold]{result['method']}[/] as a PEFT {result['peft_type']} adapter "
                  f"({result['tensors']} tensors; modules_to_save: {result['modules_to_save']}) to {result['output']}")


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Check a recipe without loading weights and print the plan (modules, parameter counts, data)."""
    from deltafit.plan import make_plan
    from deltafit.recipe import load_recipe
    from deltafit.report import print_plan

    print_plan(make_plan(load_recipe(recipe, set_ or [])))


@app.command()
def schema(
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Write the schema to this JSON file (replacing it) instead of printing it.",
    ),
):
    """Print the recipe JSON Schema (every section and every method's options), e.g. for editor completion."""
    import json

    from deltafit.fsutil import check_outside_checkpoints, check_writable_dir
    from deltafit.recipe import recipe_schema

    if output is not None:  # checked first: the schema imports every method (and torch)
        if output.is_dir() or not str(output).strip():
            raise UserError(f"--output '{output}' is a directory; give the path of a JSON file to write")
        check_outside_checkpoints(output)
        check_writable_dir(output.parent)
    text = json.dumps(recipe_schema(), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"--output '{output}' could not be written ({e.strerror or e})") from None
    typer.echo(f"wrote the recipe schema to {output}", err=True)


@app.command()
def compare(
    recipe: Path = typer.Argument(..., help="Recipe YAML file (its model, data and train settings are shared)."),
    methods_: str = typer.Option(
        ..., "--methods", "-m", help="Comma list of delta methods to train, e.g. lora,adapter,bitfit,ia3 "
        "(see `deltafit methods`).",
    ),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", help="Override a recipe key for every method (--set train.max_steps=200), or for one method "
        "with a METHOD: prefix (--set lora:train.lr=1e-3 --set adapter:delta.bottleneck=32). Repeatable; values "
        "are YAML; applied after the recommended settings.",
    ),
    output: Optional[str] = typer.Option(
        None, "--output", "-o", help="Directory for the runs (one per method) and the table "
        "(default: runs/compare-<recipe>).",
    ),
):
    """Train the recipe once per delta method and tabulate the runs side by side.

    Each method gets its recommended learning rate and options (the recipe's own method keeps its
    delta section and train.lr as written). The table lists trainable parameters, eval metrics, time,
    peak memory and checkpoint size (terminal, compare.md, compare.json), with two PNG charts. Run it
    again to continue an interrupted comparison: finished runs are reused, an interrupted one resumes."""
    from deltafit.compare import compare as run_compare
    from deltafit.report import print_compare

    if output is not None and not output.strip():
        raise UserError("--output is empty: give the directory for the comparison (or leave --output out)")
    print_compare(run_compare(recipe, methods_, set_ or [], Path(output) if output else None))


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A training run's output directory (holds metrics.jsonl)."),
    output: Optional[str] = typer.Option(
        None, "--output", "-o", help="Directory for the PNG charts (default: RUN_DIR).",
    ),
):
    """Draw a run's metrics.jsonl as PNG charts (loss, lr, eval metrics, tokens/s) and print a summary."""
    from deltafit.plots import require, run_charts
    from deltafit.report import load_run_records, print_run_summary, summarize_run

    if output is not None and not output.strip():
        raise UserError("--output is empty: give the directory for the charts (or leave --output out for RUN_DIR)")
    records = load_run_records(run_dir)
    require("deltafit report")
    target = Path(output) if output else run_dir
    if target.exists() and not target.is_dir():
        raise UserError(f"--output '{target}' is a file; give a directory for the charts")
    from deltafit.fsutil import check_writable_dir

    check_writable_dir(target)  # a file on the way there, or a read-only place: one line, not a traceback
    charts = run_charts(records, target, title=run_dir.name)
    print_run_summary(run_dir, summarize_run(records), charts)


@app.command()
def methods():
    """List the delta methods: name, family, mergeable, description."""
    from deltafit.report import print_methods

    print_methods()


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: runs the app, turning user errors into one line and exit code 2."""
    own_command_line = argv is None  # not a test's or a script's call
    argv = _bare_resume(list(sys.argv[1:] if argv is None else argv))
    _quiet_import_warnings()
    try:
        _method_lists_in_help(argv)
        if own_command_line and argv[:1] == ["train"] and not {"--help", "-h"} & set(argv):
            from deltafit.allocator import reexec_with_allocator, use_huge_pages

            reexec_with_allocator(argv)  # returns only when there is no faster malloc to start with
            use_huge_pages()  # the C library's malloc it is: large tensors on huge pages (allocator.py)
        status = app(args=argv, prog_name="deltafit", standalone_mode=False)
    except UserError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    except Interrupted as e:
        typer.secho(str(e), fg="yellow", err=True)
        sys.exit(e.exit_code)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except _click_errors() as e:
        e.show()
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, *_click_abort()):
        _interrupted()
    # Outside standalone mode typer returns, rather than raises, an Exit's code: Ctrl-C outside the
    # training loop (loading, eval, merge) arrives here as 130, which must not read as success.
    if status == 130:
        _interrupted()
    if isinstance(status, int) and not isinstance(status, bool) and status:
        sys.exit(status)


def _interrupted() -> None:
    typer.secho("interrupted", fg="yellow", err=True)
    sys.exit(130)


# Help pages that list the methods a command accepts, from the registry's lines (cheap: no method
# module is imported).
METHOD_LISTS = {
    "merge": ("Methods that merge", lambda entry: entry.mergeable),
    "export": ("Methods PEFT can express", lambda entry: entry.peft_type is not None),
}


def _method_lists_in_help(argv: list[str]) -> None:
    command = argv[0] if argv else None
    if command not in METHOD_LISTS or not {"--help", "-h"} & set(argv):
        return
    from deltafit.deltas import METHODS

    title, accepts = METHOD_LISTS[command]
    names = [name for name, entry in METHODS.items() if accepts(entry)]
    for info in app.registered_commands:
        if (info.name or info.callback.__name__) == command:
            info.help = f"{info.callback.__doc__.strip()}\n\n{title}: {', '.join(names)}."


def _quiet_import_warnings() -> None:
    """transformers imports torchao whenever it is installed (for its own torchao quantizer, which
    deltafit never uses); torchao then logs one warning per CUDA kernel a CPU build cannot load, torch
    warns about its pytree registrations, and the import costs ~0.7 s. So a fresh deltafit process
    hides torchao from transformers; QLoRA, the one method that needs it, imports it itself
    (`deltafit.deltas.qlora._nf4`). The loggers are quieted too, for processes that import it anyway."""
    import logging

    if "transformers" not in sys.modules:
        sys.modules.setdefault("torchao", None)  # `import torchao` fails; find_spec says "not installed"
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _click_exception_modules() -> list:
    """Where the usage errors come from: typer >= 0.24 raises those of its own bundled copy of click
    (typer._click), older typers click's own; both are caught, so no usage error is a traceback."""
    import click

    modules = [click.exceptions]
    try:
        from typer._click import exceptions
    except ImportError:
        return modules
    return modules + [exceptions]


def _click_errors() -> tuple:
    return tuple(m.ClickException for m in _click_exception_modules())


def _click_abort() -> tuple:
    return tuple(m.Abort for m in _click_exception_modules() if hasattr(m, "Abort"))


def _bare_resume(argv: list[str]) -> list[str]:
    """`--resume` with no value means 'latest'; Click options cannot have an optional value."""
    for i, arg in enumerate(argv):
        if arg == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            argv.insert(i + 1, "latest")
            break
    return argv
