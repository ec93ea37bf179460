"""Numerical parity of the Xception model on a chosen backend.

Copies of one model with the same weights: on the chosen backend, on the reference path (backend "torch", same
dtype), on the reference path with its inputs and weights perturbed at the dtype's rounding level, and on the
reference path in float64. One training step of each (forward, loss, backward) gives
the logits, the loss, every parameter's gradient and the BatchNorm running statistics (with TF32 off, so that
float32 is compared as float32); each is compared with the float64 copy by relative error ||a - b|| / ||b||.
The backend passes when its error is no worse than twice the reference's (the worse of the plain and the
perturbed reference path, plus a small floor): the rule flash-attention uses, with the perturbation measuring how
much the network itself amplifies rounding.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .models import Xception, xception
from .nn import SeparableConvBN
from .precision import tf32_override

# Relative size of the perturbation of the inputs and weights whose effect, next to the reference path's own
# error, sets the bar. The reference path runs the same algorithm as the float64 copy, so its own error can be
# far below what any other algorithm gives where the network is ill-conditioned (BatchNorm over two small
# images, ReLU and max-pool decisions that flip). H100, float32 training step, TF32 off (session 3): the
# reference path 6e-6 from float64, PyTorch's unfused cuDNN layers 9e-3, the fused CUDA kernels within 2x of a
# 2^-20 perturbation's effect (5e-3) and cuDNN's layers not quite. float32: 2^-17, about the error of cuDNN's
# fast convolution algorithms (Winograd, FFT); fp16 / bf16: one unit of rounding (their reference path rounds at
# every op already).
PERTURBATION = {torch.float32: 2.0 ** -17, torch.float64: 2.0 ** -46, torch.bfloat16: 2.0 ** -8,
                torch.float16: 2.0 ** -11}

# Errors below these are rounding of the dtype itself, whatever the reference path achieves.
ERROR_FLOOR = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class Row:
    """One compared tensor."""
    name: str        # e.g. "block4.convs.1.pointwise.weight.grad", "logits", "block4.convs.1.bn.running_var"
    layer: str       # the module it belongs to ("" for logits and loss)
    error: float     # backend vs float64
    ref_error: float  # the worse of the reference path and the perturbed reference path, vs float64

    @property
    def passed(self) -> bool:
        return self.error == self.error and self.error <= max(2 * self.ref_error, self._floor)  # NaN fails

    _floor: float = field(default=1e-5, repr=False)


@dataclass
class ParityReport:
    backend: str
    device: str
    dtype: str
    mode: str
    batch: int
    image_size: int
    rows: list[Row]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def worst_by_layer(self) -> list[tuple[str, float, float, bool]]:
        """(layer, worst backend error, worst reference error, passed) in model order."""
        layers: dict[str, list[Row]] = {}
        for r in self.rows:
            layers.setdefault(r.layer or "(output)", []).append(r)
        return [(name, max(r.error for r in rows), max(r.ref_error for r in rows), all(r.passed for r in rows))
                for name, rows in layers.items()]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def format(self) -> str:
        lines = [f"parity: backend={self.backend} device={self.device} dtype={self.dtype} mode={self.mode} "
                 f"batch={self.batch} image={self.image_size}x{self.image_size}",
                 f"{'layer':<28} {'backend err':>12} {'ref err':>12}  ok"]
        for name, err, ref, ok in self.worst_by_layer():
            lines.append(f"{name:<28} {err:12.3e} {ref:12.3e}  {'yes' if ok else 'NO'}")
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def randomize_batch_norm(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BatchNorm parameters and statistics, so that eval mode and the affine terms are exercised (every
    BatchNorm: nn.SyncBatchNorm is no nn.BatchNorm2d)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                values = {"weight": torch.rand(n, generator=generator) + 0.5,
                          "bias": torch.rand(n, generator=generator) * 0.2 - 0.1,
                          "running_mean": torch.rand(n, generator=generator) * 0.2 - 0.1,
                          "running_var": torch.rand(n, generator=generator) + 0.5}
                for name, value in values.items():  # (affine=False has no weight and bias; untracked, no stats)
                    if getattr(m, name) is not None:
                        getattr(m, name).copy_(value)


def _perturb(model: nn.Module, x: torch.Tensor, size: float, seed: int) -> torch.Tensor:
    """Multiplies every parameter of `model` (in place) and the input by 1 + size * N(0, 1)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + size * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return x * (1 + size * torch.randn(x.shape, generator=gen, dtype=x.dtype))


def _set_backend(model: nn.Module, backend: str) -> None:
    for m in model.modules():
        if hasattr(m, "backend") and isinstance(m.backend, str):
            m.backend = backend


def _layer_of_tensors(model: nn.Module) -> dict[str, str]:
    """Parameter / buffer name -> the layer it is reported under: a fused separable conv as a whole, else the
    module that holds it."""
    owners = {}
    for prefix, module in model.named_modules():
        if prefix and isinstance(module, SeparableConvBN):
            for name, _ in (*module.named_parameters(), *module.named_buffers()):
                owners[f"{prefix}.{name}"] = prefix
    for name, _ in (*model.named_parameters(), *model.named_buffers()):
        owners.setdefault(name, name.rpartition(".")[0])
    return owners


def _step(model: Xception, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """One training (or eval) step; returns every tensor to compare, by name."""
    model.zero_grad(set_to_none=True)
    logits = model(x)
    loss = model.loss(logits, target)
    loss.backward()
    out = {"logits": logits.detach(), "loss": loss.detach()}
    for name, p in model.named_parameters():
        if p.grad is not None:
            out[f"{name}.grad"] = p.grad
    for name, b in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            out[name] = b
    return out


def run_parity(backend: str = "auto", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               batch: int = 2, image_size: int = 71, mode: str = "train", seed: int = 0,
               num_classes: int = 1000, **model_kwargs) -> ParityReport:
    """Runs the comparison described in the module docstring. The network takes any image of 71x71 or more."""
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    if image_size < 71:
        raise ValueError(f"image_size must be at least 71 (Xception's smallest input), got {image_size}")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = xception(num_classes=num_classes, **model_kwargs)
    randomize_batch_norm(base, gen)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen)
    target = torch.randint(0, num_classes, (batch,), generator=gen)

    results = {}
    # float32 means float32 here: with TF32 (PyTorch's default for cuDNN convolutions) both paths round their
    # products to 10-bit mantissas, and on this ill-conditioned network (BatchNorm over two images) their errors
    # become noise of ~0.15 relative, which the twice-the-reference rule cannot judge (GPU run, session 3). The TF32
    # kernels have their own tests at a TF32 tolerance (tests/test_cuda_separable.py).
    with tf32_override(False):
        for key, run_backend, run_dtype in (("backend", backend, dtype), ("torch", "torch", dtype),
                                            ("perturbed", "torch", dtype), ("float64", "torch", torch.float64)):
            model = copy.deepcopy(base)
            inp = x
            if key == "perturbed":
                inp = _perturb(model, x, PERTURBATION[dtype], seed)
            model = model.to(device=device, dtype=run_dtype).train(mode == "train")
            _set_backend(model, run_backend)
            results[key] = _step(model, inp.to(device=device, dtype=run_dtype), target.to(device))

    floor = ERROR_FLOOR.get(dtype, 1e-5)
    owners = _layer_of_tensors(base)
    rows = []
    for name, exact in results["float64"].items():
        layer = owners.get(name.removesuffix(".grad"), "")
        reference = max(relative_error(results["torch"][name], exact), relative_error(results["perturbed"][name], exact))
        rows.append(Row(name, layer, relative_error(results["backend"][name], exact), reference, _floor=floor))
    return ParityReport(backend, str(device), str(dtype).replace("torch.", ""), mode, batch, image_size, rows)
