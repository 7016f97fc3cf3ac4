"""fastbn.torch: drop-in parity with torch.nn.BatchNorm*d and F.batch_norm (torch==2.13.0)."""
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fastbn.torch as fbt  # noqa: E402  (after the skip)

F = torch.nn.functional
FORMATS = [torch.contiguous_format, torch.channels_last]


def _tensor(shape, dtype, seed, memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    t = (1.5 + 2.0 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    return t.contiguous(memory_format=memory_format) if t.dim() == 4 else t


@pytest.mark.parametrize("memory_format", FORMATS, ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_matches_torch(memory_format, dtype, training):
    shape = (6, 5, 7, 8)
    results = []
    for fn in (F.batch_norm, fbt.batch_norm):
        x = _tensor(shape, dtype, 0, memory_format).requires_grad_(True)
        w = _tensor((5,), dtype, 1).requires_grad_(True)
        b = _tensor((5,), dtype, 2).requires_grad_(True)
        rm, rv = torch.zeros(5, dtype=dtype), torch.ones(5, dtype=dtype) * 2
        y = fn(x, rm, rv, w, b, training, 0.2, 1e-3)
        y.backward(_tensor(shape, dtype, 3, memory_format))
        results.append((y, x.grad, w.grad, b.grad, rm, rv))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, **tol)
    y, dx = results[1][:2]
    assert y.is_contiguous(memory_format=memory_format), "output changed memory format"
    assert dx.is_contiguous(memory_format=memory_format), "gradient changed memory format"


def test_running_statistics_updated_in_the_tensors_own_memory():
    x = _tensor((8, 3, 4, 4), torch.float32, 0)
    rm, rv = torch.zeros(3), torch.ones(3)
    ptr = rm.data_ptr()
    fbt.batch_norm(x, rm, rv, training=True, momentum=0.5)
    assert rm.data_ptr() == ptr
    torch.testing.assert_close(rm, 0.5 * x.mean(dim=(0, 2, 3)))


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_on_the_functional_form(training):
    x = _tensor((4, 3, 2, 3), torch.float64, 0).requires_grad_(True)
    w = _tensor((3,), torch.float64, 1).requires_grad_(True)
    b = _tensor((3,), torch.float64, 2).requires_grad_(True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x_, w_, b_: fbt.batch_norm(x_, rm, rv, w_, b_, training, 0.0, 1e-5),
        (x, w, b), eps=1e-6, atol=1e-6)


def test_double_backward_raises_clearly():
    x = _tensor((4, 3, 5), torch.float64, 0).requires_grad_(True)
    y = fbt.batch_norm(x, None, None, training=True)
    (grad,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        grad.sum().backward()


class Net(torch.nn.Module):
    def __init__(self, bn2d=torch.nn.BatchNorm2d, bn1d=torch.nn.BatchNorm1d, momentum=0.1):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = bn2d(8, momentum=momentum)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = bn2d(8, momentum=momentum, affine=False)
        self.fc = torch.nn.Linear(8, 6)
        self.bn3 = bn1d(6, momentum=momentum)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(x.mean(dim=(2, 3))))


def _train(bn2d, bn1d, memory_format, momentum, steps=6):
    torch.manual_seed(0)
    net = Net(bn2d, bn1d, momentum).double().to(memory_format=memory_format)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(10, 3, 9, 9, generator=g, dtype=torch.float64)
        target = torch.randn(10, 6, generator=g, dtype=torch.float64)
        opt.zero_grad()
        loss = ((net(x.contiguous(memory_format=memory_format)) - target) ** 2).mean()
        loss.backward()
        opt.step()
    return net


@pytest.mark.parametrize("memory_format", FORMATS, ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_training_a_conv_net_matches_torch(memory_format, momentum, monkeypatch):
    ref = _train(torch.nn.BatchNorm2d, torch.nn.BatchNorm1d, memory_format, momentum)

    def no_fallback(*args, **kwargs):
        raise AssertionError("fastbn's modules fell back to torch's kernel")

    with monkeypatch.context() as patch:
        patch.setattr(F, "batch_norm", no_fallback)
        ours = _train(fbt.BatchNorm2d, fbt.BatchNorm1d, memory_format, momentum)
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert list(ref_state) == list(our_state)
    for key in ref_state:
        torch.testing.assert_close(our_state[key], ref_state[key], rtol=1e-7, atol=1e-9,
                                   msg=lambda m, k=key: f"{k}: {m}")
    assert int(our_state["bn1.num_batches_tracked"]) == 6
    ref.eval()
    ours.eval()
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64).contiguous(memory_format=memory_format)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-7, atol=1e-9)


def test_modules_keep_torch_constructor_and_state_dict():
    for cls, base, shape in ((fbt.BatchNorm1d, torch.nn.BatchNorm1d, (4, 3, 5)),
                             (fbt.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 5)),
                             (fbt.BatchNorm3d, torch.nn.BatchNorm3d, (4, 3, 2, 3, 2))):
        ours = cls(3, eps=1e-3, momentum=None, affine=False, track_running_stats=True)
        assert isinstance(ours, base)
        assert list(ours.state_dict()) == list(base(3, affine=False).state_dict())
        x = _tensor(shape, torch.float32, 0)
        ref = base(3, eps=1e-3, momentum=None, affine=False)
        torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(ours.running_var, ref.running_var)
    no_stats = fbt.BatchNorm2d(3, track_running_stats=False).eval()
    x = _tensor((4, 3, 5, 5), torch.float32, 1)
    torch.testing.assert_close(no_stats(x), torch.nn.BatchNorm2d(3, track_running_stats=False)
                               .eval()(x))


def test_convert_swaps_in_place_and_preserves_outputs():
    torch.manual_seed(0)
    net = Net().double()
    _ = net(torch.randn(6, 3, 9, 9, dtype=torch.float64))  # move running statistics
    net.eval()
    x = torch.randn(5, 3, 9, 9, dtype=torch.float64)
    before = net(x)
    weight = net.bn1.weight
    assert fbt.convert(net) is net
    assert type(net.bn1) is fbt.BatchNorm2d and type(net.bn3) is fbt.BatchNorm1d
    assert net.bn1.weight is weight
    torch.testing.assert_close(net(x), before, rtol=1e-12, atol=1e-12)


def test_unsupported_tensors_fall_back_to_torch(monkeypatch):
    """Tensors off the CPU (here on the meta device) run on PyTorch's kernel (documented)."""
    x = torch.empty((6, 3, 4, 4), device="meta")
    monkeypatch.setattr(fbt.api, "forward", None)  # fastbn's kernels must not run
    y = fbt.batch_norm(x, None, None, training=True)
    assert y.device.type == "meta" and y.shape == x.shape


def test_import_without_torch_says_how_to_install():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import fastbn.torch\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert 'pip install ".[torch]"' in out and "torch==2.13.0" in out


def test_functional_docstring_example():
    import doctest

    assert doctest.testmod(fbt).failed == 0


def test_no_copy_of_the_input(backend):
    """The kernels work on the tensors' own memory: a call on a 9.4 MB input allocates nothing
    of that size through NumPy (a NumPy copy of x, or of the output, would; the output tensor
    comes from PyTorch's allocator, which tracemalloc does not see), and its result is
    PyTorch's. On Cython the compiled call path serves it."""
    import tracemalloc

    from fastbn import _backends

    x = _tensor((64, 16, 48, 48), torch.float32, 0, torch.channels_last)
    kernels = _backends._import_cython()
    served = kernels.fast_path_calls() if kernels is not None else 0
    fbt.batch_norm(x, None, None, training=True)  # warm (plans, first-call imports)
    tracemalloc.start()
    try:
        y = fbt.batch_norm(x, None, None, training=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < x.numel() * x.element_size() // 8, peak
    ref = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
    torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=1e-5)
    if backend == "cython":
        assert kernels.fast_path_calls() - served == 2


from hypothesis import given, settings, strategies as st  # noqa: E402


@st.composite
def _awkward_inputs(draw):
    """A random rank-2..5 input: size-1 and zero-size axes, every memory format, strided
    views, huge offsets with a small spread."""
    ndim = draw(st.integers(2, 5))
    shape = [draw(st.integers(0 if i == 0 else 1, 4)) for i in range(ndim)]
    shape[1] = draw(st.integers(1, 5))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "permuted", "strided"]))
    loc = draw(st.sampled_from([0.0, 1e4]))
    seed = draw(st.integers(0, 2**16))
    return shape, layout, loc, seed


@settings(max_examples=40, deadline=None)
@given(case=_awkward_inputs(), training=st.booleans(), affine=st.booleans())
def test_awkward_inputs_match_torch(case, training, affine):
    shape, layout, loc, seed = case
    g = torch.Generator().manual_seed(seed)
    big = list(shape)
    if layout == "strided":
        big[-1] = 2 * big[-1]
    base = loc + torch.randn(big, generator=g, dtype=torch.float64)
    x = base[..., ::2] if layout == "strided" else base
    if layout == "channels_last" and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    elif layout == "permuted" and x.dim() >= 3:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    m = x.shape[0] * int(np.prod(x.shape[2:]))
    if training and m == 1:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            fbt.batch_norm(x, None, None, training=True)
        return
    C = x.shape[1]
    w = b = None
    if affine:
        w = torch.rand(C, dtype=torch.float64, generator=g) + 0.5
        b = torch.randn(C, dtype=torch.float64, generator=g)
    dy = torch.randn(x.shape, dtype=torch.float64, generator=g)
    results = []
    # torch's reference runs on a contiguous copy: its own CPU kernel gets some layouts wrong
    # (torch 2.13, eval backward of shape (1, 2, 1, 2) with strides (1, 1, 1, 2): dx permuted)
    for fn, xin in ((F.batch_norm, x.contiguous()), (fbt.batch_norm, x)):
        rm = torch.full((C,), loc, dtype=torch.float64)
        rv = torch.ones(C, dtype=torch.float64)
        xg = xin.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        y = fn(xg, rm, rv, w, b, training, 0.3, 1e-5)
        y.backward(dy)
        results.append((y, xg.grad, rm, rv))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-7,
                                   msg=lambda msg: f"{shape} {layout} {loc}: {msg}")


def test_eval_backward_with_ambiguous_strides_is_right():
    """Shape (1, 2, 1, 2) with strides (1, 1, 1, 2): torch 2.13's CPU kernel returns a permuted
    dx here (not imitated); fastbn's is dy * invstd, as the formula says."""
    x = torch.randn(2, 1, 1, 1, dtype=torch.float64).expand(2, 1, 1, 2).contiguous()
    x = x.reshape(1, 2, 1, 2).transpose(0, -1).contiguous().transpose(0, -1)
    assert x.stride() == (1, 1, 1, 2)
    x.requires_grad_(True)
    dy = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]], dtype=torch.float64)
    y = fbt.batch_norm(x, torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy / (1 + 1e-5) ** 0.5)


@pytest.mark.parametrize("param_dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_parameters_in_another_dtype_than_the_input(param_dtype, training, monkeypatch):
    """fastbn takes parameters and running statistics of any floating dtype (PyTorch's kernel
    wants the input's; fastbn.keras passes float64 statistics with float32 input)."""
    x = _tensor((6, 3, 5), torch.float32, 0).requires_grad_(True)
    w = (_tensor((3,), torch.float64, 1).abs() + 0.5).to(param_dtype).requires_grad_(True)
    rm, rv = torch.zeros(3, dtype=param_dtype), torch.full((3,), 2.0, dtype=param_dtype)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    rm64, rv64 = rm.double(), rv.double()
    expected = F.batch_norm(x64, rm64, rv64, w64, None, training, 0.25, 1e-5)
    expected.backward(torch.ones_like(expected))
    monkeypatch.setattr(F, "batch_norm", None)  # fastbn's kernels, not torch's
    y = fbt.batch_norm(x, rm, rv, w, None, training, 0.25, 1e-5)
    y.backward(torch.ones_like(y))
    assert y.dtype == x.grad.dtype == torch.float32 and w.grad.dtype == param_dtype
    torch.testing.assert_close(y, expected.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-4, atol=1e-4)
    half = param_dtype != torch.float64
    tol = dict(rtol=2e-2, atol=2e-2) if half else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, **tol)
    torch.testing.assert_close(rm.double(), rm64, **tol)
    torch.testing.assert_close(rv.double(), rv64, **tol)


@pytest.mark.parametrize("momentum", [0.1, None, 1.5], ids=["0.1", "cumulative", "1.5"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_running_statistics_with_and_without_autograd(momentum, grad):
    """Without anything to differentiate (torch.no_grad, inference) fastbn.torch skips the
    autograd node; the output and the running statistics are torch's either way, for a
    momentum fastbn applies in place, a cumulative average and one PyTorch applies itself."""
    x = _tensor((16, 5, 3), torch.float64, 0)
    ours, theirs = fbt.BatchNorm1d(5, momentum=momentum).double(), \
        torch.nn.BatchNorm1d(5, momentum=momentum).double()
    for step in range(3):
        outputs = []
        for module in (ours, theirs):
            module.train(step < 2)
            with torch.set_grad_enabled(grad):
                module.zero_grad()
                outputs.append(module(x + step))
                if grad:
                    outputs[-1].sum().backward()
        torch.testing.assert_close(outputs[0], outputs[1])
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        if grad:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
    assert ours.num_batches_tracked == theirs.num_batches_tracked == 2


def _layouts():
    """Inputs whose output layout PyTorch decides: transposed and permuted (dense, not
    channels-last: the output is contiguous), sliced, channels-last (2-D and 3-D)."""
    g = torch.Generator().manual_seed(11)
    nchw = torch.randn(4, 3, 6, 5, generator=g)
    return {
        "transposed NC": torch.randn(7, 4, generator=g).t(),
        "permuted dense NHCW": nchw.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3),
        "sliced height": nchw[:, :, ::2],
        "channels_last": nchw.contiguous(memory_format=torch.channels_last),
        "channels_last sliced": nchw.contiguous(memory_format=torch.channels_last)[:, :, ::2],
        "channels_last_3d": torch.randn(2, 3, 4, 5, 2, generator=g).contiguous(
            memory_format=torch.channels_last_3d),
    }


@pytest.mark.parametrize("name", list(_layouts()))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_output_strides_are_torchs(name, training, grad):
    """The output's memory format is the one PyTorch's kernel gives (what the input's strides
    suggest), not the input's own order: for a transposed or permuted input PyTorch's
    output is contiguous, and code that views it must work on fastbn's too."""
    x = _layouts()[name].requires_grad_(grad)
    C = x.shape[1]
    ours = {1: fbt.BatchNorm1d, 2: fbt.BatchNorm1d, 4: fbt.BatchNorm2d, 5: fbt.BatchNorm3d}
    theirs = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
              5: torch.nn.BatchNorm3d}
    m_ours, m_theirs = ours[x.dim()](C).train(training), theirs[x.dim()](C).train(training)
    y_ours, y_theirs = m_ours(x), m_theirs(x)
    assert y_ours.stride() == y_theirs.stride(), name
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    y_f = fbt.batch_norm(x, None if training else m_ours.running_mean,
                         None if training else m_ours.running_var, training=training)
    assert y_f.stride() == y_theirs.stride(), name
    if grad:
        dy = torch.randn_like(y_theirs)
        (dx_ours,), (dx_theirs,) = (torch.autograd.grad(y, x, dy) for y in (y_ours, y_theirs))
        assert dx_ours.stride() == dx_theirs.stride(), name
        torch.testing.assert_close(dx_ours, dx_theirs, rtol=1e-4, atol=1e-5)
