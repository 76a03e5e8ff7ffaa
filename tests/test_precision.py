"""train.mixed_precision: auto (the default) picks bf16 only where the hardware runs it natively, and says so."""

import json
import sys

import pytest
import torch

from deltafit import precision
from deltafit.errors import UserError
from deltafit.recipe import load_recipe
from tests.helpers import run_cli, write_recipe


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)


def test_explicit_choices_pass_through(cpu_only, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ["AMX-BF16"])
    for choice in ("no", "bf16"):
        assert precision.resolve(choice) == (choice, "train.mixed_precision says so")


def test_fp16_without_cuda_is_refused_not_run_as_fp32_under_its_name(cpu_only):
    """Accelerate autocasts fp16 on CUDA only: on a CPU the run was plain fp32 while its log said fp16."""
    with pytest.raises(UserError, match=r"'train\.mixed_precision': fp16 needs a CUDA GPU.*bf16, no or auto"):
        precision.resolve("fp16")


def test_an_explicit_bf16_on_a_cpu_that_emulates_it_is_warned_in_the_first_line(cpu_only, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: [])
    choice, why = precision.resolve("bf16")
    assert choice == "bf16"  # the recipe's choice stands: it is slow, not wrong
    line = precision.line(choice, why)
    assert line.startswith("precision: bf16 autocast") and "would be emulated and slower than fp32" in line
    assert precision.resolve("no") == ("no", "train.mixed_precision says so")


def test_an_explicit_bf16_on_a_gpu_without_native_bf16_is_warned_too(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    choice, why = precision.resolve("bf16")
    assert choice == "bf16" and why.startswith("train.mixed_precision says so; but Some GPU has no native bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert precision.resolve("bf16") == ("bf16", "train.mixed_precision says so")


def test_auto_is_bf16_on_a_cpu_with_native_bf16(cpu_only, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ["AMX-BF16", "AVX-512 BF16"])
    choice, why = precision.resolve("auto")
    assert choice == "bf16" and "AMX-BF16" in why
    line = precision.line(choice, why)
    assert line.startswith("precision: bf16") and "mixed_precision: no keeps fp32" in line


def test_auto_is_fp32_on_a_cpu_without_native_bf16(cpu_only, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: [])
    choice, why = precision.resolve("auto")
    assert choice == "no" and "neither AMX nor AVX-512 BF16" in why
    assert precision.line(choice, why).startswith("precision: fp32 (auto:")


@pytest.mark.parametrize("bf16,expected", [(True, "bf16"), (False, "no")])
def test_auto_on_cuda_follows_native_bf16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    choice, why = precision.resolve("auto")
    assert choice == expected and "Some GPU" in why


def test_linux_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    real = precision.Path
    monkeypatch.setattr(precision, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real(p))
    assert precision._linux_flags() == {"AVX-512 BF16"}  # amx_tile alone is not amx_bf16


def test_cpu_units_agree_with_proc_cpuinfo_on_linux():
    # torch's probe and the kernel's flags describe the same CPU (Linux, where both can be read)
    assert sys.platform != "linux" or set(precision.cpu_bf16_units()) == precision._linux_flags()


def test_auto_is_the_default(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: some/model}\ndata: {train: rows.json}\n")
    assert load_recipe(path).train.mixed_precision == "auto"


@pytest.mark.parametrize("written", [None, "no"])
def test_first_log_line_says_which_precision_and_why(tmp_path, capsys, tiny_llama, alpaca_file, written):
    train = {"max_steps": 1} | ({"mixed_precision": written} if written else {})
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": str(alpaca_file), "format": "alpaca"},
                          train=train)
    code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err
    expected, why = precision.resolve(written or "auto")  # what this machine has decides
    first = err.splitlines()[0]  # the run's log goes to stderr
    assert first == precision.line(expected, why)
    assert first.startswith("precision: " + ("fp32" if expected == "no" else "bf16"))


def test_bf16_and_fp32_loss_curves_agree_over_60_steps(tmp_path, capsys, tiny_llama, alpaca_file):
    """bf16 autocast trains the same model as fp32 (fp32 master weights, bf16 matmuls): every step's
    loss within 1% of fp32's (measured: ~1e-4 on this tiny model), and both curves fall."""
    curves = {}
    for choice in ("no", "bf16"):
        recipe = write_recipe(tmp_path / f"{choice}.yaml", tiny_llama, {"train": str(alpaca_file), "format": "alpaca"},
                              train={"max_steps": 60, "mixed_precision": choice, "lr": 2e-2, "log_every": 1})
        code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / choice)
        assert code == 0, err
        records = [json.loads(line) for line in (tmp_path / choice / "metrics.jsonl").read_text().splitlines()]
        curves[choice] = [r["loss"] for r in records if "loss" in r]
    fp32, bf16 = curves["no"], curves["bf16"]
    assert len(fp32) == len(bf16) == 60
    assert fp32 != bf16  # the bf16 run did run in bf16
    for step, (a, b) in enumerate(zip(fp32, bf16), start=1):
        assert abs(a - b) <= 0.01 * a, (step, a, b)
    assert fp32[-1] < fp32[0] - 0.2 and bf16[-1] < bf16[0] - 0.2  # both learned


def test_resume_compares_precisions_as_they_resolve(monkeypatch, tmp_path):
    """A run saved with "no" (the default before auto) resumes under auto where auto means fp32, and
    is refused, naming both values, where auto would switch it to bf16 mid-run."""
    from deltafit import checkpoint, train
    from deltafit.errors import UserError
    from deltafit.recipe import recipe_from_dict

    recipe = recipe_from_dict({"model": {"name": "some/model"}, "data": {"train": "rows.json"}})
    saved = recipe.to_dict()
    saved["train"]["mixed_precision"] = "no"
    monkeypatch.setattr(checkpoint, "read_recipe_dict", lambda path: saved)
    monkeypatch.setattr(precision, "resolve", lambda v: ("no" if v in ("auto", "no") else v, "test"))
    train._check_unchanged(tmp_path, recipe)  # no error: the run continues in fp32 as it began
    monkeypatch.setattr(precision, "resolve", lambda v: ("bf16" if v in ("auto", "bf16") else v, "test"))
    with pytest.raises(UserError, match=r"'train.mixed_precision' is 'auto' .* trained with 'no'"):
        train._check_unchanged(tmp_path, recipe)
