"""`fuse(model)`: swap the depthwise (→ BatchNorm) (→ activation) → pointwise (→ BatchNorm) (→ ReLU) chains of any
model for SeparableConvBN.

The chains are found in the model's dataflow (torch.fx), not guessed from module order: a chain is fused only when
each step's output feeds the next step alone. A ReLU module right before the depthwise conv joins as the prologue; a
BatchNorm2d and a ReLU, ReLU6, Hardswish or ELU module between the depthwise and pointwise convs as the mid
BatchNorm and mid activation (MobileNet's dw → BN → ReLU(6) → pw, with or without a depthwise bias). The fused
module takes the place of the depthwise conv and keeps the original layers (and so the same parameters) as children;
the other layers of the chain become nn.Identity. The model keeps its class and its forward code. nn.Identity layers
inside a chain are passed through (timm's aligned Xception, DeepLab's backbone, holds them where its SeparableConv2d
has no activations), and timm's BatchNormAct2d (a BatchNorm with its activation inside: timm's MobileNet,
EfficientNet-Lite and MNASNet blocks) counts as a BatchNorm followed by its activation.

A ReLU between a chain's BatchNorm and the next chain's depthwise conv, feeding it alone, becomes that next chain's
prologue rather than this chain's epilogue, and this chain hands its BatchNorm on (SeparableConvBN.defer_bn): the
next chain applies it as it reads, so the normalized tensor is never written (what the package's Xception does
between the separable convs of a module). With backend "cuda" or "triton", a BatchNorm that feeds an nn.MaxPool2d
alone is handed to the pool the same way (Xception's strided blocks, timm's legacy_xception among them), and on
every backend one that feeds an add alone goes to the add (MobileNet's inverted residuals, `x + self.conv(x)`: the
PendingBatchNorm runs scale_shift with the residual in one pass). The value between them passes the nn.Identity layers as a
PendingBatchNorm; a forward hook on one of those sees that instead of a tensor.

The model is traced in training and in eval mode, and a chain is taken as far as both agree (a dropout or drop-path
that runs in training only ends it there). Layers with hooks (torch.nn.utils' spectral_norm, weight_norm and prune
among them: the fused module never calls their forward) and modules registered under two names are left alone.
Models that torch.fx cannot trace fall back to chains of consecutive children of nn.Sequential containers.

Every nn.MaxPool2d becomes an xception_ops.pooling.MaxPool2d on the same backend (pools=False keeps them): the same
values and gradients, from the package's pooling kernels where the backend has them (one byte of argmax per output,
a gathered backward). PyTorch's channels-last pooling ran ~8x slower than its bytes on an H100.
"""

from __future__ import annotations

import collections
import copy
import operator
import warnings
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn

from .nn import (SeparableConvBN, batch_norm_problem, batch_norms_problem, depthwise_problem, hooks_problem,
                 is_batch_norm_act, is_same_padding_conv, pointwise_problem)
from .pooling import MaxPool2d


@dataclass
class Chain:
    """One fusable chain, by the qualified names of its modules in the model."""
    depthwise: str
    pointwise: str
    batch_norm: str | None = None
    pre_relu: str | None = None
    mid_batch_norm: str | None = None
    mid_activation: str | None = None  # module name of the mid activation
    post_relu: str | None = None
    pool: str | None = None  # an nn.MaxPool2d that the chain's BatchNorm (no ReLU after it) feeds alone
    residual_add: bool = False  # the chain's BatchNorm (no ReLU after it) feeds a tensor add alone

    def names(self) -> list[str]:
        """The modules the fused one replaces (not the pool, which stays)."""
        return [n for n in (self.pre_relu, self.depthwise, self.mid_batch_norm, self.mid_activation, self.pointwise,
                            self.batch_norm, self.post_relu) if n is not None]


def _is_depthwise(m: nn.Module) -> bool:
    return depthwise_problem(m) is None


def _is_pointwise(m: nn.Module, channels: int) -> bool:
    return pointwise_problem(m, channels) is None


def _is_bn(m: nn.Module, channels: int) -> bool:
    """A BatchNorm the fused op can take (nn.batch_norm_problem), or timm's BatchNormAct2d whose activation fuse()
    then moves into the chain."""
    if is_batch_norm_act(m):
        return m.num_features == channels
    return batch_norm_problem(m, channels, "") is None


def _bn_act(bn: nn.Module) -> nn.Module | None:
    """The activation inside a BatchNormAct2d (None for a plain BatchNorm2d or an identity act)."""
    act = getattr(bn, "act", None) if is_batch_norm_act(bn) else None
    return None if act is None or type(act) is nn.Identity else act


def _take_mid_bn(chain: Chain, name: str, bn: nn.Module) -> bool:
    """Puts the BatchNorm `name` between the halves into the chain, with the activation inside it (BatchNormAct2d)
    as the mid activation; False where that activation has no mid form."""
    act = _bn_act(bn)
    if act is not None and not _mid_activation_name(act):
        return False
    chain.mid_batch_norm = name
    if act is not None:
        chain.mid_activation = name + ".act"
    return True


def _take_bn(chain: Chain, name: str, bn: nn.Module, mid_bn: nn.Module | None) -> bool:
    """Puts the BatchNorm `name` after the pointwise conv into the chain, with a ReLU inside it (BatchNormAct2d) as
    the chain's ReLU; False where it holds another activation, or where it and the chain's mid BatchNorm `mid_bn`
    do not synchronize their statistics alike (the fused layer has one setting for both)."""
    act = _bn_act(bn)
    if (act is not None and type(act) is not nn.ReLU) or batch_norms_problem(bn, mid_bn) is not None:
        return False
    chain.batch_norm = name
    if act is not None:
        chain.post_relu = name + ".act"
    return True


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with every BatchNorm (timm's BatchNormAct2d, this package's SyncBatchNorm2d, whose
    training forward branches on its input) and timm's Conv2dSame as one node each (leaves) like nn.BatchNorm2d and
    nn.Conv2d, not traced through (Conv2dSame's padding, worked out from the input's size, also stops a trace)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, nn.modules.batchnorm._BatchNorm) or is_same_padding_conv(m)
                or super().is_leaf_module(m, qualname))


def _mid_activation_name(m: nn.Module) -> str | None:
    if type(m) is nn.ReLU:
        return "relu"
    if type(m) is nn.ReLU6 or (type(m) is nn.Hardtanh and m.min_val == 0.0 and m.max_val == 6.0):
        return "relu6"
    if type(m) is nn.ELU and m.alpha == 1.0:
        return "elu"
    if type(m) is nn.Hardswish:
        return "hardswish"
    return None


def _is_binary_add(node) -> bool:
    """`a + b` (or torch.add(a, b)) of two different values of the graph: MobileNet's residual join."""
    return (node is not None and node.op == "call_function" and node.target in (operator.add, torch.add)
            and len(node.args) == 2 and not node.kwargs
            and all(isinstance(a, torch.fx.Node) for a in node.args) and node.args[0] is not node.args[1])


def _find_chains_fx(model: nn.Module, graph: torch.fx.Graph) -> list[Chain]:
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def module_of(node) -> nn.Module | None:
        # Shared modules (called more than once) are never fused: the swap would change every call.
        if node.op == "call_module" and calls[node.target] == 1:
            return modules[node.target]
        return None

    def is_identity(node) -> bool:
        return node is not None and module_of(node) is not None and type(module_of(node)) is nn.Identity

    def sole_user(node):
        # Through nn.Identity layers that feed one user each: timm's SeparableConv2d without activations holds them
        # where the activations would be (act_dw, act_pw); they stay, passing the fused module's output on.
        users = list(node.users)
        nxt = users[0] if len(users) == 1 else None
        while is_identity(nxt):
            users = list(nxt.users)
            nxt = users[0] if len(users) == 1 else None
        return nxt

    def producer(node):
        """The node whose value `node` takes as its first argument, through nn.Identity layers that feed it alone."""
        src = node.args[0] if node.args else None
        while isinstance(src, torch.fx.Node) and is_identity(src) and len(src.users) == 1 and src.args:
            src = src.args[0]
        return src

    chains = []
    for node in graph.nodes:
        dw = module_of(node)
        if dw is None or not _is_depthwise(dw) or len(node.args) != 1 or node.kwargs:
            continue
        chain, mid_bn = Chain(depthwise=node.target, pointwise=""), None
        nxt = sole_user(node)
        if nxt is not None and module_of(nxt) is not None and _is_bn(module_of(nxt), dw.out_channels):
            if not _take_mid_bn(chain, nxt.target, module_of(nxt)):
                continue  # an activation inside the BatchNorm that the op has no mid form of
            mid_bn, nxt = module_of(nxt), sole_user(nxt)
        if chain.mid_activation is None and nxt is not None and module_of(nxt) is not None \
                and _mid_activation_name(module_of(nxt)):
            chain.mid_activation, nxt = nxt.target, sole_user(nxt)
        if nxt is None or module_of(nxt) is None or not _is_pointwise(module_of(nxt), dw.out_channels):
            continue
        chain.pointwise, tail = nxt.target, nxt
        channels = module_of(nxt).out_channels
        nxt = sole_user(tail)
        if nxt is not None and module_of(nxt) is not None and _is_bn(module_of(nxt), channels) \
                and _take_bn(chain, nxt.target, module_of(nxt), mid_bn):  # (else the chain ends at pointwise)
            tail = nxt
        nxt = sole_user(tail)
        if chain.post_relu is None and nxt is not None and module_of(nxt) is not None \
                and type(module_of(nxt)) is nn.ReLU:
            chain.post_relu = nxt.target
        elif chain.batch_norm is not None and chain.post_relu is None and nxt is not None \
                and module_of(nxt) is not None and type(module_of(nxt)) is nn.MaxPool2d:
            chain.pool = nxt.target
        elif chain.batch_norm is not None and chain.post_relu is None and _is_binary_add(nxt):
            chain.residual_add = True
        # Prologue: a ReLU module feeding only this depthwise conv. An in-place ReLU also rewrites its input,
        # which is then safe only if nothing else reads that input.
        src = producer(node)
        if isinstance(src, torch.fx.Node) and sole_user(src) is node and module_of(src) is not None \
                and type(module_of(src)) is nn.ReLU:
            inner = producer(src)
            if not module_of(src).inplace or (isinstance(inner, torch.fx.Node) and sole_user(inner) is src):
                chain.pre_relu = src.target
        chains.append(chain)
    return chains


def _find_chains_sequential(model: nn.Module) -> list[Chain]:
    chains = []
    for prefix, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.named_children())
        name = (lambda n: f"{prefix}.{n}" if prefix else n)

        def skip(j: int) -> int:  # past nn.Identity children, as the dataflow finder passes them
            while j < len(children) and type(children[j][1]) is nn.Identity:
                j += 1
            return j

        i = 0
        while i < len(children):
            _, dw = children[i]
            if not _is_depthwise(dw):
                i += 1
                continue
            chain, mid_bn = Chain(depthwise=name(children[i][0]), pointwise=""), None
            j = skip(i + 1)
            if j < len(children) and _is_bn(children[j][1], dw.out_channels):
                if not _take_mid_bn(chain, name(children[j][0]), children[j][1]):
                    i += 1
                    continue
                mid_bn, j = children[j][1], skip(j + 1)
            if chain.mid_activation is None and j < len(children) and _mid_activation_name(children[j][1]):
                chain.mid_activation, j = name(children[j][0]), skip(j + 1)
            if j >= len(children) or not _is_pointwise(children[j][1], dw.out_channels):
                i += 1
                continue
            chain.pointwise, channels, j = name(children[j][0]), children[j][1].out_channels, skip(j + 1)
            if j < len(children) and _is_bn(children[j][1], channels) and \
                    _take_bn(chain, name(children[j][0]), children[j][1], mid_bn):
                j = skip(j + 1)
            if chain.post_relu is None and j < len(children) and type(children[j][1]) is nn.ReLU:
                chain.post_relu, j = name(children[j][0]), j + 1
            elif chain.batch_norm is not None and chain.post_relu is None and j < len(children) \
                    and type(children[j][1]) is nn.MaxPool2d:
                chain.pool = name(children[j][0])
            # (An in-place ReLU first in the container rewrites the container's input, which its caller may read
            # again: taken only where an earlier child produced its input.)
            if i > 0 and type(children[i - 1][1]) is nn.ReLU and (i > 1 or not children[i - 1][1].inplace):
                chain.pre_relu = name(children[i - 1][0])
            chains.append(chain)
            i = j
    return chains


def _agreed(first: list[Chain], second: list[Chain]) -> list[Chain]:
    """The chains of two traces (training and eval mode) as far as they agree: a chain whose halves differ between
    the modes is left out; one whose BatchNorm differs (a dropout between the pointwise conv and the BatchNorm in
    training only) ends at the pointwise conv; a prologue, epilogue ReLU, pool or residual add found in one mode
    only is left to run as it is."""
    second_by_dw = {c.depthwise: c for c in second}
    agreed = []
    for a in first:
        b = second_by_dw.get(a.depthwise)
        if b is None or any(getattr(a, f) != getattr(b, f) for f in ("pointwise", "mid_batch_norm", "mid_activation")):
            continue
        chain = copy.copy(a)
        if a.batch_norm != b.batch_norm:  # the chain ends at the pointwise conv (what follows is the BatchNorm's)
            chain.batch_norm, chain.post_relu, chain.pool, chain.residual_add = None, None, None, False
        for f in ("pre_relu", "post_relu", "pool"):
            if getattr(a, f) != getattr(b, f):
                setattr(chain, f, None)
        chain.residual_add = chain.residual_add and b.residual_add
        agreed.append(chain)
    return agreed


def _without_unsafe_modules(model: nn.Module, chains: list[Chain]) -> list[Chain]:
    """Leaves out the chains with a module the fused one cannot stand in for: one with hooks (the fused module
    never calls its forward: nn.hooks_problem), or one reachable under a second name (an alias: the model's
    forward may call it by the name that would not be swapped). A pool with either is left as it is."""
    names = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))

    def safe(name: str) -> bool:
        m = model.get_submodule(name)
        return names[id(m)] == 1 and hooks_problem(m) is None

    kept = []
    for chain in chains:
        if all(safe(n) for n in chain.names()):
            if chain.pool is not None and not safe(chain.pool):
                chain.pool = None
            kept.append(chain)
    return kept


def find_chains(model: nn.Module) -> list[Chain]:
    """The fusable chains of `model`, found by tracing it with torch.fx in training and in eval mode (a model's
    Python may take other paths in each: its dropout, drop-path), taken as far as both agree (or, where it cannot
    be traced, in nn.Sequential containers)."""
    # Tracing runs the model's Python on proxies, but buffers are real tensors to torch.fx: an in-place op on one
    # runs (timm's BatchNormAct2d counts num_batches_tracked itself, in training mode). Put them back afterwards,
    # and every module's mode.
    saved = [(b, b.clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        graphs = []
        for training in (True, False):
            for m, _ in modes:  # (the flags alone: a model's own train() may do more)
                m.training = training
            graphs.append(_Tracer().trace(model))
    except Exception as e:  # noqa: BLE001  (tracing fails in many ways on dynamic Python code)
        warnings.warn(f"fuse: torch.fx could not trace {type(model).__name__} ({e}); looking for chains inside "
                      "nn.Sequential containers only", RuntimeWarning, stacklevel=3)
        chains = _find_chains_sequential(model)
    else:
        chains = _agreed(*(_find_chains_fx(model, g) for g in graphs))
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
        for m, training in modes:
            m.training = training
    return _without_unsafe_modules(model, chains)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def _fuse_chains(modules: dict[str, nn.Module], chains: list[Chain], deferring: set[str], backend: str,
                 replace) -> None:
    """Puts a SeparableConvBN in each chain's depthwise place and nn.Identity in its other layers' (through
    `replace`, which records what it replaces)."""
    claimed: set[str] = set()
    for chain in chains:
        if chain.pre_relu in claimed:  # already the previous chain's post_relu
            chain.pre_relu = None
        claimed.update(chain.names())
        mid = modules[chain.mid_activation] if chain.mid_activation else None
        # Deepest first: an activation inside a BatchNormAct2d ("....bn1.act") is set to nn.Identity inside that
        # module, which the fused module keeps as its BatchNorm (taking it with that activation gone), before the
        # BatchNorm's own place becomes one. (`modules` still holds every module taken.)
        for name in sorted(chain.names(), key=lambda n: -n.count(".")):
            if name != chain.depthwise:
                replace(name, nn.Identity())
        fused = SeparableConvBN.from_modules(
            modules[chain.depthwise], modules[chain.pointwise],
            modules[chain.batch_norm] if chain.batch_norm else None,
            pre_relu=chain.pre_relu is not None, mid_activation=_mid_activation_name(mid) if mid else None,
            post_relu=chain.post_relu is not None, backend=backend,
            mid_bn=modules[chain.mid_batch_norm] if chain.mid_batch_norm else None)
        fused.defer_bn = chain.depthwise in deferring
        replace(chain.depthwise, fused)


def fuse(model: nn.Module, *, inplace: bool = False, backend: str = "auto", pools: bool = True) -> nn.Module:
    """Returns `model` (a copy unless inplace) with every depthwise (→ BN) (→ act) → pointwise (→ BN) (→ ReLU) chain
    fused, and
    (pools) every nn.MaxPool2d on the package's pooling.

    The fused model computes what the original does, in training and in eval mode, with the same parameters. If a
    layer cannot be fused after others were, fuse raises with every module back in its place (inplace too).
    """
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    chains = find_chains(model)
    # A ReLU that is both a chain's epilogue and the next chain's prologue (the finders give it to both: the dataflow
    # or the Sequential order says it feeds that depthwise conv alone) goes to the next chain, and the chain before
    # defers its BatchNorm to it.
    prologues = {c.pre_relu for c in chains if c.pre_relu is not None}
    deferring = set()
    for chain in chains:
        if chain.batch_norm is not None and chain.post_relu is not None and chain.post_relu in prologues:
            chain.post_relu = None
            deferring.add(chain.depthwise)
        # A BatchNorm that feeds a max pool alone goes to the pool too, where the pool runs the package's kernel
        # (a named kernel backend: "auto" may pick PyTorch's pooling, which would make it a pass of its own).
        if chain.pool is not None and pools and backend in ("cuda", "triton") \
                and MaxPool2d.from_module(modules[chain.pool], backend).takes_batch_norm():
            deferring.add(chain.depthwise)
        # A BatchNorm that feeds a residual add alone goes to the add: the PendingBatchNorm it receives runs
        # scale_shift with the residual, one pass where the BatchNorm's and the add's were two (in training; in
        # inference the epilogue's folded BatchNorm was free, and the same bytes move either way).
        if chain.residual_add:
            deferring.add(chain.depthwise)
    # Every replacement is recorded, and undone if a later one raises: fuse(model, inplace=True) leaves the model
    # either fully fused or as it was.
    replaced: list[tuple[str, nn.Module]] = []

    def replace(name: str, module: nn.Module) -> None:
        replaced.append((name, model.get_submodule(name)))
        _set_module(model, name, module)

    try:
        _fuse_chains(modules, chains, deferring, backend, replace)
        if pools:
            for name, module in list(model.named_modules(remove_duplicate=False)):  # (a shared pool at each name)
                if type(module) is nn.MaxPool2d and hooks_problem(module) is None:
                    replace(name, MaxPool2d.from_module(module, backend))
    except BaseException:
        for name, module in reversed(replaced):
            _set_module(model, name, module)
        raise
    return model


__all__ = ["Chain", "find_chains", "fuse"]
