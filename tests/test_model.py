import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from asl_tune.errors import AslTuneError
from asl_tune.model import DexNet, count_parameters, feature_side, flops_per_image


@pytest.mark.parametrize("head_width, expected", [(512, 12_275_101), (128, 5_854_621)])
def test_seed_parameter_counts_at_200px(head_width, expected):
    assert count_parameters(DexNet(head_width=head_width, image_size=200)) == expected


def test_seed_feature_map_is_8x8_at_200px():
    assert feature_side(200) == 8


@pytest.mark.parametrize("size", [32, 48, 64, 200])
def test_forward_shape_at_any_supported_size(size):
    model = DexNet(head_width=16, image_size=size).eval()
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 29)


def test_head_has_no_relu_after_second_linear():
    kinds = [type(m).__name__ for m in DexNet(head_width=8, image_size=64).head]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "Dropout", "Linear"]


def test_too_small_head_refused():
    with pytest.raises(AslTuneError, match="head_width: must be >= 2, got 1"):
        DexNet(head_width=1, image_size=64)


@pytest.mark.parametrize("size", [16, 31])
def test_an_image_too_small_for_the_conv_stack_is_refused_by_the_configs_rule(size):
    """The conv arithmetic leaves a map of 2 or more even below 32 px; forward then fails. The config's rule decides."""
    with pytest.raises(AslTuneError, match=rf"image_size: must be >= 32 .*got {size}"):
        DexNet(head_width=8, image_size=size)


@pytest.mark.parametrize("head_width, size, classes", [(512, 200, 29), (16, 32, 3), (64, 64, 29)])
def test_flops_per_image_is_what_torchs_flop_counter_counts_for_one_image(head_width, size, classes):
    model = DexNet(head_width, size, classes).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    assert flops_per_image(model) == counter.get_total_flops()
