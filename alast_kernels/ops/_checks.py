"""Argument checks shared by every backend: each failure names the argument and what was expected."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .._validate import check_int, check_real, is_int

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def tensor(name: str, t, *, ndim: Optional[int] = None, dtypes: Optional[Iterable[torch.dtype]] = None,
           device: Optional[torch.device] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name}: expected dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    return t


def same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} like {ref_name}, got {t.dtype}")


def param_dtype(name: str, p: torch.Tensor, x_name: str, x: torch.Tensor, *, float32_ok: bool = False) -> None:
    """A parameter has the dtype of the activation ``x`` (float32 also allowed for a float16/bfloat16 ``x``
    when ``float32_ok``). Skipped under autocast for ``x``'s device, which casts both to one dtype."""
    if torch.is_autocast_enabled(x.device.type) or p.dtype == x.dtype:
        return
    if float32_ok and p.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16):
        return
    extra = " (or float32)" if float32_ok and x.dtype in (torch.float16, torch.bfloat16) else ""
    raise TypeError(f"{name}: expected dtype {x.dtype}{extra} like {x_name}, got {p.dtype}")


def shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(t.shape)}")


def attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale) -> float:
    """Checks ``q (B, H, Nq, Dh)``, ``k``/``v (B, H, Nk, Dh)`` (same dtype and device, at least one query, key
    and channel) and ``scale`` (a finite number > 0, or ``None`` for ``Dh ** -0.5``); returns the scale."""
    tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        tensor(name, t, ndim=4, device=q.device)
        same_dtype(name, t, "q", q)
    B, H, Nq, Dh = q.shape
    shape("k", k, (B, H, k.shape[2], Dh))
    shape("v", v, tuple(k.shape))
    if Nq == 0 or k.shape[2] == 0 or Dh == 0:
        raise ValueError(f"q, k: expected at least one query, key and channel, got Nq={Nq}, Nk={k.shape[2]}, Dh={Dh}")
    if scale is None:
        return Dh ** -0.5
    return check_real("scale", scale, 0, low_open=True, optional=True)


def indices(name: str, idx: torch.Tensor, x_name: str, x: torch.Tensor, *, unique: bool, values: bool = True) -> None:
    """``idx`` is an int64 ``(B, K)`` index into dim 1 of the ``(B, N, D)`` tensor ``x``.

    With ``values`` (the default) the indices themselves are read on the host (one synchronisation on a GPU)
    and checked to be in range (and unique within each row when ``unique``); callers that made the indices
    themselves pass ``check_indices=False`` to the ops to skip that part. The type, shape and device are
    always checked.
    """
    tensor(name, idx, ndim=2, dtypes=(torch.int64,), device=x.device)
    if idx.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: expected batch size {x.shape[0]} like {x_name}, got {idx.shape[0]}")
    if idx.shape[1] > x.shape[1]:
        raise ValueError(f"{name}: expected at most {x.shape[1]} indices per row ({x_name} has "
                         f"{x.shape[1]} tokens), got {idx.shape[1]}")
    if not values or idx.numel() == 0:
        return
    lo, hi = torch.aminmax(idx)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= x.shape[1]:
        raise IndexError(f"{name}: expected indices in [0, {x.shape[1]}) for {x_name} of shape "
                         f"{tuple(x.shape)}, got values from {lo} to {hi}")
    if unique and idx.shape[1] > 1:
        ordered = idx.sort(dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError(f"{name}: expected indices unique within each row")


def prefix_and_keep(num_prefix, keep, num_tokens: int):
    """``num_prefix`` an int >= 0 and ``keep`` an int in ``[1, num_tokens - num_prefix]``; returns both as
    Python ints (``keep`` stays a ``SymInt`` under ``torch.compile``)."""
    num_prefix = check_int("num_prefix", num_prefix, 0)
    available = num_tokens - num_prefix
    # A SymInt under torch.compile: the keep count of a compiled block is a dynamic size.
    if not (isinstance(keep, torch.SymInt) or is_int(keep)) or not 1 <= keep <= available:
        raise ValueError(f"keep: expected an int in [1, {available}] (N={num_tokens} tokens less "
                         f"num_prefix={num_prefix}), got {keep!r}")
    return num_prefix, keep if isinstance(keep, torch.SymInt) else int(keep)
