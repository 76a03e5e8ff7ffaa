"""Several deltas on one frozen base: a recipe's `delta:` as a list.

    delta:
      - {method: lora, target_modules: [q_proj, v_proj], r: 8}    # tensors under 'lora.'
      - {method: bitfit}                                           # tensors under 'bitfit.'
      - {method: prompt, num_virtual_tokens: 10, lr: 1.0e-2}       # its own learning rate

`Compose` is one Delta to the trainer, evaluator and merger: it attaches its parts in order on one
model, and forwards every hook to each part in that order (prepare_inputs chains, extra losses add
up). Each part keeps its own parameters, hooks, schedule state and optimizer group; its checkpoint
tensors are its own state_dict under '<name>.' (the task head stays under 'head.'), so a part's
keys are exactly those of a single-method run with that part.

What cannot share one model is refused while attaching, which `validate` and `train` first do on a
weightless (meta) model, so before any weight loads: two deltas training the same base tensor
(BitFit + full), a method that owns its host modules' weights (`Delta.exclusive_hosts`: DoRA, QLoRA,
masks...) sharing a module with another delta, two deltas putting virtual tokens in one slot
(`Delta.input_slot`), and methods that cannot train on packed rows turn packing off for all.

A list of one delta is that delta alone (same checkpoint as a plain mapping). Presets (MAM, UniPELT)
subclass `Compose` and build their parts from their own options.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

import torch
from pydantic import Field, field_validator
from torch import nn

from deltafit.deltas.base import HEAD_PREFIX, Delta, DeltaConfig, base_named_parameters
from deltafit.errors import UserError

METHOD = "compose"


class ComposeConfig(DeltaConfig):
    method: Literal["compose"] = METHOD
    deltas: list[Any] = Field(description="The deltas, in the order they attach; each is a method's section.")

    @field_validator("deltas", mode="before")
    @classmethod
    def _sections(cls, deltas):
        """Each entry validated against its own method's config (dicts from YAML or a checkpoint)."""
        from deltafit.recipe import validate_delta_list

        if not isinstance(deltas, list):
            raise ValueError("must be a list of delta sections")
        return validate_delta_list([d.model_dump(mode="json") if isinstance(d, DeltaConfig) else d for d in deltas])

    def to_list(self) -> list[dict]:
        """The recipe form: `delta:` as a list of sections."""
        return [d.model_dump(mode="json", exclude_none=False) for d in self.deltas]

    @property
    def num_virtual_tokens(self) -> int:
        """Positions every input gains in front (limits.py holds them against the model's maximum)."""
        return sum(int(getattr(d, "num_virtual_tokens", None) or 0) for d in self.deltas)


def part_name(config: DeltaConfig) -> str:
    return config.name or config.method


class Compose(Delta):
    name = METHOD
    family = "composition"
    description = "Several deltas on one base, attached in order (`delta:` as a list)."
    Config = ComposeConfig

    def __init__(self, config: ComposeConfig):
        super().__init__(config)
        from deltafit.deltas import build

        self.parts: dict[str, Delta] = {part_name(c): build(c) for c in self._part_configs(config)}
        parts = self.parts.values()
        # Facts about the whole follow from its parts (instance attributes shadow the class's).
        self.mergeable = all(p.mergeable for p in parts)
        self.not_mergeable_because = "; ".join(f"delta '{n}' ({p.name}): {p.not_mergeable_because}"
                                               for n, p in self.parts.items() if not p.mergeable)
        self.supports_packing = all(p.supports_packing for p in parts)
        self.zero_init_identity = all(p.zero_init_identity for p in parts)
        self.detach_restores_weights = all(p.detach_restores_weights for p in parts)
        self.lossy_base = any(p.lossy_base for p in parts)
        self.trainables_change = any(p.trainables_change for p in parts)
        self._attached: list[Delta] = []
        self._trial = False  # this instance is check_fits' trial run on a weightless model

    def _part_configs(self, config) -> list[DeltaConfig]:
        """The parts' configs; presets build them from their own options."""
        return list(config.deltas)

    def _in_part(self, error: UserError, index: int, name: str) -> UserError:
        """A part's error as the recipe spells its keys: 'delta.<index>.<key>' in a list of deltas;
        a preset maps them to its own options instead (`part_keys`)."""
        indexed = re.sub(r"'delta\.(?!\d)", f"'delta.{index}.", str(error))
        return UserError(f"delta '{name}': {indexed}")

    def packing_blocker(self) -> Optional[str]:
        """Which part keeps the whole from training on packed rows (for data.packing's message)."""
        return next((f"delta '{n}' ({p.name})" for n, p in self.parts.items() if not p.supports_packing), None)

    # -- lifecycle ---------------------------------------------------------------------------

    def check_fits(self, model: nn.Module) -> None:
        """Each part's sizes, then the conflicts between parts, found by attaching the whole to a
        weightless (meta) model first: a conflict surfaces there before a part touches real weights
        (DoRA would read the 4-bit weights QLoRA had made before the checks could refuse the pair)."""
        for i, (name, part) in enumerate(self.parts.items()):
            try:
                part.check_fits(model)
            except UserError as e:
                raise self._in_part(e, i, name) from None
        if self._trial:
            return
        weightless = model if _on_meta(model) else _meta_twin(model)
        if weightless is not None:
            trial = type(self)(self.config)
            trial.tokenizer, trial._trial = self.tokenizer, True
            trial.attach(weightless)
            trial.detach()

    def _attach(self, model: nn.Module) -> None:
        names: dict[int, str] = {}  # tensor -> its name (a base tensor's own, else '<delta>.<key>')
        owners: dict[int, str] = {}  # tensor (base or inserted) -> the delta that trains it
        hosts: dict[int, tuple[str, bool]] = {}  # host module -> (delta, whether it owns the module)
        opened = []
        try:
            for name, part in self.parts.items():
                self._attach_part(name, part, model)
                self._attached.append(part)
                opened.append([p for p in model.parameters() if p.requires_grad])
                names.update({id(p): n for n, p in base_named_parameters(model)})  # QLoRA replaces weights
                self._check_claims(name, part, names, owners)
                self._check_hosts(name, part, hosts)
            self._check_slots()
        except BaseException:
            self._detach()
            raise
        for params in opened:  # each part's attach froze what the parts before it had opened
            for p in params:
                p.requires_grad_(True)

    def _attach_part(self, name: str, part: Delta, model: nn.Module) -> None:
        part.tokenizer = self.tokenizer
        try:
            part.attach(model, restoring=self.restoring)  # freezes everything, then opens its own tensors
        except UserError:
            raise
        except Exception as e:  # e.g. DoRA reading the 4-bit weights QLoRA made of the same modules
            owner = next((n for n, p in self.parts.items() if p in self._attached and p.exclusive_hosts), None)
            if owner is None:
                raise
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            raise UserError(f"recipe key 'delta': delta '{name}' cannot attach beside '{owner}', which owns its "
                            f"modules' weights ({self.parts[owner].name}; {why}); give them different target_modules"
                            ) from None

    def _check_claims(self, name: str, part: Delta, names: dict, owners: dict) -> None:
        """A tensor (of the base, by name, or one a delta inserted) trains in one delta only. A method
        that owns its modules' weights (exclusive_hosts) claims them too, trained or not."""
        claimed = [names.setdefault(id(p), f"{name}.{key}") for key, p in part.delta_parameters().items()]
        claimed += [f"{key.rsplit('.', 1)[0]}.weight" for key, _, owns in part.inserted_hosts() if owns]
        for tensor in claimed:
            if owners.setdefault(tensor, name) != name:
                raise UserError(f"recipe key 'delta': deltas '{owners[tensor]}' and '{name}' both train the tensor "
                                f"'{tensor}'; a tensor can belong to one delta only (drop one, or narrow "
                                f"its target_modules)")

    def _check_hosts(self, name: str, part: Delta, hosts: dict) -> None:
        for key, host, owns in part.inserted_hosts():
            other = hosts.get(id(host))
            if other is not None and other[0] != name and (other[1] or owns):
                owner = other[0] if other[1] else name
                module = key.rsplit(".", 1)[0]
                raise UserError(f"recipe key 'delta': deltas '{other[0]}' and '{name}' both attach to '{module}', and "
                                f"'{owner}' ({self.parts[owner].name}) reads or rewrites that module's weights; give "
                                f"them different target_modules")
            hosts.setdefault(id(host), (name, owns))

    def _check_slots(self) -> None:
        taken: dict[str, str] = {}
        for name, part in self.parts.items():
            for slot in sorted(part.input_slots()):
                if taken.setdefault(slot, name) == name:
                    continue
                where = "input embeddings" if slot == "embeddings" else "attention cache (past keys/values)"
                raise UserError(f"recipe key 'delta': deltas '{taken[slot]}' and '{name}' both put virtual tokens in "
                                f"front of the {where}; their tokens would collide, keep one of them")

    def _detach(self) -> None:
        """Parts leave in reverse order: each restores the model as it found it."""
        while self._attached:
            self._attached.pop().detach()

    def _merge(self) -> None:
        for part in self.parts.values():  # in attach order; detach (reverse) follows in Delta.merge
            part._merge()

    # -- parameters and state ----------------------------------------------------------------

    def components(self) -> dict[str, Delta]:
        return dict(self.parts)

    def inserted_hosts(self):
        return [(f"{n}.{key}", host, owns)
                for n, part in self.parts.items() for key, host, owns in part.inserted_hosts()]

    def input_slots(self) -> set[str]:
        return set().union(*(part.input_slots() for part in self.parts.values()))

    def delta_parameters(self) -> dict[str, nn.Parameter]:
        return {f"{n}.{k}": p for n, part in self.parts.items() for k, p in part.delta_parameters().items()}

    def optimizer_groups(self):
        """Each part's groups at its own lr / weight decay; a part that sets none takes the
        composition's (a preset's `lr` covers its parts), then train's. The task head trains at train.lr."""
        c, groups = self.config, []
        for n, part in self.parts.items():
            for params, lr, decay in part.optimizer_groups():
                groups.append(({f"{n}.{k}": p for k, p in params.items()}, c.lr if lr is None else lr,
                               c.weight_decay if decay is None else decay))
        head = {HEAD_PREFIX + n: p for n, p in self._own_head().items()}
        return groups + ([(head, None, None)] if head else [])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._namespaced(lambda part: part.state_dict())

    def final_state_dict(self) -> dict[str, torch.Tensor]:
        return self._namespaced(lambda part: part.final_state_dict())

    def _namespaced(self, state_of) -> dict[str, torch.Tensor]:
        state = {f"{n}.{k}": v for n, part in self.parts.items() for k, v in state_of(part).items()}
        state.update({HEAD_PREFIX + n: p.detach() for n, p in self._own_head().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Each part loads the tensors under its name (and checks them); the head loads as usual."""
        taken = set()
        for name, part in self.parts.items():
            own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            taken.update(f"{name}.{k}" for k in own)
            try:
                part.load_state_dict(own)
            except UserError as e:
                raise UserError(f"delta '{name}': {e}") from None
        head = {HEAD_PREFIX + n: p for n, p in self._own_head().items()}
        rest = {k: v for k, v in state.items() if k not in taken}
        if set(rest) != set(head):
            odd = sorted(set(rest) ^ set(head))[:3]
            raise UserError(f"checkpoint tensors do not fit the deltas {', '.join(self.parts)} on this model: "
                            f"{odd} belong to none of them (or are missing)")
        with torch.no_grad():
            for key, target in head.items():
                _copy_checked(key, rest[key], target)

    # -- hooks, each part's in order ---------------------------------------------------------

    def prepare_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        # Virtual input embeddings go in first, so a prefix in the attention cache sees (and masks) the
        # whole embedded sequence: [cache prefix][prompt][text]. Otherwise in attach order.
        for part in sorted(self.parts.values(), key=lambda p: "embeddings" not in p.input_slots()):
            batch = part.prepare_inputs(batch)
        return batch

    def extra_loss(self) -> Optional[torch.Tensor]:
        losses = [loss for loss in (part.extra_loss() for part in self.parts.values()) if loss is not None]
        return sum(losses[1:], losses[0]) if losses else None

    def before_optimizer_step(self, step: int) -> None:
        for part in self.parts.values():
            part.before_optimizer_step(step)

    def on_step_end(self, step: int, total_steps: int) -> None:
        for part in self.parts.values():
            part.on_step_end(step, total_steps)

    def check_run(self, total_steps: int) -> None:
        for i, (name, part) in enumerate(self.parts.items()):
            try:
                part.check_run(total_steps)
            except UserError as e:
                raise self._in_part(e, i, name) from None

    def schedule_state(self) -> dict[str, Any]:
        return {name: part.schedule_state() for name, part in self.parts.items()}

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            part.load_schedule_state(state.get(name, {}))

    def expected_trainable_params(self, model: nn.Module) -> int:
        return sum(part.expected_trainable_params(model) for part in self.parts.values())

    def describe_targets(self) -> list[str]:
        return [f"{n}: {t}" for n, part in self.parts.items() for t in part.describe_targets()]

    @classmethod
    def to_peft(cls, config, state, model_config):
        names = ", ".join(f"{n} ({part.name})" for n, part in cls(config).parts.items())
        raise UserError(f"a composition of deltas ({names}) cannot be expressed in PEFT's format: a PEFT adapter "
                        f"holds one method; use the deltafit checkpoint (deltafit eval/merge accept it directly)")


def _on_meta(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def _meta_twin(model: nn.Module) -> Optional[nn.Module]:
    """The same architecture on the meta device (no memory, no init), or None for a model that is not a
    transformers model (the real attach then runs the checks alone)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "config_class"):
        return None
    with torch.device("meta"):
        return type(model)(config)


def _copy_checked(key: str, source: torch.Tensor, target: torch.Tensor) -> None:
    if tuple(source.shape) != tuple(target.shape):
        raise UserError(f"checkpoint tensor '{key}' has shape {tuple(source.shape)}, the model expects "
                        f"{tuple(target.shape)} (different base model or config?)")
    target.copy_(source.to(target.dtype))


DELTA = Compose
