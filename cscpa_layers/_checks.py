"""Input validation and the few private helpers shared by every public function.

All checks raise at the public boundary with an expected-versus-actual message, so that a
user sees which argument is wrong and what would have been right. Shape, rank, range,
dtype and option errors are ``ValueError``; an argument that is not a tensor at all is a
``TypeError``. These are real ``raise`` statements, never ``assert``: asserts vanish under
``python -O``.

Each rule is written once here: what counts as a feature map, where random numbers are drawn,
how counts derived from decimal fractions round, and how a hand-written backward turns
autocast off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def check_tensor(x: Any, name: str) -> None:
    """Raise ``TypeError`` unless ``x`` is a ``torch.Tensor``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_rank(x: Tensor, ndim: int, name: str, layout: str) -> None:
    """Raise unless ``x`` is a tensor of rank ``ndim``; ``layout`` names the axes, e.g. (B, C, H, W)."""
    check_tensor(x, name)
    if x.ndim != ndim:
        raise ValueError(
            f"{name} must be {ndim}-D {layout}, got {x.ndim}-D with shape {tuple(x.shape)}"
        )


def check_floating(x: Tensor, name: str) -> None:
    """Raise unless ``x`` holds floating-point values."""
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_features(x: Any, name: str) -> None:
    """Raise unless ``x`` is a floating-point feature map of shape (B, C, H, W)."""
    check_rank(x, 4, name, "(B, C, H, W)")
    check_floating(x, name)


def check_integer(x: Tensor, name: str) -> None:
    """Raise unless ``x`` holds integer labels (any integer dtype, not bool or float)."""
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class labels, got dtype {x.dtype}")


def check_shape(x: Tensor, expected: Sequence[int], name: str, layout: str) -> None:
    """Raise unless ``x.shape`` equals ``expected`` exactly; nothing is broadcast."""
    check_tensor(x, name)
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(x.shape)}")


def check_same_device(x: Tensor, y: Tensor, x_name: str, y_name: str) -> None:
    """Raise unless both tensors live on the same device."""
    if x.device != y.device:
        raise ValueError(f"{y_name} must be on the same device as {x_name} ({x.device}), got {y.device}")


def check_option(value: Any, name: str, choices: Sequence[str]) -> None:
    """Raise unless ``value`` is one of ``choices``, listing the valid ones."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {valid}, got {value!r}")


def check_positive_int(value: Any, name: str) -> None:
    """Raise unless ``value`` is an ``int`` greater than zero."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")


def check_bool(value: Any, name: str) -> None:
    """Raise ``TypeError`` unless ``value`` is a ``bool`` (1 and 0 are not)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_range(value: float, name: str, low: float, high: float, *, low_open: bool = False) -> None:
    """Raise unless ``low <= value <= high`` (or ``low < value`` when ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    below = value <= low if low_open else value < low
    if below or value > high or value != value:  # NaN compares False both ways: name it too
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value}")


def check_positive(value: Any, name: str) -> None:
    """Raise unless ``value`` is a number greater than zero, e.g. an ``eps`` or a temperature."""
    check_range(value, name, 0.0, float("inf"), low_open=True)


def check_epoch(epoch: float, epochs: int) -> None:
    """Raise unless ``epochs`` is a positive int and ``0 <= epoch <= epochs`` (a schedule's t, T)."""
    check_positive_int(epochs, "epochs")
    check_range(epoch, "epoch", 0.0, float(epochs))


def check_generator(generator: Any) -> None:
    """Raise ``TypeError`` unless ``generator`` is a ``torch.Generator`` or None.

    Any device is accepted: every op draws on the generator's own device (:func:`draw_device`)
    and moves the result to its data, so one seeded generator gives the same draw for data on
    any device.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def draw_device(generator: torch.Generator | None, data: torch.device) -> torch.device:
    """Where random numbers are drawn: on the generator's device, or on ``data``'s with None.

    Without a generator the global generator of the data's device is used, as torch does.
    """
    return data if generator is None else generator.device


# Fractions given in decimal are not exact in binary: 0.07 * 100 is 7.000000000000001, and
# ceil() of it would give 8. Counts derived from a fraction round against this tolerance, so
# they come out as written; it is far below 1 / (any pixel or patch count we meet).
DECIMAL_TOLERANCE = 1e-9


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """Autocast's dtype on ``device_type`` where autocast is on there, else None."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def without_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Turn autocast off on ``device_type``: a hand-written backward needs the dtypes its forward saved."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _reading_data_is_allowed(x: Tensor) -> bool:
    """Value checks read the data: skip them on empty tensors and while torch.compile traces.

    Under ``torch.compile(fullgraph=True)`` a data-dependent Python branch would break the
    graph; the eager call of the same code has validated the same kind of input already.
    """
    return x.numel() > 0 and not torch.compiler.is_compiling()


def check_values_in(x: Tensor, name: str, low: float, high: float) -> None:
    """Raise unless every value of ``x`` lies in ``[low, high]`` (NaN fails too)."""
    if not _reading_data_is_allowed(x):
        return
    smallest, largest = torch.aminmax(x)  # one pass; NaN propagates and fails both tests
    if not bool((smallest >= low) & (largest <= high)):
        bad = ~((x >= low) & (x <= high))
        raise ValueError(
            f"{name} must lie in [{low}, {high}], got {int(bad.sum())} value(s) outside, "
            f"e.g. {x[bad].flatten()[0].item()}"
        )


def check_labels(x: Tensor, name: str, ignore_index: int) -> None:
    """Raise unless every label is >= 0 or equal to ``ignore_index``."""
    if not _reading_data_is_allowed(x):
        return
    bad = (x < 0) & (x != ignore_index)
    if bool(bad.any()):
        raise ValueError(
            f"{name} must hold class labels >= 0 or ignore_index={ignore_index}, "
            f"got {int(bad.sum())} other value(s), e.g. {x[bad].flatten()[0].item()}"
        )


def check_int(value: Any, name: str) -> None:
    """Raise ``TypeError`` unless ``value`` is an ``int`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
