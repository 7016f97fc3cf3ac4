"""fuse_relu: every BatchNorm whose output feeds only a ReLU runs as one fused BatchNormReLU.

Two rewrites, both sharing the BatchNorm's parameters and buffers (the same tensor objects,
so an optimizer built before keeps working, and state_dict keys do not change):

- in a ``torch.nn.Sequential``, a BatchNorm followed by a ``torch.nn.ReLU`` becomes the fused
  module, and the ReLU an ``Identity``, in place;
- a module that calls its children in forward code (a ResNet block) is traced with
  ``torch.fx``; a BatchNorm node whose only user is a ReLU (module, ``F.relu``,
  ``torch.relu``, ``Tensor.relu``, in place or not) calls the fused module instead and the ReLU
  node goes. The module becomes a ``torch.fx.GraphModule`` (its forward is the traced graph).

A module fx cannot trace (data-dependent control flow) is searched child by child instead;
BatchNorms called directly by such a module stay unfused, with a warning naming the module.
"""
import copy
import warnings

import torch
import torch.fx

F = torch.nn.functional

_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu, F.relu_)
_RELU_METHODS = ("relu", "relu_")


def fuse_relu(model, batchnorm_types, fused_for):
    """See :func:`fastbn.torch.fuse_relu`. ``batchnorm_types``: the exact classes fused;
    ``fused_for(bn)``: the fused module sharing ``bn``'s parameters and buffers."""
    fuser = _Fuser(tuple(batchnorm_types), fused_for)
    return fuser.fuse(model, "")


class _LeafTracer(torch.fx.Tracer):
    """fx's tracer, with BatchNorms (fastbn's included) kept as calls of their module."""

    def __init__(self, leaves=()):
        # leaves may be left out: torch.load rebuilds a traced module's tracer class with
        # no arguments (a pickled fused model); it traces nothing then
        super().__init__()
        self._leaves = tuple(leaves)

    def is_leaf_module(self, m, qualname):
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)


class _Fuser:
    def __init__(self, batchnorm_types, fused_for):
        self.types = batchnorm_types
        self.fused_for = fused_for
        self.fused_classes = None

    def _is_bn(self, module):
        return type(module) in self.types

    def fuse(self, module, path):
        if self._is_bn(module) or not any(True for _ in module.children()):
            return module
        if isinstance(module, torch.nn.Sequential):
            self._fuse_sequential(module)
            for name, child in list(module.named_children()):
                setattr(module, name, self.fuse(child, _join(path, name)))
            return module
        try:
            graph_module = self._trace(module)
        except Exception as exc:  # fx raises many kinds (TraceError, TypeError, ...)
            return self._fuse_children(module, path, exc)
        return graph_module if self._fuse_graph(graph_module) else module

    def _fuse_children(self, module, path, exc):
        direct = [name for name, child in module.named_children() if self._is_bn(child)]
        if direct:
            warnings.warn(f"fastbn.torch.fuse_relu: {path or 'the model'} "
                          f"({type(module).__name__}) cannot be traced by torch.fx "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                          f"; its BatchNorm children {direct} stay unfused", stacklevel=4)
        for name, child in list(module.named_children()):
            setattr(module, name, self.fuse(child, _join(path, name)))
        return module

    def _fuse_sequential(self, seq):
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            bn, relu = seq._modules[first], seq._modules[second]
            if self._is_bn(bn) and type(relu) is torch.nn.ReLU:
                seq._modules[first] = self.fused_for(bn)
                seq._modules[second] = torch.nn.Identity()

    def _trace(self, module):
        tracer = _LeafTracer(self.types + self._fused_types())
        graph = tracer.trace(module)
        return torch.fx.GraphModule(tracer.root, graph, type(module).__name__)

    def _fused_types(self):
        if self.fused_classes is None:
            from . import torch as fbt

            self.fused_classes = (fbt.BatchNormReLU1d, fbt.BatchNormReLU2d, fbt.BatchNormReLU3d)
        return self.fused_classes

    def _fuse_graph(self, gm):
        """Rewrite BatchNorm -> ReLU pairs of the traced graph; True if any was fused."""
        modules = dict(gm.named_modules())
        sites = {}
        for node in gm.graph.nodes:
            if node.op == "call_module" and self._is_bn(modules[node.target]):
                sites.setdefault(node.target, []).append(node)
        fused_any = False
        for target, nodes in sites.items():
            relus = [self._only_relu_user(node, modules) for node in nodes]
            # A BatchNorm called at several places is fused only where every call feeds a
            # ReLU: its module (and state_dict key) is then replaced, not duplicated.
            if any(r is None for r in relus):
                continue
            _set_submodule(gm, target, self.fused_for(modules[target]))
            for node, relu in zip(nodes, relus):
                relu.replace_all_uses_with(node)
                gm.graph.erase_node(relu)
            fused_any = True
        if fused_any:
            gm.delete_all_unused_submodules()  # the ReLU modules no node calls any more
            gm.graph.lint()
            gm.recompile()
        return fused_any

    @staticmethod
    def _only_relu_user(node, modules):
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        if user.args[:1] != (node,) or len(user.args) > 1 and user.op != "call_function":
            return None
        if user.op == "call_module" and type(modules.get(user.target)) is torch.nn.ReLU:
            return user
        if user.op == "call_function" and user.target in _RELU_FUNCTIONS:
            extra = list(user.args[1:]) + [v for k, v in user.kwargs.items() if k != "inplace"]
            return user if all(isinstance(v, bool) for v in extra) else None
        if user.op == "call_method" and user.target in _RELU_METHODS and len(user.args) == 1:
            return user
        return None


def _join(path, name):
    return f"{path}.{name}" if path else name


def _set_submodule(root, target, module):
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, module)


def share_state(bn, cls):
    """A ``cls`` module that is ``bn`` with another forward: the same parameter and buffer
    tensors, hooks and train/eval state (its own dicts, so that neither module's later
    reassignments affect the other)."""
    fused = copy.copy(bn)
    fused.__class__ = cls
    for attr in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        setattr(fused, attr, copy.copy(getattr(bn, attr)))
    return fused
