"""Base parameters a method trains in place (full FT, BitFit, adapter LayerNorms).

Specification-based methods add no modules: their "delta" is a chosen set of existing tensors.
`InPlaceParams` unfreezes them, lists them under their own model names, and, when asked, keeps a
copy of their starting values so `detach()` can give back the pristine base. The copy is cheap
for biases and norms; full fine-tuning opts out of it (it would double the model's memory).
"""

from __future__ import annotations

import torch
from torch import nn

from deltafit.deltas.base import Delta


class InPlaceParams:
    def __init__(self):
        self.params: dict[str, nn.Parameter] = {}
        self._originals: dict[str, torch.Tensor] = {}

    def unfreeze(self, named: dict[str, nn.Parameter], keep_originals: bool) -> None:
        """Let `named` train; remember their values when detach must be able to restore them."""
        for name, param in named.items():
            param.requires_grad_(True)
            self.params[name] = param
            if keep_originals:
                self._originals[name] = param.detach().clone()

    def restore(self) -> None:
        """Put the remembered starting values back (undo training)."""
        with torch.no_grad():
            for name, original in self._originals.items():
                self.params[name].copy_(original)

    def keep_trained(self) -> None:
        """Forget the starting values: after a merge the trained values are the model's."""
        self._originals.clear()

    def clear(self) -> None:
        self.params.clear()
        self._originals.clear()


class InPlaceDelta(Delta):
    """A method whose delta is a chosen set of the model's own tensors, trained in place (BitFit,
    LayerNorm tuning). Subclasses name them in `_chosen(model)`; detach gives back their starting
    values, merge keeps the trained ones (they already sit in the model)."""

    def __init__(self, config):
        super().__init__(config)
        self.base_params = InPlaceParams()

    def _chosen(self, model: nn.Module) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def _attach(self, model: nn.Module) -> None:
        self.base_params.unfreeze(self._chosen(model), keep_originals=True)

    def _detach(self) -> None:
        self.base_params.restore()
        self.base_params.clear()

    def _merge(self) -> None:
        self.base_params.keep_trained()  # only stop detach from restoring the starting values

    def delta_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.base_params.params)

    def expected_trainable_params(self, model: nn.Module) -> int:
        return sum(p.numel() for p in self._chosen(model).values())

    def describe_targets(self) -> list[str]:
        return list(self.base_params.params)
