"""fastbn.torch's eager calls on the compiled call path (``fast_torch_forward`` and
``fast_torch_backward`` in ``_cy_call.pxi``): which calls it serves, that they match PyTorch's
modules (outputs, gradients, running statistics), and that the autograd node it makes behaves
as PyTorch's own (in-place use of the output, version checks of the saved tensors, gradients
of any strides, several Python threads at once)."""
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fastbn.torch as fbt  # noqa: E402
from fastbn import _backends  # noqa: E402


def _served():
    kernels = _backends._import_cython()
    return kernels.fast_path_calls() if kernels is not None else 0


def _pair(cls, C, **kwargs):
    """A torch module and fastbn's, same parameters (not all ones and zeros) and buffers."""
    ref = getattr(torch.nn, cls)(C, **kwargs).double()
    fast = getattr(fbt, cls)(C, **kwargs).double()
    gen = torch.Generator().manual_seed(C)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
            ref.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        if ref.running_mean is not None:
            ref.running_mean.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
            ref.running_var.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


CASES = [("BatchNorm1d", (32, 48), None), ("BatchNorm1d", (16, 12, 7), None),
         ("BatchNorm2d", (6, 8, 5, 5), None), ("BatchNorm2d", (6, 8, 5, 5), torch.channels_last),
         ("BatchNorm3d", (3, 4, 3, 4, 5), None),
         ("BatchNorm3d", (3, 4, 3, 4, 5), torch.channels_last_3d)]


@pytest.mark.parametrize("cls,shape,fmt", CASES,
                         ids=[f"{c}-{len(s)}d{'-channels_last' if f else ''}"
                              for c, s, f in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("affine,track,momentum",
                         [(True, True, 0.1), (False, True, None), (True, False, 0.3)],
                         ids=["affine", "no-affine-cumulative", "no-running-stats"])
def test_training_and_eval_match_torch_and_are_served(backend, cls, shape, fmt, dtype, affine,
                                                     track, momentum):
    ref, fast = _pair(cls, shape[1], affine=affine, track_running_stats=track,
                      momentum=momentum)
    ref, fast = ref.to(dtype), fast.to(dtype)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 3 + 100  # a large mean
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for step in range(2):  # twice: running statistics and num_batches_tracked move on
        outs = []
        for module in (ref, fast):
            xi = x.clone().requires_grad_()
            before = _served()
            y = module(xi)
            grads = torch.autograd.grad(y, (xi,) + tuple(module.parameters()), dy)
            outs.append((y, grads, _served() - before))
        (y_ref, g_ref, _), (y_fast, g_fast, served) = outs
        assert served == (2 if backend == "cython" else 0)  # forward and backward
        assert y_fast.stride() == y_ref.stride()  # the input's memory format
        torch.testing.assert_close(y_fast, y_ref, **tol)
        for a, b in zip(g_fast, g_ref):
            torch.testing.assert_close(a, b, **tol)
        for name, buf in ref.named_buffers():
            torch.testing.assert_close(dict(fast.named_buffers())[name], buf, **tol)
    ref.eval(), fast.eval()
    with torch.no_grad():
        before = _served()
        y_fast = fast(x)
        assert _served() - before == (1 if backend == "cython" else 0)
        torch.testing.assert_close(y_fast, ref(x), **tol)


def test_fused_relu_is_served_and_matches(backend):
    ref = torch.nn.Sequential(torch.nn.BatchNorm2d(5), torch.nn.ReLU()).double()
    fast = fbt.BatchNormReLU2d(5).double()
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 5, 6, 6, dtype=torch.float64)
    before = _served()
    y = fast(x)
    g = torch.autograd.grad(y, (x, fast.weight, fast.bias), dy)
    assert _served() - before == (2 if backend == "cython" else 0)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = ref(x_ref)
    g_ref = torch.autograd.grad(y_ref, (x_ref, ref[0].weight, ref[0].bias), dy)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_output_may_change_in_place():
    """relu(bn(x), inplace=True), as in torchvision's ResNets: the output is an ordinary
    output of the node, not a view a custom Function made (which PyTorch forbids changing)."""
    bn = fbt.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = torch.nn.functional.relu(bn(x), inplace=True)
    y.sum().backward()
    ref = torch.nn.BatchNorm2d(3)
    x_ref = x.detach().clone().requires_grad_()
    torch.nn.functional.relu(ref(x_ref), inplace=True).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad)


@pytest.mark.parametrize("change", ["input", "weight"])
def test_changing_a_saved_tensor_before_backward_raises_as_torch(change):
    """The node saves x, weight and bias as PyTorch's does: changing one in place between
    forward and backward (an optimizer step, say) raises PyTorch's error, not wrong grads."""
    for module in (torch.nn.BatchNorm1d(4), fbt.BatchNorm1d(4)):
        x = torch.randn(8, 4, requires_grad=True)
        h = x * 1.0
        y = module(h)
        with torch.no_grad():
            (h if change == "input" else module.weight).add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_gradients_of_other_strides():
    """y.sum().backward() hands the node an expanded gradient (stride 0), which the call path
    does not take: the Python path computes it, same result as torch."""
    for shape in [(16, 6), (4, 6, 3, 3)]:
        ref, fast = _pair("BatchNorm1d" if len(shape) == 2 else "BatchNorm2d", 6)
        x = torch.randn(shape, dtype=torch.float64)
        grads = []
        for module in (ref, fast):
            xi = x.clone().requires_grad_()
            (module(xi) * 2.0).sum().backward()  # dy: an expanded scalar times 2
            grads.append((xi.grad, module.weight.grad, module.bias.grad))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)


def test_grad_of_weight_only_and_no_grad_inputs(backend):
    bn = fbt.BatchNorm1d(5).double()
    x = torch.randn(10, 5, dtype=torch.float64)  # x needs no gradient, the parameters do
    (dw,) = torch.autograd.grad(bn(x).pow(2).sum(), (bn.weight,))
    ref = torch.nn.BatchNorm1d(5).double()
    (dw_ref,) = torch.autograd.grad(ref(x).pow(2).sum(), (ref.weight,))
    torch.testing.assert_close(dw, dw_ref)
    bn.weight.requires_grad_(False), bn.bias.requires_grad_(False)
    y = bn(x)  # nothing to differentiate: no autograd node
    assert y.grad_fn is None and not y.requires_grad


def test_several_python_threads_at_once(backend):
    """Modules stepped from four threads at once (the call path lends one scratch block to one
    call at a time) give what each gives alone."""
    def run(seed, results):
        gen = torch.Generator().manual_seed(seed)
        bn = fbt.BatchNorm1d(96 + seed)
        out = []
        for _ in range(30):  # 25-30 KB: the kernels run without the GIL, so calls overlap
            x = torch.randn(64 + seed, 96 + seed, generator=gen, requires_grad=True)
            y = bn(x)
            (dx,) = torch.autograd.grad(y, (x,), torch.ones_like(y) * seed)
            out.append((y.detach().numpy().copy(), dx.numpy().copy()))
        results[seed] = (out, bn.running_mean.numpy().copy(), bn.running_var.numpy().copy())

    alone, together = {}, {}
    for seed in range(4):
        run(seed, alone)
    threads = [threading.Thread(target=run, args=(seed, together)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for seed in range(4):
        (out_a, rm_a, rv_a), (out_t, rm_t, rv_t) = alone[seed], together[seed]
        np.testing.assert_array_equal(rm_a, rm_t)
        np.testing.assert_array_equal(rv_a, rv_t)
        for (ya, dxa), (yt, dxt) in zip(out_a, out_t):
            np.testing.assert_array_equal(ya, yt)
            np.testing.assert_array_equal(dxa, dxt)


@pytest.mark.parametrize("case", ["half", "momentum-above-one", "eps-zero-eval",
                                  "running-stats-in-another-dtype"])
def test_calls_it_does_not_take_run_on_the_python_path(backend, case):
    """What the call path does not serve (nothing written) runs as before, same result."""
    x = torch.randn(12, 6, dtype=torch.float16 if case == "half" else torch.float32)
    bn = fbt.BatchNorm1d(6, momentum=1.5 if case == "momentum-above-one" else 0.1,
                         eps=0.0 if case == "eps-zero-eval" else 1e-5)
    ref = torch.nn.BatchNorm1d(6, momentum=bn.momentum, eps=bn.eps)
    if case == "half":
        bn, ref = bn.half(), ref.half()
    if case == "running-stats-in-another-dtype":
        bn.running_mean = bn.running_mean.double()
        bn.running_var = bn.running_var.double()
    if case == "eps-zero-eval":
        bn.eval(), ref.eval()
    before = _served()
    y = bn(x)
    assert _served() == before
    if case == "running-stats-in-another-dtype":
        ref.running_mean, ref.running_var = ref.running_mean.double(), ref.running_var.double()
    tol = dict(rtol=2e-3, atol=2e-3) if case == "half" else {}
    if case == "running-stats-in-another-dtype":  # torch's kernel takes x's dtype only
        ref_y = torch.nn.functional.batch_norm(x, None, None, ref.weight, ref.bias, True)
    else:
        ref_y = ref(x)
    torch.testing.assert_close(y, ref_y, **tol)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_jit_trace_records_the_operators(backend, training, grad):
    """torch.jit.trace records fastbn's operators (the call path's output would be a constant
    of the trace): the traced model gives torch's outputs, running statistics and gradients on
    new inputs."""
    import warnings

    torch.manual_seed(0)
    fast = torch.nn.Sequential(torch.nn.Linear(4, 6), fbt.BatchNorm1d(6)).double()
    ref = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)).double()
    ref.load_state_dict(fast.state_dict())
    fast.train(training), ref.train(training)
    x = torch.randn(8, 4, dtype=torch.float64)
    with torch.set_grad_enabled(grad), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        traced = torch.jit.trace(fast, x, check_trace=not training)
    # fastbn's checks and branches warn nothing (PyTorch's own, in C++, are unseen too)
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)], \
        [str(w.message) for w in caught]
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced_ref = torch.jit.trace(ref, x, check_trace=not training)
    assert "fastbn::batch_norm" in str(traced.inlined_graph)
    x2 = torch.randn(8, 4, dtype=torch.float64)
    y, y_ref = traced(x2), traced_ref(x2)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(fast[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(fast[1].running_var, ref[1].running_var)
    g = torch.autograd.grad(y.square().sum(), fast[0].weight)
    g_ref = torch.autograd.grad(y_ref.square().sum(), ref[0].weight)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_matches_torch(backend, reentrant):
    """torch.utils.checkpoint recomputes the forward during backward (saved-tensor hooks, or a
    no-grad pass then a recompute): gradients and running statistics as PyTorch's BatchNorm."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(1)
    fast = torch.nn.Sequential(torch.nn.Linear(5, 7), fbt.BatchNorm1d(7), torch.nn.ReLU()).double()
    ref = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7),
                              torch.nn.ReLU()).double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    grads = []
    for model in (fast, ref):
        xi = x.detach().clone().requires_grad_()
        out = checkpoint(model, xi, use_reentrant=reentrant)
        out.square().sum().backward()
        grads.append((xi.grad, model[0].weight.grad, model[1].weight.grad, model[1].bias.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(fast[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(fast[1].running_var, ref[1].running_var)
    assert int(fast[1].num_batches_tracked) == int(ref[1].num_batches_tracked)
