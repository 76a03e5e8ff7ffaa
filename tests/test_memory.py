"""Training memory: activations recomputed instead of kept, LoRA inputs kept once, and the allocator.

Each optimization must leave the numbers exactly as they were: recomputing an activation runs
the same op on the same tensor, so gradients are compared bit for bit (`torch.equal`), not
within a tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltafit import allocator
from deltafit.recompute import RecomputedActivations
from tests.helpers import write_recipe

ROOT = Path(__file__).resolve().parents[1]


def _tiny_llama(**config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, **config))


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=120, hidden_size=32, intermediate_size=80,
                                                    num_hidden_layers=2, num_attention_heads=4))


def _grads(model, batch, recomputed=None):
    model.zero_grad(set_to_none=True)
    if recomputed is None:
        loss = model(**batch).loss
    else:
        with recomputed.active():
            loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model, batch, recomputed=None) -> int:
    """Bytes of distinct storages autograd keeps for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(tensor):
        if torch.is_tensor(tensor) and tensor.untyped_storage().data_ptr() not in params:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    if recomputed is None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**batch)
    else:  # count what the recomputing hooks let through
        inner = recomputed._pack
        recomputed._pack = lambda t: pack(p) if torch.is_tensor(p := inner(t)) else p
        try:
            with recomputed.active():
                model(**batch)
        finally:
            recomputed._pack = inner
    return sum(seen.values())


@pytest.mark.parametrize("arch", ["llama-silu", "bert-gelu"])
def test_recomputed_activations_give_bit_identical_gradients_and_keep_less(arch):
    model = _tiny_llama() if arch == "llama-silu" else _tiny_bert()
    model.train()
    torch.manual_seed(1)
    ids = torch.randint(0, 120, (3, 11))
    batch = {"input_ids": ids, "labels": ids if arch == "llama-silu" else torch.tensor([0, 1, 1])}
    if arch == "bert-gelu":
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    recomputed = RecomputedActivations().attach(model)
    assert recomputed.hooked == (2 if arch == "llama-silu" else 3)  # one per layer (+ BERT's pooler tanh)
    plain_loss, plain = _grads(model, batch)
    lean_loss, lean = _grads(model, batch, recomputed)
    assert torch.equal(plain_loss, lean_loss) and plain.keys() == lean.keys() and len(plain) > 10
    for name, grad in plain.items():
        assert torch.equal(grad, lean[name]), name
    # Each layer's activation output ([tokens, intermediate] floats) is no longer kept.
    intermediate = 3 * 11 * 80 * 4
    assert _saved_bytes(model, batch) - _saved_bytes(model, batch, recomputed) == 2 * intermediate


def test_recompute_refuses_an_activation_input_changed_in_place():
    act = torch.nn.SiLU()
    holder = torch.nn.Sequential(act)
    recomputed = RecomputedActivations().attach(holder)
    g = torch.randn(5, requires_grad=True)
    with recomputed.active():
        h = g * 2
        y = (holder(h) * g).sum()
    with torch.no_grad():
        h.add_(1)  # torch itself would refuse this too (SiLU keeps h)
    with pytest.raises(RuntimeError, match="modified by an inplace operation|modified in place"):
        y.backward()


def test_recompute_remembers_nothing_outside_a_training_forward():
    class Counting(dict):  # entries are keyed by storage address, which a freed output may hand on
        stores = 0

        def __setitem__(self, key, value):
            self.stores += 1
            super().__setitem__(key, value)

    model = _tiny_llama()
    recomputed = RecomputedActivations().attach(model)
    recomputed._outputs = Counting()
    ids = torch.randint(0, 120, (2, 7))
    model(input_ids=ids, labels=ids).loss.backward()  # not inside active(): hooks must hold nothing
    assert recomputed._outputs == {} and recomputed._outputs.stores == 0
    with recomputed.active():
        model(input_ids=ids, labels=ids)
        assert recomputed._outputs and recomputed._outputs.stores == 2  # one per layer
    assert recomputed._outputs == {}  # released when the forward pass ends
    recomputed.detach()
    assert recomputed.hooked == 0


def test_a_branch_the_loss_does_not_use_is_freed_after_each_step():
    """model.pooling mean (MiniLM's default) replaces the pooler's output, so the pooler's dense + tanh
    run in forward but never in backward. An unexecuted node never releases what it saved: if what
    the saved-tensor hook kept were the tensor itself, the tanh node would hold its own output (a
    cycle through C++ that Python's gc cannot see) and every step's graph would stay alive, its
    thousands of small allocations fragmenting the C library's heap (1.25x the reference's memory
    without tcmalloc in scripts/bench.py, before this was found)."""
    import gc
    import weakref

    from deltafit.model import mean_pooling_hook

    model = _tiny_bert()
    model.bert.register_forward_hook(mean_pooling_hook, with_kwargs=True)
    outputs = []
    model.bert.pooler.register_forward_hook(lambda module, args, output: outputs.append(weakref.ref(output)))
    recomputed = RecomputedActivations().attach(model)
    ids = torch.randint(0, 120, (3, 11))
    for _ in range(3):
        with recomputed.active():
            loss = model(input_ids=ids, labels=torch.tensor([0, 1, 1])).loss
        loss.backward()
        del loss
    gc.collect()
    assert len(outputs) == 3 and all(ref() is None for ref in outputs)


def test_lora_projections_sharing_an_input_keep_it_once_with_bool_masks():
    from deltafit.deltas._lowrank import LowRankUpdate

    torch.manual_seed(0)
    q, v = (LowRankUpdate(16, 16, r=4, scale=2.0, dropout=0.1) for _ in range(2))
    x = torch.randn(3, 5, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        (q(x) + v(x)).sum()
    large = {t.untyped_storage().data_ptr(): t for t in saved if t.numel() == x.numel()}
    # x itself once, and one bool mask per projection: never a dropped-out float copy of x.
    assert sorted(str(t.dtype) for t in large.values()) == ["torch.bool", "torch.bool", "torch.float32"]
    assert x.untyped_storage().data_ptr() in large


# ----------------------------------------------------------------------------------------------
# The allocator `deltafit train` starts with


def test_launch_env_preloads_the_library_once(monkeypatch, tmp_path):
    monkeypatch.setattr(allocator, "loaded", lambda: None)
    library = tmp_path / "libtcmalloc_minimal.so.4"
    library.write_bytes(b"")
    env = allocator.launch_env({"DELTAFIT_ALLOCATOR": str(library), "LD_PRELOAD": "/a/libfoo.so"})
    assert env["LD_PRELOAD"] == f"{library}:/a/libfoo.so"
    assert env[allocator.TRIED] == "1" and int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) > 2**40
    assert allocator.launch_env(env) is None  # the re-executed process does not go round again
    assert allocator.launch_env({"DELTAFIT_ALLOCATOR": "system"}) is None
    # A user's own preloaded allocator is theirs to choose.
    assert allocator.launch_env({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is None


def test_only_the_process_command_line_reexecutes(monkeypatch, tmp_path):
    import deltafit.cli as cli

    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a) or (_ for _ in ()).throw(SystemExit(0)))
    monkeypatch.setenv("DELTAFIT_ALLOCATOR", str(tmp_path / "libtcmalloc_minimal.so.4"))
    monkeypatch.delenv(allocator.TRIED, raising=False)
    monkeypatch.setattr(allocator, "loaded", lambda: None)
    with pytest.raises(SystemExit):
        cli.main(["train", "missing.yaml"])  # an explicit argv (tests, scripts): never re-executed
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["deltafit", "train", "r.yaml", "--set", "train.lr=1"])
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == []  # a DELTAFIT_ALLOCATOR path that is not a file is a user error (exit 2), not a preload
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    with pytest.raises(SystemExit):
        cli.main()
    (executable, argv, env), = calls
    assert argv == [sys.executable, "-m", "deltafit", "train", "r.yaml", "--set", "train.lr=1"]
    assert env["LD_PRELOAD"].startswith(str(tmp_path / "libtcmalloc_minimal.so.4"))


def test_a_missing_allocator_library_is_a_clear_user_error(monkeypatch, capsys):
    import deltafit.cli as cli

    monkeypatch.setenv("DELTAFIT_ALLOCATOR", "/nowhere/libtcmalloc.so")
    monkeypatch.delenv(allocator.TRIED, raising=False)
    monkeypatch.setattr(allocator, "loaded", lambda: None)
    monkeypatch.setattr(sys, "argv", ["deltafit", "train", "r.yaml"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "DELTAFIT_ALLOCATOR='/nowhere/libtcmalloc.so' is not a file" in err and "system" in err
    assert "Traceback" not in err


def test_huge_pages_are_for_the_c_librarys_malloc_where_linux_offers_them(monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    monkeypatch.setattr(allocator, "THP_SETTING", setting)
    for offered in ("always [madvise] never", "[always] madvise never"):
        setting.write_text(offered)
        assert allocator.huge_pages_env({})[allocator.HUGE_PAGES] == "1"
        assert allocator.huge_pages_env({"DELTAFIT_ALLOCATOR": "system", "PATH": "/bin"}) == \
            {"DELTAFIT_ALLOCATOR": "system", "PATH": "/bin", allocator.HUGE_PAGES: "1"}
    assert allocator.huge_pages_env({"DELTAFIT_ALLOCATOR": "plain"}) is None  # as it comes
    assert allocator.huge_pages_env({allocator.HUGE_PAGES: "0"}) is None  # the user's own choice
    assert allocator.huge_pages_env({"LD_PRELOAD": "/x/libtcmalloc_minimal.so.4"}) is None  # its own pages
    assert allocator.huge_pages_env({allocator.TRIED: "1"}) is None  # re-executed with a preloaded malloc
    setting.write_text("always madvise [never]")
    assert allocator.huge_pages_env({}) is None
    monkeypatch.setattr(allocator, "THP_SETTING", tmp_path / "missing")  # not Linux, or no THP in the kernel
    assert allocator.huge_pages_env({}) is None


def test_huge_pages_switched_on_put_large_tensors_on_huge_pages():
    """In fresh processes: `use_huge_pages` before torch is imported, then a 16 MiB tensor lands in huge
    pages when this machine offers them; with `plain`, or when torch came first, nothing is switched."""
    probe = ("import os, sys; from deltafit import allocator; late = sys.argv[1] == 'late'; "
             "late and __import__('torch'); on = allocator.use_huge_pages(); import torch; "
             "x = torch.ones(4 << 20); "
             "huge = [int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')]; "
             "print(on, huge[0] if huge else 0, os.environ.get(allocator.HUGE_PAGES), allocator.describe())")
    results = {}
    for choice, order in (("system", "early"), ("plain", "early"), ("system", "late")):
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.HUGE_PAGES, allocator.TRIED)}
        env.update(DELTAFIT_ALLOCATOR=choice, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", probe, order], env=env, capture_output=True, text=True, check=True)
        on, huge_kb, variable, *described = out.stdout.split()
        results[choice, order] = (on == "True", int(huge_kb), variable, " ".join(described))
    nothing = (False, 0, "None", "system malloc")
    assert results["plain", "early"] == nothing
    assert results["system", "late"] == nothing  # PyTorch reads the variable once: too late to switch
    if allocator.huge_pages_env({}) is not None:
        on, huge_kb, variable, described = results["system", "early"]
        assert (on, variable, described) == (True, "1", "system malloc + huge pages")
        assert huge_kb >= 4096  # at least two whole 2 MiB pages of the 16 MiB tensor
    else:  # this kernel offers none: nothing is switched on and the log says the plain malloc
        assert results["system", "early"] == nothing


@pytest.mark.parametrize("choice", ["auto", "system", "plain"])
def test_deltafit_train_reports_the_malloc_it_runs_on(choice, tmp_path, tiny_llama, alpaca_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": str(alpaca_file), "format": "alpaca"},
                          train={"max_steps": 1, "batch_size": 2})
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.TRIED)}
    env.update(DELTAFIT_ALLOCATOR=choice, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "deltafit", "train", str(recipe), "--output", str(tmp_path / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    library = allocator.find_library() if choice == "auto" else None
    if library:  # `make install` fetched it (or the system has it): training runs on it
        assert "; malloc: tcmalloc" in proc.stderr
    elif choice != "plain" and allocator.huge_pages_env({}) is not None:
        assert "; malloc: system malloc + huge pages data:" in " ".join(proc.stderr.split())  # the next line
    else:  # plain, or a kernel without transparent huge pages: the C library's malloc as it comes
        assert "; malloc: system malloc data:" in " ".join(proc.stderr.split())
