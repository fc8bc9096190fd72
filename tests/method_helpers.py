"""Building one method outside a Trainer, for tests that call its losses and steps directly."""
from __future__ import annotations

import copy

import torch
from torch import nn

from benchmark.config import resolve_config
from datamodules import get_dataset
from methods.registry import get_method


def build_method(name: str, dataset: str = "synthetic_acdc", overrides=(), *, profile: str = "smoke", patch=None,
                 stage: str | None = None, seed: int | None = 0):
    """The method as the runner configures it (its defaults under the preset and the overrides), with a fixed
    initialisation (``seed``; None keeps the global generator as it is) and logging silenced, since no Trainer is
    attached. ``patch`` replaces the preset's patch size; ``stage`` picks the stage of a multi-stage method."""
    entry = get_dataset(dataset)
    config = resolve_config(dataset, name, profile, list(overrides), get_method(name).defaults, family=entry.family)
    if patch is not None:
        config["data"]["patch_size"] = list(patch)
    if stage is not None:
        config["run"]["stage"] = stage
    if seed is not None:
        torch.manual_seed(seed)
    model = get_method(name)(entry.spec, config)
    model.log = model.log_dict = lambda *a, **k: None
    return model


def random_batch(model, n_labeled: int = 2, n_unlabeled: int = 2, generator: torch.Generator | None = None):
    """A training batch of Gaussian images and uniform labels at the model's patch size; no ``unlabeled`` entry when
    ``n_unlabeled`` is 0, as the loader yields for full supervision."""
    shape = tuple(model.config["data"]["patch_size"])
    channels = model.spec.in_channels
    labels = torch.randint(0, model.spec.num_classes, (n_labeled, *shape), generator=generator)
    batch = {"labeled": {"image": torch.randn(n_labeled, channels, *shape, generator=generator), "label": labels}}
    if n_unlabeled:
        batch["unlabeled"] = {"image": torch.randn(n_unlabeled, channels, *shape, generator=generator)}
    return batch


def has_grad(module) -> bool:
    """Some parameter of ``module`` received a non-zero gradient."""
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def no_grad(module) -> bool:
    """No parameter of ``module`` received a non-zero gradient."""
    return all(p.grad is None or p.grad.abs().sum() == 0 for p in module.parameters())


def upstream_reference(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What upstream computes: the network in training mode at batch 1 (its networks have no dropout, so
    dropout is off here too), on a copy so that the running statistics it updates do not matter."""
    reference = copy.deepcopy(network).eval()
    for module in reference.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
    return torch.cat([reference(images[i:i + 1]) for i in range(images.shape[0])])
