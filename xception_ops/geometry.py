"""Convolution geometry: padding specs, output sizes. The Python twin of csrc/kernels/conv_geometry.h."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

PaddingSpec = Union[str, int, Sequence[int]]


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int or a pair of ints as a pair of ints."""
    if isinstance(value, int):
        return (value, value)
    values = tuple(value)
    if len(values) != 2 or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return values  # type: ignore[return-value]


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
    if isinstance(padding, int):
        values: tuple[int, ...] = (padding,) * 4
    else:
        values = tuple(padding)
        if len(values) == 2:
            values = (values[0], values[0], values[1], values[1])
    if len(values) != 4 or not all(isinstance(v, int) and v >= 0 for v in values):
        raise ValueError(f"padding must be 'same', 'valid', a non-negative int, a pair or four such ints "
                         f"(top, bottom, left, right), got {padding!r}")
    return values  # type: ignore[return-value]


def output_hw(input_hw: Sequence[int], kernel_hw: Sequence[int], stride: Sequence[int],
              padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, int]:
    top, bottom, left, right = padding
    return (conv_out_size(input_hw[0], top, bottom, kernel_hw[0], stride[0], dilation[0]),
            conv_out_size(input_hw[1], left, right, kernel_hw[1], stride[1], dilation[1]))
