"""Tests for edsr_ray.models: the networks, built from their configs, against the official layout and an independent
functional forward (tests/layouts.py); scales, inputs, precision and the receptive field.
"""

from __future__ import annotations

import pytest
import torch
from layouts import (
    ALL_VARIANTS,
    ALL_VARIANTS_SLOW_MARKED,
    TINY_F,
    TINY_R,
    Variant,
    mdsr_layout,
    random_state_dict,
    randomised,
    ref_mdsr,
)

from edsr_ray import models, weights
from edsr_ray.config import ModelConfig

# --------------------------------------------------------------------------------------------------------------------
# Every released variant


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_variant_layout_parameter_count_and_config(variant: Variant):
    with torch.device("meta"):  # shapes only, instant even for 43 M parameters
        model = variant.build()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == variant.layout()
    # The official module order, so our state dicts list keys like the released files.
    assert list(got) == list(variant.layout())

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    # The published counts are the trainable parameters; the two fixed mean shifts add 2 x 12 and do not change them.
    assert total - trainable == 2 * (3 * 3 + 3)
    assert round(trainable / 1e6, variant.digits) == variant.params_m
    assert round(total / 1e6, variant.digits) == variant.params_m
    assert not model.sub_mean.weight.requires_grad and not model.add_mean.bias.requires_grad

    expected = ModelConfig(variant.arch, variant.n_resblocks, variant.n_feats, variant.scales, variant.res_scale)
    assert model.config == expected
    assert model.scales == variant.scales
    assert models.VARIANTS[variant.name] == expected


@pytest.mark.parametrize("variant", ALL_VARIANTS_SLOW_MARKED)
def test_official_state_dict_loads_strictly_and_matches_functional_forward(variant: Variant, lr_input, tmp_path):
    sd = random_state_dict(variant.layout(), seed=7)

    model = variant.build()
    model.load_state_dict(sd, strict=True)
    model.eval()
    from_dict = weights.load_model(sd)
    path = tmp_path / f"{variant.name}.pt"
    torch.save(sd, path)
    from_file = weights.load_model(path)
    for loaded in (from_dict, from_file):
        assert loaded.config == model.config
        assert not loaded.training
        assert not loaded.sub_mean.weight.requires_grad
        assert all(p.requires_grad for n, p in loaded.named_parameters() if "mean" not in n)

    h, w = lr_input.shape[-2:]
    with torch.no_grad():
        for scale in variant.scales:
            expected = variant.reference(sd, lr_input, scale)
            assert expected.shape == (1, 3, h * scale, w * scale)
            assert expected.abs().max() > 1  # the comparison is not between two near-zero tensors
            for net in (model, from_dict, from_file):
                torch.testing.assert_close(net(lr_input, scale), expected, atol=1e-3, rtol=0)
    # load_model copied the caller's tensors instead of aliasing them.
    assert from_dict.head[0].weight.data_ptr() != sd["head.0.weight"].data_ptr()


# --------------------------------------------------------------------------------------------------------------------
# Scales, inputs and precision


def test_mdsr_forward_gives_each_scale_and_refuses_others(lr_input):
    model = models.MDSR(TINY_R, TINY_F).eval()
    h, w = lr_input.shape[-2:]
    with torch.no_grad():
        outputs = {s: model(lr_input, s) for s in (2, 3, 4)}
    for s, out in outputs.items():
        assert out.shape == (1, 3, h * s, w * s)
    with pytest.raises(ValueError, match=r"supports scales \[2, 3, 4\], got scale=8"):
        model(lr_input, 8)
    with pytest.raises(TypeError):
        model(lr_input)  # MDSR needs the scale


def test_mdsr_subset_uses_branch_positions(lr_input):
    sd = random_state_dict(mdsr_layout(TINY_R, TINY_F, (2, 4)), seed=2)
    model = models.MDSR(TINY_R, TINY_F, scales=(2, 4))
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        for branch, scale in enumerate((2, 4)):
            expected = ref_mdsr(sd, lr_input, TINY_R, branch, scale)
            torch.testing.assert_close(model(lr_input, scale), expected, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match=r"supports scales \[2, 4\], got scale=3"):
        model(lr_input, 3)


def test_edsr_scale_argument_and_input_shape_are_checked(lr_input):
    model = models.EDSR(1, 4, 2).eval()
    with torch.no_grad():
        assert model(lr_input).shape == model(lr_input, 2).shape == (1, 3, 24, 20)
    with pytest.raises(ValueError, match=r"upscales x2 only, got scale=3"):
        model(lr_input, 3)
    with pytest.raises(ValueError, match=r"expects a \(B, 3, H, W\) tensor, got shape \(3, 12, 10\)"):
        model(lr_input[0])


def test_invalid_constructor_arguments_name_the_problem():
    with pytest.raises(ValueError, match=r"EDSR\(\.\.\.\): scales: scale 5 is not supported"):
        models.EDSR(1, 4, 5)
    with pytest.raises(ValueError, match=r"MDSR\(\.\.\.\): n_feats: must be >= 1"):
        models.MDSR(1, 0)


def test_output_mean_shift_stays_float32_under_bf16_autocast(lr_input):
    model = randomised(models.EDSR(1, TINY_F, 2))
    with torch.no_grad():
        full = model(lr_input)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(lr_input)
    assert full.dtype == half.dtype == torch.float32
    assert (half - full).abs().max() < 4  # bf16 network, fp32 mean: a few grey levels at most


# --------------------------------------------------------------------------------------------------------------------
# Receptive field


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_receptive_radius_of_variants(variant: Variant):
    per_lr_conv = 1 + 2 * variant.n_resblocks + 1 + 1  # head, ResBlocks, body conv, first upsampling conv
    if variant.arch == "mdsr":
        per_lr_conv += 4 * 2  # four 5x5 convs
    # Convs after the pixel shuffle add less than one LR pixel together; plus the safety margin.
    assert models.receptive_radius(models.VARIANTS[variant.name]) == per_lr_conv + 1 + models.RECEPTIVE_MARGIN


@pytest.mark.parametrize("arch, scale", [("edsr", 2), ("edsr", 3), ("edsr", 4), ("mdsr", 3), ("mdsr", 4)])
def test_receptive_radius_matches_the_measured_field(arch, scale):
    torch.manual_seed(0)
    model = models.EDSR(1, 16, scale) if arch == "edsr" else models.MDSR(1, 16, (scale,))
    radius = models.receptive_radius(model)
    size = 2 * radius + 9
    centre = size // 2
    x = (torch.rand(1, 3, size, size) * 255).requires_grad_()
    out = model(x, scale)  # (1, 3, size*s, size*s)
    # The s x s output pixels (every sub-pixel phase) above the centre LR pixel: one backward pass gives the union
    # of their input fields (a sum of gradients does not cancel to exactly zero).
    patch = out[0, :, centre * scale : (centre + 1) * scale, centre * scale : (centre + 1) * scale]
    (grad,) = torch.autograd.grad(patch.sum(), x)
    ys, xs = (grad[0].abs().sum(0) > 0).nonzero(as_tuple=True)
    measured = max(int((ys - centre).abs().max()), int((xs - centre).abs().max()))
    assert measured + models.RECEPTIVE_MARGIN == radius
