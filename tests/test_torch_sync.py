"""fastbn.torch.SyncBatchNorm without a process group (a plain batch norm, as PyTorch's) and
convert_sync_batchnorm. The synchronized path runs in test_distributed.py (gloo group)."""
import warnings

import pytest

torch = pytest.importorskip("torch")
import fastbn.torch as fbt  # noqa: E402


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 5), (4, 3, 5, 4), (2, 3, 2, 3, 2)])
def test_without_process_group_it_is_batchnorm(shape, backend):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    bn = fbt.SyncBatchNorm(3, momentum=None).double()
    ref = torch.nn.SyncBatchNorm(3, momentum=None).double()
    for _ in range(2):
        y, y_ref = bn(x), ref(x_ref)
        torch.testing.assert_close(y, y_ref)
        y.sum().mul(y).sum().backward()
        y_ref.sum().mul(y_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(bn.state_dict()[key], value)
    bn.eval()
    ref.eval()
    torch.testing.assert_close(bn(x), ref(x_ref))
    with pytest.raises(ValueError, match="at least 2D"):
        bn(torch.randn(3))


def test_convert_sync_batchnorm_keeps_state_and_parameters():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                              torch.nn.Sequential(torch.nn.BatchNorm1d(4, affine=False)),
                              torch.nn.SyncBatchNorm(4, momentum=None),
                              fbt.BatchNorm3d(4, eps=1e-3))
    net[1].running_mean.fill_(0.5)
    net[1].num_batches_tracked.fill_(7)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    weight = net[1].weight
    converted = fbt.convert_sync_batchnorm(net)
    assert converted is net
    for layer in (net[1], net[2][0], net[3], net[4]):
        assert type(layer) is fbt.SyncBatchNorm and not layer.training
    assert net[1].weight is weight  # shared, so an optimizer built before still works
    assert net[2][0].weight is None and net[3].momentum is None and net[4].eps == 1e-3
    after = net.state_dict()
    assert sorted(after) == sorted(before)
    for key in before:
        torch.testing.assert_close(after[key], before[key])
    single = fbt.convert_sync_batchnorm(torch.nn.BatchNorm2d(5))
    assert type(single) is fbt.SyncBatchNorm
    fused = fbt.BatchNormReLU2d(4)  # a fused layer becomes a fused synchronized one
    fused.running_var.fill_(2.0)
    converted = fbt.convert_sync_batchnorm(torch.nn.Sequential(fused))[0]
    assert type(converted) is fbt.SyncBatchNormReLU
    assert converted.weight is fused.weight and converted.running_var is fused.running_var


def test_doctests():
    import doctest

    import fastbn._torch_sync

    result = doctest.testmod(fastbn._torch_sync)
    assert result.failed == 0 and result.attempted > 0


def test_fused_layers_convert_either_way_and_match_batchnormrelu_alone():
    """convert_sync_batchnorm turns fastbn's fused layers into SyncBatchNormReLU, and
    fuse_relu fuses SyncBatchNorm + ReLU into one: both orders give the same model. Without
    a process group the fused synchronized layer is BatchNormReLU (outputs, running
    statistics, gradients), on fastbn's kernels."""
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                   torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1),
                                   torch.nn.BatchNorm2d(4))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fuse_first = fbt.convert_sync_batchnorm(fbt.fuse_relu(net()))
        convert_first = fbt.fuse_relu(fbt.convert_sync_batchnorm(net()))
    kinds = ["Conv2d", "SyncBatchNormReLU", "Identity", "Conv2d", "SyncBatchNorm"]
    assert [type(m).__name__ for m in fuse_first] == kinds
    assert [type(m).__name__ for m in convert_first] == kinds
    alone = fbt.fuse_relu(fbt.convert(net()))  # every layer on fastbn's kernels
    x = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    outs = [m(x) for m in (fuse_first, convert_first, alone)]
    for y in outs[:2]:
        torch.testing.assert_close(y, outs[2], rtol=0, atol=0)
    grads = [torch.autograd.grad(y.square().sum(), m[0].weight)[0]
             for y, m in zip(outs, (fuse_first, convert_first, alone))]
    for g in grads[:2]:
        torch.testing.assert_close(g, grads[2], rtol=0, atol=0)
    torch.testing.assert_close(fuse_first[1].running_var, alone[1].running_var, rtol=0, atol=0)
