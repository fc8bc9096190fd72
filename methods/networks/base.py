"""The encoder / multi-decoder container every backbone in this package is built as, plus what they share.

Upstream code bakes the number of decoders into one class per variant (SSL4MIS ``UNet`` / ``UNet_CCT``,
MC-Net ``VNet`` / ``MCNet3d_v1`` / ``MCNet3d_v2``, each with its own ``forward``). Here a network is always
one encoder plus a list of decoders, so a method picks how many heads it needs and how to call them:

* ``net(x)`` - logits of the main decoder (``decoders[0]``), what validation and inference use;
* ``net.forward_all(x)`` - one logits tensor per decoder from a single encoder pass (MC-Net+, CCT);
* ``net.forward_features(x)`` - logits of the main decoder and its intermediate maps, deep to shallow (ACTION);
* ``feats = net.encoder(x); net.decoders[0]([perturb(f) for f in feats])`` - feature perturbation (UniMatch).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from core.errors import UserError

#: Four stride-2 downsamplings in both backbones: every spatial size must be a multiple of 2**4.
SIZE_DIVISOR = 16

#: Canonical names of the decoder upsampling variants (MC-Net ``up_type`` / ``mode_upsampling`` 0, 1, 2).
UP_MODES = ("deconv", "linear", "nearest")

# "bilinear" is accepted for 2-D and "trilinear" for 3-D, the names upstream code passes to nn.Upsample.
_LINEAR_ALIASES = {2: "bilinear", 3: "trilinear"}


class NetworkConfigError(UserError, ValueError):
    """A network was asked for with settings that do not exist (unknown name, up mode, dims, ...).

    A :class:`ValueError` for code that builds networks programmatically, and a
    :class:`~core.errors.UserError` so the CLI reports a typo in a config without a traceback.
    """


def interpolation_mode(up_mode: str, spatial_dims: int) -> str:
    """The ``nn.Upsample`` mode for a canonical up mode: ``linear`` means bilinear in 2-D, trilinear in 3-D."""
    if up_mode == "linear":
        return _LINEAR_ALIASES[spatial_dims]
    if up_mode == "nearest":
        return "nearest"
    raise ValueError(f"up mode '{up_mode}' does not interpolate; expected 'linear' or 'nearest'")


def resolve_up_mode(name: str, spatial_dims: int) -> str:
    """Map a user-facing up-mode name to one of :data:`UP_MODES` (``bilinear``/``trilinear`` -> ``linear``)."""
    key = name.lower()
    if key in UP_MODES:
        return key
    if key == _LINEAR_ALIASES.get(spatial_dims):
        return "linear"
    accepted = [*UP_MODES, _LINEAR_ALIASES[spatial_dims]] if spatial_dims in _LINEAR_ALIASES else list(UP_MODES)
    raise NetworkConfigError(
        f"unknown up mode '{name}' for a {spatial_dims}-D network",
        where=f"known up modes: {', '.join(accepted)}",
        fix="'linear' picks bilinear (2-D) or trilinear (3-D) interpolation by itself",
    )


def check_spatial_size(x: torch.Tensor, spatial_dims: int) -> None:
    """Fail early and readably when the input cannot go down and back up the four resolution levels.

    Without this, an odd size is floored by the strided conv / max-pool and the error surfaces as an opaque
    shape mismatch at a skip connection deep in the decoder.
    """
    if x.dim() != spatial_dims + 2:
        raise ValueError(f"expected a {spatial_dims + 2}-D tensor (N, C, *spatial), got shape {tuple(x.shape)}")
    sizes = tuple(x.shape[2:])
    if any(size % SIZE_DIVISOR for size in sizes):
        raise ValueError(
            f"spatial size {sizes} is not a multiple of {SIZE_DIVISOR}: the network downsamples 4 times by 2; "
            "pad or crop the patch to a multiple of 16"
        )


class SegmentationNetwork(nn.Module):
    """Encoder + one or more decoders. ``decoders[0]`` is the main decoder.

    Protocol of the parts:
      * ``encoder(x) -> list[Tensor]``: feature maps, shallow to deep;
      * ``decoder(features) -> Tensor``: logits at the input resolution.

    ``spatial_dims`` and ``num_classes`` are taken from ``encoder.spatial_dims`` / ``decoder.num_classes``
    when not given; every decoder must predict the same number of classes.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoders: Sequence[nn.Module],
        *,
        spatial_dims: int | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        if len(decoders) == 0:
            raise ValueError("a SegmentationNetwork needs at least one decoder")
        self.encoder = encoder
        self.decoders = nn.ModuleList(decoders)
        self.spatial_dims = spatial_dims if spatial_dims is not None else getattr(encoder, "spatial_dims", None)
        self.num_classes = num_classes if num_classes is not None else getattr(decoders[0], "num_classes", None)
        if self.spatial_dims is None or self.num_classes is None:
            raise ValueError(
                "pass spatial_dims=/num_classes= or give the encoder a `spatial_dims` and the decoders a "
                "`num_classes` attribute"
            )
        for index, decoder in enumerate(decoders):
            classes = getattr(decoder, "num_classes", self.num_classes)
            if classes != self.num_classes:
                raise ValueError(f"decoder {index} predicts {classes} classes, decoder 0 predicts {self.num_classes}")

    @property
    def num_decoders(self) -> int:
        return len(self.decoders)

    @property
    def up_modes(self) -> list[str | None]:
        """The upsampling variant of each decoder (``None`` for a decoder that does not say)."""
        return [getattr(decoder, "up_mode", None) for decoder in self.decoders]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the main decoder only: the other decoders cost nothing at inference."""
        return self.decoders[0](self.encoder(x))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits of the main decoder and its intermediate maps, deep to shallow (``decoder.forward_features``)."""
        return self.decoders[0].forward_features(self.encoder(x))

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One logits tensor per decoder, all from the same encoder pass (and the same encoder dropout mask)."""
        return self.decode_all(self.encoder(x))

    def decode_all(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run every decoder on the same (possibly perturbed) features."""
        return [decoder(features) for decoder in self.decoders]


INIT_SCHEMES = ("kaiming", "xavier")
# What a method may ask for: a scheme, or "default" (PyTorch's own layer init, left as built).
INIT_CHOICES = (*INIT_SCHEMES, "default")


def init_weights(module: nn.Module, scheme: str, generator: torch.Generator | None = None) -> nn.Module:
    """Re-initialise ``module`` in place the way SSL4MIS's 3-D cross pseudo supervision does; returns ``module``.

    Reproduces ``kaiming_normal_init_weight`` / ``xavier_normal_init_weight`` of HiLab-git/SSL4MIS
    ``code/train_cross_pseudo_supervision_3D.py`` (Conv3d/BatchNorm3d) and their 2-D twins in ``..._2D.py``
    (Conv2d/BatchNorm2d; defined there but not called, so upstream's 2-D networks keep the default init):

    * plain convolutions (``nn.Conv2d`` / ``nn.Conv3d``, which includes 1x1 and strided ones): only the weight
      is redrawn, ``kaiming_normal_`` with PyTorch's defaults (fan_in, leaky_relu gain with a=0, i.e. sqrt(2))
      or ``xavier_normal_`` (gain 1); **biases keep their default init**;
    * batch norm: weight 1, bias 0;
    * everything else is untouched - notably transposed convolutions (``nn.ConvTranspose*d`` is not a
      subclass of ``nn.Conv*d``, so upstream's ``isinstance`` test skips them), GroupNorm/InstanceNorm.

    CPS 3-D gives its two networks different schemes so they start apart. Both 2-D and 3-D layer types are
    handled here; a network only contains one kind, so this equals whichever upstream function applies.
    Draws from the global torch RNG unless ``generator`` is given; ``default`` leaves ``module`` as built.
    """
    if scheme == "default":
        return module
    if scheme == "kaiming":
        def draw(weight: torch.Tensor) -> None:
            nn.init.kaiming_normal_(weight, generator=generator)
    elif scheme == "xavier":
        def draw(weight: torch.Tensor) -> None:
            nn.init.xavier_normal_(weight, generator=generator)
    else:
        raise NetworkConfigError(
            f"unknown init scheme '{scheme}'", where=f"known init schemes: {', '.join(INIT_SCHEMES)}"
        )

    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Conv3d)):
            draw(layer.weight)
        elif isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm3d)):
            with torch.no_grad():
                layer.weight.fill_(1.0)
                layer.bias.zero_()
    return module
