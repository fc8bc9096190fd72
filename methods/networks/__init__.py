"""Segmentation backbones of the literature, built as one encoder + N decoders (see :mod:`.base`).

``build_network(2, 1, 4)`` is the SSL4MIS U-Net, ``build_network(3, 1, 2)`` the UA-MT V-Net;
``num_decoders=3`` gives the MC-Net+ networks (``MCNet2d_v2`` / ``MCNet3d_v2``).
"""
from __future__ import annotations

from collections.abc import Sequence

from methods.networks import unet2d, vnet
from methods.networks.base import (
    INIT_CHOICES,
    INIT_SCHEMES,
    UP_MODES,
    NetworkConfigError,
    SegmentationNetwork,
    init_weights,
    resolve_up_mode,
)

__all__ = [
    "INIT_CHOICES",
    "INIT_SCHEMES",
    "NETWORKS",
    "UP_MODES",
    "NetworkConfigError",
    "SegmentationNetwork",
    "build_network",
    "default_up_modes",
    "init_weights",
]

#: Network name -> the spatial dimensionality it exists in.
NETWORKS = {"unet": 2, "vnet": 3}
_DEFAULT_NAME = {dims: name for name, dims in NETWORKS.items()}
_MCNET_UP_MODES = {"unet": unet2d.MCNET_UP_MODES, "vnet": vnet.MCNET_UP_MODES}


def default_up_modes(name: str, num_decoders: int) -> list[str]:
    """Upsampling per decoder when none is given: MC-Net's order, so the upstream networks come out exactly.

    One decoder gives the plain backbone (U-Net: linear, V-Net: deconv); two give ``MCNet*_v1``, three
    ``MCNet*_v2``. Beyond three the order repeats, which for the V-Net is ``MCNet3d_v3``'s
    (deconv, linear, nearest, deconv); MC-Net's 2-D v3 uses bicubic as 4th decoder, not offered here.
    Methods wanting identical heads (e.g. CCT's auxiliary decoders) pass ``up_modes`` explicitly.
    """
    order = _MCNET_UP_MODES[name]
    return [order[index % len(order)] for index in range(num_decoders)]


def build_network(
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    name: str | None = None,
    base_features: int = 16,
    num_decoders: int = 1,
    up_modes: Sequence[str] | None = None,
    dropout: bool = True,
    normalization: str = "batchnorm",
) -> SegmentationNetwork:
    """Build a backbone with ``num_decoders`` decoders sharing one encoder.

    ``name`` defaults to ``"unet"`` in 2-D and ``"vnet"`` in 3-D. ``up_modes`` (one per decoder) takes
    ``"deconv"``, ``"linear"`` (bilinear in 2-D, trilinear in 3-D; the explicit names are accepted too) and
    ``"nearest"``; ``None`` gives :func:`default_up_modes`. ``dropout`` is the V-Net's ``has_dropout`` and
    switches the U-Net's encoder dropout. ``normalization`` (V-Net only) is one of ``vnet.NORMALIZATIONS``.
    """
    if spatial_dims not in _DEFAULT_NAME:
        raise NetworkConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if name is None:
        name = _DEFAULT_NAME[spatial_dims]
    if name not in NETWORKS:
        raise NetworkConfigError(
            f"unknown network '{name}'",
            where=f"known networks: {', '.join(f'{known} ({dims}-D)' for known, dims in NETWORKS.items())}",
        )
    if NETWORKS[name] != spatial_dims:
        raise NetworkConfigError(
            f"network '{name}' is {NETWORKS[name]}-D but spatial_dims={spatial_dims}",
            fix=f"use name='{_DEFAULT_NAME[spatial_dims]}' or leave name unset",
        )
    if isinstance(num_decoders, bool) or not isinstance(num_decoders, int) or num_decoders < 1:
        raise NetworkConfigError(f"num_decoders must be a whole number >= 1, got {num_decoders!r}")
    if isinstance(base_features, bool) or not isinstance(base_features, int) or base_features < 1:
        raise NetworkConfigError(f"base_features must be a whole number >= 1, got {base_features!r}")

    if up_modes is None:
        modes = default_up_modes(name, num_decoders)
    else:
        if isinstance(up_modes, str):
            raise NetworkConfigError(
                "up_modes is a list with one entry per decoder", fix=f"e.g. up_modes=['{up_modes}']"
            )
        modes = [resolve_up_mode(mode, spatial_dims) for mode in up_modes]
        if len(modes) != num_decoders:
            raise NetworkConfigError(
                f"{len(modes)} up_modes given for num_decoders={num_decoders}",
                fix="give exactly one up mode per decoder",
            )

    if name == "unet":
        if normalization != "batchnorm":
            raise NetworkConfigError(f"the U-Net only has batchnorm, got normalization='{normalization}'")
        return unet2d.build_unet2d(in_channels, num_classes, base_features, modes, dropout)
    if normalization not in vnet.NORMALIZATIONS:
        raise NetworkConfigError(
            f"unknown normalization '{normalization}'", where=f"known: {', '.join(vnet.NORMALIZATIONS)}"
        )
    if normalization == "groupnorm" and base_features % 16:
        raise NetworkConfigError(
            f"groupnorm uses 16 groups, so base_features must be a multiple of 16, got {base_features}"
        )
    return vnet.build_vnet(in_channels, num_classes, base_features, modes, dropout, normalization)
