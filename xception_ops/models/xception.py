"""Xception (Chollet, CVPR 2017), Figure 5, built on the fused separable convolutions.

Every separable conv is a SeparableConvBN: the ReLU before it is its prologue, the BatchNorm after it its
epilogue, and in the middle flow the residual add joins the last one's epilogue too. A BatchNorm between two
separable convs of a module (batch statistics in training, folded in inference) is applied by the second one's
prologue (PendingBatchNorm); in a strided module the last one's is applied by the max pool as it reads, which adds
the shortcut to its output in the same pass (on the package's pooling kernels). Module names follow timm's
`legacy_xception` (conv1, bn1, ..., block1..block12, conv3, conv4, fc) so that its weights map one to one
(`from_timm`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import backend as backends
from ..geometry import same_padding, same_pool_padding
from ..nn import PendingBatchNorm, SeparableConvBN
from ..pooling import OP as POOL_OP, max_pool2d

# BatchNorm conventions: PyTorch's defaults (timm's port) and Keras' (eps 1e-3, momentum 0.99, which is 0.01 in
# PyTorch's convention of the weight given to the new batch).
BN_CONVENTIONS = {"torch": {"eps": 1e-5, "momentum": 0.1}, "keras": {"eps": 1e-3, "momentum": 0.01}}


class MaxPool2dSame(nn.Module):
    """3×3 max pooling with TensorFlow's "same" padding (the extra row, if any, at the bottom), or PyTorch's
    symmetric padding of 1 as timm's port uses. The two agree on odd input sizes.

    `backend` picks the pooling kernel (xception_ops.pooling.max_pool2d): "cuda" and "triton" take the package's,
    "torch" PyTorch's; "auto" follows the measurements (PyTorch's until a GPU run has timed ours)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2, padding: str = "same", backend: str = "auto"):
        super().__init__()
        if padding not in ("same", "symmetric"):
            raise ValueError(f"pool padding must be 'same' or 'symmetric', got {padding!r}")
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.backend = backends.checked_name(backend)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding!r}, "
                f"backend={getattr(self, 'backend', 'auto')!r}")

    def applies_bn(self, x: torch.Tensor) -> bool:
        """Whether a PendingBatchNorm given for an input like x costs nothing: the package's pooling kernel applies
        it as it reads (else the BatchNorm would be a pass of its own, where in inference the separable op's
        epilogue applies it for free)."""
        backend = getattr(self, "backend", "auto")
        implicit = self.padding == "symmetric" or all(
            same_pool_padding(size, self.kernel_size, self.stride) is not None for size in x.shape[2:])
        return implicit and backends.resolve(backend, POOL_OP, x) != "torch"

    def forward(self, x: torch.Tensor | PendingBatchNorm, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x may be a PendingBatchNorm (the block's last BatchNorm, not yet applied): the pool applies it as it reads,
        and adds `residual` (the shortcut) to what it pools, in one pass on the package's kernels."""
        backend = getattr(self, "backend", "auto")  # (modules pickled before the attribute existed)
        y, scale, shift = (x.y, x.scale, x.shift) if isinstance(x, PendingBatchNorm) else (x, None, None)
        extras = {"scale": scale, "shift": shift, "residual": residual, "backend": backend}
        if self.padding == "symmetric":
            return max_pool2d(y, self.kernel_size, self.stride, self.kernel_size // 2, **extras)
        rows, cols = (same_pool_padding(size, self.kernel_size, self.stride) for size in y.shape[2:])
        if rows is not None and cols is not None:  # no padded copy of x (at 147², 0.12 ms each way on an H100)
            return max_pool2d(y, self.kernel_size, self.stride, (rows[0], cols[0]), ceil_mode=rows[1] or cols[1],
                              **extras)
        out = self.padded(x.apply() if isinstance(x, PendingBatchNorm) else x)
        return out if residual is None else out + residual

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """The definition: x padded with -inf explicitly, then pooled without padding."""
        top, bottom = same_padding(x.shape[2], self.kernel_size, self.stride, 1)
        left, right = same_padding(x.shape[3], self.kernel_size, self.stride, 1)
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


class XceptionBlock(nn.Module):
    """One module of Figure 5: `reps` × ([ReLU] → SeparableConv → BN), then a max pool when strided, plus the
    shortcut: identity, or a strided 1×1 conv + BN when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, reps: int, stride: int = 1,
                 start_with_relu: bool = True, grow_first: bool = True, residual: bool = True,
                 mid_activation: str | None = None, bn: dict | None = None, pool_padding: str = "same",
                 backend: str = "auto"):
        super().__init__()
        bn = bn or BN_CONVENTIONS["torch"]
        convs = []
        for i in range(reps):
            if grow_first:
                cin, cout = (in_channels if i == 0 else out_channels), out_channels
            else:
                cin, cout = in_channels, (in_channels if i < reps - 1 else out_channels)
            convs.append(SeparableConvBN(cin, cout, 3, padding="same", pre_relu=i > 0 or start_with_relu,
                                         mid_activation=mid_activation, backend=backend, **bn))
        self.convs = nn.ModuleList(convs)
        self.pool = MaxPool2dSame(3, stride, pool_padding, backend) if stride != 1 else None
        self.residual = residual
        if residual and (in_channels != out_channels or stride != 1):
            self.skip = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.skipbn = nn.BatchNorm2d(out_channels, **bn)
        else:
            self.skip = self.skipbn = None

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = inp
        # An identity shortcut (middle flow) joins the last separable conv's epilogue.
        fuse_shortcut = self.residual and self.skip is None and self.pool is None
        last = len(self.convs) - 1
        pool_takes_bn = self.pool is not None and self.pool.applies_bn(inp)
        for i, conv in enumerate(self.convs):
            # A BatchNorm between two separable convs (batch statistics, or folded in inference): the next one applies
            # it as it reads (defer_bn); the last one's, the pool that follows it.
            x = conv(x, residual=inp if fuse_shortcut and i == last else None, defer_bn=i < last or pool_takes_bn)
        shortcut = None
        if self.residual and not fuse_shortcut:
            shortcut = self.skipbn(self.skip(inp)) if self.skip is not None else inp
        if self.pool is not None:
            return self.pool(x, residual=shortcut)  # BatchNorm, pool and shortcut in one pass
        return x if shortcut is None else x + shortcut


class Xception(nn.Module):
    """Xception as in the paper's Figure 5: entry flow, 8 middle-flow modules, exit flow.

    Args:
        num_classes: classifier outputs (1000: 22,855,952 trainable parameters).
        in_chans: input channels.
        residual: the residual connections (False: paper section 4.6).
        mid_activation: None, "relu" or "elu" between each depthwise and pointwise stage (paper section 4.7).
        fc_hidden: widths of fully-connected layers (with ReLU) before the classifier; (4096, 4096) is the
            paper's variant with FC layers (Figures 7-8).
        drop_rate: dropout before the classifier (0.5 in the paper's ImageNet recipe).
        multi_label: the head is a per-class sigmoid (JFT) instead of a softmax; see `loss` and `predict`.
        bn: "torch" (eps 1e-5, momentum 0.1, as timm) or "keras" (eps 1e-3, Keras momentum 0.99).
        pool_padding: "same" (Keras, as the paper) or "symmetric" (timm's port; the two differ on even sizes).
        backend: the backend of every separable conv.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, residual: bool = True,
                 mid_activation: str | None = None, fc_hidden: Sequence[int] = (), drop_rate: float = 0.0,
                 multi_label: bool = False, bn: str = "torch", pool_padding: str = "same", backend: str = "auto"):
        super().__init__()
        if bn not in BN_CONVENTIONS:
            raise ValueError(f"bn must be one of {sorted(BN_CONVENTIONS)}, got {bn!r}")
        bn_args = BN_CONVENTIONS[bn]
        self.num_classes, self.multi_label, self.drop_rate = num_classes, multi_label, drop_rate
        self.conv1 = nn.Conv2d(in_chans, 32, 3, 2, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(32, **bn_args)
        self.conv2 = nn.Conv2d(32, 64, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(64, **bn_args)

        def block(cin, cout, reps, stride, **kw):
            return XceptionBlock(cin, cout, reps, stride, residual=residual, mid_activation=mid_activation,
                                 bn=bn_args, pool_padding=pool_padding, backend=backend, **kw)

        # Entry flow (block1 starts without ReLU: the stem's ReLU precedes it).
        self.block1 = block(64, 128, 2, 2, start_with_relu=False)
        self.block2 = block(128, 256, 2, 2)
        self.block3 = block(256, 728, 2, 2)
        # Middle flow: 8 identical modules.
        for i in range(4, 12):
            setattr(self, f"block{i}", block(728, 728, 3, 1))
        # Exit flow.
        self.block12 = block(728, 1024, 2, 2, grow_first=False)
        sep = dict(padding="same", mid_activation=mid_activation, backend=backend, **bn_args)
        # conv3's BatchNorm and ReLU are conv4's prologue (conv3 defers its BatchNorm): the same values, one pass
        # fewer. conv4's ReLU is its epilogue's.
        self.conv3 = SeparableConvBN(1024, 1536, 3, **sep)
        self.conv4 = SeparableConvBN(1536, 2048, 3, pre_relu=True, post_relu=True, **sep)
        self.num_features = 2048

        hidden, width = [], self.num_features
        for h in fc_hidden:
            hidden += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.fc_hidden = nn.Sequential(*hidden)
        self.fc = nn.Linear(width, num_classes)

    def blocks(self) -> list[XceptionBlock]:
        return [getattr(self, f"block{i}") for i in range(1, 13)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        for block in self.blocks():
            x = block(x)
        return self.conv4(self.conv3(x, defer_bn=True))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc_hidden(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        if self.drop_rate:
            x = F.dropout(x, self.drop_rate, self.training)
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits; see `predict` for probabilities."""
        return self.forward_head(self.forward_features(x))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over classes, or per-class binary cross-entropy for a multi-label head."""
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
        return F.cross_entropy(logits, target)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        logits = self(x)
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)


def xception(num_classes: int = 1000, **kwargs) -> Xception:
    """The paper's Xception; see Xception for the options."""
    return Xception(num_classes=num_classes, **kwargs)


def timm_key_map(timm_model: nn.Module) -> dict[str, str]:
    """Maps every state_dict key of a timm `legacy_xception` to the key of the same tensor in our Xception."""
    mapping = {}

    def add(theirs: str, module: nn.Module, ours: str) -> None:
        for key in module.state_dict():
            mapping[f"{theirs}.{key}"] = f"{ours}.{key}"

    for name in ("conv1", "bn1", "conv2", "bn2", "fc"):
        add(name, getattr(timm_model, name), name)

    def add_separable(sep_name: str, sep: nn.Module, bn_name: str, bn: nn.Module, ours: str) -> None:
        add(f"{sep_name}.conv1", sep.conv1, f"{ours}.depthwise")
        add(f"{sep_name}.pointwise", sep.pointwise, f"{ours}.pointwise")
        add(bn_name, bn, f"{ours}.bn")

    for i in range(1, 13):
        block = getattr(timm_model, f"block{i}")
        layers = list(block.rep)
        seps = [j for j, m in enumerate(layers) if hasattr(m, "pointwise")]
        for k, j in enumerate(seps):  # each separable conv is followed by its BatchNorm
            add_separable(f"block{i}.rep.{j}", layers[j], f"block{i}.rep.{j + 1}", layers[j + 1],
                          f"block{i}.convs.{k}")
        if block.skip is not None:
            add(f"block{i}.skip", block.skip, f"block{i}.skip")
            add(f"block{i}.skipbn", block.skipbn, f"block{i}.skipbn")
    add_separable("conv3", timm_model.conv3, "bn3", timm_model.bn3, "conv3")
    add_separable("conv4", timm_model.conv4, "bn4", timm_model.bn4, "conv4")
    return mapping


@torch.no_grad()
def from_timm(timm_model: nn.Module, **kwargs) -> Xception:
    """Our Xception with the weights and BatchNorm settings of a timm `legacy_xception` model.

    Built with pool_padding="symmetric", which is what timm's port computes, so the outputs match it.
    """
    bn = timm_model.bn1
    kwargs.setdefault("pool_padding", "symmetric")
    model = Xception(num_classes=timm_model.num_classes, in_chans=timm_model.conv1.in_channels,
                     drop_rate=timm_model.drop_rate, **kwargs)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps, module.momentum = bn.eps, bn.momentum
    mapping = timm_key_map(timm_model)
    model.load_state_dict({mapping[k]: v for k, v in timm_model.state_dict().items()})
    return model.to(timm_model.conv1.weight.dtype).train(timm_model.training)
