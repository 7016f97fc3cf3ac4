"""One rank of a torch.distributed gloo group, started by test_distributed.py as
``python tests/gloo_worker.py RANK WORLD_SIZE INIT_FILE``: fastbn.torch.SyncBatchNorm against
batch norm on the concatenated batch, DistributedDataParallel on the CPU against
single-process training, and a bad input on one rank. Exits nonzero on any failure; the
collectives time out instead of hanging."""
import datetime
import sys
import traceback

import numpy as np
import torch
import torch.distributed as dist

import fastbn.torch as fbt
from fastbn.distributed import RemoteInputError

RANK, SIZE = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)  # several ranks share few cores: no spinning thread teams


def slices(n, empty_rank):
    sizes = [0 if r == empty_rank else r + 1 for r in range(SIZE)]
    sizes[-1 if empty_rank != SIZE - 1 else 0] += n - sum(sizes)
    edges = np.concatenate([[0], np.cumsum(sizes)])
    return [slice(int(edges[r]), int(edges[r + 1])) for r in range(SIZE)]


def same_everywhere(*tensors):
    mine = b"".join(t.detach().numpy().tobytes() for t in tensors)
    theirs = [None] * SIZE
    dist.all_gather_object(theirs, mine)
    assert all(t == mine for t in theirs), "statistics differ between ranks"


def check_layer(shape, dtype, loc, scale, memory_format, empty_rank):
    what = f"rank {RANK}: {shape} {dtype} {memory_format} empty={empty_rank}"
    gen = torch.Generator().manual_seed(11)
    x = (loc + scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    C = shape[1]
    ref = torch.nn.BatchNorm1d(C, dtype=torch.float64, momentum=None)
    sync = fbt.SyncBatchNorm(C, dtype=dtype, momentum=None)
    weight, bias = 1 + 0.5 * torch.randn(C, generator=gen), 0.3 * torch.randn(C, generator=gen)
    with torch.no_grad():
        for layer in (ref, sync):
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    s = slices(shape[0], empty_rank)[RANK]
    for _ in range(2):  # two steps: the cumulative running average too
        x64 = x.to(torch.float64).flatten(2) if x.dim() > 2 else x.to(torch.float64)
        xr = x64.clone().requires_grad_(True)
        y_ref = ref(xr)
        y_ref.backward(dy.to(torch.float64).reshape(y_ref.shape))
        xs = x[s].contiguous(memory_format=memory_format).requires_grad_(True)
        y = sync(xs)
        y.backward(dy[s].contiguous(memory_format=memory_format))
        if memory_format == torch.channels_last:
            assert y.is_contiguous(memory_format=torch.channels_last), what
        y_tol, rel = (1e-12, 1e-12) if dtype == torch.float64 else (1e-5, 1e-4)
        y_ref_s = y_ref.detach().reshape(x.shape)[s]
        dx_ref = xr.grad.reshape(x.shape)
        if y.numel():
            err = (y.detach().double() - y_ref_s).abs().max()
            assert err <= y_tol, f"{what}: {err}"
            assert ((xs.grad.double() - dx_ref[s]).abs().max()
                    <= rel * dx_ref.abs().max()), what
        for mine, theirs in ((sync.weight.grad, ref.weight.grad),
                             (sync.bias.grad, ref.bias.grad)):
            total = mine.double().clone()
            dist.all_reduce(total)  # the shares add up
            assert (total - theirs).abs().max() <= rel * theirs.abs().max() + 1e-12, what
            mine.zero_()
            theirs.zero_()
        same_everywhere(sync.running_mean, sync.running_var)
        assert torch.allclose(sync.running_mean.double(), ref.running_mean, rtol=1e-6), what
        assert torch.allclose(sync.running_var.double(), ref.running_var, rtol=1e-5), what
    assert int(sync.num_batches_tracked) == 2
    assert sorted(sync.state_dict()) == sorted(torch.nn.SyncBatchNorm(C).state_dict())


def make_net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 2)).double()


def check_fused_relu_layer(empty_rank):
    """SyncBatchNormReLU: relu(batch norm) of the whole batch (output, running statistics,
    input and parameter gradients), one rank's slice each, one of them empty."""
    gen = torch.Generator().manual_seed(5)
    x = 0.3 + torch.randn(10, 3, 4, generator=gen, dtype=torch.float64)
    dy = torch.randn(10, 3, 4, generator=gen, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    sync = fbt.SyncBatchNormReLU(3, dtype=torch.float64)
    with torch.no_grad():
        for layer in (ref, sync):
            layer.weight.copy_(torch.tensor([1.5, -0.5, 1.0]))
            layer.bias.copy_(torch.tensor([0.2, 0.1, -0.3]))
    xr = x.clone().requires_grad_(True)
    y_ref = torch.relu(ref(xr))
    y_ref.backward(dy)
    s = slices(10, empty_rank)[RANK]
    xs = x[s].clone().requires_grad_(True)
    y = sync(xs)
    y.backward(dy[s])
    what = f"rank {RANK}: SyncBatchNormReLU empty={empty_rank}"
    assert torch.allclose(y, y_ref.detach()[s], rtol=1e-12, atol=1e-12), what
    assert torch.allclose(xs.grad, xr.grad[s], rtol=1e-10, atol=1e-12), what
    for name in ("running_mean", "running_var"):
        assert torch.allclose(getattr(sync, name), getattr(ref, name), rtol=1e-12), name
    grads = torch.stack([sync.weight.grad, sync.bias.grad])
    dist.all_reduce(grads)  # each rank holds its share
    assert torch.allclose(grads[0], ref.weight.grad, rtol=1e-10, atol=1e-12), what
    assert torch.allclose(grads[1], ref.bias.grad, rtol=1e-10, atol=1e-12), what


def check_ddp_training():
    """DDP with fastbn's SyncBatchNorm on the CPU, uneven slices, a few SGD steps: the same
    parameters as one process training on the whole batch with torch's BatchNorm2d."""
    whole = make_net(0)
    net = fbt.convert_sync_batchnorm(make_net(0))
    assert type(net[1]) is fbt.SyncBatchNorm
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    opt_whole = torch.optim.SGD(whole.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    n = 12
    for step in range(3):
        x = torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64)
        target = torch.randn(n, 2, generator=gen, dtype=torch.float64)
        s = slices(n, None)[RANK]
        opt_whole.zero_grad()
        ((whole(x) - target) ** 2).sum().div(n).backward()
        opt_whole.step()
        opt.zero_grad()
        # DDP averages gradients over ranks: scale so that the average is the whole loss's
        ((ddp(x[s]) - target[s]) ** 2).sum().mul(SIZE / n).backward()
        opt.step()
    for (name, p), q in zip(net.named_parameters(), whole.parameters()):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-11), f"rank {RANK}: {name}"
    for name, buf in net.named_buffers():
        ref = dict(whole.named_buffers())[name]
        assert torch.allclose(buf.double(), ref.double(), rtol=1e-9, atol=1e-11), name


def check_bad_input_raises_everywhere():
    bn = fbt.SyncBatchNorm(3)
    x = torch.randn(4, 3, 2, 2)
    if RANK == 1:
        x = x.to(torch.bfloat16)  # unsupported on rank 1 only
    try:
        bn(x)
    except RemoteInputError as exc:
        assert RANK != 1 and "[1]" in str(exc)
    except TypeError as exc:
        assert RANK == 1 and "float32 or float64" in str(exc)
    else:
        raise AssertionError("no error")
    assert not bn.running_mean.any()


def check_layers_that_disagree_raise_everywhere():
    """Layers of other num_features on the ranks (different models): all_gather of vectors of
    other lengths would abort the processes (gloo); every rank raises instead, once."""
    bn = fbt.SyncBatchNorm(3 + RANK)
    try:
        bn(torch.randn(4, 3 + RANK, 2))
    except ValueError as exc:
        assert "disagree on num_features (3, 4, 5" in str(exc), str(exc)
    else:
        raise AssertionError("no error")
    assert not bn.running_mean.any() and int(bn.num_batches_tracked) == 1


def check_wrong_channel_count_raises_pytorchs_error():
    """Every rank feeds 4 channels to layers of 3: PyTorch's words, on every rank."""
    bn = fbt.SyncBatchNorm(3)
    try:
        bn(torch.randn(4, 4, 2))
    except RuntimeError as exc:
        assert "running_mean should contain 4 elements not 3" in str(exc), str(exc)
    else:
        raise AssertionError("no error")


def check_single_process_group():
    solo = dist.new_group([0])  # every rank creates it; rank 0 uses it
    if RANK == 0:
        bn = fbt.SyncBatchNorm(3, process_group=solo)
        ref = torch.nn.BatchNorm2d(3)
        x = torch.randn(5, 3, 4, 4)
        assert torch.allclose(bn(x), ref(x), atol=1e-5)
        assert torch.allclose(bn.running_var, ref.running_var, atol=1e-6)


def main():
    dist.init_process_group("gloo", init_method=f"file://{sys.argv[3]}", rank=RANK,
                            world_size=SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        cases = [(torch.float64, 0.5, 2.0, None), (torch.float32, 1e4, 0.1, 1)]
        for shape in ((10, 4, 5, 6), (10, 6), (10, 3, 7)):
            for dtype, loc, scale, empty_rank in cases:  # empty: rank 1 has no samples
                check_layer(shape, dtype, loc, scale, torch.contiguous_format, empty_rank)
        for dtype, loc, scale, empty_rank in cases:
            check_layer((10, 4, 5, 6), dtype, loc, scale, torch.channels_last, empty_rank)
        for empty_rank in (None, 1):
            check_fused_relu_layer(empty_rank)
        check_ddp_training()
        check_bad_input_raises_everywhere()
        check_layers_that_disagree_raise_everywhere()
        check_wrong_channel_count_raises_pytorchs_error()
        check_single_process_group()
        dist.barrier()
    except BaseException:  # noqa: BLE001 - report, then exit nonzero
        traceback.print_exc()
        sys.stderr.flush()
        sys.exit(1)
    dist.destroy_process_group()
    print(f"rank {RANK} of {SIZE}: ok", flush=True)


if __name__ == "__main__":
    main()
