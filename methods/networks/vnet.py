"""The 3-D V-Net of UA-MT and its MC-Net multi-decoder form.

Reproduces ``class VNet`` of yulequan/UA-MT ``code/networks/vnet.py`` (used unchanged by SSL4MIS, DTC, MC-Net, ...)
and the ``Encoder`` / ``Decoder(up_type)`` split of ycwu1997/MC-Net ``code/networks/VNet.py``:

* non-residual conv stages (3x3x3 conv + norm + ReLU, repeated) with 1, 2, 3, 3, 3 convs in the encoder levels
  and 3, 3, 2, 1 in the decoder levels, ``n_filters * [1, 2, 4, 8, 16]`` channels;
* downsampling by a 2x2x2 stride-2 conv + norm + ReLU;
* skip connections are *added* (not concatenated) to the upsampled map;
* ``has_dropout``: ``Dropout3d(p=0.5)`` on the deepest encoder feature and on the last decoder feature before
  the 1x1x1 output conv - identical places in UA-MT and MC-Net. Both train with ``has_dropout=True`` (student and
  EMA teacher alike) and build the test network with ``False``; here ``model.eval()`` switches it off instead.

Decoder upsampling (MC-Net ``Upsampling_function(mode_upsampling)``), each followed by norm + ReLU:
``deconv`` (0) = 2x2x2 stride-2 ConvTranspose3d, UA-MT's ``UpsamplingDeconvBlock`` and the default;
``linear`` (1) = trilinear x2 (``align_corners=True``) then 3x3x3 conv; ``nearest`` (2) = nearest x2 then 3x3x3 conv.
Note the order differs from the 2-D U-Net: here interpolation comes first and the conv is 3x3x3, not 1x1.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from methods.losses.precision import to_float32
from methods.networks.base import SegmentationNetwork, check_spatial_size, interpolation_mode, resolve_up_mode

NORMALIZATIONS = ("batchnorm", "instancenorm", "groupnorm", "none")

#: UA-MT's V-Net upsamples with transposed convolutions only.
DEFAULT_UP_MODE = "deconv"

#: MC-Net+ 3-D decoder order (``MCNet3d_v2``: up_type 0, 1, 2); ``decoders[0]`` is UA-MT's V-Net decoder.
MCNET_UP_MODES = ("deconv", "linear", "nearest")

#: Convolutions per level, encoder shallow to deep and decoder deep to shallow.
ENCODER_STAGES = (1, 2, 3, 3, 3)
DECODER_STAGES = (3, 3, 2, 1)

#: Dropout3d probability where ``has_dropout`` applies it.
DROPOUT_P = 0.5


def vnet_channels(n_filters: int = 16) -> list[int]:
    """Channels of the five levels: ``n_filters * [1, 2, 4, 8, 16]``."""
    return [n_filters * 2**level for level in range(5)]


def norm_layer(normalization: str, channels: int) -> nn.Module | None:
    """The normalisation upstream inserts after each conv; ``None`` for ``'none'``.

    GroupNorm uses 16 groups as upstream does, so it needs channel counts divisible by 16 (n_filters = 16k).
    InstanceNorm3d keeps PyTorch's default ``affine=False`` (no parameters), as upstream.
    """
    if normalization == "batchnorm":
        return nn.BatchNorm3d(channels)
    if normalization == "instancenorm":
        return nn.InstanceNorm3d(channels)
    if normalization == "groupnorm":
        return nn.GroupNorm(num_groups=16, num_channels=channels)
    if normalization == "none":
        return None
    raise ValueError(f"unknown normalization '{normalization}'; known: {', '.join(NORMALIZATIONS)}")


def _conv_norm_relu(conv: nn.Module, normalization: str, channels: int) -> list[nn.Module]:
    norm = norm_layer(normalization, channels)
    return [conv] + ([norm] if norm is not None else []) + [nn.ReLU(inplace=True)]


class ConvStage(nn.Sequential):
    """``n_convs`` x (3x3x3 conv, norm, ReLU); the first conv maps in -> out channels (UA-MT ``ConvBlock``)."""

    def __init__(self, n_convs: int, in_channels: int, out_channels: int, normalization: str):
        layers: list[nn.Module] = []
        for index in range(n_convs):
            conv = nn.Conv3d(in_channels if index == 0 else out_channels, out_channels, kernel_size=3, padding=1)
            layers += _conv_norm_relu(conv, normalization, out_channels)
        super().__init__(*layers)


class DownConv(nn.Sequential):
    """2x2x2 stride-2 conv, norm, ReLU (UA-MT ``DownsamplingConvBlock``)."""

    def __init__(self, in_channels: int, out_channels: int, normalization: str):
        conv = nn.Conv3d(in_channels, out_channels, kernel_size=2, stride=2)
        super().__init__(*_conv_norm_relu(conv, normalization, out_channels))


class UpConv(nn.Sequential):
    """x2 upsampling to ``out_channels``, norm, ReLU (MC-Net ``Upsampling_function``; deconv = UA-MT's)."""

    def __init__(self, in_channels: int, out_channels: int, normalization: str, up_mode: str):
        if up_mode == "deconv":
            layers: list[nn.Module] = [nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2)]
        else:
            mode = interpolation_mode(up_mode, spatial_dims=3)
            align = {"align_corners": True} if mode == "trilinear" else {}
            layers = [
                nn.Upsample(scale_factor=2, mode=mode, **align),
                nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1),
            ]
        norm = norm_layer(normalization, out_channels)
        super().__init__(*layers, *([norm] if norm is not None else []), nn.ReLU(inplace=True))


class VNetEncoder(nn.Module):
    """Five conv stages with a strided-conv downsampling between them; returns the five stage outputs."""

    spatial_dims = 3

    def __init__(
        self, in_channels: int, n_filters: int = 16, normalization: str = "batchnorm", has_dropout: bool = True
    ):
        super().__init__()
        channels = vnet_channels(n_filters)
        self.channels = channels
        self.stages = nn.ModuleList()
        self.downs = nn.ModuleList()
        previous = in_channels
        for level, n_convs in enumerate(ENCODER_STAGES):
            if level > 0:
                self.downs.append(DownConv(channels[level - 1], channels[level], normalization))
                previous = channels[level]
            self.stages.append(ConvStage(n_convs, previous, channels[level], normalization))
        # Applied to the deepest feature only; all decoders of a forward_all pass see the same mask.
        self.dropout = nn.Dropout3d(DROPOUT_P) if has_dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_spatial_size(x, self.spatial_dims)
        features = [self.stages[0](x)]
        for down, stage in zip(self.downs, self.stages[1:]):
            features.append(stage(down(features[-1])))
        features[-1] = self.dropout(features[-1])
        return features


class VNetDecoder(nn.Module):
    """Four (upsample, add skip, conv stage) levels, optional Dropout3d, 1x1x1 conv to the classes."""

    def __init__(
        self,
        num_classes: int,
        n_filters: int = 16,
        normalization: str = "batchnorm",
        has_dropout: bool = True,
        up_mode: str = DEFAULT_UP_MODE,
    ):
        super().__init__()
        channels = vnet_channels(n_filters)
        self.num_classes = num_classes
        self.up_mode = resolve_up_mode(up_mode, spatial_dims=3)
        # Level 4 -> 3, 3 -> 2, 2 -> 1, 1 -> 0: upsample to the skip's channels, then refine at that level.
        self.ups = nn.ModuleList(
            UpConv(channels[level + 1], channels[level], normalization, self.up_mode) for level in reversed(range(4))
        )
        self.stages = nn.ModuleList(
            ConvStage(n_convs, channels[level], channels[level], normalization)
            for n_convs, level in zip(DECODER_STAGES, reversed(range(4)))
        )
        self.dropout = nn.Dropout3d(DROPOUT_P) if has_dropout else nn.Identity()
        self.out_conv = nn.Conv3d(channels[0], num_classes, kernel_size=1)
        #: Channels of the maps ``forward_features`` returns (four upsampled + skip sums, the last stage).
        self.feature_channels = [channels[3], channels[2], channels[1], channels[0], channels[0]]

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.forward_features(features)[0]

    def forward_features(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the decoder's maps deep to shallow: ``up(x) + skip`` of each level (UA-MT's x5_up ...
        x8_up), then the last stage's output x9 (before dropout): the ``feature_list`` of ACTION's
        ``vnetWithArgs`` (128, 64, 32, 16, 16 channels)."""
        x = features[-1]
        levels = []
        for up, stage, skip in zip(self.ups, self.stages, reversed(features[:-1])):
            # Out-of-place add: the same feature list is shared by every decoder of the network.
            merged = up(x) + skip
            levels.append(merged)
            x = stage(merged)
        levels.append(x)
        # Float32 logits even under autocast: every softmax, entropy and Dice computed from them stays in
        # float32 (methods/losses/precision.py); a no-op in a float32 run.
        return to_float32(self.out_conv(self.dropout(x))), levels


def build_vnet(
    in_channels: int,
    num_classes: int,
    n_filters: int = 16,
    up_modes: Sequence[str] = (DEFAULT_UP_MODE,),
    has_dropout: bool = True,
    normalization: str = "batchnorm",
) -> SegmentationNetwork:
    """A shared V-Net encoder with one decoder per entry of ``up_modes`` (MC-Net ``VNet`` / ``MCNet3d_v*``)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization '{normalization}'; known: {', '.join(NORMALIZATIONS)}")
    encoder = VNetEncoder(in_channels, n_filters, normalization, has_dropout)
    decoders = [VNetDecoder(num_classes, n_filters, normalization, has_dropout, mode) for mode in up_modes]
    return SegmentationNetwork(encoder, decoders)
