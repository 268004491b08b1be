"""utils/reduce.py: channel_max / channel_argmax equal torch.max / argmax over dim 1; sum_groups."""
import pytest
import torch

from utils.reduce import channel_argmax, channel_max, sum_groups


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (3, 21, 16), (1, 151, 4, 4), (4, 2)])
def test_equals_torch_on_random_maps(shape):
    x = torch.randn(*shape)
    values, indices = channel_max(x)
    expected = torch.max(x, dim=1)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
    assert torch.equal(channel_argmax(x), x.argmax(dim=1))


def test_ties_take_the_first_channel():
    x = torch.tensor([[[1.0, 0.0, 2.0]], [[1.0, 3.0, 2.0]], [[0.5, 3.0, 2.0]]]).permute(1, 0, 2)  # (1, 3, 3)
    assert channel_argmax(x).tolist() == [[0, 1, 0]]
    quantised = torch.randint(0, 3, (2, 6, 5, 5)).float()  # many ties
    assert torch.equal(channel_argmax(quantised), quantised.argmax(dim=1))


def test_integer_and_nan_inputs():
    labels = torch.randint(0, 4, (2, 8, 3))
    assert torch.equal(channel_argmax(labels), labels.argmax(dim=1))
    x = torch.zeros(1, 4, 3)
    x[0, 2, 1] = float("nan")  # torch reports the NaN's channel
    values, indices = channel_max(x)
    assert indices.tolist() == [[0, 2, 0]] and torch.isnan(values[0, 1])


@pytest.mark.parametrize("dim, m", [(-1, 2), (-1, 8), (-2, 4), (1, 3)])
def test_sum_groups_is_the_reduction_of_each_group(dim, m):
    torch.manual_seed(m)
    x = torch.randn(2, 7, 13, 17) * 10
    n = x.shape[dim]
    groups = n // m
    got = sum_groups(x, groups, m, dim=dim)
    kept = x.narrow(dim, 0, groups * m)
    shape = list(x.shape)
    axis = dim % x.dim()
    shape[axis:axis + 1] = [groups, m]
    want = kept.reshape(shape).sum(dim=axis + 1)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-5)
