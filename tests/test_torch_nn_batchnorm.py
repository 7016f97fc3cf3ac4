"""The batchnorm tests of PyTorch's ``test/test_nn.py`` (CPU), with fastbn.torch's modules and
``batch_norm`` in place of torch's.

Checked against test_nn.py at pytorch/pytorch commit 74f2fa66. Each test below names the
test_nn.py test it follows; the assertions are those of test_nn.py, in our own code, with
``torch.nn.functional.batch_norm`` patched to raise where fastbn's kernels must run (so that a
silent fallback to torch's kernel fails the test).

test_nn.py test -> test here
----------------------------
TestNN
    test_batchnorm_nhwc_cpu -> test_nhwc_cpu (BatchNorm2d and 3d, channels_last(_3d), float32,
        bfloat16, float16, float32 parameters with half input; float64 added)
    test_batchnorm_half_overflow -> test_half_overflow (smaller tensors that still overflow a
        float16 sum of squares)
    test_batchnorm_non_contig_cpu[BatchNorm2d], [SyncBatchNorm] -> test_non_contig_cpu
        (fastbn.torch.BatchNorm2d and fastbn.torch.SyncBatchNorm)
    test_batchnorm_cudnn_nhwc, test_batchnorm_cudnn_half, test_batchnorm_nhwc_cuda -> not
        applicable: CUDA/cuDNN only
    test_batchnorm_nonaffine_cuda_half_input -> CUDA only; its assertion (half input, float32
        module without affine: half output, train and eval) is checked on the CPU in
        test_nonaffine_half_input
    test_batchnorm_raises_error_if_less_than_one_value_per_channel ->
        test_raises_error_if_less_than_one_value_per_channel
    test_batchnorm_raises_error_if_{running_mean,running_var,weight,bias}_is_not_same_size_as_input
        -> test_raises_error_if_argument_is_not_same_size_as_input[...]
    test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad ->
        test_raises_error_if_running_stats_have_forward_grad (forward-mode AD runs on torch's
        kernel: a documented fallback)
    test_batchnorm_buffer_update_when_stats_are_not_tracked ->
        test_buffer_update_when_stats_are_not_tracked
    test_batchnorm_{2D,3D}_{train,inference}_NCHW_vs_{cpu,native}[_mixed]_{dtype}
        (parametrized test_batchnorm) -> not applicable: CUDA only (cuDNN/MIOpen against the
        CPU or native CUDA kernel)
    test_batchnorm_load_state_dict -> test_load_state_dict (meta-device part included)
    test_batch_norm_update_stats -> not applicable: tests the ATen operator
        ``torch.batch_norm_update_stats``, which fastbn does not provide (fastbn leaves the
        running statistics untouched on an empty batch: test_BatchNorm_empty)
    test_state_dict (its BatchNorm2d entries) -> test_state_dict_entries
    test_convert_sync_batchnorm -> CUDA only in test_nn.py; the same assertions on the CPU
        with fastbn.torch.convert_sync_batchnorm in test_convert_sync_batchnorm
    test_sync_batchnorm_backward_elemt, test_sync_batchnorm_accuracy_cuda -> not applicable:
        CUDA only, and they test ATen operators (torch.batch_norm_backward_elemt,
        torch.batch_norm_stats) that fastbn does not provide
TestNNDeviceType (CPU instantiation)
    test_BatchNorm_empty (float64 input, float32 module) -> test_BatchNorm_empty (1d and 3d
        added)
    test_batchnorm_grad (_test_batchnorm_grad) -> test_grad (gradcheck) and test_gradgrad
        (gradgradcheck: xfail, fastbn's backward cannot be differentiated, documented)
    test_batchnorm_eval (_test_batchnorm_eval) -> test_eval
    test_batchnorm_eval_mixed -> CUDA only; the CPU analogue (bfloat16/float16 input,
        float32 module) is in test_eval's parameters
    test_batchnorm_affine (_test_batchnorm_affine) -> test_affine
    test_batchnorm_affine_mixed -> CUDA only; CPU analogue in test_affine's parameters
    test_batchnorm_simple_average (_test_batchnorm_simple_average) -> test_simple_average
    test_batchnorm_simple_average_mixed -> CUDA only; CPU analogue in test_simple_average's
        parameters
    test_batchnorm_update_stats (_test_batchnorm_update_stats) -> test_update_stats
    test_batchnorm_large_batch -> CUDA only (a CUDA grid limit); the same shape is run on the
        CPU against torch in test_large_batch
TestFusionEval
    test_fuse_module_eval_numerics -> test_fuse_module_eval_numerics
TestFusionUtils
    test_fuse_conv_bn_requires_grad, test_fuse_linear_bn_requires_grad ->
        test_fuse_bn_weights_requires_grad

The BatchNorm cases that test_nn.py generates from ``common_nn``'s module tests are defined
outside test_nn.py; test_torch_module_db.py runs PyTorch's module_db samples for the three
modules. Where test_nn.py also checks double backward (gradgradcheck), fastbn's backward
cannot be differentiated (documented): test_gradgrad records it.
"""
import itertools
from collections import OrderedDict

import pytest

torch = pytest.importorskip("torch")
import torch.autograd.forward_ad as fwAD  # noqa: E402

import fastbn.torch as fbt  # noqa: E402

nn = torch.nn
F = torch.nn.functional
REDUCED = (torch.bfloat16, torch.float16)


def _no_torch_kernel(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("fastbn.torch fell back to torch's kernel")

    monkeypatch.setattr(F, "batch_norm", refuse)


def _close_to(actual, expected, dtype, roundings=1):
    """Results in a reduced-precision ``dtype`` against a float64 computation on the same
    values: within ``roundings`` units of ``dtype``'s precision at the tensor's scale (an
    element-wise relative tolerance means nothing next to the zeros of a normalized tensor)."""
    expected = expected.detach().double()
    scale = max(float(expected.abs().max()), 1e-30)
    torch.testing.assert_close(actual.detach().double(), expected, rtol=0,
                               atol=roundings * torch.finfo(dtype).eps * scale)


# --- TestNN ------------------------------------------------------------------------------------

_NHWC_CASES = [
    (fbt.BatchNorm2d, nn.BatchNorm2d, torch.channels_last, shape)
    for shape in [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)]
] + [
    (fbt.BatchNorm3d, nn.BatchNorm3d, torch.channels_last_3d, shape)
    for shape in [(4, 8, 2, 10, 10), (4, 1, 2, 9, 9), (4, 9, 1, 1, 1)]
]
_NHWC_DTYPES = [(torch.float32, False), (torch.float64, False), (torch.bfloat16, False),
                (torch.bfloat16, True), (torch.float16, False), (torch.float16, True)]


def _run_bn(cls, channels, state, param_dtype, x, grad, fmt):
    """A fresh module of ``cls`` with ``state``, parameters in ``param_dtype``, run forward
    and backward on ``x`` and ``grad`` laid out as ``fmt``."""
    bn = cls(channels).to(param_dtype)
    bn.load_state_dict(state)
    x = x.detach().clone().contiguous(memory_format=fmt).requires_grad_(True)
    out = bn(x)
    out.backward(grad.detach().clone().contiguous(memory_format=fmt))
    return bn, x, out


@pytest.mark.parametrize("dtype,mixed", _NHWC_DTYPES,
                         ids=["f32", "f64", "bf16", "bf16-f32params", "f16", "f16-f32params"])
@pytest.mark.parametrize("ours,theirs,fmt,shape", _NHWC_CASES,
                         ids=[f"{c[1].__name__}-{'x'.join(map(str, c[3]))}" for c in _NHWC_CASES])
def test_nhwc_cpu(ours, theirs, fmt, shape, dtype, mixed, monkeypatch):
    """test_batchnorm_nhwc_cpu: channels_last input and gradient give a channels_last output,
    equal to torch's on contiguous memory (output, weight, bias and input gradients).

    float32/float64: against torch's module, test_nn.py's tolerances. Half-precision
    parameters: torch's kernel computes in the half dtype and is off by up to twice fastbn's
    error (fastbn accumulates in float32/float64), so both are held to a float64 computation
    on the same values, fastbn within one rounding and torch's within two of fastbn's result.
    """
    g = torch.Generator().manual_seed(0)
    channels = shape[1]
    x = torch.randn(shape, generator=g).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    init = theirs(channels)
    with torch.no_grad():
        init.weight.uniform_(generator=g)
        init.bias.uniform_(generator=g)
    param_dtype = torch.float32 if mixed else dtype
    state = init.to(param_dtype).state_dict()
    ref, ref_x, ref_out = _run_bn(theirs, channels, state, param_dtype, x, grad,
                                  torch.contiguous_format)
    exact = None
    if dtype in REDUCED:
        exact = _run_bn(theirs, channels, init.double().state_dict(), torch.float64,
                        x.double(), grad.double(), torch.contiguous_format)
    with monkeypatch.context() as patch:
        _no_torch_kernel(patch)
        bn, x, out = _run_bn(ours, channels, state, param_dtype, x, grad, fmt)
    assert out.is_contiguous(memory_format=fmt)
    assert x.grad.is_contiguous(memory_format=fmt)
    assert out.dtype == x.grad.dtype == dtype
    assert bn.weight.grad.dtype == param_dtype
    pairs = [(out, ref_out), (x.grad, ref_x.grad), (bn.weight.grad, ref.weight.grad),
             (bn.bias.grad, ref.bias.grad), (bn.running_mean, ref.running_mean),
             (bn.running_var, ref.running_var)]
    if exact is None:
        # test_nn.py's tolerance for BatchNorm3d's float32 weight gradient
        wtol = 1e-4 if theirs is nn.BatchNorm3d and dtype == torch.float32 else None
        for i, (mine, theirs_) in enumerate(pairs):
            tol = dict(atol=wtol, rtol=wtol) if i == 2 and wtol else {}
            torch.testing.assert_close(mine, theirs_, **tol)
        return
    exact_bn, exact_x, exact_out = exact
    exacts = [exact_out, exact_x.grad, exact_bn.weight.grad, exact_bn.bias.grad,
              exact_bn.running_mean, exact_bn.running_var]
    for (mine, theirs_), truth in zip(pairs, exacts):
        rounding = mine.dtype if mine.dtype in REDUCED else dtype
        _close_to(mine, truth, rounding)
        _close_to(theirs_, mine, rounding, roundings=2)


_OVERFLOW_2D = (fbt.BatchNorm2d, nn.BatchNorm2d, (2, 2, 192, 192),
                [torch.contiguous_format, torch.channels_last])
_OVERFLOW_3D = (fbt.BatchNorm3d, nn.BatchNorm3d, (2, 2, 9, 64, 64),
                [torch.contiguous_format, torch.channels_last_3d])
_OVERFLOW_CASES = (
    [(case, torch.float16, fmt, fmt) for case in (_OVERFLOW_2D, _OVERFLOW_3D) for fmt in case[3]]
    + [(case, torch.float32, a, b) for case in (_OVERFLOW_2D, _OVERFLOW_3D)
       for a, b in itertools.product(case[3], repeat=2)])


@pytest.mark.parametrize(
    "case,param_dtype,fwd_format,bwd_format", _OVERFLOW_CASES,
    ids=[f"{c[1].__name__}-{str(p)[6:]}-{str(a)[6:]}-{str(b)[6:]}"
         for c, p, a, b in _OVERFLOW_CASES])
def test_half_overflow(case, param_dtype, fwd_format, bwd_format, monkeypatch):
    """test_batchnorm_half_overflow: float16 input whose per-feature sum of squares (and, for
    the gradient, sum of dy) overflows float16 gives finite results equal to a float32 module's
    (torch's) result; float16 parameters forward only, float32 parameters also backward with
    the gradient in either memory format."""
    ours, theirs, shape, _ = case
    channels = shape[1]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).half().contiguous(memory_format=fwd_format)
    per_feature = x.float().transpose(0, 1).reshape(channels, -1)
    assert (per_feature.square().sum(1) > torch.finfo(torch.float16).max).all()  # would overflow
    ref = theirs(channels).float()
    ref_x = x.detach().clone().requires_grad_(True)
    ref_out = ref(ref_x)
    grad = torch.rand(shape, generator=g).half().contiguous(memory_format=bwd_format)
    if param_dtype != torch.float16:
        ref_out.backward(grad.clone())
    bn = ours(channels).to(param_dtype)
    x.requires_grad_(True)
    _no_torch_kernel(monkeypatch)
    out = bn(x)
    assert not out.isinf().any() and not out.isnan().any()
    # torch's float32 computation rounds to float16 as fastbn's does: one rounding apart at most
    _close_to(out, ref_out, torch.float16)
    if param_dtype != torch.float16:
        out.backward(grad)
        assert not x.grad.isinf().any() and not x.grad.isnan().any()
        _close_to(x.grad, ref_x.grad, torch.float16, roundings=2)
        # sums over float16 data: a float16 rounding at their scale
        _close_to(bn.weight.grad, ref.weight.grad, torch.float16)
        _close_to(bn.bias.grad, ref.bias.grad, torch.float16)


@pytest.mark.parametrize("bn_module", [fbt.BatchNorm2d, fbt.SyncBatchNorm],
                         ids=["BatchNorm2d", "SyncBatchNorm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_non_contig_cpu(bn_module, dtype, monkeypatch):
    """test_batchnorm_non_contig_cpu: a permuted input (1, 2, 3, 1) normalizes in eval as its
    contiguous copy does in torch's BatchNorm2d, and the output is channels_last;
    half-precision permuted input with a float32 module agrees with the float32 computation."""
    g = torch.Generator().manual_seed(2)
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    bn = bn_module(2).float().eval()
    with torch.no_grad():
        bn.weight.uniform_(generator=g)
        bn.bias.uniform_(generator=g)
    ref_bn = nn.BatchNorm2d(2).float().eval()
    ref_bn.load_state_dict(bn.state_dict())
    ref_out = ref_bn(x.detach().clone().contiguous())
    x_half = torch.arange(24, dtype=dtype).reshape(1, 3, 2, 4).permute(0, 2, 1, 3)
    bn_mix = bn_module(2).float().eval()
    ref_mix = nn.BatchNorm2d(2).float().eval()
    ref_mix.load_state_dict(bn_mix.state_dict())
    ref_out_half = ref_mix(x_half.float())
    _no_torch_kernel(monkeypatch)
    out = bn(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref_out)
    out_half = bn_mix(x_half)
    assert out_half.dtype == dtype
    torch.testing.assert_close(out_half.float(), ref_out_half, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_nonaffine_half_input(dtype, monkeypatch):
    """test_batchnorm_nonaffine_cuda_half_input, on the CPU: half-precision input with a
    float32 module without affine parameters gives output in the input's dtype, in training
    and in eval."""
    x = torch.randn(16, 3, 24, 24, generator=torch.Generator().manual_seed(3)).to(dtype)
    ref = nn.BatchNorm2d(3, affine=False).float()
    ref_train = ref(x)
    ref_eval = ref.eval()(x)
    m = fbt.BatchNorm2d(3, affine=False).float()  # keeps its running statistics in float32
    _no_torch_kernel(monkeypatch)
    out = m(x)
    assert out.dtype == dtype
    _close_to(out, ref_train, dtype, roundings=2)
    m.eval()
    out = m(x)
    assert out.dtype == dtype
    _close_to(out, ref_eval, dtype, roundings=2)


@pytest.mark.parametrize("which", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_raises_error_if_argument_is_not_same_size_as_input(which, training):
    """test_batchnorm_raises_error_if_{running_mean,running_var,weight,bias}_is_not_same_size_
    as_input (test_nn.py: eval; training added)."""
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


def test_raises_error_if_running_stats_have_forward_grad():
    """test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad: with
    forward-mode AD (eval, momentum -1.2), a tangent on a running statistic raises when the
    input has one too; otherwise the call runs. Forward-mode AD runs on torch's kernel (a
    documented fallback): this checks that the fallback keeps torch's behaviour."""
    args = (torch.randn(3, 2, 5), torch.randn(2), torch.randn(2))
    for dual_indices in ((0,), (1,), (1, 2), (0, 1), (0, 1, 2)):
        tangents = [torch.rand_like(a) for a in args]
        with fwAD.dual_level():
            duals = [fwAD.make_dual(a, t) if i in dual_indices else a
                     for i, (a, t) in enumerate(zip(args, tangents))]
            if 0 in dual_indices and (1 in dual_indices or 2 in dual_indices):
                with pytest.raises(RuntimeError, match="batch_norm is not differentiable wrt "
                                                       "running_mean and running_var"):
                    fbt.batch_norm(*duals, training=False, momentum=-1.2)
            else:
                out = fbt.batch_norm(*duals, training=False, momentum=-1.2)
                expected = F.batch_norm(*duals, training=False, momentum=-1.2)
                torch.testing.assert_close(fwAD.unpack_dual(out).primal,  # NaN where the
                                           fwAD.unpack_dual(expected).primal,  # variance < 0
                                           equal_nan=True)


def test_buffer_update_when_stats_are_not_tracked(monkeypatch):
    """test_batchnorm_buffer_update_when_stats_are_not_tracked"""
    bn = fbt.BatchNorm1d(4, track_running_stats=True)
    bn.track_running_stats = False  # buffers used to normalize (eval) but never updated
    num_batches = bn.num_batches_tracked.clone()
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    _no_torch_kernel(monkeypatch)
    bn(torch.rand(32, 4))
    assert torch.equal(num_batches, bn.num_batches_tracked)
    assert torch.equal(running_mean, bn.running_mean)
    assert torch.equal(running_var, bn.running_var)


def test_load_state_dict():
    """test_batchnorm_load_state_dict"""
    bn = fbt.BatchNorm2d(3)
    assert bn.state_dict()["num_batches_tracked"] == torch.tensor(0)
    bn.num_batches_tracked = torch.tensor(10)
    assert bn.state_dict()["num_batches_tracked"] == torch.tensor(10)
    empty = OrderedDict()
    bn.load_state_dict(empty, strict=False)  # missing keys keep their values
    assert bn.state_dict()["num_batches_tracked"] == torch.tensor(10)
    # a module built on the meta device gets a real 0 for num_batches_tracked when the loaded
    # state lacks it (assign=True)
    with torch.device("meta"):
        meta_bn = fbt.BatchNorm2d(3)
    assert meta_bn.num_batches_tracked.device == torch.device("meta")
    meta_bn.load_state_dict(empty, assign=True, strict=False)
    assert meta_bn.state_dict()["num_batches_tracked"] == torch.tensor(0)
    bn = fbt.BatchNorm2d(3, track_running_stats=False)
    assert "num_batches_tracked" not in bn.state_dict()


def test_state_dict_entries():
    """test_state_dict, its BatchNorm2d part: the five entries, sharing the module's memory."""
    net = nn.Module()
    net.bn = fbt.BatchNorm2d(2)
    state = net.state_dict()
    assert "bn" in state._metadata
    assert set(state) == {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                          "bn.num_batches_tracked"}
    for key, value in state.items():
        assert value.data_ptr() == getattr(net.bn, key.split(".")[1]).data_ptr()


def test_convert_sync_batchnorm():
    """test_convert_sync_batchnorm (CUDA only in test_nn.py), on the CPU with
    fastbn.torch.convert_sync_batchnorm: BatchNorm1d becomes a SyncBatchNorm, InstanceNorm1d
    stays, and every state entry keeps its device and value."""
    module = nn.Sequential(fbt.BatchNorm1d(100), nn.InstanceNorm1d(100))
    with torch.no_grad():
        module[0].running_mean.uniform_(-1, 1)
        module[0].weight.uniform_(0.5, 1.5)
    comp_module = nn.Sequential(fbt.BatchNorm1d(100), nn.InstanceNorm1d(100))
    comp_module.load_state_dict(module.state_dict())
    sync_bn_module = fbt.convert_sync_batchnorm(module)
    children = list(sync_bn_module.children())
    assert children[0].__class__ is fbt.SyncBatchNorm
    assert children[1].__class__ is nn.InstanceNorm1d
    for layer, converted in zip(comp_module.children(), sync_bn_module.children()):
        for key in layer.state_dict():
            assert layer.state_dict()[key].device == converted.state_dict()[key].device
            assert torch.equal(layer.state_dict()[key], converted.state_dict()[key])


# --- TestNNDeviceType (CPU) -----------------------------------------------------------------------

_CLS = {2: fbt.BatchNorm1d, 3: fbt.BatchNorm1d, 4: fbt.BatchNorm2d}
# test_nn.py's CPU dtype (float32); float64, and (as its CUDA-only *_mixed tests) half input
# with a float32 module, added
_EVAL_DTYPES = [(torch.float, torch.float), (torch.double, torch.double),
                (torch.bfloat16, torch.float), (torch.float16, torch.float),
                (torch.bfloat16, torch.bfloat16)]
_EVAL_IDS = ["f32", "f64", "bf16-f32module", "f16-f32module", "bf16"]


def _grad_args(training):
    bs, n_feat, size_feat = 4, 5, 6
    dtype = torch.double
    x = torch.arange(bs * n_feat * size_feat, dtype=dtype).view(bs, n_feat, size_feat)
    weight = torch.arange(1, n_feat + 1, dtype=dtype, requires_grad=True)
    bias = torch.arange(n_feat, dtype=dtype, requires_grad=True)
    running_mean = 1 - torch.arange(n_feat, dtype=dtype)
    running_var = 2 * torch.arange(n_feat, dtype=dtype)

    def fn(inp, w, b):
        return fbt.batch_norm(inp, running_mean.clone(), running_var.clone(), w, b, training,
                              0.1, 0.0001)
    return x, weight, bias, fn


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_grad(training):
    """test_batchnorm_grad (_test_batchnorm_grad): gradcheck through F.batch_norm's form with
    running statistics, eps 1e-4; a non-contiguous input added."""
    x, weight, bias, fn = _grad_args(training)
    for inp in (x, x.transpose(0, 2).contiguous().transpose(0, 2)):
        inp = inp.detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(fn, (inp, weight, bias), check_batched_grad=True)


@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="fastbn's batch_norm backward cannot be differentiated (double "
                          "backward raises, documented); test_nn.py's _assertGradAndGrad"
                          "gradChecks also runs gradgradcheck")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradgrad(training):
    """test_batchnorm_grad, its gradgradcheck half."""
    x, weight, bias, fn = _grad_args(training)
    torch.autograd.gradgradcheck(fn, (x.detach().clone().requires_grad_(True), weight, bias))


@pytest.mark.parametrize("ndim", [2, 3, 4])
@pytest.mark.parametrize("dtype,module_dtype", _EVAL_DTYPES, ids=_EVAL_IDS)
def test_eval(ndim, dtype, module_dtype, monkeypatch):
    """test_batchnorm_eval (_test_batchnorm_eval; ndim 2 and 3 with BatchNorm1d, 4 with
    BatchNorm2d added): in eval two identical calls give the same output and gradient; a
    module without running statistics gives in eval what it gave in training."""
    _no_torch_kernel(monkeypatch)
    module = _CLS[ndim](3).to(module_dtype)
    module.eval()
    data = torch.rand([3] * ndim, dtype=dtype, requires_grad=True)
    grad = torch.rand([3] * ndim, dtype=dtype)
    res1 = module(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    data.grad.zero_()
    res2 = module(data)
    res2.backward(grad)
    assert torch.equal(res1, res2) and torch.equal(grad1, data.grad)

    module = fbt.BatchNorm1d(3, track_running_stats=False).to(module_dtype)
    data = torch.rand(4, 3, dtype=dtype, requires_grad=True)
    grad = torch.rand(4, 3, dtype=dtype)
    res1 = module(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    module.eval()
    data.grad.zero_()
    res2 = module(data)
    res2.backward(grad)
    assert torch.equal(res1, res2) and torch.equal(grad1, data.grad)


@pytest.mark.parametrize("ndim", [2, 3, 4])
@pytest.mark.parametrize("dtype,module_dtype", _EVAL_DTYPES, ids=_EVAL_IDS)
def test_affine(ndim, dtype, module_dtype, monkeypatch):
    """test_batchnorm_affine (_test_batchnorm_affine): affine=False equals weight 1, bias 0,
    in output and input gradient."""
    _no_torch_kernel(monkeypatch)
    module = _CLS[ndim](3, affine=False).to(module_dtype)
    module_affine = _CLS[ndim](3, affine=True).to(module_dtype)
    with torch.no_grad():
        module_affine.weight.fill_(1.0)
        module_affine.bias.zero_()
    data = torch.rand([3] * ndim, dtype=dtype, requires_grad=True)
    grad = torch.ones_like(data)
    res1 = module_affine(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    data.grad.zero_()
    res2 = module(data)
    res2.backward(grad)
    torch.testing.assert_close(res1, res2)
    torch.testing.assert_close(grad1, data.grad)


@pytest.mark.parametrize("dtype,module_dtype", _EVAL_DTYPES, ids=_EVAL_IDS)
def test_simple_average(dtype, module_dtype, monkeypatch):
    """test_batchnorm_simple_average (_test_batchnorm_simple_average): with momentum=None the
    running statistics after two batches are the average of those each batch gives alone,
    and the outputs do not depend on the running statistics."""
    _no_torch_kernel(monkeypatch)
    module = fbt.BatchNorm1d(3, momentum=None).to(dtype=module_dtype)
    zeros = torch.zeros(3, dtype=module_dtype)
    ones = torch.ones(3, dtype=module_dtype)
    torch.testing.assert_close(module.running_mean, zeros)
    torch.testing.assert_close(module.running_var, ones)
    data1 = torch.rand(4, 3, dtype=dtype)
    data2 = torch.rand(4, 3, dtype=dtype)
    results, stats = [], []
    for data in (data1, data2):  # each batch alone
        results.append(module(data))
        stats.append((module.running_mean.clone(), module.running_var.clone()))
        assert not torch.equal(stats[-1][0], zeros) and not torch.equal(stats[-1][1], ones)
        module.reset_running_stats()
        torch.testing.assert_close(module.running_mean, zeros)
        torch.testing.assert_close(module.running_var, ones)
    res3, res4 = module(data1), module(data2)  # both, one after the other
    torch.testing.assert_close(res3, results[0])
    torch.testing.assert_close(res4, results[1])
    torch.testing.assert_close(module.running_mean, (stats[0][0] + stats[1][0]) / 2)
    torch.testing.assert_close(module.running_var, (stats[0][1] + stats[1][1]) / 2)


def test_update_stats(monkeypatch):
    """test_batchnorm_update_stats (_test_batchnorm_update_stats): training updates the
    running statistics and num_batches_tracked, eval leaves all three alone."""
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


@pytest.mark.parametrize("cls,shape,dtype", [(fbt.BatchNorm2d, (0, 3, 2, 2), torch.double),
                                             (fbt.BatchNorm1d, (0, 3, 9), torch.float),
                                             (fbt.BatchNorm3d, (0, 3, 2, 2, 2), torch.float)],
                         ids=["2d-f64-input-f32-module", "1d", "3d"])
def test_BatchNorm_empty(cls, shape, dtype, monkeypatch):
    """test_BatchNorm_empty (_test_module_empty_input; test_nn.py: BatchNorm2d, float64 input,
    float32 module): an empty batch gives an empty output of the input's shape, zero
    gradients, and untouched running statistics."""
    _no_torch_kernel(monkeypatch)
    mod = cls(3)
    inp = torch.randn(shape, dtype=dtype, requires_grad=True)
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


def test_large_batch(monkeypatch):
    """test_batchnorm_large_batch's shape (880801, 1, 1, 1) (CUDA only in test_nn.py, where it
    exercises a grid limit), forward and backward on the CPU: fastbn against a float64
    computation, and torch's float32 result against fastbn's. torch's float32 sum of the
    880801 normalized values (the weight gradient, exactly 0) comes out near 15, which moves
    its input gradient by ~1e-4; the tolerance for torch is relative to the sum's terms."""
    data = torch.rand(880801, 1, 1, 1, generator=torch.Generator().manual_seed(4))
    results = {}
    for name, cls, dtype in (("torch", nn.BatchNorm2d, torch.float32),
                             ("exact", nn.BatchNorm2d, torch.float64),
                             ("fastbn", fbt.BatchNorm2d, torch.float32)):
        bn = cls(1).to(dtype)
        x = data.detach().clone().to(dtype).requires_grad_(True)
        with monkeypatch.context() as patch:
            if name == "fastbn":
                _no_torch_kernel(patch)
            out = bn(x)
            out.sum().backward()
        results[name] = [out, x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean,
                         bn.running_var]
    for i, (mine, exact, theirs) in enumerate(zip(results["fastbn"], results["exact"],
                                                  results["torch"])):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine.double(), exact, rtol=1e-5, atol=1e-5)
        atol = 1e-4 * data.numel() if i == 2 else 1e-3
        torch.testing.assert_close(theirs, mine, rtol=1e-3, atol=atol)


# --- TestFusionEval, TestFusionUtils -----------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fuse_module_eval_numerics(seed, monkeypatch):
    """test_fuse_module_eval_numerics (test_nn.py draws its data with hypothesis): conv then
    fastbn's BatchNorm2d in eval equals the conv that fuse_conv_bn_eval folds them into, with
    and without affine parameters."""
    torch.manual_seed(seed)
    inputs = torch.randn(5, 3, 5, 5, dtype=torch.double)
    conv = nn.Conv2d(3, 6, kernel_size=(3, 3), bias=True).double().eval()
    running_mean = torch.randn(6, dtype=torch.double)
    running_var = torch.rand(6, dtype=torch.double) + 0.1
    for affine in (True, False):
        bn = fbt.BatchNorm2d(6, affine=affine).double()
        bn.running_mean = running_mean.clone()
        bn.running_var = running_var.clone()
        bn.eval()
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
        with monkeypatch.context() as patch:
            _no_torch_kernel(patch)
            expected = bn(conv(inputs))
        torch.testing.assert_close(fused(inputs), expected)


def test_fuse_bn_weights_requires_grad():
    """test_fuse_conv_bn_requires_grad, test_fuse_linear_bn_requires_grad: folding fastbn's
    BatchNorm into a conv or linear layer keeps the layer's requires_grad flags."""
    conv, bn2 = nn.Conv2d(3, 3, 3), fbt.BatchNorm2d(3)
    linear, bn1 = nn.Linear(3, 3), fbt.BatchNorm1d(3)
    for w_rg, b_rg in itertools.product([True, False], repeat=2):
        for layer, bn, fuse in ((conv, bn2, torch.nn.utils.fusion.fuse_conv_bn_weights),
                                (linear, bn1, torch.nn.utils.fusion.fuse_linear_bn_weights)):
            layer.weight.requires_grad = w_rg
            layer.bias.requires_grad = b_rg
            weight, bias = fuse(layer.weight, layer.bias, bn.running_mean, bn.running_var,
                                bn.eps, bn.weight, bn.bias)
            assert weight.requires_grad == w_rg
            assert bias.requires_grad == b_rg


# --- beyond test_nn.py ----------------------------------------------------------------------------

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


@pytest.mark.parametrize("channels", [3, 4])
def test_wrong_channel_count_names_what_pytorch_names(channels):
    """A module of 3 features given another number of channels: PyTorch checks the running
    statistics first, then weight and bias; the message names the same tensor."""
    x = torch.randn(4, channels + 1, 2, 2)
    messages = []
    for m in (nn.BatchNorm2d(channels), fbt.BatchNorm2d(channels),
              nn.BatchNorm2d(channels, track_running_stats=False),
              fbt.BatchNorm2d(channels, track_running_stats=False)):
        with pytest.raises(RuntimeError) as info:
            m(x)
        messages.append(str(info.value))
    assert messages[0] == messages[1] and messages[2] == messages[3], messages


@pytest.mark.parametrize("momentum", [None, "0.1"])
def test_functional_momentum_of_the_wrong_type_raises_pytorchs_error(momentum):
    x = torch.randn(4, 3)
    errors = []
    for fn in (F.batch_norm, fbt.batch_norm):
        with pytest.raises(TypeError) as info:
            fn(x, torch.zeros(3), torch.ones(3), training=True, momentum=momentum)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
