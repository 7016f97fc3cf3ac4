"""fastbn.torch on bfloat16 and float16 CPU tensors: fastbn's kernels on the tensors' own
memory, output in the input's dtype and memory format, as accurate as PyTorch's half kernels
(measured against float64), and CPU training under torch.autocast."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ml_dtypes")
import fastbn.torch as fbt  # noqa: E402

F = torch.nn.functional
HALVES = [torch.bfloat16, torch.float16]
#: PyTorch's own default tolerances for these dtypes (torch.testing.assert_close)
RTOL = {torch.bfloat16: 1.6e-2, torch.float16: 1e-3}


def _no_torch_kernel(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("fastbn.torch fell back to torch's kernel")

    monkeypatch.setattr(F, "batch_norm", refuse)


def _module(cls, C, dtype, training):
    """The same parameters for every dtype (drawn in float64, rounded to the module's dtype)."""
    m = cls(C).to(dtype).train(training)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t, low, high in ((m.weight, 0.5, 1.5), (m.bias, -1, 1), (m.running_mean, -1, 1),
                             (m.running_var, 0.5, 2)):
            t.copy_(low + (high - low) * torch.rand(C, generator=g, dtype=torch.float64))
    return m


def _exact_twin(cls, C, dtype, training):
    """A float64 module holding the values of the ``dtype`` one (after rounding)."""
    m = cls(C).double().train(training)
    m.load_state_dict({k: v.double() if v.is_floating_point() else v
                       for k, v in _module(cls, C, dtype, training).state_dict().items()})
    return m


def _step(module, x, dy):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    return y, x.grad, module.weight.grad, module.bias.grad, module.running_mean, \
        module.running_var


def _check_accuracy(name, ours, theirs, exact, dtype):
    """ours within PyTorch's tolerance for the dtype of the float64 result, and no worse than
    twice PyTorch's own half kernel's error (plus one rounding at the result's scale)."""
    exact = exact.detach().double()
    scale = float(exact.abs().max()) or 1.0
    rtol = RTOL[dtype]
    err_ours = (ours.detach().double() - exact).abs().max()
    err_theirs = (theirs.detach().double() - exact).abs().max()
    torch.testing.assert_close(ours.detach().double(), exact, rtol=rtol, atol=rtol * scale,
                               msg=lambda m: f"{name}: {m}")
    assert err_ours <= 2 * err_theirs + rtol * scale / 2, \
        f"{name}: fastbn error {err_ours:.3g}, torch's {err_theirs:.3g}"


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("param_half", [False, True], ids=["f32_params", "half_params"])
@pytest.mark.parametrize("dtype", HALVES, ids=["bf16", "f16"])
def test_half_tensors_run_on_fastbn(dtype, param_half, training, memory_format, monkeypatch):
    shape, C = (6, 5, 7, 8), 5
    g = torch.Generator().manual_seed(1)
    x = (1.5 + 2 * torch.randn(shape, generator=g)).to(dtype).contiguous(
        memory_format=memory_format)
    dy = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=memory_format)
    pdtype = dtype if param_half else torch.float32
    theirs = _step(_module(torch.nn.BatchNorm2d, C, pdtype, training), x, dy)
    exact = _step(_exact_twin(torch.nn.BatchNorm2d, C, pdtype, training), x.double(),
                  dy.double())
    seen, given = [], []
    real = fbt.api.forward

    def spy(xn, *args, **kwargs):
        seen.append(xn.__array_interface__["data"][0])
        return real(xn, *args, **kwargs)

    module = _module(fbt.BatchNorm2d, C, pdtype, training)
    module.register_forward_pre_hook(lambda m, inputs: given.append(inputs[0].data_ptr()))
    with monkeypatch.context() as patch:
        _no_torch_kernel(patch)
        patch.setattr(fbt.api, "forward", spy)
        ours = _step(module, x, dy)
    assert seen == given, "fastbn did not read the tensor's own memory"
    y, dx = ours[:2]
    assert y.dtype == dx.dtype == dtype
    assert y.is_contiguous(memory_format=memory_format)
    assert dx.is_contiguous(memory_format=memory_format)
    for what in range(6):
        assert ours[what].dtype == theirs[what].dtype
    names = ["y", "dx", "dweight", "dbias", "running_mean", "running_var"]
    for name, a, b, e in zip(names, ours, theirs, exact):
        _check_accuracy(f"{name} {dtype}", a, b, e, dtype)


@pytest.mark.parametrize("dtype", HALVES, ids=["bf16", "f16"])
def test_half_3d_and_1d_modules(dtype, monkeypatch):
    for cls, ref_cls, shape in ((fbt.BatchNorm1d, torch.nn.BatchNorm1d, (16, 4)),
                                (fbt.BatchNorm1d, torch.nn.BatchNorm1d, (4, 4, 9)),
                                (fbt.BatchNorm3d, torch.nn.BatchNorm3d, (3, 4, 3, 4, 5))):
        g = torch.Generator().manual_seed(2)
        x = torch.randn(shape, generator=g).to(dtype)
        if len(shape) == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        dy = torch.randn(shape, generator=g).to(dtype)
        theirs = _step(_module(ref_cls, 4, torch.float32, True), x, dy)
        exact = _step(_module(ref_cls, 4, torch.float64, True), x.double(), dy.double())
        with monkeypatch.context() as patch:
            _no_torch_kernel(patch)
            ours = _step(_module(cls, 4, torch.float32, True), x, dy)
        if len(shape) == 5:
            assert ours[0].is_contiguous(memory_format=torch.channels_last_3d)
        for name, a, b, e in zip(["y", "dx", "dweight", "dbias"], ours, theirs, exact):
            _check_accuracy(f"{cls.__name__}{shape} {name}", a, b, e, dtype)


class _Net(torch.nn.Module):
    def __init__(self, bn2d, bn1d):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = bn2d(8)
        self.fc = torch.nn.Linear(8, 4)
        self.bn1 = bn1d(4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.bn1(self.fc(x.mean(dim=(2, 3))))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_training_under_cpu_autocast(memory_format, monkeypatch):
    """torch.autocast("cpu", bfloat16): convolutions and linear layers give bfloat16, and
    BatchNorm runs in its input's dtype with float32 parameters (PyTorch's policy: batch_norm
    is on neither of its autocast lists). fastbn's modules do the same, on fastbn's kernels."""
    results = []
    for bn2d, bn1d in ((torch.nn.BatchNorm2d, torch.nn.BatchNorm1d),
                       (fbt.BatchNorm2d, fbt.BatchNorm1d)):
        torch.manual_seed(0)
        net = _Net(bn2d, bn1d).to(memory_format=memory_format)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(1)
        dtypes = []
        hook = net.bn.register_forward_hook(lambda m, i, o: dtypes.append((i[0].dtype,
                                                                           o.dtype)))
        with monkeypatch.context() as patch:
            if bn2d is fbt.BatchNorm2d:
                _no_torch_kernel(patch)
            for _ in range(3):
                x = torch.randn(8, 3, 6, 6, generator=g).contiguous(memory_format=memory_format)
                target = torch.randn(8, 4, generator=g)
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = net(x)
                    loss = ((out.float() - target) ** 2).mean()
                loss.backward()
                opt.step()
        hook.remove()
        results.append((net, dtypes, out.dtype))
    (ref, ref_dtypes, ref_out), (ours, our_dtypes, our_out) = results
    assert our_dtypes == ref_dtypes == [(torch.bfloat16, torch.bfloat16)] * 3
    assert our_out == ref_out
    for (key, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        # three bfloat16 steps: both drift from each other by bfloat16 roundings
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05, msg=lambda m, k=key: f"{k}: {m}")
        assert a.dtype == b.dtype
