"""User-facing errors.

Anything the user can fix (a recipe key, a file, a value) raises `UserError`; the CLI prints its
one-line message and exits with code 2, without a traceback. Everything else is a bug and keeps
its traceback.
"""

import difflib
import shlex


class UserError(Exception):
    """A mistake in the user's input, reported as one clear line (exit code 2)."""


class Interrupted(Exception):
    """A run stopped on request (SIGINT/SIGTERM) after saving a checkpoint; the message says how to
    resume. The CLI exits with 128 + the signal number, as shells expect."""

    def __init__(self, message: str, signum: int, resume_args: tuple[str, ...] = ()):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.resume_args = resume_args  # what `deltafit train <recipe>` needs after it to resume
        self.recipe_args: tuple[str, ...] = ("RECIPE",)  # the CLI puts in the recipe file and its --set

    def __str__(self) -> str:
        if not self.resume_args:
            return super().__str__()
        command = shlex.join(["deltafit", "train", *self.recipe_args, *self.resume_args])
        return f"{super().__str__()} Resume with: {command}"


# Names users bring from PEFT and the transformers Trainer, mapped to deltafit's own.
ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora",
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "scheduler", "max_seq_length": "max_length",
    "model_name_or_path": "name", "peft_type": "method",
}


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    choices = list(choices)
    if ALIASES.get(str(word)) in choices:
        return f" (did you mean '{ALIASES[str(word)]}'?)"
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
