"""Convolution geometry: padding specs, output sizes. The Python twin of csrc/kernels/conv_geometry.h."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Union

import torch

PaddingSpec = Union[str, int, Sequence[int]]


def _is_int(value) -> bool:
    """Whether `value` is an int for a geometry argument: Python's, numpy's or a torch.SymInt (a size under
    torch.compile). Not a bool, which Python counts as an int but is no stride, nor a float, even a whole one."""
    return isinstance(value, (torch.SymInt, numbers.Integral)) and not isinstance(value, bool)


def _as_int(value):
    # numpy's ints as Python's (the operators' int[] arguments); a SymInt stays symbolic
    return value if isinstance(value, (int, torch.SymInt)) else int(value)


def _ints(value, lengths: tuple[int, ...]) -> tuple | None:
    """`value` (an int, or a tuple or list of `lengths` ints) as a tuple of ints, else None."""
    if _is_int(value):
        return (_as_int(value),)
    if isinstance(value, (tuple, list)) and len(value) in lengths and all(_is_int(v) for v in value):
        return tuple(_as_int(v) for v in value)
    return None


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int or a pair of ints as a pair of ints; anything else (a float, a bool, None, a tensor, another length)
    is a ValueError that names the argument."""
    values = _ints(value, (2,))
    if values is None:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r} ({type(value).__name__})")
    return values * 2 if len(values) == 1 else values  # type: ignore[return-value]


def conv_out_size(size: int, pad_begin: int, pad_end: int, kernel: int, stride: int, dilation: int) -> int:
    span = dilation * (kernel - 1) + 1
    padded = size + pad_begin + pad_end
    return 0 if padded < span else (padded - span) // stride + 1


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow / Keras "same": out = ceil(size / stride), the odd row of padding at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
    return total // 2, total - total // 2


def same_pool_padding(size: int, kernel: int, stride: int) -> tuple[int, bool] | None:
    """Max pooling with "same" padding on one dimension as PyTorch's own implicit padding: (padding, ceil_mode)
    such that `max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode)` makes the same windows as padding x
    with -inf explicitly (a copy of the whole tensor and a fill). Symmetric padding is plain padding; one more row
    at the end is ceil mode's partial last window. None where PyTorch's pooling cannot express it."""
    top, bottom = same_padding(size, kernel, stride, 1)
    if top > kernel // 2:
        return None
    if top == bottom:
        return top, False  # ceil mode would not change this dimension's size either (exact division)
    # One more row at the end: ceil mode's output size (PyTorch's rule, the last window starting inside the
    # input or its padding) must be "same"'s.
    out = -(-size // stride)
    ceil_out = -(-(size + 2 * top - kernel) // stride) + 1
    if (ceil_out - 1) * stride >= size + top:
        ceil_out -= 1
    return (top, True) if ceil_out == out else None


def resolve_padding(padding: PaddingSpec, input_hw: Sequence[int], kernel_hw: Sequence[int],
                    stride: Sequence[int], dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """Any padding spec as (top, bottom, left, right).

    Accepts "valid", "same" (TensorFlow's, asymmetric when needed), an int, (pad_h, pad_w), or the four values.
    """
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return (0, 0, 0, 0)
        if mode == "same":
            top, bottom = same_padding(input_hw[0], kernel_hw[0], stride[0], dilation[0])
            left, right = same_padding(input_hw[1], kernel_hw[1], stride[1], dilation[1])
            return (top, bottom, left, right)
        raise ValueError(f"padding must be 'same', 'valid', an int, a pair or four ints, got {padding!r}")
    values = _ints(padding, (2, 4))
    if values is not None and len(values) == 1:
        values = values * 4
    elif values is not None and len(values) == 2:
        values = (values[0], values[0], values[1], values[1])
    if values is None or not all(v >= 0 for v in values):
        raise ValueError(f"padding must be 'same', 'valid', a non-negative int, a pair or four such ints "
                         f"(top, bottom, left, right), got {padding!r} ({type(padding).__name__})")
    return values  # type: ignore[return-value]


def output_hw(input_hw: Sequence[int], kernel_hw: Sequence[int], stride: Sequence[int],
              padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, int]:
    top, bottom, left, right = padding
    return (conv_out_size(input_hw[0], top, bottom, kernel_hw[0], stride[0], dilation[0]),
            conv_out_size(input_hw[1], left, right, kernel_hw[1], stride[1], dilation[1]))
