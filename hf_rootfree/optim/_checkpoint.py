"""Saving and loading optimizer state: checked before anything changes.

``torch.optim.Optimizer.load_state_dict`` trusts the state it is given. A state saved for
parameters of other shapes (a resized model) or by another optimizer class then fails at the
next ``step()`` at best; on the fused CPU path it would walk past the end of smaller buffers.
:class:`CheckedStateDict` is torch's ``load_state_dict`` (same pre/post hooks, same group and
``param_names`` handling) with one difference: the whole loaded state is validated against the
parameters first, and a ``ValueError`` that names the parameter, the key, the saved and the
expected value leaves the optimizer exactly as it was.

A saved state dict names its class in every param group (:data:`CLASS_KEY`), so a state dict of
another hf_rootfree class is refused by name. State dicts without that tag (ours from before it,
or another library's) are recognized by their hyperparameter keys.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

#: the param-group key under which a saved state dict names the class that saved it
CLASS_KEY = "hf_rootfree_class"

#: param-group keys that are not hyperparameters of one optimizer class (torch adds "differentiable"
#: to every optimizer's defaults)
_BOOKKEEPING_KEYS = frozenset({"params", "param_names", "initial_lr", "differentiable", CLASS_KEY})


@functools.cache
def _torch_optimizer_keys() -> dict[str, frozenset[str]]:
    """The hyperparameter names of torch's own optimizers, by class name."""
    keys = {}
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and name != "Optimizer":
            try:  # the defaults hold keys the signature lacks (AdamW's decoupled_weight_decay)
                found = set(cls([torch.zeros(1, requires_grad=True)]).defaults)
            except Exception:
                found = set()
            keys[f"torch.optim.{name}"] = frozenset(found | _init_keys(cls))
    return keys


def _init_keys(cls: type) -> frozenset[str]:
    parameters = inspect.signature(cls.__init__).parameters
    skip = {"self", "params", "model", "trainer_model"}
    return frozenset(
        name
        for name, p in parameters.items()
        if name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if torch.is_tensor(value) else None


def _describe(value: Any) -> str:
    if torch.is_tensor(value):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return f"{value!r} ({type(value).__name__})"


class CheckedStateDict:
    """Mixin for ``torch.optim.Optimizer`` subclasses: a tagged ``state_dict`` and a checked
    ``load_state_dict``.

    A subclass says which class names and hyperparameter keys it accepts, checks the loaded
    groups and state (raising, changing nothing), and says how a loaded value is stored.
    """

    #: hyperparameter keys a loaded group may lack (filled from the current group: keys added later)
    _optional_group_keys: frozenset[str] = frozenset()
    #: values of group keys added after a checkpoint was saved that keep its saved behaviour
    _legacy_group_defaults: dict[str, Any] = {}  # noqa: RUF012  (read only)

    # -- hooks for the optimizer classes -----------------------------------------------------------
    def _check_loaded_groups(self, groups: list[dict[str, Any]]) -> None:
        """Validate the loaded param groups (hyperparameters); may normalize them in place."""

    def _check_loaded_state(self, groups: list[dict[str, Any]], states: list[dict[str, Any]]) -> None:
        """Validate ``states[i]``, the loaded state of parameter i (in param-group order)."""

    def _store_loaded_value(self, param: torch.Tensor, group: dict[str, Any], key: str, value: Any) -> Any:
        """The value the optimizer keeps for a loaded (already validated) state entry: ``step`` a
        float64 CPU tensor (also from a plain number, as older or converted checkpoints hold)."""
        if key == "step":
            return torch.as_tensor(value).to(device="cpu", dtype=torch.float64, copy=True).reshape(())
        return copy.deepcopy(value)

    def _after_load(self) -> None:
        """Refresh caches derived from the state or the groups."""

    # -- helpers for the hooks ---------------------------------------------------------------------
    def _load_error(self, index: int, param: torch.Tensor, key: str, problem: str) -> ValueError:
        return ValueError(
            f"{type(self).__name__}.load_state_dict: parameter {index} (shape {tuple(param.shape)}, "
            f"{str(param.dtype).removeprefix('torch.')}): state {key!r} {problem}; the state dict was "
            "saved for other parameters (a resized or reordered model?). Nothing was loaded."
        )

    def _check_tensor(
        self,
        index: int,
        param: torch.Tensor,
        key: str,
        value: Any,
        shape: Sequence[int],
        *,
        floating: bool = True,
    ) -> None:
        """A state tensor: of ``shape`` and of the floating (or, if not ``floating``, integer) kind."""
        if not torch.is_tensor(value):
            raise self._load_error(index, param, key, f"is {_describe(value)}, expected a tensor")
        if tuple(value.shape) != tuple(shape):
            raise self._load_error(
                index, param, key, f"has shape {tuple(value.shape)}, expected {tuple(shape)}"
            )
        integer = not (value.is_floating_point() or value.is_complex())
        if not (value.is_floating_point() if floating else integer):
            expected = "a floating dtype" if floating else "an integer dtype"
            raise self._load_error(index, param, key, f"has dtype {value.dtype}, expected {expected}")

    def _check_step(self, index: int, param: torch.Tensor, value: Any) -> None:
        """``step``: a one-element real tensor or a plain number, finite and ≥ 0."""
        if torch.is_tensor(value):
            if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
                raise self._load_error(index, param, "step", f"is {_describe(value)}, expected a count")
            number = float(value.detach().to("cpu").reshape(()))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        else:
            raise self._load_error(index, param, "step", f"is {_describe(value)}, expected a count")
        if not (math.isfinite(number) and number >= 0):
            raise self._load_error(index, param, "step", f"is {number!r}, expected a finite count ≥ 0")

    def _check_known_keys(
        self, index: int, param: torch.Tensor, state: dict[str, Any], allowed: Iterable[str]
    ) -> None:
        allowed = set(allowed)
        unknown = sorted(str(k) for k in state if k not in allowed)
        if unknown:
            raise self._load_error(
                index,
                param,
                unknown[0],
                f"is not a state key of {type(self).__name__} (allowed here: {', '.join(sorted(allowed))})",
            )

    # -- state_dict / load_state_dict --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with the saving class named in every param group (:data:`CLASS_KEY`)."""
        state_dict = super().state_dict()  # type: ignore[misc]
        for group in state_dict["param_groups"]:
            group[CLASS_KEY] = type(self).__name__
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict`, after checking all of it.

        As ``torch.optim.Optimizer.load_state_dict``: load-state-dict pre-hooks run first (and may
        change or replace the dict), param groups are matched by position, ``param_names`` are
        kept, and post-hooks run last. Before anything changes, the loaded state is checked: the
        class that saved it, the hyperparameters, and each parameter's state keys, shapes and
        dtypes. A problem raises ``ValueError`` (naming the parameter index, the key, the saved
        and the expected value) and leaves the optimizer untouched. ``step`` is kept as a float64
        CPU tensor, also when it was saved as a plain number.
        """
        owner = type(self).__name__
        state_dict = state_dict.copy()  # shallow, as torch does
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():  # type: ignore[attr-defined]
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result

        groups_now: list[dict[str, Any]] = self.param_groups  # type: ignore[attr-defined]
        saved_groups = state_dict["param_groups"]
        self._check_class(saved_groups)
        if len(groups_now) != len(saved_groups):
            raise ValueError(
                f"{owner}.load_state_dict: loaded state dict has a different number of parameter groups "
                f"({len(saved_groups)} saved, {len(groups_now)} in the optimizer)"
            )
        for i, (g, s) in enumerate(zip(groups_now, saved_groups)):
            if len(g["params"]) != len(s["params"]):
                raise ValueError(
                    f"{owner}.load_state_dict: loaded state dict contains a parameter group that doesn't "
                    f"match the size of optimizer's group (group {i}: {len(s['params'])} saved, "
                    f"{len(g['params'])} in the optimizer)"
                )

        # The new groups: saved hyperparameters, current parameters (deep copies: nothing shared).
        groups = []
        for g, s in zip(groups_now, saved_groups):
            new = {k: copy.deepcopy(v) for k, v in s.items() if k not in ("params", CLASS_KEY)}
            for key in self._optional_group_keys:
                if key not in new and key in g:
                    new[key] = copy.deepcopy(g[key])
            for key, value in self._legacy_group_defaults.items():  # saved before the key existed
                if key in g:
                    new.setdefault(key, value)
            if "batch_size" in g:  # B follows the run (world size, accumulation), not the checkpoint
                new["batch_size"] = g["batch_size"]
            new["params"] = g["params"]
            if "param_names" in g and "param_names" not in new:
                new["param_names"] = g["param_names"]
            groups.append(new)
        self._check_loaded_groups(groups)

        saved_ids = [pid for s in saved_groups for pid in s["params"]]
        saved_state = state_dict["state"]
        states = [dict(saved_state.get(pid, {})) for pid in saved_ids]
        self._check_loaded_state(groups, states)

        # Everything checked: build the new state, then swap it in.
        params = [(p, g) for g in groups for p in g["params"]]
        id_map = dict(zip(saved_ids, range(len(params))))
        state: defaultdict[Any, dict[Any, Any]] = defaultdict(dict)
        for pid, value in saved_state.items():
            if pid not in id_map:
                state[pid] = value  # not assigned to a parameter: kept as is, as torch does
                continue
            param, group = params[id_map[pid]]
            state[param] = {k: self._store_loaded_value(param, group, k, v) for k, v in value.items()}
        self.__setstate__({"state": state, "param_groups": groups})  # type: ignore[attr-defined]
        self._after_load()

        for post_hook in self._optimizer_load_state_dict_post_hooks.values():  # type: ignore[attr-defined]
            post_hook(self)

    def _check_class(self, saved_groups: list[dict[str, Any]]) -> None:
        """Refuse a state dict saved by another optimizer class, naming both."""
        owner = type(self).__name__
        ours = {cls.__name__ for cls in type(self).__mro__}
        # torch's Optimizer.__setstate__ adds "differentiable" to the defaults of any optimizer
        own_keys = set(self.defaults) - ({"differentiable"} - _init_keys(type(self)))  # type: ignore[attr-defined]
        required = own_keys - set(self._optional_group_keys)
        for group in saved_groups:
            tag = group.get(CLASS_KEY)
            if tag is not None:
                if tag not in ours:
                    raise ValueError(
                        f"{owner}.load_state_dict: this state dict was saved by {tag}, not by {owner}; "
                        f"load it into a {tag}, or start {owner} from fresh state"
                    )
                continue
            keys = set(group) - _BOOKKEEPING_KEYS
            missing = required - keys
            alien = keys & (self._known_keys() - own_keys)
            if missing or alien:
                guess = self._guess_class(keys)
                details = []
                if alien:
                    details.append(f"it has {', '.join(sorted(alien))}")
                if missing:
                    details.append(f"it lacks {', '.join(sorted(missing))}")
                raise ValueError(
                    f"{owner}.load_state_dict: this state dict is not {owner}'s, it looks like {guess}'s "
                    f"(its param_groups: {'; '.join(details)}); load it into the class that saved it, or "
                    f"start {owner} from fresh state"
                )

    def _known_keys(self) -> set[str]:
        from . import AdaX, RootFreeAdamW, RootFreeAdaX, RootFreeRMSprop, SIRFShampoo

        known: set[str] = set()
        for keys in _torch_optimizer_keys().values():
            known |= keys
        for cls in (AdaX, RootFreeAdamW, RootFreeAdaX, RootFreeRMSprop, SIRFShampoo):
            known |= _init_keys(cls)
        return known

    def _guess_class(self, keys: set[str]) -> str:
        from . import AdaX, RootFreeAdamW, RootFreeAdaX, RootFreeRMSprop, SIRFShampoo

        candidates = dict(_torch_optimizer_keys())
        for cls in (AdaX, RootFreeAdamW, RootFreeAdaX, RootFreeRMSprop, SIRFShampoo):
            if cls is not type(self):
                candidates[cls.__name__] = _init_keys(cls)
        scores = {name: len(keys & ck) / len(keys | ck) for name, ck in candidates.items() if keys | ck}
        best = max(scores.values(), default=0.0)
        if best < 0.5:
            return "another optimizer class"
        return " or ".join(sorted(name for name, score in scores.items() if score == best))
