"""A model's parameters kept side by side in a few leaf tensors (`ParamGroups`), for steps whose
cost is their kernel count (captured CUDA graphs of small models).

Each parameter is a view of one leaf per group; a group is (weight decay or not: matrices are
decayed, `decays`, as `step.make_optimizer` decides; cast by autocast or not: the parameters
of `Linear` and `Conv1d` modules, which autocast casts to bf16 one by one in every forward and
whose gradients its backward casts back one by one). So:
- autograd gathers the gradients in the leaves: clipping and AdamW act on a few tensors, not
  one per parameter (the backward's `split` makes one `cat` a group);
- under autocast `working` casts each cast group in one kernel and the backward casts its
  gradient back in one (the same values: each parameter rounded once, as autocast's cache does
  within a forward), where autocast launched two kernels a parameter (the default model: 40).

Stacked seed replicates (`study.replicas`) keep their `(k, ...)` parameters as `(k, P)` leaves
(`lead` 1); a single trial's captured step (`study.step`) as `(P,)` leaves (`lead` 0), its
module's parameters then aliases of the leaves (`alias_into`), which evaluation reads.
A parameter no loss reaches gets a zero gradient in its leaf (so weight decay applies to it),
where on its own it would have None and AdamW would skip it: no configuration that takes this
path has one (`arch: lstm_attention` on per-token tasks does, and takes neither path: it is
never captured nor batched).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

# the modules whose parameters autocast casts, parameter by parameter, in each forward
CAST_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d)

Group = tuple[bool, bool]  # (weight decay, cast by autocast)


def decays(p: torch.Tensor, lead: int = 0) -> bool:
    """Whether AdamW's weight decay applies to `p` (with `lead` leading replicate dims): to
    matrices (and higher), not to biases, norm weights or gains."""
    return p.dim() - lead >= 2


def cast_names(model: nn.Module) -> set[str]:
    """The names of the parameters autocast casts in `model`'s forward (`CAST_MODULES`')."""
    return {f"{mn}.{pn}" if mn else pn for mn, mod in model.named_modules()
            if type(mod) in CAST_MODULES for pn, _ in mod.named_parameters(recurse=False)}


class ParamGroups:
    """`params` (name -> tensor, each with `lead` leading replicate dims) as one leaf per group
    (`leaves`, `(*lead, P)`, requiring grad), with the cast groups cast to `cast_dtype` by
    `working` (None: no autocast, so no cast group)."""

    def __init__(self, params: dict[str, torch.Tensor], cast: set[str],
                 cast_dtype: torch.dtype | None, lead: int = 0) -> None:
        self.lead, self.cast_dtype = lead, cast_dtype
        self.shapes = {n: p.shape for n, p in params.items()}
        group_of = {n: (decays(p, lead), n in cast and cast_dtype is not None)
                    for n, p in params.items()}
        self.groups: dict[Group, list[str]] = {
            g: [n for n in params if group_of[n] == g]
            for g in itertools.product((True, False), (True, False)) if g in group_of.values()}
        self.leaves = {g: torch.cat([params[n].detach().reshape(*params[n].shape[:lead], -1)
                                     for n in names], lead).requires_grad_()
                       for g, names in self.groups.items()}

    def decayed(self, decay: bool) -> list[torch.Tensor]:
        """The leaves with (or without) weight decay: the optimizer's two groups."""
        return [leaf for (d, _), leaf in self.leaves.items() if d == decay]

    def views(self) -> dict[str, torch.Tensor]:
        """Each parameter as a view of its leaf, made anew at each call (so that autograd
        takes gradients through it to the leaf)."""
        return self._split(self.leaves)

    def working(self) -> dict[str, torch.Tensor]:
        """`views` as the forward takes them: the cast groups cast first, one kernel each."""
        if self.cast_dtype is None:
            return self.views()
        return self._split({(d, c): leaf.to(self.cast_dtype) if c else leaf
                            for (d, c), leaf in self.leaves.items()})

    def grads(self) -> list[torch.Tensor]:
        """The leaves' gradients (those that have one)."""
        return [leaf.grad for leaf in self.leaves.values() if leaf.grad is not None]

    def alias_into(self, model: nn.Module) -> None:
        """Make `model`'s parameters aliases of their slices of the leaves (same storage, no
        gradient of their own): whatever reads the module (evaluation, `n_params`, the
        parameter norm) sees the values the optimizer writes into the leaves. A deep copy
        does not keep the aliasing (`Parameter.__deepcopy__` clones): copy the leaves."""
        assert self.lead == 0
        for name, view in self.views().items():
            mod_name, _, p_name = name.rpartition(".")
            mod = model.get_submodule(mod_name)
            setattr(mod, p_name, nn.Parameter(view.detach(), requires_grad=False))

    def _split(self, leaves: dict[Group, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for g, leaf in leaves.items():
            names = self.groups[g]
            sizes = [math.prod(self.shapes[n][self.lead:]) for n in names]
            out.update({n: t.view(self.shapes[n])
                        for n, t in zip(names, leaf.split(sizes, self.lead))})
        return out
