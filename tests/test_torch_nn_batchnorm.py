"""The assertions of PyTorch's test_nn.py batchnorm tests (CPU), with fastbn.torch's modules
and batch_norm in place of torch's.

Each test names the test_nn.py test it follows. Where test_nn.py also checks double backward
(gradgradcheck), only first derivatives are checked here: fastbn's backward cannot be
differentiated (documented).
"""
import pytest

torch = pytest.importorskip("torch")
import fastbn.torch as fbt  # noqa: E402

nn = torch.nn
F = torch.nn.functional


def _no_torch_kernel(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("fastbn.torch fell back to torch's kernel")

    monkeypatch.setattr(F, "batch_norm", refuse)


# --- TestNN ------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_raises_error_if_argument_is_not_same_size_as_input(which, training):
    """test_batchnorm_raises_error_if_{running_mean,running_var,weight,bias}_is_not_same_size_
    as_input"""
    x = torch.rand(2, 10)
    for size in (9, 11):
        args = dict(running_mean=torch.rand(10), running_var=torch.rand(10))
        args[which] = torch.rand(size) if which.startswith("running") else \
            nn.Parameter(torch.rand(size))
        before = (args["running_mean"].clone(), args["running_var"].clone())
        with pytest.raises(RuntimeError, match=f"{which} should contain 10 elements not {size}"):
            fbt.batch_norm(x, training=training, **args)
        with pytest.raises(ValueError):  # fastbn's own convention holds too
            fbt.batch_norm(x, training=training, **args)
        assert torch.equal(args["running_mean"], before[0])  # nothing written
        assert torch.equal(args["running_var"], before[1])


def test_raises_error_if_less_than_one_value_per_channel():
    """test_batchnorm_raises_error_if_less_than_one_value_per_channel"""
    x = torch.rand(10)[None, :, None]
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fbt.BatchNorm1d(10)(x)


def test_buffer_update_when_stats_are_not_tracked():
    """test_batchnorm_buffer_update_when_stats_are_not_tracked"""
    bn = fbt.BatchNorm1d(4, track_running_stats=True)
    bn.track_running_stats = False
    num_batches = bn.num_batches_tracked.clone()
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    bn(torch.rand(32, 4))
    assert torch.equal(num_batches, bn.num_batches_tracked)
    assert torch.equal(running_mean, bn.running_mean)
    assert torch.equal(running_var, bn.running_var)


def test_load_state_dict():
    """test_batchnorm_load_state_dict"""
    bn = fbt.BatchNorm2d(3)
    state = bn.state_dict()
    assert state["num_batches_tracked"] == torch.tensor(0)
    bn.num_batches_tracked = torch.tensor(10)
    assert bn.state_dict()["num_batches_tracked"] == torch.tensor(10)
    empty = {}
    bn.load_state_dict(empty, strict=False)  # missing keys keep their values
    assert bn.state_dict()["num_batches_tracked"] == torch.tensor(10)
    bn = fbt.BatchNorm2d(3, track_running_stats=False)
    assert "num_batches_tracked" not in bn.state_dict()


@pytest.mark.parametrize("shape", [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["f32", "f64", "bf16"])
def test_nhwc(shape, dtype, monkeypatch):
    """test_batchnorm_nhwc_cpu: channels_last input and gradient give channels_last output and
    gradient, equal to torch's on contiguous memory."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 10, shape, generator=g).to(dtype)
    grad = torch.randint(1, 10, shape, generator=g).to(dtype)
    # bfloat16: torch's own bfloat16 kernel is far less accurate than fastbn's (its dgamma is
    # off by up to 100% here), so both are held to float64 computations on the same values
    ref_dtype = torch.float64 if dtype == torch.bfloat16 else dtype
    ref_mod = nn.BatchNorm2d(shape[1]).to(ref_dtype)
    ref_x = x.detach().clone().to(ref_dtype).contiguous().requires_grad_(True)
    ref_out = ref_mod(ref_x)
    ref_out.backward(grad.to(ref_dtype).contiguous())
    mod = fbt.BatchNorm2d(shape[1]).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with monkeypatch.context() as patch:
        _no_torch_kernel(patch)
        out = mod(x)
        out.backward(grad.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    assert out.dtype == x.grad.dtype == dtype

    def close(ours, ref, **tol):
        if dtype == torch.bfloat16:  # two roundings to bfloat16 of the result's scale
            tol = dict(rtol=1.6e-2, atol=1.6e-2 * float(ref.detach().abs().max()))
        torch.testing.assert_close(ours.to(ref.dtype), ref, **tol)

    close(out, ref_out)
    close(x.grad, ref_x.grad)
    # sums of 400 products of size ~10 that cancel: torch's float32 accumulation is off by
    # ~1e-4 (fastbn accumulates in float64)
    ptol = dict(rtol=1e-5, atol=1e-3) if dtype == torch.float32 else {}
    close(mod.weight.grad, ref_mod.weight.grad, **ptol)
    close(mod.bias.grad, ref_mod.bias.grad, **ptol)
    close(mod.running_mean, ref_mod.running_mean)
    close(mod.running_var, ref_mod.running_var)


def test_non_contig():
    """test_batchnorm_non_contig_cpu: a permuted (neither contiguous nor channels_last) input
    normalizes as its contiguous copy, and channels_last input stays channels_last."""
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1)
    x = x.permute(0, 2, 1, 3)
    bn = fbt.BatchNorm2d(2).float().eval()
    bn.weight.data.uniform_()
    bn.bias.data.uniform_()
    ref_bn = nn.BatchNorm2d(2).float().eval()
    ref_bn.load_state_dict(bn.state_dict())
    out = bn(x)
    torch.testing.assert_close(out, ref_bn(x.contiguous()))
    cl = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    bn3 = fbt.BatchNorm2d(3)
    assert bn3(cl).is_contiguous(memory_format=torch.channels_last)


_CLS = {2: fbt.BatchNorm1d, 3: fbt.BatchNorm1d, 4: fbt.BatchNorm2d}

# --- TestNNDeviceType (CPU) --------------------------------------------------------------------

@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_grad(training):
    """test_batchnorm_grad (_test_batchnorm_grad): gradcheck through F.batch_norm's form with
    running statistics, eps 1e-4, contiguous and non-contiguous input."""
    bs, n_feat, size_feat = 4, 5, 6
    dtype = torch.double
    x = torch.arange(bs * n_feat * size_feat, dtype=dtype).view(bs, n_feat, size_feat)
    weight = torch.arange(1, n_feat + 1, dtype=dtype, requires_grad=True)
    bias = torch.arange(n_feat, dtype=dtype, requires_grad=True)
    running_mean = 1 - torch.arange(n_feat, dtype=dtype)
    running_var = 2 * torch.arange(n_feat, dtype=dtype)
    for inp in (x, x.transpose(0, 2).contiguous().transpose(0, 2)):
        inp = inp.detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda i, w, b: fbt.batch_norm(i, running_mean.clone(), running_var.clone(), w, b,
                                           training, 0.1, 0.0001),
            (inp, weight, bias), check_batched_grad=True)


@pytest.mark.parametrize("ndim", [2, 3, 4])
@pytest.mark.parametrize("dtype,module_dtype", [(torch.float, torch.float),
                                                (torch.double, torch.double),
                                                (torch.bfloat16, torch.float),
                                                (torch.bfloat16, torch.bfloat16)])
def test_eval(ndim, dtype, module_dtype, monkeypatch):
    """test_batchnorm_eval (_test_batchnorm_eval): in eval mode two identical calls give the
    same output and gradient; likewise without running statistics."""
    _no_torch_kernel(monkeypatch)
    module = _CLS[ndim](3).to(module_dtype)
    module.eval()
    data = torch.rand([3] * ndim, dtype=dtype, requires_grad=True)
    grad = torch.rand([3] * ndim, dtype=dtype)
    res1 = module(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    if data.grad is not None:
        data.grad.data.zero_()
    res2 = module(data)
    res2.backward(grad)
    grad2 = data.grad.clone()
    assert torch.equal(res1, res2) and torch.equal(grad1, grad2)
    module = fbt.BatchNorm1d(3, track_running_stats=False).to(module_dtype)
    data = torch.rand(4, 3, dtype=dtype, requires_grad=True)
    grad = torch.rand(4, 3, dtype=dtype)
    res1 = module(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    module.eval()
    if data.grad is not None:
        data.grad.data.zero_()
    res2 = module(data)
    res2.backward(grad)
    grad2 = data.grad.clone()
    assert torch.equal(res1, res2) and torch.equal(grad1, grad2)


@pytest.mark.parametrize("ndim", [2, 3, 4])
@pytest.mark.parametrize("dtype,module_dtype", [(torch.float, torch.float),
                                                (torch.double, torch.double),
                                                (torch.bfloat16, torch.float),
                                                (torch.bfloat16, torch.bfloat16)])
def test_affine(ndim, dtype, module_dtype, monkeypatch):
    """test_batchnorm_affine (_test_batchnorm_affine): affine=False equals weight 1, bias 0."""
    _no_torch_kernel(monkeypatch)
    module = _CLS[ndim](3, affine=False).to(module_dtype)
    module_affine = _CLS[ndim](3, affine=True).to(module_dtype)
    with torch.no_grad():
        module_affine.weight.fill_(1.0)
        module_affine.bias.zero_()
    data = torch.rand([3] * ndim, dtype=dtype, requires_grad=True)
    grad = torch.ones_like(data, requires_grad=False)
    res1 = module_affine(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    data.grad.zero_()
    res2 = module(data)
    res2.backward(grad)
    grad2 = data.grad
    torch.testing.assert_close(res1, res2)
    torch.testing.assert_close(grad1, grad2)


@pytest.mark.parametrize("dtype,module_dtype", [(torch.float, torch.float),
                                                (torch.double, torch.double),
                                                (torch.bfloat16, torch.float),
                                                (torch.bfloat16, torch.bfloat16)])
def test_simple_average(dtype, module_dtype, monkeypatch):
    """test_batchnorm_simple_average (_test_batchnorm_simple_average): momentum=None keeps the
    average of the batch statistics, as momentum 1 then 0.5 would."""
    _no_torch_kernel(monkeypatch)
    module = fbt.BatchNorm1d(3, momentum=None).to(dtype=module_dtype)
    zeros = torch.zeros(3, dtype=module_dtype)
    ones = torch.ones(3, dtype=module_dtype)
    torch.testing.assert_close(module.running_mean, zeros)
    torch.testing.assert_close(module.running_var, ones)
    data1 = torch.rand(4, 3, dtype=dtype)
    data2 = torch.rand(4, 3, dtype=dtype)
    module(data1)
    running_mean1, running_var1 = module.running_mean.clone(), module.running_var.clone()
    module(data2)
    running_mean2, running_var2 = module.running_mean.clone(), module.running_var.clone()
    module.reset_running_stats()
    torch.testing.assert_close(module.running_mean, zeros)
    torch.testing.assert_close(module.running_var, ones)
    module.momentum = None  # average of the two, as test_nn checks through momentum 1 below
    module(data1)
    module(data2)
    torch.testing.assert_close(module.running_mean, running_mean2)
    torch.testing.assert_close(module.running_var, running_var2)
    module.reset_running_stats()
    module.momentum = 1.0
    module(data1)
    torch.testing.assert_close(module.running_mean, running_mean1)
    torch.testing.assert_close(module.running_var, running_var1)
    module(data2)
    average = (running_mean1.float() + module.running_mean.float()) / 2
    torch.testing.assert_close(running_mean2.float(), average,
                               **({} if module_dtype != torch.bfloat16
                                  else dict(rtol=0.02, atol=0.02)))


def test_update_stats(monkeypatch):
    """test_batchnorm_update_stats (_test_batchnorm_update_stats)."""
    _no_torch_kernel(monkeypatch)
    module = fbt.BatchNorm1d(3)
    data = torch.rand(4, 3)
    old_running_mean = module.running_mean.clone()
    old_running_var = module.running_var.clone()
    old_num_batches_tracked = module.num_batches_tracked.clone()
    module(data)
    assert not torch.equal(old_running_mean, module.running_mean)
    assert not torch.equal(old_running_var, module.running_var)
    assert torch.equal(old_num_batches_tracked + 1, module.num_batches_tracked)
    module.eval()
    old_running_mean = module.running_mean.clone()
    old_running_var = module.running_var.clone()
    old_num_batches_tracked = module.num_batches_tracked.clone()
    module(data)
    assert torch.equal(old_running_mean, module.running_mean)
    assert torch.equal(old_running_var, module.running_var)
    assert torch.equal(old_num_batches_tracked, module.num_batches_tracked)


@pytest.mark.parametrize("cls,shape", [(fbt.BatchNorm1d, (0, 3, 9)),
                                       (fbt.BatchNorm2d, (0, 3, 2, 2)),
                                       (fbt.BatchNorm3d, (0, 3, 2, 2, 2))])
def test_empty(cls, shape):
    """test_BatchNorm_empty (_test_module_empty_input): an empty batch gives an empty output,
    zero gradients, and untouched running statistics."""
    mod = cls(3)
    inp = torch.randn(shape, requires_grad=True)
    out = mod(inp)
    out.backward(torch.rand_like(out))
    assert out.size() == inp.size()
    for p in mod.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p.grad))
    assert torch.equal(inp.grad, torch.zeros_like(inp))
    assert torch.equal(mod.running_mean, torch.tensor([0.0, 0, 0]))
    assert torch.equal(mod.running_var, torch.tensor([1.0, 1, 1]))
    assert torch.equal(mod.weight.grad, torch.tensor([0.0, 0, 0]))
    assert torch.equal(mod.bias.grad, torch.tensor([0.0, 0, 0]))


@pytest.mark.parametrize("momentum", [-1.2, 0.0, 0.5, 1.0, 2.5])
def test_any_momentum_in_training_ignored_in_eval(momentum, monkeypatch):
    """PyTorch applies r = (1 - momentum) r + momentum batch for any momentum, and ignores
    momentum in eval."""
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    ref_rm, ref_rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 1
    rm, rv = ref_rm.clone(), ref_rv.clone()
    expected = F.batch_norm(x, ref_rm, ref_rv, training=True, momentum=momentum)
    expected_eval = F.batch_norm(x, ref_rm, ref_rv, training=False, momentum=momentum)
    _no_torch_kernel(monkeypatch)
    torch.testing.assert_close(fbt.batch_norm(x, rm, rv, training=True, momentum=momentum),
                               expected)
    torch.testing.assert_close((rm, rv), (ref_rm, ref_rv), rtol=1e-12, atol=1e-12)
    # (momentum 2.5 can leave a negative running variance: NaN in both)
    torch.testing.assert_close(fbt.batch_norm(x, rm, rv, training=False, momentum=momentum),
                               expected_eval, equal_nan=True)
    torch.testing.assert_close((rm, rv), (ref_rm, ref_rv), rtol=1e-12, atol=1e-12)


def test_eps_messages_and_running_statistics_in_pairs():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="eps must be positive"):
        fbt.batch_norm(x, None, None, training=True, eps=0.0)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        fbt.batch_norm(x, torch.zeros(3), torch.ones(3), training=False, eps=-1.0)
    with pytest.raises(ValueError, match="both be None or neither"):
        fbt.batch_norm(x, torch.zeros(3), None, training=True)
    with pytest.raises(RuntimeError, match="running_mean must be defined"):
        fbt.batch_norm(x, None, None, training=False)
