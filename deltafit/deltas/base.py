"""The Delta interface: the one seam between the trainer and every method.

A method is a small class with a typed `Config` and the lifecycle below. The trainer, evaluator,
checkpointer and merger only ever talk to this interface, so adding a method never touches them.

Lifecycle: `attach(model)` freezes the base and inserts the delta (through `Insertions`, which
uses forward hooks and registered child modules, never patched forwards); the trainer optimizes
`trainable_parameters()`, calls the hooks, and saves `state_dict()`; `detach()` gives back the
pristine base, `merge()` folds the update into the base weights where the math allows.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from deltafit.errors import UserError

HEAD_PREFIX = "head."


class DeltaConfig(BaseModel):
    """Options shared by every method. Subclasses add their own fields (their docs are the help)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    method: str = Field(description="Delta method name (see `deltafit methods`).")
    name: Optional[str] = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$",
        description="This delta's name in a composition (`delta:` as a list): its checkpoint tensors are stored "
        "under '<name>.' and `--set delta.<name>.key=value` reaches it. Default: the method name.",
    )
    lr: Optional[float] = Field(
        None, gt=0, description="Learning rate of this delta's parameters (default train.lr): in a composition "
        "each delta may train at its own rate (prompt tuning ~1e-2 beside LoRA ~2e-4).",
    )
    weight_decay: Optional[float] = Field(
        None, ge=0, description="Weight decay of this delta's matrices (default train.weight_decay).",
    )


class TargetedConfig(DeltaConfig):
    """Options for methods that attach to chosen modules (LoRA and friends)."""

    target_modules: Optional[Union[str, list[str]]] = Field(
        None,
        description="Modules that get a delta: a list of exact names or name suffixes (e.g. [q_proj, v_proj]), "
        "a regex string matched against full module names, or 'all-linear'. Default: per architecture.",
    )
    layers: Optional[list[int]] = Field(
        None, description="Only blocks with these indexes (negative counts from the end). Default: every block."
    )


class Delta:
    """Base class of every delta method; the hooks have no-op defaults."""

    name: ClassVar[str]
    family: ClassVar[str]  # "addition" | "specification" | "reparameterization" | "baseline"
    description: ClassVar[str]
    mergeable: ClassVar[bool] = False
    not_mergeable_because: ClassVar[str] = "its update is not a change of existing weights"
    Config: ClassVar[type[DeltaConfig]] = DeltaConfig
    # Freshly attached (default init), the model computes exactly what the base computes. False for
    # methods that add inputs the base never saw (prompt and prefix tokens).
    zero_init_identity: ClassVar[bool] = True
    # detach() also undoes training. False only where the delta *is* the base weights and keeping a
    # pristine copy would double memory (full fine-tuning): detach then only restores grad flags.
    detach_restores_weights: ClassVar[bool] = True
    # The delta stores the frozen base lossily (QLoRA keeps it 4-bit and frees the originals). The
    # base it sits on is then the quantized one: "a fresh delta leaves the output unchanged" and
    # "detach restores the base" hold relative to the model after attach + detach (the base's
    # weights as stored, dequantized), not to the original weights.
    lossy_base: ClassVar[bool] = False
    # Trains on packed rows (several examples per row, positions restarting per example). False for
    # methods that add inputs in front of each sequence (prompt, prefix): a row holds several.
    supports_packing: ClassVar[bool] = True
    # Composition (a list of deltas on one base; deltafit/deltas/compose.py). The method reads or rewrites
    # the weights of the modules it attaches to (DoRA's column norms, QLoRA's 4-bit
    # copy, masks over W): another delta on one of those modules would break its math or its merge.
    exclusive_hosts: ClassVar[bool] = False
    # Where the method puts virtual tokens in front of every sequence: "embeddings" (prompt tuning,
    # P-tuning) or "cache" (prefix tuning's past keys/values). Two deltas cannot share one slot.
    input_slot: ClassVar[Optional[str]] = None
    # Parameters stop (or start) training during the run: blocks open and close (LISA), columns or
    # projections freeze (LaMDA, LaMDA++, AFLoRA). Under DDP every step then looks for the parameters
    # that got no gradient, which DDP otherwise takes for a bug and stops on.
    trainables_change: ClassVar[bool] = False
    # The run's tokenizer, set by the trainer before attach, for methods that initialize from text.
    tokenizer: Any = None
    # Set by attach(restoring=True): a state is loaded right after (eval/merge/export reattaching a
    # checkpoint, --resume), so an initialization that state overwrites may be skipped (PiSSA's SVD).
    restoring: bool = False

    def __init_subclass__(cls, **kwargs):
        """A registered method's facts (mergeable, PEFT type) come from its registry line, the one
        place that states them (the CLI reads them there without importing any method)."""
        super().__init_subclass__(**kwargs)
        from deltafit.deltas import METHODS

        entry = METHODS.get(cls.__dict__.get("name"))
        if entry is not None:
            cls.mergeable, cls.peft_type = entry.mergeable, entry.peft_type

    def __init__(self, config: DeltaConfig):
        self.config = config
        self.model: Optional[nn.Module] = None
        self.insertions = Insertions()
        self._head: dict[str, nn.Parameter] = {}
        self._grad_flags: dict[str, bool] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def attach(self, model: nn.Module, head: Iterable[str] = (), restoring: bool = False) -> None:
        """Freeze the base, insert the delta, and let the task head (e.g. a new classifier) train.

        `check_fits` runs first: a size the model cannot use is refused before anything is touched
        or allocated (on a meta-device model for `validate`, on the real one for `train`).
        `restoring`: the caller loads a state_dict next, which replaces every initial value."""
        self.check_fits(model)
        self.model, self.restoring = model, restoring
        self._grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        self._attach(model)
        head = tuple(head)
        self._head = {n: p for n, p in model.named_parameters() if _under(n, head)}
        for p in self._head.values():
            p.requires_grad_(True)

    def detach(self) -> None:
        """Remove every hook and module the delta added and restore the base's grad flags."""
        self._detach()
        self.insertions.remove_all()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._grad_flags.get(n, True))
        self.model = None

    def merge(self) -> None:
        """Fold the delta into the base weights and detach; the model becomes a plain one."""
        if not self.mergeable:
            raise UserError(f"method '{self.name}' cannot be merged: {self.not_mergeable_because}")
        with torch.no_grad():
            self._merge()
        self.detach()

    # -- parameters and state ----------------------------------------------------------------

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter the optimizer updates: the delta's own plus the task head's."""
        params = dict(self.delta_parameters())
        params.update({HEAD_PREFIX + n: p for n, p in self._own_head().items()})
        return params

    def delta_parameters(self) -> dict[str, nn.Parameter]:
        """The delta's own trainable tensors, keyed like its state_dict."""
        return dict(self.insertions.named_parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Only the delta's tensors (and the task head's): what a checkpoint stores.

        Inserted parameters are included whether or not they train right now, so the key set is
        the same at every step of a run that freezes parts of its delta on a schedule (LaMDA's B,
        AFLoRA's paths); frozen-forever tensors that can be regenerated belong in buffers.
        """
        state = {n: p.detach() for n, p in self.insertions.named_parameters(trainable_only=False)}
        state.update({n: p.detach() for n, p in self.delta_parameters().items()})
        state.update(self._extra_state())
        state.update({HEAD_PREFIX + n: p.detach() for n, p in self._own_head().items()})
        return state

    def final_state_dict(self) -> dict[str, torch.Tensor]:
        """What the final checkpoint stores; by default the same as `state_dict`. Methods whose
        training-time tensors are larger than the result (AdaLoRA trims pruned ranks) override it;
        their `load_state_dict` must then accept both forms."""
        return self.state_dict()

    def _own_head(self) -> dict[str, nn.Parameter]:
        """Head parameters the delta does not already hold (full FT and BitFit train head tensors
        too): listing a tensor twice would make the optimizer update it twice."""
        held = {id(p) for p in self.delta_parameters().values()}
        return {n: p for n, p in self._head.items() if id(p) not in held}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors in place; names and shapes must match exactly."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise UserError(
                f"checkpoint tensors do not fit method '{self.name}' on this model: "
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
            )
        with torch.no_grad():
            for key, target in own.items():
                if tuple(state[key].shape) != tuple(target.shape):
                    raise UserError(
                        f"checkpoint tensor '{key}' has shape {tuple(state[key].shape)}, "
                        f"the model expects {tuple(target.shape)} (different base model or config?)"
                    )
                target.copy_(state[key].to(target.dtype))

    # -- hooks the trainer calls for every method (no-ops by default) ------------------------

    def prepare_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Rewrite a batch before the forward pass (prompt/prefix methods)."""
        return batch

    def extra_loss(self) -> Optional[torch.Tensor]:
        """A regularizer added to the task loss (AdaLoRA orthogonality, L0 penalties...)."""
        return None

    def before_optimizer_step(self, step: int) -> None:
        """Called once per optimizer step, after backward and gradient clipping, while the gradients
        still exist (importance scores for AdaLoRA, AFLoRA). `step` is the step about to complete
        (1-based)."""

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called after every optimizer step (rank budgets, freezing schedules...)."""

    def check_fits(self, model: nn.Module) -> None:
        """Refuse, with a UserError naming the recipe key, the value and what would be valid, a size
        this model cannot use (a rank above a target's dimensions...). Called by `attach` before any
        parameter is created; must only read shapes (the model may be on the meta device). The shared
        checks are in `deltafit.deltas._targets` (`check_rank`, `check_within_base`, `refuse_above`)."""

    def check_run(self, total_steps: int) -> None:
        """Refuse a run too short for the method's schedule with a UserError naming the recipe keys;
        called before the first step (and by `validate` when train.max_steps is set)."""

    def schedule_state(self) -> dict[str, Any]:
        """The method's own training-schedule state (importance averages, rank masks, what is frozen),
        saved in step checkpoints so a resumed run continues exactly. Nested dicts/lists of tensors
        and JSON values. Stateless methods return {}."""
        return {}

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        """Restore what `schedule_state` returned; called after attach and after the optimizer state
        is restored, before training continues."""

    # -- what subclasses implement -----------------------------------------------------------

    def _attach(self, model: nn.Module) -> None:
        raise NotImplementedError

    def _detach(self) -> None:
        """Undo anything `insertions` does not track (e.g. requires_grad set on base params)."""

    def _merge(self) -> None:
        """The default, for parallel updates (LoRA and its family): every inserted module that has a
        dense `delta_weight()` (shaped like its host's weight) is folded in, W <- W + delta, through
        its own `fold(host)` where it has a faster one. Other mergeable methods override this."""
        from deltafit.deltas._lowrank import fold_into

        for host, _, update in self.insertions.hosts.values():
            if hasattr(update, "fold"):
                update.fold(host)
            elif hasattr(update, "delta_weight"):
                fold_into(host, update.delta_weight())

    def _extra_state(self) -> dict[str, torch.Tensor]:
        """Non-trainable tensors a checkpoint must hold too (buffers, frozen random projections...)."""
        return {}

    def expected_trainable_params(self, model: nn.Module) -> int:
        """The paper's parameter-count formula for this model, computed before attaching."""
        raise NotImplementedError

    def describe_targets(self) -> list[str]:
        """Names of the modules that got a delta (for `deltafit validate`)."""
        return list(self.insertions.hosts)

    def inserted_hosts(self) -> list[tuple[str, nn.Module, bool]]:
        """(key, host module, whether this method owns the host's weights) of every insertion; a
        composition lists its parts' (compose.py checks that deltas can share the modules)."""
        return [(key, host, self.exclusive_hosts) for key, (host, _, _) in self.insertions.hosts.items()]

    def input_slots(self) -> set[str]:
        """The places virtual tokens go in front of the input (`input_slot`), of every part for a composition."""
        return {self.input_slot} if self.input_slot else set()

    def components(self) -> dict[str, "Delta"]:
        """The named deltas a composition holds ({} for a single method), for `validate`'s table."""
        return {}

    def optimizer_groups(self) -> list[tuple[dict[str, nn.Parameter], Optional[float], Optional[float]]]:
        """(parameters, lr, weight_decay) per group; None means train.lr / train.weight_decay.
        One group here; a composition gives each delta its own (delta.<name>.lr)."""
        return [(self.trainable_parameters(), self.config.lr, self.config.weight_decay)]

    # -- PEFT interoperability (`deltafit export --format peft`, eval/merge of PEFT adapters) ----
    # PEFT's name for this method ("LORA", "PROMPT_TUNING"...); None where PEFT cannot express it.
    # The generic part (common config fields, task head as modules_to_save, key prefixes, files)
    # is in deltafit/peft_io.py; a method maps only its own fields and tensors.
    peft_type: ClassVar[Optional[str]] = None

    @classmethod
    def to_peft(cls, config: DeltaConfig, state: dict[str, torch.Tensor], model_config) -> tuple[dict, dict]:
        """(this method's adapter_config fields, its tensors under PEFT's names) from a checkpoint's
        config and tensors (task head excluded). Tuner keys are module paths without PEFT's
        `base_model.model.` prefix. `model_config()` returns the base's transformers config."""
        raise UserError(f"method '{cls.name}' cannot be expressed in PEFT's format; use the deltafit checkpoint "
                        f"(deltafit eval/merge accept it directly)")

    @classmethod
    def from_peft(cls, fields: dict, tensors: dict[str, torch.Tensor], model_config) -> tuple[dict, dict]:
        """(deltafit delta config dict, state dict) from a PEFT adapter's config and tensors (head
        excluded, PEFT's key prefix removed). Refuse PEFT options the method cannot express."""
        raise UserError(f"method '{cls.name}' cannot import PEFT adapters")


INSERTED = "_deltafit_inserted"  # marks a module a delta inserted (Insertions._register)


def base_named_modules(model: nn.Module):
    """`named_modules()` without the modules deltas inserted: in a composition a later delta finds its
    targets (linear layers, biases, norms, blocks' tensors) in the base only, not in an earlier delta."""
    seen = set()

    def walk(module: nn.Module, prefix: str):
        if id(module) in seen:
            return
        seen.add(id(module))
        yield prefix, module
        for name, child in module.named_children():
            if not getattr(child, INSERTED, False):
                yield from walk(child, f"{prefix}.{name}" if prefix else name)

    yield from walk(model, "")


def base_named_parameters(model: nn.Module):
    """`named_parameters()` of the base only (tied tensors once), as `base_named_modules`."""
    seen = set()
    for prefix, module in base_named_modules(model):
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield (f"{prefix}.{name}" if prefix else name), p


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class Insertions:
    """OpenDelta-style insertion primitives, all undoable.

    Each primitive registers the delta module as a child of its host (so `.to()`, Accelerate and
    `model.parameters()` see it) and a forward hook that routes data through it.
    """

    def __init__(self):
        self.hosts: dict[str, tuple[nn.Module, str, nn.Module]] = {}  # host name -> (host, child, delta)
        self._attributes: dict[str, str] = {}  # key -> the child's attribute name on its host
        self._handles: list[Any] = []

    def _register(self, host_name: str, host: nn.Module, child: str, delta: nn.Module) -> None:
        delta.train(host.training)  # a model attached in eval mode stays in eval mode (no dropout, fixed gates)
        key = f"{host_name}.{child}" if host_name else child
        # In a composition two deltas may insert a child of one name on one host (two LoRAs): the second
        # gets a free attribute name; its key (and so its checkpoint tensor names) stays the method's own.
        attribute, n = child, 1
        while hasattr(host, attribute):
            attribute, n = f"{child}_{n}", n + 1
        setattr(delta, INSERTED, True)
        host.add_module(attribute, delta)
        self.hosts[key] = (host, child, delta)
        self._attributes[key] = attribute

    def parallel(self, host_name: str, host: nn.Module, child: str, delta: nn.Module) -> None:
        """out = host(x) + delta(x): LoRA-style updates beside a layer."""
        self._register(host_name, host, child, delta)
        self._handles.append(host.register_forward_hook(lambda m, args, out: out + delta(args[0]).to(out.dtype)))

    def after(self, host_name: str, host: nn.Module, child: str, delta: nn.Module) -> None:
        """out = delta(host(x)): serial adapters after a projection."""
        self._register(host_name, host, child, delta)
        self._handles.append(host.register_forward_hook(lambda m, args, out: delta(out)))

    def before(self, host_name: str, host: nn.Module, child: str, delta: nn.Module) -> None:
        """host(delta(x)): rewrite a layer's first input."""
        self._register(host_name, host, child, delta)
        self._handles.append(
            host.register_forward_pre_hook(lambda m, args: (delta(args[0]),) + tuple(args[1:]))
        )

    def holder(self, host_name: str, host: nn.Module, child: str, delta: nn.Module) -> None:
        """Only register `delta` under `host` (its parameters are used by hooks elsewhere)."""
        self._register(host_name, host, child, delta)

    def named_parameters(self, trainable_only: bool = True):
        for key, (_, _, delta) in self.hosts.items():
            for n, p in delta.named_parameters():
                if p.requires_grad or not trainable_only:
                    yield f"{key}.{n}", p

    def remove_all(self) -> None:
        for handle in self._handles:
            handle.remove()
        for key, (host, _, _) in self.hosts.items():
            delattr(host, self._attributes[key])
        self._handles.clear()
        self.hosts.clear()
        self._attributes.clear()
