"""PyTorch's own test material for BatchNorm1d/2d/3d, run against fastbn.torch's modules.

The samples come from ``torch.testing._internal.common_modules.module_db`` (the inputs that
PyTorch's test_modules.py feeds its BatchNorm modules, error inputs included); each is run
through torch's module and fastbn's, built alike with the same state, and everything is
compared: outputs, input and parameter gradients, running statistics, num_batches_tracked,
in contiguous, channels-last and non-contiguous memory. F.batch_norm is patched to raise, so
fastbn's kernels ran wherever torch's test could see a difference.
"""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch.testing._internal needs it
import fastbn.torch as fbt  # noqa: E402
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

F = torch.nn.functional
SWAP = {torch.nn.BatchNorm1d: fbt.BatchNorm1d, torch.nn.BatchNorm2d: fbt.BatchNorm2d,
        torch.nn.BatchNorm3d: fbt.BatchNorm3d}
INFOS = [info for info in module_db if info.module_cls in SWAP]
IDS = [info.module_cls.__name__ for info in INFOS]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def test_module_db_has_the_three_batchnorms():
    assert sorted(IDS) == ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


def _samples(info, dtype, training, requires_grad=True):
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad,
                                   training=training)


def _pair(info, sample, dtype, training):
    """torch's module and fastbn's, same constructor arguments and state (running statistics
    moved off their initial values, so that eval mode tests them)."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    torch.manual_seed(0)
    ref = info.module_cls(*args, **kwargs).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
        if ref.running_mean is not None:
            ref.running_mean.uniform_(-1, 1)
            ref.running_var.uniform_(0.5, 2.0)
    ours = SWAP[info.module_cls](*args, **kwargs).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref.train(training), ours.train(training)


def _no_torch_kernel(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("fastbn.torch fell back to torch's kernel")

    monkeypatch.setattr(F, "batch_norm", refuse)


def _layout(t, how):
    if how == "channels_last" and t.dim() in (4, 5):
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt)
    if how == "non_contiguous":
        # test_modules.py's recipe: every other element of a tensor twice as long
        return torch.repeat_interleave(t, 2, dim=-1)[..., ::2]
    return t


def _run(module, x, dy, how):
    x = _layout(x.detach().clone(), how).requires_grad_(True)
    y = module(x)
    y.backward(_layout(dy, how))
    grads = [p.grad for p in module.parameters()]
    return y, x.grad, grads, [b.clone() for b in module.buffers()]


@pytest.mark.parametrize("how", ["contiguous", "channels_last", "non_contiguous"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_samples_match_torch(info, dtype, training, how, monkeypatch):
    for sample in _samples(info, dtype, training):
        ref, ours = _pair(info, sample, dtype, training)
        if how == "non_contiguous":
            for module in (ref, ours):  # parameters and buffers too, as test_modules.py does
                for t in list(module.parameters()) + list(module.buffers()):
                    if t.dim() == 1:
                        t.data = torch.repeat_interleave(t.data, 2)[::2]
        x = sample.forward_input.args[0]
        dy = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
        expected = _run(ref, x, dy, how)
        with monkeypatch.context() as patch:
            _no_torch_kernel(patch)
            got = _run(ours, x, dy, how)
        name = f"{info.module_cls.__name__} {sample.desc} {how}"
        for what, a, b in (("y", got[0], expected[0]), ("dx", got[1], expected[1])):
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, w=what: f"{name} {w}: {m}")
        for what, a_list, b_list in (("parameter grad", got[2], expected[2]),
                                     ("buffer", got[3], expected[3])):
            for a, b in zip(a_list, b_list, strict=True):
                torch.testing.assert_close(a, b, **TOL[dtype],
                                           msg=lambda m, w=what: f"{name} {w}: {m}")
        if how == "channels_last" and x.dim() in (4, 5):
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            assert got[0].is_contiguous(memory_format=fmt), f"{name}: y lost channels_last"
            assert got[1].is_contiguous(memory_format=fmt), f"{name}: dx lost channels_last"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_gradcheck_with_batched_gradients(info, training, monkeypatch):
    """test_modules.py's test_grad: gradcheck of input and parameter gradients, with the
    vmap-batched gradients that torch's gradcheck wrapper asks for (which run the backward
    written in torch operations: counted)."""
    import fastbn._torch_ops as ops

    batched = []
    real = ops.backward_in_torch
    monkeypatch.setattr(ops, "backward_in_torch", lambda *a: batched.append(1) or real(*a))
    for sample in _samples(info, torch.float64, training):
        _, ours = _pair(info, sample, torch.float64, training)
        x = sample.forward_input.args[0]
        params = tuple(ours.parameters())
        names = [n for n, _ in ours.named_parameters()]

        def fn(x_, *ps, ours=ours, names=names):
            return torch.func.functional_call(ours, dict(zip(names, ps)), (x_,))

        assert torch.autograd.gradcheck(fn, (x, *params), check_batched_grad=True,
                                        fast_mode=True), sample.desc
    assert batched, "the batched-gradient check did not reach the vmap-able backward"


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_error_inputs(info):
    for error in info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                               requires_grad=False, training=True):
        sample = error.module_error_input
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error.error_type, match=error.error_regex):
                SWAP[info.module_cls](*args, **kwargs)
            continue
        module = SWAP[info.module_cls](*args, **kwargs)
        with pytest.raises(error.error_type, match=error.error_regex):
            module(*sample.forward_input.args, **sample.forward_input.kwargs)


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_train_and_eval_differ_as_in_torch(info):
    """module_db marks BatchNorm train_and_eval_differ: eval mode normalizes with the running
    statistics and changes no buffer; training mode updates them as torch does."""
    for sample in _samples(info, torch.float64, False, requires_grad=False):
        ref, ours = _pair(info, sample, torch.float64, False)
        x = sample.forward_input.args[0]
        before = [b.clone() for b in ours.buffers()]
        torch.testing.assert_close(ours(x), ref(x))
        for a, b in zip(ours.buffers(), before, strict=True):
            assert torch.equal(a, b), f"{sample.desc}: eval changed a buffer"
        torch.testing.assert_close(ours.train()(x), ref.train()(x))
        for a, b in zip(ours.buffers(), ref.buffers(), strict=True):
            torch.testing.assert_close(a, b)


# --- transforms: forward-mode AD and vmap run torch's kernel (documented); vmap over the
# gradients of a fastbn forward uses the backward written in torch operations

def _bn_args(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, dtype=dtype, generator=g)
    w, b = torch.rand(3, dtype=dtype, generator=g) + 0.5, torch.randn(3, dtype=dtype, generator=g)
    return x, w, b


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jvp_and_dual_tensors_match_torch(training):
    x, w, b = _bn_args()
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    t = torch.randn_like(x)
    ours = torch.func.jvp(lambda x_: fbt.batch_norm(x_, rm.clone(), rv.clone(), w, b, training),
                          (x,), (t,))
    ref = torch.func.jvp(lambda x_: F.batch_norm(x_, rm.clone(), rv.clone(), w, b, training),
                         (x,), (t,))
    torch.testing.assert_close(ours, ref)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        y = fbt.batch_norm(fwAD.make_dual(x, t), rm.clone(), rv.clone(), w, b, training)
        torch.testing.assert_close(fwAD.unpack_dual(y).tangent, ref[1])


def test_running_statistics_with_forward_grad_raise_as_in_torch():
    """test_nn.py's test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad."""
    import torch.autograd.forward_ad as fwAD

    args = (torch.randn(3, 2, 5), torch.randn(2), torch.randn(2), torch.randn(2), torch.randn(2))
    for dual_indices in ((0,), (1,), (1, 2), (0, 1), (0, 1, 2)):
        tangents = tuple(torch.rand_like(a) for a in args)
        with fwAD.dual_level():
            duals = [fwAD.make_dual(a, t) if i in dual_indices else a
                     for i, (a, t) in enumerate(zip(args, tangents))]
            if (1 in dual_indices or 2 in dual_indices) and 0 in dual_indices:
                with pytest.raises(RuntimeError, match="batch_norm is not differentiable wrt "
                                                       "running_mean and running_var"):
                    fbt.batch_norm(*duals, training=False, momentum=-1.2)
            else:
                fbt.batch_norm(*duals, training=False, momentum=-1.2)


def test_vmap_forward_and_vmap_over_gradients(monkeypatch):
    x, w, b = _bn_args()
    xs = torch.stack([x, 2 * x + 1])
    torch.testing.assert_close(
        torch.func.vmap(lambda x_: fbt.batch_norm(x_, None, None, w, b, True))(xs),
        torch.func.vmap(lambda x_: F.batch_norm(x_, None, None, w, b, True))(xs))
    results = []
    for fn in (F.batch_norm, fbt.batch_norm):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = fn(xg, None, None, wg, b, True)
        vs = torch.randn((3,) + y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(5))
        results.append(torch.func.vmap(
            lambda v: torch.autograd.grad(y, (xg, wg), v, retain_graph=True))(vs))
    torch.testing.assert_close(results[1], results[0])


def test_double_backward_raises_documented():
    x, w, b = _bn_args()
    x.requires_grad_(True)
    y = fbt.batch_norm(x, None, None, w, b, True)
    (grad,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        grad.sum().backward()
