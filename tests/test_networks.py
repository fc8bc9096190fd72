"""Backbones: shapes, the multi-decoder contract, parameter counts equal to the upstream networks, init schemes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.networks import NETWORKS, SegmentationNetwork, build_network, default_up_modes, init_weights
from methods.networks.unet2d import UNetDecoder, UNetEncoder
from methods.networks.vnet import VNetDecoder, VNetEncoder


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------------------
# Shapes and defaults


def test_unet_maps_an_image_to_class_logits_at_input_resolution():
    net = build_network(2, in_channels=1, num_classes=4)
    assert isinstance(net, SegmentationNetwork)
    assert (net.spatial_dims, net.num_classes) == (2, 4)
    assert isinstance(net.encoder, UNetEncoder) and isinstance(net.decoders[0], UNetDecoder)
    assert net(torch.randn(1, 1, 64, 64)).shape == (1, 4, 64, 64)


@pytest.mark.parametrize("patch", [(32, 32, 32), (48, 48, 32)], ids=["cubic", "non-cubic"])
def test_vnet_maps_a_volume_to_class_logits_at_input_resolution(patch):
    net = build_network(3, in_channels=1, num_classes=2).eval()
    assert isinstance(net.encoder, VNetEncoder) and isinstance(net.decoders[0], VNetDecoder)
    assert (net.spatial_dims, net.num_classes) == (3, 2)
    assert net(torch.randn(1, 1, *patch)).shape == (1, 2, *patch)


def test_encoder_returns_five_levels_shallow_to_deep():
    unet_features = build_network(2, 1, 4).encoder(torch.randn(2, 1, 32, 48))
    assert [tuple(f.shape) for f in unet_features] == [
        (2, 16, 32, 48), (2, 32, 16, 24), (2, 64, 8, 12), (2, 128, 4, 6), (2, 256, 2, 3)
    ]
    vnet_features = build_network(3, 1, 2, base_features=4).eval().encoder(torch.randn(1, 1, 32, 32, 16))
    assert [f.shape[1] for f in vnet_features] == [4, 8, 16, 32, 64]
    assert [tuple(f.shape[2:]) for f in vnet_features] == [(32, 32, 16), (16, 16, 8), (8, 8, 4), (4, 4, 2), (2, 2, 1)]


def test_sizes_that_cannot_be_halved_four_times_are_rejected_readably():
    with pytest.raises(ValueError, match="multiple of 16"):
        build_network(2, 1, 4)(torch.randn(1, 1, 60, 64))
    with pytest.raises(ValueError, match="multiple of 16"):
        build_network(3, 1, 2, base_features=4)(torch.randn(1, 1, 32, 32, 40))


def test_default_names_and_up_modes():
    assert NETWORKS == {"unet": 2, "vnet": 3}
    assert build_network(2, 1, 4).up_modes == ["linear"]  # SSL4MIS UNet: 1x1 conv + bilinear
    assert build_network(3, 1, 2, base_features=4).up_modes == ["deconv"]  # UA-MT VNet: ConvTranspose3d
    # MC-Net+ (MCNet2d_v2 / MCNet3d_v2): the main decoder is the plain backbone's.
    assert default_up_modes("unet", 3) == ["linear", "deconv", "nearest"]
    assert default_up_modes("vnet", 3) == ["deconv", "linear", "nearest"]
    assert default_up_modes("vnet", 4) == ["deconv", "linear", "nearest", "deconv"]  # MCNet3d_v3
    assert build_network(3, 1, 2, base_features=4, num_decoders=3).up_modes == ["deconv", "linear", "nearest"]


def test_up_mode_names_pick_the_interpolation_by_dims():
    net2d = build_network(2, 1, 4, num_decoders=3, up_modes=["bilinear", "deconv", "nearest"])
    assert net2d.up_modes == ["linear", "deconv", "nearest"]
    upsamplers = [m for m in net2d.decoders[0].modules() if isinstance(m, nn.Upsample)]
    assert upsamplers and all(m.mode == "bilinear" and m.align_corners for m in upsamplers)
    assert any(isinstance(m, nn.ConvTranspose2d) for m in net2d.decoders[1].modules())
    assert all(m.mode == "nearest" for m in net2d.decoders[2].modules() if isinstance(m, nn.Upsample))

    net3d = build_network(3, 1, 2, base_features=4, num_decoders=2, up_modes=["linear", "trilinear"])
    modes = {m.mode for d in net3d.decoders for m in d.modules() if isinstance(m, nn.Upsample)}
    assert modes == {"trilinear"}

    with pytest.raises(ValueError, match="trilinear"):  # the 3-D name in 2-D is a mistake, and says so
        build_network(2, 1, 4, up_modes=["trilinear"])
    with pytest.raises(ValueError, match="deconv"):
        build_network(2, 1, 4, up_modes=["bicubic"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spatial_dims": 2, "name": "resnet"}, "unet.*vnet"),  # unknown names list the known ones
        ({"spatial_dims": 3, "name": "unet"}, "2-D"),
        ({"spatial_dims": 1}, "2 or 3"),
        ({"spatial_dims": 2, "num_decoders": 0}, ">= 1"),
        ({"spatial_dims": 3, "num_decoders": 2, "up_modes": ["deconv"]}, "one up mode per decoder"),
        ({"spatial_dims": 3, "normalization": "layernorm"}, "batchnorm"),
        ({"spatial_dims": 2, "normalization": "groupnorm"}, "batchnorm"),
    ],
)
def test_bad_settings_raise_value_errors_that_say_what_is_known(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_network(in_channels=1, num_classes=2, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts, derived by hand from the upstream code (BatchNorm: 2 parameters per channel; running stats are
# buffers). Notation: conv k^d, a -> b with bias = k^d*a*b + b.
#
# SSL4MIS UNet(in_chns=1, class_num=4), code/networks/unet.py. ConvBlock(a, b) = 9ab + b + 2b + 9b^2 + b + 2b
#   = 9ab + 9b^2 + 6b.  Encoder: (1,16) 2,544 + (16,32) 14,016 + (32,64) 55,680 + (64,128) 221,952
#   + (128,256) 886,272 = 1,180,464.
#   UpBlock, bilinear (the effective default): 1x1 conv c*s + s, then ConvBlock(2s, s) = 27s^2 + 6s:
#   (256->128) 32,896 + 443,136; (128->64) 8,256 + 110,976; (64->32) 2,080 + 27,840; (32->16) 528 + 7,008;
#   out_conv 3x3 16->4 = 580.  Decoder = 633,300.  UNet = 1,813,764 (the "1.81M" quoted for it).
#   ConvTranspose2d 2x2 instead of the 1x1 conv: 4cs + s -> 131,200 / 32,832 / 8,224 / 2,064, decoder = 763,860.
#   MC-Net MCNet2d_v2 = encoder + bilinear + deconv + nearest(= bilinear count) = 1,180,464 + 633,300 * 2
#   + 763,860 = 3,210,924.
#
# UA-MT VNet(n_channels=1, n_classes=2, n_filters=16, batchnorm), code/networks/vnet.py. Conv 3^3 a->b + BN
#   = 27ab + 3b; down conv 2^3 a->b + BN = 8ab + 3b.
#   Encoder: stage one 480; down 16->32 4,192; stage two 2 x 27,744; down 32->64 16,576; stage three
#   3 x 110,784; down 64->128 65,920; stage four 3 x 442,752; down 128->256 262,912; stage five 3 x 1,770,240
#   = 7,376,896.
#   Decoder (deconv 2^3 + BN = 8ab + 3b): up 256->128 262,528; stage six 1,328,256; up 128->64 65,728;
#   stage seven 332,352; up 64->32 16,480; stage eight 55,488; up 32->16 4,144; stage nine 6,960;
#   out 1x1x1 16->2 34 = 2,071,970.  VNet = 9,448,866 (the "9.44M" in the MC-Net+ paper).
#   Interpolation decoder (3^3 conv + BN after up-sampling: 27ab + 3b): ups 885,120 + 221,376 + 55,392 + 13,872
#   replace 348,880 of deconv ups -> 2,898,850.  MCNet3d_v2 = 7,376,896 + 2,071,970 + 2 * 2,898,850 = 15,246,566.

UNET_ENCODER, UNET_DECODER_LINEAR, UNET_DECODER_DECONV = 1_180_464, 633_300, 763_860
VNET_ENCODER, VNET_DECODER_DECONV, VNET_DECODER_INTERP = 7_376_896, 2_071_970, 2_898_850


@pytest.mark.parametrize(
    "spatial_dims, num_classes, num_decoders, total, per_decoder",
    [
        (2, 4, 1, 1_813_764, [UNET_DECODER_LINEAR]),  # SSL4MIS UNet
        (2, 4, 3, 3_210_924, [UNET_DECODER_LINEAR, UNET_DECODER_DECONV, UNET_DECODER_LINEAR]),  # MCNet2d_v2
        (3, 2, 1, 9_448_866, [VNET_DECODER_DECONV]),  # UA-MT VNet
        (3, 2, 3, 15_246_566, [VNET_DECODER_DECONV, VNET_DECODER_INTERP, VNET_DECODER_INTERP]),  # MCNet3d_v2
    ],
    ids=["unet", "mcnet2d_v2", "vnet", "mcnet3d_v2"],
)
def test_parameter_counts_equal_the_upstream_networks(spatial_dims, num_classes, num_decoders, total, per_decoder):
    net = build_network(spatial_dims, 1, num_classes, num_decoders=num_decoders)
    assert count(net.encoder) == (UNET_ENCODER if spatial_dims == 2 else VNET_ENCODER)
    assert [count(decoder) for decoder in net.decoders] == per_decoder
    assert count(net) == total


def test_vnet_normalization_variants():
    # 'none' / affine-free InstanceNorm3d drop the 2,800 BN channels (5,600 parameters); GroupNorm has as many as BN.
    assert count(build_network(3, 1, 2, normalization="none")) == 9_448_866 - 5_600
    assert count(build_network(3, 1, 2, normalization="instancenorm")) == 9_448_866 - 5_600
    assert count(build_network(3, 1, 2, normalization="groupnorm")) == 9_448_866
    net = build_network(3, 1, 2, normalization="groupnorm").eval()
    assert net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


# ---------------------------------------------------------------------------------------------------------------
# The multi-decoder contract


@pytest.mark.parametrize("spatial_dims, shape", [(2, (2, 1, 32, 32)), (3, (2, 1, 16, 16, 16))], ids=["2d", "3d"])
def test_forward_all_runs_the_encoder_once_and_gives_one_distinct_output_per_decoder(spatial_dims, shape):
    net = build_network(spatial_dims, 1, 3, base_features=8, num_decoders=3).eval()
    encoder_calls = []
    net.encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    x = torch.randn(shape)

    outputs = net.forward_all(x)

    assert len(encoder_calls) == 1
    assert len(outputs) == 3 and all(o.shape == (shape[0], 3, *shape[2:]) for o in outputs)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(outputs[i], outputs[j])
    torch.testing.assert_close(net(x), outputs[0])  # forward() is the main decoder


@pytest.mark.parametrize("spatial_dims, shape", [(2, (2, 1, 32, 32)), (3, (2, 1, 16, 16, 16))], ids=["2d", "3d"])
def test_every_decoder_trains_the_shared_encoder_and_only_itself(spatial_dims, shape):
    net = build_network(spatial_dims, 1, 2, base_features=4, num_decoders=3)
    x = torch.randn(shape)
    for index in range(3):
        net.zero_grad(set_to_none=True)
        net.forward_all(x)[index].square().mean().backward()
        encoder_grads = [p.grad for p in net.encoder.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in encoder_grads)
        for other, decoder in enumerate(net.decoders):
            touched = any(p.grad is not None for p in decoder.parameters())
            assert touched == (other == index)


def test_decoders_accept_perturbed_features():
    # UniMatch-style feature perturbation: one encoder pass, dropout on every feature map, main decoder.
    net = build_network(2, 1, 4, base_features=8)
    features = net.encoder(torch.randn(2, 1, 32, 32))
    perturbed = net.decoders[0]([nn.functional.dropout2d(f, 0.5) for f in features])
    assert perturbed.shape == (2, 4, 32, 32)
    assert len(net.decode_all(features)) == 1


def test_dropout_flag_and_eval_mode():
    vnet = build_network(3, 1, 2, base_features=4)
    # has_dropout: Dropout3d(0.5) on the deepest encoder feature and before each decoder's output conv.
    assert sum(isinstance(m, nn.Dropout3d) for m in vnet.modules()) == 2
    without = build_network(3, 1, 2, base_features=4, dropout=False)
    assert not any(isinstance(m, nn.Dropout3d) for m in without.modules())
    unet = build_network(2, 1, 4)
    encoder_rates = [m.p for m in unet.encoder.modules() if isinstance(m, nn.Dropout)]
    assert encoder_rates == [0.05, 0.1, 0.2, 0.3, 0.5]
    assert all(m.p == 0 for m in unet.decoders[0].modules() if isinstance(m, nn.Dropout))
    no_dropout = build_network(2, 1, 4, dropout=False)
    assert all(m.p == 0 for m in no_dropout.modules() if isinstance(m, nn.Dropout))

    x = torch.randn(2, 1, 16, 16, 16)
    vnet.eval()
    torch.testing.assert_close(vnet(x), vnet(x))
    vnet.train()
    assert not torch.allclose(vnet(x), vnet(x))  # MC-dropout (UA-MT's uncertainty) needs train-mode dropout


# ---------------------------------------------------------------------------------------------------------------
# Initialisation (SSL4MIS cross pseudo supervision)


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("scheme", ["kaiming", "xavier"])
def test_init_schemes_are_deterministic_and_touch_only_conv_weights_and_batchnorm(spatial_dims, scheme):
    net = build_network(spatial_dims, 1, 2, base_features=8, num_decoders=2)
    with torch.no_grad():  # make BN visibly not-default so the reset is observable
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                m.weight.fill_(0.5)
                m.bias.fill_(0.25)
    before = _state(net)

    torch.manual_seed(123)
    init_weights(net, scheme)
    first = _state(net)
    torch.manual_seed(123)
    assert init_weights(net, scheme) is net
    second = _state(net)
    init_weights(net, scheme, generator=torch.Generator().manual_seed(7))
    third = _state(net)
    init_weights(net, scheme, generator=torch.Generator().manual_seed(7))

    for key in first:
        torch.testing.assert_close(first[key], second[key])
        torch.testing.assert_close(net.state_dict()[key], third[key])

    for name, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            assert not torch.equal(first[f"{name}.weight"], before[f"{name}.weight"])
            torch.testing.assert_close(first[f"{name}.bias"], before[f"{name}.bias"])  # upstream leaves biases
        elif isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
            torch.testing.assert_close(first[f"{name}.weight"], before[f"{name}.weight"])  # not an nn.Conv*d
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            assert torch.all(first[f"{name}.weight"] == 1) and torch.all(first[f"{name}.bias"] == 0)


def test_init_schemes_draw_from_their_distributions():
    conv = nn.Conv3d(64, 64, kernel_size=3)
    fan_in, fan_out = 64 * 27, 64 * 27
    init_weights(conv, "kaiming", generator=torch.Generator().manual_seed(0))
    assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.02)  # leaky_relu a=0 gain sqrt(2)
    init_weights(conv, "xavier", generator=torch.Generator().manual_seed(0))
    assert conv.weight.std().item() == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.02)
    with pytest.raises(ValueError, match="kaiming, xavier"):
        init_weights(conv, "orthogonal")
