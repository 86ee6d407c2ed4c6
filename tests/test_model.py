"""The model's promises: size, cost, receptive field and structure, all computed from the model object."""
import collections
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import model_train as mt
from conftest import fails_with_one_line, train_args


def macs(model):
    return sum(row["macs"] for row in mt.layer_table(model))


def receptive_field(model):
    return [row for row in mt.layer_table(model) if row["kind"] != "linear"][-1]["receptive_field"]


def test_the_net_keeps_its_promises(capsys):
    """Under 200,000 parameters and 50 M multiply-adds, a receptive field of at least 49, ten logits per image; the
    start-of-run table says so, a row per layer."""
    model = mt.Net()
    params = sum(p.numel() for p in model.parameters())
    assert params < 200_000 and macs(model) <= 50_000_000 and receptive_field(model) >= 49
    assert model.eval()(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    mt.describe_model(model)
    out = capsys.readouterr().out
    assert f"{params:,} parameters" in out and f"receptive field {receptive_field(model)} px" in out
    assert len(out.splitlines()) == len(mt.layer_table(model)) + 2


def test_structure_depthwise_dilated_strided_no_maxpool():
    model = mt.Net()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert any(c.groups == c.in_channels > 1 for c in convs), "no depthwise conv"
    assert any(c.stride[0] == 2 for c in convs) and any(c.kernel_size == (1, 1) for c in convs)
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in model.modules())
    assert isinstance(model.head[0], nn.AdaptiveAvgPool2d) and isinstance(model.head[-1], nn.Linear)
    assert [name for name, _ in model.features.named_children()] == ["C1", "C2", "C3", "C4", "C5"]
    for block in ("C3", "C5"):  # the dilated convs
        assert any(isinstance(m, nn.Conv2d) and m.dilation[0] > 1 for m in getattr(model.features, block).modules())
    assert all(m.p == 0.3 for m in mt.Net(dropout=0.3).modules() if isinstance(m, nn.Dropout))


class Stack(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)


def test_mac_and_receptive_field_counts_match_hand_counts():
    tiny = Stack(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, 2, 1, groups=8), nn.AdaptiveAvgPool2d(1),
                 nn.Flatten(), nn.Linear(8, 10))
    assert macs(tiny) == 32 * 32 * 8 * 27 + 16 * 16 * 8 * 9 + 8 * 10
    stack = Stack(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, padding=2, dilation=2))
    # 1 + 2 (3x3) + 2 (3x3, stride 2 after it) + 2 * 2 * 2 (dilation 2 at jump 2) = 13
    assert [row["receptive_field"] for row in mt.layer_table(stack)] == [3, 5, 13]
    assert [row["kind"] for row in mt.layer_table(stack)] == ["conv 3x3", "conv 3x3 s2", "conv 3x3 d2"]


def empirical_receptive_field(model, size=160):
    """Backpropagate from the centre of the last feature map and measure how far the gradient reaches.
    All weights are made positive and the input is positive, so every unit passes gradient."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    image = torch.ones(1, 3, size, size, requires_grad=True)
    features = model.features(image)
    features[0, :, features.shape[2] // 2, features.shape[3] // 2].sum().backward()
    reached = image.grad[0].abs().sum(0) > 0
    rows, cols = reached.any(1).nonzero().flatten(), reached.any(0).nonzero().flatten()
    assert 0 < rows[0] and rows[-1] < size - 1, "input too small to hold the receptive field"
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def test_the_calculated_receptive_field_is_confirmed_by_backprop():
    model = mt.Net()
    assert empirical_receptive_field(model) == (receptive_field(model), receptive_field(model))


@pytest.mark.parametrize("in_channels, out_channels, groups, dilation, size", [
    (24, 24, 24, 2, 16),  # depthwise, as in C3 and C5
    (6, 10, 1, 2, 8),     # a full conv
    (8, 8, 4, 4, 12),     # grouped, dilation 4
])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_dilated_conv_gives_the_outputs_and_gradients_of_a_dilated_conv(in_channels, out_channels, groups, dilation,
                                                                        size, memory_format):
    conv = mt.DilatedConv2d(in_channels, out_channels, 3, dilation, groups)
    x = torch.randn(3, in_channels, size, size).contiguous(memory_format=memory_format).requires_grad_()
    reference = x.detach().clone().requires_grad_()
    out = conv(x)
    expected = torch.nn.functional.conv2d(reference, conv.weight, None, 1, dilation, dilation, groups)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad(out, (x, conv.weight), upstream)
    expected_grads = torch.autograd.grad(expected, (reference, conv.weight), upstream)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def record_conv2d_dilations(monkeypatch):
    """Every dilation F.conv2d is called with from now on (nn.Conv2d calls it too)."""
    dilations, conv2d = [], torch.nn.functional.conv2d

    def recording(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        dilations.append(dilation if isinstance(dilation, int) else dilation[0])
        return conv2d(input, weight, bias, stride, padding, dilation, groups)
    monkeypatch.setattr(torch.nn.functional, "conv2d", recording)
    return dilations


def test_the_nets_dilated_convs_run_undilated_on_a_cpu_unless_the_size_does_not_divide(monkeypatch):
    model = mt.Net()
    dilated = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.dilation[0] > 1]
    assert dilated and all(isinstance(m, mt.DilatedConv2d) for m in dilated)
    dilations = record_conv2d_dilations(monkeypatch)
    model(torch.randn(2, 3, 32, 32))
    assert dilations == [1] * sum(isinstance(m, nn.Conv2d) for m in model.modules())
    dilations.clear()
    assert mt.DilatedConv2d(4, 4, 3, 2, 4)(torch.randn(1, 4, 7, 7)).shape == (1, 4, 7, 7)
    assert dilations == [2]


class CountOps(TorchDispatchMode):
    """Counts every aten operator that runs inside the with-block (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make_unit", [lambda: mt.ConvBNAct(8, 8), lambda: mt.DepthwiseSeparable(8, 8),
                                       lambda: mt.InvertedBottleneck(8)],
                         ids=["ConvBNAct", "DepthwiseSeparable", "InvertedBottleneck"])
def test_a_training_step_copies_no_activation(make_unit):
    # An in-place SiLU overwrites the input that its backward needs, so autograd would first save a copy of it:
    # in every unit, every step, one more pass over each activation's memory.
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    with CountOps() as ops:
        make_unit().train()(x).sum().backward()
    assert ops.counts["convolution"] > 0 and ops.counts["clone"] == 0


def test_inverted_bottleneck_widens_looks_around_and_projects_back_linearly():
    unit = mt.InvertedBottleneck(8, expansion=3, dilation=2)
    convs = [m for m in unit.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (8, 24, (1, 1)), (24, 24, (3, 3)), (24, 8, (1, 1))]
    assert convs[1].groups == 24 and convs[1].dilation == (2, 2)
    with torch.no_grad():
        out = unit.eval()(10 * torch.randn(2, 8, 10, 10))
    assert out.shape == (2, 8, 10, 10) and (out < -1).any(), "SiLU after the projection keeps outputs above -0.28"


@pytest.mark.parametrize("limit, says", [("MAX_PARAMETERS", "over the 100,000 limit"),
                                         ("MIN_RECEPTIVE_FIELD", "under 100000; add dilation or stride")])
def test_a_model_that_breaks_a_promise_is_refused(limit, says, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mt, limit, 100_000)
    assert says in fails_with_one_line(train_args(data_dir, tmp_path), capsys)
    assert not (tmp_path / "best_model.pth").exists()
