"""AdapterFusion (Pfeiffer et al. 2021, https://arxiv.org/abs/2005.00247), stage 2.

Stage 1 trains one bottleneck adapter per task (`method: adapter`, one run each). Stage 2, this
method, freezes the base and all N adapters and learns, at every place the adapters sit, an
attention over them, per token:

        h  (output of the host: attention / FFN output projection, before the residual add)
        |----------------+----------------+---- ... ----+
        |            adapter 1        adapter 2       adapter N      frozen (stage 1): u_n = W_up f(W_down h)
        |               u_1              u_2             u_N
       Q h          keys K u_n                       values V u_n
        |               |                                |
        +--> s = softmax over n of (Q h).(K u_n) ------>  out = h + sum_n s_n V u_n

Q and K are d x d with biases, initialised N(0, 0.02) with zero bias (BERT's init, as AdapterHub's
`BertFusion`), so the scores start near 0 and the softmax near uniform: fusion starts close to the
*average* of the adapters. V (d x d, no bias) starts at the identity with 1e-6 everywhere off the
diagonal (AdapterHub's `value_initialized`). Trainable per fused host: 3 d^2 + 2 d. The optional
regularizer `regularization * sum over hosts ||I - V||_F^2` (0.01 in the paper) keeps V near the
identity; it is `extra_loss`, exactly 0 at V = I.

Keys and values are each adapter's update u_n, the residual h added once after mixing (AdapterHub's
"dynamic" fusion: `residual_before: false`, `value_before_softmax: true`). The paper writes keys and
values as the adapters' outputs a_n(h) = h + u_n: the scores are the same (the shared K h term is one
constant per token, which the softmax ignores), and at V = I so is the output; this form keeps V off
the residual stream h.

What is frozen and where it lives:
- The N adapters are read from their checkpoints (safetensors + JSON, never pickle) at attach and
  held as buffers outside every state_dict: the fusion checkpoint *references* them. Its delta_config
  records each source by absolute path (`adapters`) and by the SHA-256 of its tensor file
  (`adapter_sha256`, filled in at the first attach when the recipe leaves it out), so eval, generate
  and resume need only the fusion checkpoint's path, and refuse, naming `delta.adapters.<i>`, a
  source that changed since (retrained, edited) or moved.
- Norms: the fused adapters share one set of block norms, and N stage-1 runs that trained their own
  (the `adapter` method's `train_layernorms`, Houlsby's recipe) would disagree about it. The paper
  (and AdapterHub) keep the base norms frozen in both stages, so fusion keeps the base norms and
  refuses a source trained with `train_layernorms: true` (train stage 1 with it off).
- The stage-1 task heads are ignored: the target task's head trains with the fusion as usual.
- All sources must sit at the same modules (same variant, target_modules and layers); their
  bottleneck sizes and activations may differ.

Relative paths in `adapters` are resolved against the current directory when the recipe is
validated. Not mergeable: the mixing weights depend on each token's hidden state.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch
from pydantic import Field, StringConstraints, field_validator, model_validator
from torch import nn

from deltafit import checkpoint
from deltafit.deltas._targets import out_features
from deltafit.deltas.adapter import Bottleneck
from deltafit.deltas.base import HEAD_PREFIX, Delta, DeltaConfig, base_named_modules
from deltafit.errors import UserError
from deltafit.fsutil import sha256_file

STAGE1 = "adapter"  # the method every source checkpoint must have been trained with
PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")  # a Bottleneck's tensors
_ADAPTER_TENSOR = re.compile(r"^(?P<host>.+)\.adapter\.(?P<part>(?:down|up)\.(?:weight|bias))$")
VALID = "valid: a deltafit checkpoint trained with method 'adapter' (stage 1: one adapter per task)"


class AdapterFusionConfig(DeltaConfig):
    method: Literal["adapter-fusion"] = "adapter-fusion"
    adapters: list[Annotated[str, StringConstraints(min_length=1)]] = Field(
        min_length=2,
        description="Stage-1 checkpoints to fuse (N >= 2): deltafit checkpoints (or run directories: their final "
        "one) trained with method 'adapter' and train_layernorms false on this base model, all at the same places. "
        "Relative paths are resolved against the current directory; the absolute checkpoint paths are recorded.",
    )
    adapter_sha256: Optional[list[Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]]] = Field(
        None,
        description="SHA-256 of each source's delta.safetensors, in the order of `adapters`. Filled in at the "
        "first attach and recorded in the checkpoint; a source whose file no longer matches is refused.",
    )
    regularization: float = Field(
        0.01, ge=0, description="Weight of the regularizer sum ||I - V||_F^2 over fused places (the paper's 0.01), "
        "keeping each value matrix V near the identity; 0 turns it off.",
    )

    @field_validator("adapters")
    @classmethod
    def _absolute(cls, paths: list[str]) -> list[str]:
        # Recorded absolute: eval may run from another directory than train did.
        return [os.path.abspath(os.path.expanduser(p)) for p in paths]

    @model_validator(mode="after")
    def _one_hash_per_adapter(self):
        if self.adapter_sha256 is not None and len(self.adapter_sha256) != len(self.adapters):
            raise ValueError(f"adapter_sha256 has {len(self.adapter_sha256)} hashes for {len(self.adapters)} "
                             f"adapters; give one per adapter, in the same order, or leave it out")
        return self


# -- the stage-1 checkpoints -----------------------------------------------------------------------


@dataclass
class Source:
    """One stage-1 adapter checkpoint, read and checked."""

    key: str  # the recipe key naming it: delta.adapters.<i>
    directory: Path
    sha256: str  # of its tensor file
    activation: str
    adapters: dict[str, dict[str, torch.Tensor]]  # host module name -> {"down.weight": ..., ...}


def read_source(index: int, path: str, recorded: Optional[str]) -> Source:
    """Read checkpoint `path` (checkpoint.py's readers: manifest-checked safetensors + JSON) and refuse,
    naming delta.adapters.<index>, anything that is not an unchanged stage-1 adapter checkpoint."""
    key = f"delta.adapters.{index}"
    try:
        directory = checkpoint.find_checkpoint(path)
        meta, tensors = checkpoint.load(directory)
    except UserError as e:
        raise UserError(f"recipe key '{key}': {e}; {VALID}") from None
    config = _stage1_config(key, directory, meta)
    sha = sha256_file(directory / checkpoint.TENSORS)
    if recorded is not None and sha != recorded:
        raise UserError(f"recipe key '{key}': '{directory}' changed since this fusion was trained (its "
                        f"{checkpoint.TENSORS} has SHA-256 {sha[:12]}..., delta.adapter_sha256.{index} records "
                        f"{recorded[:12]}...); valid: the unchanged stage-1 checkpoint (restore it, or train the "
                        f"fusion again)")
    return Source(key, directory, sha, config.activation, _adapters_by_host(key, directory, tensors))


def _stage1_config(key: str, directory: Path, meta: dict):
    """The source's adapter config; only plain adapters without trained norms can be fused."""
    from deltafit.recipe import validate_delta

    if meta["method"] != STAGE1:
        raise UserError(f"recipe key '{key}': '{directory}' was trained with method '{meta['method']}'; {VALID}")
    config = validate_delta(meta["delta_config"], source=f"checkpoint '{directory}'")
    if config.train_layernorms:
        raise UserError(f"recipe key '{key}': '{directory}' also trained the blocks' norms (train_layernorms: true), "
                        f"but fused adapters share the base norms; valid: stage-1 adapters trained with "
                        f"--set delta.train_layernorms=false")
    return config


def _adapters_by_host(key: str, directory: Path, tensors: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Group '<host>.adapter.<part>' tensors by host; the stage-1 task head is dropped (stage 2 trains its own)."""
    hosts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _ADAPTER_TENSOR.match(name)
        if match is None and not name.startswith(HEAD_PREFIX):
            raise UserError(f"recipe key '{key}': '{directory}' holds '{name}', which is not an adapter tensor; "
                            f"{VALID}")
        if match is not None:
            hosts.setdefault(match["host"], {})[match["part"]] = tensor
    broken = [h for h, parts in hosts.items() if set(parts) != set(PARTS)]
    if broken or not hosts:
        what = f"an incomplete adapter at '{broken[0]}'" if broken else "no adapter tensors"
        raise UserError(f"recipe key '{key}': '{directory}' has {what}; {VALID}")
    return hosts


def check_same_places(sources: list[Source]) -> None:
    """Fusion mixes the adapters of one place: every source must have adapters at the same modules."""
    first = sources[0]
    for source in sources[1:]:
        differ = sorted(set(source.adapters) ^ set(first.adapters))
        if differ:
            raise UserError(f"recipe key '{source.key}': its adapters sit at {len(source.adapters)} modules, those of "
                            f"{first.key} at {len(first.adapters)} ('{differ[0]}' has only one of them); valid: "
                            f"adapters trained with the same variant, target_modules and layers")


def check_fits_model(source: Source, modules: dict[str, nn.Module]) -> None:
    """Every source adapter sits on a module of this model, shaped for its width (same base model)."""
    for host, parts in source.adapters.items():
        if host not in modules:
            raise UserError(f"recipe key '{source.key}': '{source.directory}' has an adapter at '{host}', which this "
                            f"model lacks; valid: adapters trained on this base model")
        width, size = out_features(modules[host]), parts["down.weight"].shape[0]
        want = {"down.weight": (size, width), "down.bias": (size,), "up.weight": (width, size), "up.bias": (width,)}
        for part, shape in want.items():
            if tuple(parts[part].shape) != shape:
                raise UserError(f"recipe key '{source.key}': '{source.directory}' tensor '{host}.adapter.{part}' has "
                                f"shape {tuple(parts[part].shape)}, this model needs {shape}; valid: adapters trained "
                                f"on this base model")


# -- the modules -----------------------------------------------------------------------------------


def frozen_bottleneck(tensors: dict[str, torch.Tensor], activation: str, device) -> Bottleneck:
    """The stage-1 adapter as a `Bottleneck` whose tensors are non-persistent buffers: frozen, moved by
    `.to()` with the model, and in no state_dict (the fusion checkpoint references them instead)."""
    width, size = tensors["up.weight"].shape
    module = Bottleneck(width, size, activation, device="meta")  # no init: the values come from the file
    for part in PARTS:
        linear_name, attr = part.split(".")
        linear = getattr(module, linear_name)
        delattr(linear, attr)
        linear.register_buffer(attr, tensors[part].to(device=device, dtype=torch.float32), persistent=False)
    return module


class Fusion(nn.Module):
    """Attention over N frozen adapters at one place: out = h + sum_n softmax_n((Q h).(K u_n)) V u_n."""

    def __init__(self, adapters: list[Bottleneck], width: int, device=None):
        super().__init__()
        self.adapters = nn.ModuleList(adapters)
        self.query = nn.Linear(width, width, device=device, dtype=torch.float32)
        self.key = nn.Linear(width, width, device=device, dtype=torch.float32)
        self.value = nn.Linear(width, width, bias=False, device=device, dtype=torch.float32)
        if self.value.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.query, self.key):  # BERT's init, as AdapterHub's BertFusion: scores start near 0
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        with torch.no_grad():  # identity + 1e-6 off the diagonal (AdapterHub's value_initialized)
            self.value.weight.fill_(1e-6).fill_diagonal_(1.0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(torch.float32)
        updates = torch.stack([a.update(x) for a in self.adapters], dim=-2)  # (..., N, d): u_n, in fp32
        scores = (self.key(updates) @ self.query(x).unsqueeze(-1)).squeeze(-1)  # (..., N)
        weights = scores.softmax(dim=-1)
        mixed = (weights.unsqueeze(-2).to(updates.dtype) @ self.value(updates)).squeeze(-2)  # (..., d)
        return (x + mixed).to(h.dtype)

    def value_drift(self) -> torch.Tensor:
        """||I - V||_F^2, the paper's regularizer for this place."""
        eye = torch.eye(self.value.weight.shape[0], device=self.value.weight.device, dtype=torch.float32)
        return (eye - self.value.weight.float()).pow(2).sum()


# -- the method ------------------------------------------------------------------------------------


class AdapterFusion(Delta):
    name = "adapter-fusion"
    family = "addition"
    description = "AdapterFusion: a per-layer attention over frozen stage-1 task adapters (Pfeiffer et al. 2021)."
    not_mergeable_because = "the attention over the adapters depends on each token's hidden state"
    Config = AdapterFusionConfig
    # The fused adapters were trained: a fresh fusion computes (nearly) their average, not the base.
    zero_init_identity = False

    def __init__(self, config: AdapterFusionConfig):
        super().__init__(config)
        self._sources: Optional[list[Source]] = None

    def sources(self) -> list[Source]:
        """The stage-1 checkpoints, read once per instance and checked (hashes, method, places)."""
        if self._sources is None:
            c = self.config
            recorded = c.adapter_sha256 or [None] * len(c.adapters)
            sources = [read_source(i, path, sha) for i, (path, sha) in enumerate(zip(c.adapters, recorded))]
            check_same_places(sources)
            self._sources = sources
        return self._sources

    def check_fits(self, model: nn.Module) -> None:
        modules = dict(base_named_modules(model))
        for source in self.sources():
            check_fits_model(source, modules)

    def _attach(self, model: nn.Module) -> None:
        sources = self.sources()
        for name, host in self._hosts(model).items():
            device = host.weight.device
            frozen = [frozen_bottleneck(s.adapters[name], s.activation, device) for s in sources]
            self.insertions.after(name, host, "fusion", Fusion(frozen, out_features(host), device))
        # Pin the sources in the config: the checkpoint's delta_config then names each by path and hash.
        self.config.adapters = [str(s.directory) for s in sources]
        self.config.adapter_sha256 = [s.sha256 for s in sources]

    def _hosts(self, model: nn.Module) -> dict[str, nn.Module]:
        """The modules the adapters sit on, in model order."""
        places = self.sources()[0].adapters
        return {n: m for n, m in base_named_modules(model) if n in places}

    def extra_loss(self) -> Optional[torch.Tensor]:
        if not self.config.regularization or not self.insertions.hosts:
            return None
        drift = sum(fusion.value_drift() for _, _, fusion in self.insertions.hosts.values())
        return self.config.regularization * drift

    def expected_trainable_params(self, model: nn.Module) -> int:
        # Q and K with biases, V without: 3 d^2 + 2 d per fused place.
        return sum(3 * d * d + 2 * d for d in map(out_features, self._hosts(model).values()))


DELTA = AdapterFusion
