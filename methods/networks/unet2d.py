"""The 2-D U-Net of SSL4MIS, with the decoder upsampling variants of MC-Net+.

Reproduces ``class UNet`` of HiLab-git/SSL4MIS ``code/networks/unet.py`` (itself from PyMIC): five levels with
[16, 32, 64, 128, 256] channels, double 3x3 conv + BatchNorm + LeakyReLU blocks, max-pool downsampling,
encoder dropout [0.05, 0.1, 0.2, 0.3, 0.5] between the two convs of each level, no dropout in the decoder and a
final 3x3 conv to the classes.

Upsampling, the detail that is easy to get wrong: SSL4MIS's ``UNet`` sets ``params['bilinear'] = False``, but its
``Decoder`` never passes that flag on, so every ``UpBlock`` keeps the constructor default ``bilinear=True``:
a 1x1 conv to the skip's channel count, then bilinear x2 upsampling with ``align_corners=True``. That is the
default here (``up_mode="linear"``) and it matches MC-Net's 2-D ``UNet`` (``mode_upsampling=1``).

The other variants are those of ycwu1997/MC-Net ``code/networks/unet.py`` ``UpBlock(mode_upsampling)``, which
``MCNet2d_v1/_v2`` give their extra decoders: 0 = 2x2 stride-2 ConvTranspose2d (no 1x1 conv), 2 = 1x1 conv then
nearest x2. All MC-Net decoders are otherwise identical to the SSL4MIS one (dropout 0 in every decoder).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from methods.losses.precision import to_float32
from methods.networks.base import SegmentationNetwork, check_spatial_size, interpolation_mode, resolve_up_mode

#: Dropout probability inside the encoder block of each level, shallow to deep (SSL4MIS ``params['dropout']``).
ENCODER_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)

#: The SSL4MIS / MC-Net single-decoder U-Net upsampling (see the module docstring).
DEFAULT_UP_MODE = "linear"

#: MC-Net+ 2-D decoder order (``MCNet2d_v2``: mode_upsampling 1, 0, 2). The main decoder is the bilinear one,
#: so ``decoders[0]`` of an MC-Net+ network is exactly the single-decoder U-Net.
MCNET_UP_MODES = ("linear", "deconv", "nearest")


def unet_channels(base_features: int = 16) -> list[int]:
    """Channels of the five levels: ``base_features`` doubling, [16, 32, 64, 128, 256] by default."""
    return [base_features * 2**level for level in range(5)]


class DoubleConv(nn.Module):
    """conv3x3-BN-LeakyReLU, dropout, conv3x3-BN-LeakyReLU (SSL4MIS ``ConvBlock``; LeakyReLU slope 0.01)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UNetEncoder(nn.Module):
    """Input block plus four (max-pool x2, DoubleConv) levels; returns the five feature maps, shallow to deep."""

    spatial_dims = 2

    def __init__(self, in_channels: int, channels: Sequence[int], dropout: Sequence[float] = ENCODER_DROPOUT):
        super().__init__()
        if len(channels) != 5 or len(dropout) != 5:
            raise ValueError("the U-Net has exactly five levels: give five channel counts and five dropout rates")
        self.channels = list(channels)
        self.levels = nn.ModuleList([DoubleConv(in_channels, channels[0], dropout[0])])
        for level in range(1, 5):
            self.levels.append(
                nn.Sequential(nn.MaxPool2d(2), DoubleConv(channels[level - 1], channels[level], dropout[level]))
            )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_spatial_size(x, self.spatial_dims)
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


class UNetUpBlock(nn.Module):
    """Upsample the deeper map to the skip's size and channel count, concatenate [skip, up], DoubleConv."""

    def __init__(self, deep_channels: int, skip_channels: int, up_mode: str):
        super().__init__()
        if up_mode == "deconv":
            self.upsample = nn.ConvTranspose2d(deep_channels, skip_channels, kernel_size=2, stride=2)
        else:
            mode = interpolation_mode(up_mode, spatial_dims=2)
            # align_corners only exists for the linear modes; upstream sets it True there.
            align = {"align_corners": True} if mode == "bilinear" else {}
            # The 1x1 conv comes *before* interpolation (cheaper: it runs at the coarse resolution).
            self.upsample = nn.Sequential(
                nn.Conv2d(deep_channels, skip_channels, kernel_size=1),
                nn.Upsample(scale_factor=2, mode=mode, **align),
            )
        self.conv = DoubleConv(2 * skip_channels, skip_channels, dropout=0.0)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.upsample(deep)], dim=1))


class UNetDecoder(nn.Module):
    """Four up blocks from the deepest feature map back to full resolution, then a 3x3 conv to the classes."""

    def __init__(self, channels: Sequence[int], num_classes: int, up_mode: str = DEFAULT_UP_MODE):
        super().__init__()
        self.num_classes = num_classes
        self.up_mode = resolve_up_mode(up_mode, spatial_dims=2)
        self.ups = nn.ModuleList(
            UNetUpBlock(channels[level + 1], channels[level], self.up_mode) for level in reversed(range(4))
        )
        self.out_conv = nn.Conv2d(channels[0], num_classes, kernel_size=3, padding=1)
        #: Channels of the maps ``forward_features`` returns (bottleneck, then each up block).
        self.feature_channels = [channels[4], channels[3], channels[2], channels[1], channels[0]]

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.forward_features(features)[0]

    def forward_features(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the decoder's maps deep to shallow: the bottleneck, then the output of each up block
        (the ``feature_list`` of ACTION's ``unetWithArgs``: 256, 128, 64, 32, 16 channels)."""
        x = features[-1]
        levels = [x]
        for up, skip in zip(self.ups, reversed(features[:-1])):
            x = up(x, skip)
            levels.append(x)
        # Float32 logits even under autocast: every softmax, entropy and Dice computed from them stays in
        # float32 (methods/losses/precision.py); a no-op in a float32 run.
        return to_float32(self.out_conv(x)), levels


def build_unet2d(
    in_channels: int,
    num_classes: int,
    base_features: int = 16,
    up_modes: Sequence[str] = (DEFAULT_UP_MODE,),
    dropout: bool = True,
) -> SegmentationNetwork:
    """A shared U-Net encoder with one decoder per entry of ``up_modes``.

    ``dropout=False`` zeroes the encoder dropout rates (upstream always uses them; kept for ablations).
    """
    channels = unet_channels(base_features)
    rates = ENCODER_DROPOUT if dropout else (0.0,) * 5
    encoder = UNetEncoder(in_channels, channels, rates)
    decoders = [UNetDecoder(channels, num_classes, mode) for mode in up_modes]
    return SegmentationNetwork(encoder, decoders)
