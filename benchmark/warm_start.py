"""Warm starts across methods (``run.init_from``): a backbone's weights, taken from another run's checkpoint of any
method or from a plain weights file of the backbone, loaded into every segmentation network of this method (both
networks of CPS, the student and the teacher of Mean Teacher). What was loaded and what was not is printed.

A network of this method is a ``SegmentationNetwork`` child (``net``, ``net1``, ...) or an EMA copy of one
(``teacher.module``). In the source, a network is any key prefix under which the target network's keys are found
(``net.``, ``net1.``, ``teacher.module.``, or none for a plain weights file); the source network used for a target
is the one of the same name if the source has it, else the first one in the checkpoint's order that fills the most
tensors of the same shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from core.errors import UserError
from methods.networks.base import SegmentationNetwork


def target_networks(model: nn.Module) -> dict[str, nn.Module]:
    """The model's segmentation networks by their key prefix in its state dict (``net.``, ``teacher.module.``)."""
    found = {}
    for name, child in model.named_children():
        if isinstance(child, SegmentationNetwork):
            found[f"{name}."] = child
        elif isinstance(child, AveragedModel) and isinstance(child.module, SegmentationNetwork):
            found[f"{name}.module."] = child.module
    return found


def source_prefixes(weights: dict[str, Any], network_keys: set[str]) -> list[str]:
    """The prefixes under which ``weights`` holds keys of the network, in the order the file lists them."""
    prefixes: dict[str, None] = {}
    for key in weights:
        for suffix in network_keys:
            if key.endswith(suffix) and (len(key) == len(suffix) or key[-len(suffix) - 1] == "."):
                prefixes.setdefault(key[: len(key) - len(suffix)], None)
                break
    return list(prefixes)


@dataclass
class Loaded:
    target: str
    source: str | None  # "" for a plain weights file, None when no network was found
    loaded: int
    total: int
    missing: list[str] = field(default_factory=list)  # target keys not found, or found with another shape


def plan(model: nn.Module, weights: dict[str, Any]) -> list[Loaded]:
    plans = []
    for target, network in target_networks(model).items():
        state = network.state_dict()
        candidates = source_prefixes(weights, set(state))

        def fits(prefix: str) -> list[str]:
            return [key for key, tensor in state.items() if isinstance(weights.get(prefix + key), torch.Tensor)
                    and weights[prefix + key].shape == tensor.shape]

        if not candidates:
            plans.append(Loaded(target, None, 0, len(state), list(state)))
            continue
        source = target if target in candidates else max(candidates, key=lambda prefix: len(fits(prefix)))
        fitting = set(fits(source))
        plans.append(Loaded(target, source, len(fitting), len(state), [key for key in state if key not in fitting]))
    return plans


def warm_start(model: nn.Module, weights: dict[str, Any], origin: Path | str) -> list[Loaded]:
    """Load the backbone weights of ``weights`` into every segmentation network of ``model``; prints and returns
    what was loaded. A UserError if no network of the model gets any tensor."""
    plans = plan(model, weights) if isinstance(weights, dict) else []
    fix = ("give a checkpoint of a run with the same network settings (model.*, dataset), of any method, or a weights "
           "file of the segmentation network itself (run.init_from)")
    if not plans or not any(item.source is not None for item in plans):
        raise UserError("the checkpoint holds no weights of this method's networks (no tensor of their names)",
                        where=str(origin), fix=fix)
    networks = target_networks(model)
    for item in plans:
        # A head for another number of classes is left out; a network of another width or depth is refused.
        if item.loaded < item.total / 2:
            state = networks[item.target].state_dict()
            reshaped = [key for key in item.missing if item.source is not None and item.source + key in weights]
            example = (f" ({len(reshaped)} of another shape, e.g. {reshaped[0]}: {list(weights[item.source + reshaped[0]].shape)} "
                       f"in the checkpoint, {list(state[reshaped[0]].shape)} in this model)") if reshaped else ""
            raise UserError(f"the checkpoint's network does not fit {item.target.rstrip('.')}: only {item.loaded} of "
                            f"{item.total} tensors have the same name and shape{example}", where=str(origin), fix=fix)
    with torch.no_grad():
        for item in plans:
            state = networks[item.target].state_dict()
            missing = set(item.missing)
            for key, tensor in state.items():
                if key not in missing:
                    tensor.copy_(weights[item.source + key])
    text = describe(plans, origin)
    others = other_weights(model)
    if others:
        text += f"\n  not loaded: {len(others)} tensor(s) outside the segmentation networks (e.g. {others[0]}), left as initialised"
    print(text)
    return plans


def describe(plans: list[Loaded], origin: Path | str) -> str:
    lines = [f"warm start from {origin}:"]
    for item in plans:
        source = "nothing (no network found)" if item.source is None else item.source.rstrip(".") or "the weights file"
        line = f"  {item.target.rstrip('.')} <- {source}: {item.loaded} of {item.total} tensors"
        if item.missing:
            line += f"; not loaded: {len(item.missing)} (e.g. {', '.join(item.missing[:3])}), left as initialised"
        lines.append(line)
    return "\n".join(lines)


def other_weights(model: nn.Module) -> list[str]:
    """Parameters of ``model`` outside its segmentation networks (heads, projectors): never warm-started."""
    prefixes = tuple(target_networks(model))
    return [key for key in model.state_dict() if not key.startswith(prefixes)]
