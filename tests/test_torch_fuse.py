"""Fused BatchNorm+ReLU from PyTorch: BatchNormReLU1d/2d/3d and fuse_relu."""
import pytest

torch = pytest.importorskip("torch")
import fastbn.torch as fbt  # noqa: E402

nn = torch.nn
F = torch.nn.functional
FUSED = [(fbt.BatchNormReLU1d, nn.BatchNorm1d, (6, 4, 5)),
         (fbt.BatchNormReLU1d, nn.BatchNorm1d, (12, 4)),
         (fbt.BatchNormReLU2d, nn.BatchNorm2d, (4, 4, 5, 3)),
         (fbt.BatchNormReLU3d, nn.BatchNorm3d, (3, 4, 2, 3, 4))]


def _no_torch_kernel(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("fastbn.torch fell back to torch's kernel")

    monkeypatch.setattr(F, "batch_norm", refuse)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + [b for b in module.buffers() if b.dim() == 1]:
            t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
        for m in module.modules():
            norm = isinstance(m, nn.modules.batchnorm._NormBase)
            if norm and m.bias is not None:
                m.bias.sub_(1.0)  # both signs, so the ReLU cuts
    return module


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cls,base,shape", FUSED, ids=[f"{c.__name__}{s}" for c, _, s in FUSED])
def test_batchnormrelu_matches_relu_of_torch_batchnorm(cls, base, shape, dtype, training,
                                                       affine, monkeypatch):
    ref = _randomize(base(4, affine=affine).to(dtype)).train(training)
    ours = cls(4, affine=affine).to(dtype).train(training)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=dtype)
    dy = torch.randn(shape, generator=g, dtype=dtype)
    results = []
    for module, wrap in ((ref, torch.relu), (ours, lambda y: y)):
        xg = x.clone().requires_grad_(True)
        with monkeypatch.context() as patch:
            if module is ours:
                _no_torch_kernel(patch)
            y = wrap(module(xg))
            y.backward(dy)
        results.append([y, xg.grad] + [p.grad for p in module.parameters()]
                       + [b for b in module.buffers()])
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    for a, b in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(a, b, **tol)
    assert (results[1][0] >= 0).all()


def test_fused_backward_needs_no_stored_output(monkeypatch):
    """The autograd graph saves x, weight, bias, mean and invstd: the output y (or a mask) is
    not among them."""
    bn = _randomize(fbt.BatchNormReLU2d(3))
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = bn(x)
    saved = [t for t in _saved_tensors(y.grad_fn)]
    assert any(t.data_ptr() == x.data_ptr() for t in saved)
    assert all(t.data_ptr() != y.data_ptr() for t in saved)
    assert all(t.dtype != torch.bool for t in saved)


def _saved_tensors(fn):
    for name in dir(fn):
        if name.startswith("_saved_"):
            value = getattr(fn, name)
            values = value if isinstance(value, (tuple, list)) else [value]
            yield from (v for v in values if isinstance(v, torch.Tensor))
    ctx = getattr(fn, "saved_tensors", None)
    if ctx:
        yield from (t for t in ctx if t is not None)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, written out (torchvision is not a dependency)."""

    def __init__(self, c, functional_relu=False):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.functional_relu = functional_relu

    def forward(self, x):
        out = self.bn1(self.conv1(x))
        out = F.relu(out, inplace=True) if self.functional_relu else self.relu(out)
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.inner = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return torch.relu(self.bn(self.inner(x)))


class Net(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.block = BasicBlock(c)
        self.block_f = BasicBlock(c, functional_relu=True)
        self.head = nn.Linear(c, 2)

    def forward(self, x):
        x = self.block_f(self.block(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)).relu())


def _train_step(model, x, target):
    model.zero_grad()
    loss = ((model(x) - target) ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_fuse_relu_on_a_resnet_style_model(memory_format, monkeypatch):
    torch.manual_seed(0)
    ref = _randomize(Net()).to(memory_format=memory_format)
    model = _randomize(Net()).to(memory_format=memory_format)
    model.load_state_dict(ref.state_dict())
    params_before = dict(model.named_parameters())
    fused = fbt.fuse_relu(fbt.convert(model))
    assert list(fused.state_dict()) == list(ref.state_dict())
    for name, p in fused.named_parameters():  # shared, not copied
        assert p is params_before[name], name
    kinds = {name: type(m).__name__ for name, m in fused.named_modules()}
    # (the model is traced whole, so its Sequential's ReLU goes with its graph node)
    assert kinds["stem.1"] == "BatchNormReLU2d" and kinds.get("stem.2") in (None, "Identity")
    assert kinds["block.bn1"] == kinds["block_f.bn1"] == "BatchNormReLU2d"
    assert kinds["block.bn2"] == kinds["block_f.bn2"] == "BatchNorm2d"  # feeds the addition
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 6, 6, generator=g).contiguous(memory_format=memory_format)
    target = torch.randn(4, 2, generator=g)
    expected = _train_step(ref, x, target)
    with monkeypatch.context() as patch:
        _no_torch_kernel(patch)
        got = _train_step(fused, x, target)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for (key, a), b in zip(fused.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    fused.eval()
    ref.eval()
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)


def test_a_fused_traced_model_pickles_and_reloads():
    """fuse_relu traces models with torch.fx; torch.save / torch.load of the result rebuilds
    the tracer with no arguments, which fastbn's tracer once required."""
    import copy
    import io

    torch.manual_seed(0)
    fused = fbt.fuse_relu(_randomize(Net()))
    assert any(type(m).__name__ == "BatchNormReLU2d" for m in fused.modules())
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    for copied in (reloaded, copy.deepcopy(fused)):
        copied.eval()
        fused.eval()
        torch.testing.assert_close(copied(x), fused(x), rtol=0, atol=0)
        fused_layers = [n for n, m in fused.named_modules() if isinstance(m, fbt.BatchNormReLU2d)]
        assert fused_layers and fused_layers == [
            n for n, m in copied.named_modules() if isinstance(m, fbt.BatchNormReLU2d)]


def test_untraceable_module_warns_and_keeps_its_batchnorm():
    model = nn.Sequential(Branchy(3), nn.Conv2d(3, 3, 1))
    with pytest.warns(UserWarning, match=r"0 \(Branchy\) cannot be traced.*\['bn'\]"):
        fused = fbt.fuse_relu(model)
    assert fused is model
    assert type(model[0].bn) is nn.BatchNorm2d  # stays unfused
    assert type(model[0].inner[1]).__name__ == "BatchNormReLU2d"  # its Sequential is fused
    x = torch.randn(2, 3, 4, 4)
    ref = Branchy(3)
    ref.load_state_dict(model[0].state_dict())
    torch.testing.assert_close(model[0](x), ref(x))


def test_batchnorm_shared_by_a_relu_and_another_user_stays_unfused():
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            y = self.bn(x)
            return torch.relu(y) + y

    model = TwoUses()
    assert fbt.fuse_relu(model) is model  # nothing to fuse: the module is returned as is
    assert type(model.bn) is nn.BatchNorm1d


def test_fused_repr_says_fastbn():
    assert "on fastbn" in repr(fbt.BatchNormReLU2d(3))
    assert "on fastbn" in repr(fbt.convert(nn.BatchNorm2d(3)))


def test_bench_training_step_with_fused_variant_runs():
    """The bench's ResNet-block step (time and peak memory) runs every variant, fused included
    (tiny sizes: the figures themselves come from python -m fastbn.bench)."""
    from fastbn import bench_train

    times = bench_train.train_step(batch=2, channels=4, size=6, samples=1)
    memory = bench_train.train_step_memory(batch=2, channels=4, size=6,
                                           memory_format="channels_last")
    names = ["torch BN", "fastbn BN", "fastbn BN+ReLU fused", "no BN"]
    assert list(times) == list(memory) == names
    assert all(t > 0 for t in times.values()) and all(m > 0 for m in memory.values())
    table = bench_train.format_train_step(times, "tiny", memory)
    assert "fastbn BN+ReLU fused" in table and "peak MiB" in table
