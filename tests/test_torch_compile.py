"""torch.compile and torch.export see through fastbn.torch: its kernels are custom operators
(fastbn::batch_norm, fastbn::batch_norm_backward, fastbn::update_running), so a model traces
whole (fullgraph=True: a graph break raises) and the compiled model matches eager."""
import shutil

import pytest

torch = pytest.importorskip("torch")
import fastbn.torch as fbt  # noqa: E402

F = torch.nn.functional


class _Net(torch.nn.Module):
    """Tiny on purpose: compiling costs seconds per graph on two cores."""

    def __init__(self, bn2d=fbt.BatchNorm2d, bn1d=fbt.BatchNorm1d):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = bn2d(4)
        self.fc = torch.nn.Linear(4, 3)
        self.bn1 = bn1d(3, momentum=None)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.bn1(self.fc(x.mean(dim=(2, 3))))


def _pair(memory_format):
    torch.manual_seed(0)
    ours = _Net().to(memory_format=memory_format)
    ref = _Net(torch.nn.BatchNorm2d, torch.nn.BatchNorm1d).to(memory_format=memory_format)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _steps(model, memory_format, steps=2):
    g = torch.Generator().manual_seed(1)
    outs = []
    for _ in range(steps):
        x = torch.randn(4, 3, 5, 5, generator=g).contiguous(memory_format=memory_format)
        model.zero_grad()
        y = model(x)
        (y * torch.arange(3.0)).sum().backward()
        outs.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
    return outs


def _compare(compiled_model, eager_model, got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for (key, a), b in zip(compiled_model.state_dict().items(),
                           eager_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("backend_name", ["eager", "aot_eager"])
def test_compile_fullgraph_matches_eager(backend_name, memory_format):
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.lookup_backend(backend_name)(gm, example_inputs)

    torch._dynamo.reset()
    ours, ref = _pair(memory_format)
    compiled = torch.compile(ours, fullgraph=True, backend=recording)
    _compare(ours, ref, _steps(compiled, memory_format), _steps(ref, memory_format))
    assert graphs and all("fastbn.batch_norm" in g for g in graphs), "fastbn's op not traced"
    assert all("aten.batch_norm" not in g and "F.batch_norm" not in g for g in graphs)
    ours.eval()
    ref.eval()
    x = torch.randn(3, 3, 5, 5).contiguous(memory_format=memory_format)
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-5)


def test_compile_fused_batchnorm_relu():
    """A fuse_relu'd model (fused BatchNormReLU, the relu flag through the operators)."""
    torch._dynamo.reset()
    ours, ref = _pair(torch.contiguous_format)
    fused = fbt.fuse_relu(ours)
    assert type(fused.get_submodule("bn")).__name__ == "BatchNormReLU2d"
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    _compare(fused, ref, _steps(compiled, torch.contiguous_format),
             _steps(ref, torch.contiguous_format))


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="inductor compiles C++ and no C++ compiler is installed")
def test_compile_inductor_matches_eager():
    torch._dynamo.reset()
    ours, ref = _pair(torch.channels_last)
    compiled = torch.compile(ours, fullgraph=True, backend="inductor")
    _compare(ours, ref, _steps(compiled, torch.channels_last),
             _steps(ref, torch.channels_last))
    assert int(ours.bn.num_batches_tracked) == 2


def test_export_in_eval_mode():
    torch.manual_seed(0)
    ours = _Net().eval()
    ref = _Net(torch.nn.BatchNorm2d, torch.nn.BatchNorm1d).eval()
    with torch.no_grad():
        for m in (ours, ref):
            torch.manual_seed(3)
            for t in (m.bn.running_mean, m.bn1.running_mean):
                t.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 5, 5)
    program = torch.export.export(ours, (x,), dynamic_shapes={"x": {0: torch.export.Dim("n")}})
    code = program.graph_module.code
    assert code.count("torch.ops.fastbn.batch_norm") == 2
    y = torch.randn(5, 3, 5, 5)
    torch.testing.assert_close(program.module()(y), ref(y))
