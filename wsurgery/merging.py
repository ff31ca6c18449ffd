"""Merge arithmetic and the stored values that compute merged tensors lazily.

The methods (DESIGN.md "Merges") over float64 torch tensors (mean and task arithmetic
computed chunk by chunk in :class:`MergedStored`; :func:`ties`, :func:`slerp_coefficients`,
:func:`trim_cut`), and :class:`MergedStored` / :class:`LoraStored`, ``Stored`` values that compute one
tensor when written or read: the inputs are read one tensor each (zero-copy from a
safetensors file's map where possible) and combined chunk by chunk in float64, then
rounded once to the output dtype (:func:`round_once`). Memory holds one tensor per input
at most, plus float64 chunks; TIES also holds one tensor's magnitudes while it finds each
task vector's cut.

This module sits beside the transforms (it imports only the checkpoint model), so both
the surgery verbs and a reader may build these values.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from .dtypes import BY_NAME
from .errors import SurgeryError
from .model import Stored, tensor_bytes

METHODS = ("mean", "task-arithmetic", "ties", "slerp")
NEEDS_BASE = ("task-arithmetic", "ties")  # the methods over task vectors (x - base)
CHUNK = 1 << 20  # elements per float64 chunk and input (8 MiB)
SLERP_LINEAR = 0.9995  # mergekit's DOT_THRESHOLD: above it, SLERP interpolates linearly
SLERP_EPS = 1e-8  # mergekit's: a vector whose norm is at most this is not normalized


@dataclass(frozen=True)
class MergeSpec:
    """How tensors are merged.

    Attributes:
        method: ``mean``, ``task-arithmetic``, ``ties`` or ``slerp``.
        weights: one per input (not the base).
        density: for ``ties``, the fraction of each task vector kept, in (0, 1].
        t: for ``slerp``, in [0, 1]; 0 gives the first input.
    """

    method: str
    weights: tuple[float, ...]
    density: float = 1.0
    t: float = 0.5


# --- rounding ------------------------------------------------------------------------------


def round_once(x, dtype: str):
    """``x`` (float64) rounded once, to nearest even, to the floating ``dtype``.

    torch converts float64 to half, bfloat16 and float8 through float32, which rounds
    twice; rounding to float32 *to odd* first (truncate, then set the last bit where
    inexact) makes the second rounding give what one rounding would (float32 keeps more
    than two bits beyond any of those formats)."""
    import torch

    target = getattr(torch, dtype)
    if target in (torch.float64, torch.float32):
        return x.to(target)
    f = x.to(torch.float32)
    back = f.to(torch.float64)
    inexact = (back != x) & torch.isfinite(x)
    if bool(inexact.any()):
        over = inexact & (back.abs() > x.abs())  # rounded away from zero: step back toward it
        bits = f.view(torch.int32)
        bits = torch.where(over, bits - 1, bits)  # the same sign, one ulp closer to zero
        bits = torch.where(inexact, bits | 1, bits)
        f = bits.view(torch.float32)
    return f.to(target)


# --- the methods, over float64 tensors -------------------------------------------------------


def trim_cut(task_vector, density: float) -> tuple[float, int]:
    """Where TIES trims one task vector: ``(threshold, equal_kept)``, keeping the
    k = max(1, floor(density * numel)) largest magnitudes: every element above the
    threshold, and of those equal to it the first ``equal_kept`` in flat order."""
    import torch

    mag = task_vector.reshape(-1).abs()
    n = mag.numel()
    k = max(1, math.floor(density * n))
    if k >= n:
        return -math.inf, 0
    thr = torch.kthvalue(mag.cpu() if mag.device.type == "mps" else mag, n - k + 1).values
    greater = int((mag > thr).sum())
    return float(thr), k - greater


def trim_mask(task_vector, cut: tuple[float, int], equal_before: int):
    """The kept elements of one chunk of a task vector, given its :func:`trim_cut` and how
    many elements equal to the threshold came before the chunk; -> (mask, equal here)."""
    import torch

    thr, keep_equal = cut
    mag = task_vector.abs()
    if thr == -math.inf:
        return torch.ones_like(mag, dtype=torch.bool), 0
    equal = mag == thr
    rank = torch.cumsum(equal.to(torch.int64), 0) + equal_before  # 1-based among the equal ones
    return (mag > thr) | (equal & (rank <= keep_equal)), int(equal.sum())


def ties(base, trimmed: Sequence, weights: Sequence[float]):
    """TIES from trimmed task vectors: elect each element's sign from the sum of the
    weighted vectors (zero counts as +), then B + (sum of the weighted vectors of that
    sign) / (sum of their weights; 1 where there is none)."""
    import torch

    weighted = [t * w for t, w in zip(trimmed, weights, strict=True)]
    total = weighted[0].clone()
    for v in weighted[1:]:
        total += v
    elected = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    acc = torch.zeros_like(total)
    div = torch.zeros_like(total)
    for v, w in zip(weighted, weights, strict=True):
        agree = torch.sign(v) == elected
        acc += torch.where(agree, v, 0.0)
        div += torch.where(agree, w, 0.0)
    div = torch.where(div == 0, 1.0, div)
    return base + acc / div


def slerp_coefficients(t: float, dot: float, norm0: float, norm1: float) -> tuple[float, float]:
    """``(s0, s1)`` such that SLERP(t; x0, x1) = s0 x0 + s1 x1, from the float64 dot
    product and norms of the two flattened tensors (mergekit's: vectors normalized where
    their norm exceeds 1e-8; linear where |cos| > 0.9995)."""
    n0 = norm0 if norm0 > SLERP_EPS else 1.0
    n1 = norm1 if norm1 > SLERP_EPS else 1.0
    cos = dot / (n0 * n1)
    if abs(cos) > SLERP_LINEAR:
        return 1.0 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin(theta - theta * t) / sin_theta, math.sin(theta * t) / sin_theta


# --- reading inputs chunk by chunk -------------------------------------------------------------


class _Flat:
    """One input tensor, flat, on ``device``: over a safetensors file's map on the CPU
    (zero-copy where the bytes are aligned for the dtype, else copied a chunk at a time;
    pages released as chunks are done), else read whole once."""

    def __init__(self, stored: Stored, device):
        import torch

        self.stored = stored
        self.itemsize = BY_NAME[stored.dtype].itemsize
        self.dtype = getattr(torch, stored.dtype)
        self.device = torch.device(device)
        raw = stored.raw() if str(device) == "cpu" and stored.numel else None  # a file's map, no copy
        self.file = stored if raw is not None else None
        self.t = None  # the elements, when they can be viewed or were read whole
        self.u8 = None  # the bytes of a map not aligned for the dtype
        if raw is not None:
            with warnings.catch_warnings():  # the map is read-only, and nothing writes to it
                warnings.simplefilter("ignore", UserWarning)
                u8 = torch.frombuffer(raw, dtype=torch.uint8)
            if u8.data_ptr() % self.itemsize == 0:
                self.t = u8.view(self.dtype)
            else:
                self.u8 = u8
        else:
            self.t = _read(stored, device).reshape(-1)

    def _elements(self, a: int, b: int):
        if self.u8 is not None:  # an aligned copy of this chunk's bytes
            return self.u8[a * self.itemsize : b * self.itemsize].clone().view(self.dtype)
        assert self.t is not None
        return self.t[a:b]

    def chunk(self, a: int, b: int, out=None):
        """Elements ``[a, b)`` as float64, into ``out`` (a float64 buffer of at least
        ``b - a`` elements, reused chunk after chunk) when given."""
        import torch

        if out is None:
            return self._elements(a, b).to(torch.float64)
        view = out[: b - a]
        view.copy_(self._elements(a, b))
        return view

    def done(self, a: int, b: int) -> None:
        if self.file is not None:
            self.file.release(a * self.itemsize, b * self.itemsize)


def _read(stored: Stored, device):
    """The whole tensor, read on ``device``; a safetensors file's mapped pages are released
    after the copy, so they do not stay in this process's resident set."""
    t = stored.tensor(device)
    stored.release()
    return t


@contextlib.contextmanager
def _one_thread(device):
    """torch's CPU ops on one thread while a merged tensor is computed: each op streams a
    few MiB of memory (a LoRA update is a rank-r product), and splitting it across threads
    costs more in hand-offs (spinning waits on a busy machine: 2-4x the wall time of one
    thread, measured) than it gains."""
    import torch

    if str(device) != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _chunks(n: int):
    for a in range(0, n, CHUNK):
        yield a, min(n, a + CHUNK)


class MergedStored(Stored):
    """One tensor merged from the same name in several checkpoints, computed when written
    or read (see the module's docstring).

    Args:
        name: the tensor's name.
        inputs: that tensor in each input (one shape; dtypes may differ).
        spec: the method and its parameters.
        base: the base's tensor for ``task-arithmetic`` and ``ties``.
        dtype: the output dtype (floating).
        device: where the arithmetic runs (``"cpu"``, ``"cuda"``).
    """

    def __init__(
        self, name: str, inputs: Sequence[Stored], spec: MergeSpec, *, base: Stored | None, dtype: str, device="cpu"
    ):
        self.name = name
        self.inputs = tuple(inputs)
        self.spec = spec
        self.base = base
        self.dtype = dtype
        self.shape = tuple(inputs[0].shape)
        self.device = device

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.name,)

    @property
    def label(self) -> str:
        return f"merge({self.spec.method})"

    def stored_inputs(self) -> tuple[Stored, ...]:
        """The stored tensors it reads (for ``Checkpoint.close``)."""
        return (*self.inputs, *([self.base] if self.base is not None else []))

    def _pieces(self):
        """The result, chunk by chunk in flat order, as float64 tensors on the device."""
        spec, n = self.spec, self.numel
        xs = [_Flat(s, self.device) for s in self.inputs]
        b = None if self.base is None else _Flat(self.base, self.device)
        every = [*xs, *([b] if b is not None else [])]
        w = spec.weights
        cuts: list[tuple[float, int]] = []
        s0 = s1 = 0.0
        if spec.method == "ties":
            assert b is not None
            import torch

            for x in xs:  # one task vector at a time, built chunk by chunk
                tv = torch.empty(n, dtype=torch.float64, device=x.device)
                for lo, hi in _chunks(n):
                    tv[lo:hi] = x.chunk(lo, hi) - b.chunk(lo, hi)
                cuts.append(trim_cut(tv, spec.density))
                del tv
        elif spec.method == "slerp":
            dot = n0 = n1 = 0.0
            for lo, hi in _chunks(n):
                x0, x1 = xs[0].chunk(lo, hi), xs[1].chunk(lo, hi)
                dot += float((x0 * x1).sum())
                n0 += float((x0 * x0).sum())
                n1 += float((x1 * x1).sum())
                for x in xs:
                    x.done(lo, hi)
            s0, s1 = slerp_coefficients(spec.t, dot, math.sqrt(n0), math.sqrt(n1))
        equal_before = [0] * len(xs)
        import torch

        size = min(n, CHUNK)
        bufs = [torch.empty(size, dtype=torch.float64, device=x.device) for x in every]
        for lo, hi in _chunks(n):
            if spec.method in ("mean", "task-arithmetic"):
                # in place, in reused buffers, without a fresh allocation per step:
                # mean: sum(w_i x_i) / sum(w_i); task arithmetic: B + sum(w_i (x_i - B))
                chunk = [x.chunk(lo, hi, buf) for x, buf in zip(every, bufs, strict=False)]
                base = chunk[len(xs)] if b is not None else None
                acc = chunk[0]
                for i, (c, wi) in enumerate(zip(chunk[: len(xs)], w, strict=True)):
                    if base is not None:
                        c.sub_(base)
                    if wi != 1.0:
                        c.mul_(wi)
                    if i:
                        acc.add_(c)
                if base is not None:
                    acc.add_(base)
                elif math.fsum(w) != 1.0:
                    acc.div_(math.fsum(w))
                yield acc
                for x in every:
                    x.done(lo, hi)
                continue
            chunk = [x.chunk(lo, hi) for x in xs]
            if spec.method == "ties":
                assert b is not None
                base = b.chunk(lo, hi)
                trimmed = []
                for i, c in enumerate(chunk):
                    tv = c - base
                    keep, eq = trim_mask(tv, cuts[i], equal_before[i])
                    equal_before[i] += eq
                    trimmed.append(tv * keep)
                out = ties(base, trimmed, w)
            else:
                out = chunk[0] * s0 + chunk[1] * s1
            yield out
            for x in every:
                x.done(lo, hi)

    def tensor(self, device="cpu"):
        import torch

        with _one_thread(self.device):
            parts = [round_once(p, self.dtype) for p in self._pieces()]
        out = torch.cat(parts) if parts else torch.empty(0, dtype=getattr(torch, self.dtype))
        out = out.reshape(self.shape)
        return out if str(out.device) == str(device) else out.to(device)

    def write(self, f) -> None:
        with _one_thread(self.device):
            for p in self._pieces():
                f.write_bytes(tensor_bytes(round_once(p, self.dtype)))


class CarriedStored(Stored):
    """A non-floating tensor carried from the first input, which every input must hold
    with the same value: checked when it is written or read (a ``SurgeryError`` naming it
    otherwise)."""

    label = "carried (equal in every input)"

    def stored_inputs(self) -> tuple[Stored, ...]:
        """The stored tensors it reads (for ``Checkpoint.close``)."""
        return self.inputs

    def __init__(self, name: str, inputs: Sequence[Stored], device="cpu"):
        self.name = name
        self.inputs = tuple(inputs)
        self.dtype = inputs[0].dtype
        self.shape = tuple(inputs[0].shape)
        self.device = device

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.name,)

    def tensor(self, device="cpu"):
        import torch

        first = _read(self.inputs[0], self.device)
        for i, s in enumerate(self.inputs[1:], start=2):
            other = _read(s, self.device)
            if other.dtype != first.dtype or not torch.equal(first, other):
                raise SurgeryError(
                    f"merge: {self.name} is not floating and differs between input 1 and input {i}; "
                    "a non-floating tensor must be equal in every input",
                    hint="drop it from the inputs, or leave it out of the merge with only=",
                )
        return first if str(first.device) == str(device) else first.to(device)

    def write(self, f) -> None:
        f.write_bytes(tensor_bytes(self.tensor("cpu")))


# --- LoRA ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraUpdate:
    """One adapter's low-rank update of one base tensor: ``scale * (B @ A)``, laid out as
    the base tensor (``transpose`` for ``fan_in_fan_out``; Embedding adapters store A as
    ``(r, num_embeddings)`` and B as ``(embedding_dim, r)``, whose update is
    ``(B @ A).T``; Conv2d updates are reshaped (1x1) or convolved (k x k) as PEFT does)."""

    a: Stored
    b: Stored
    scale: float
    kind: str = "linear"  # linear | embedding | conv
    transpose: bool = False
    magnitude: Stored | None = None  # DoRA's magnitude vector (Linear only)


def lora_delta(a, b, kind: str, transpose: bool, shape: Sequence[int]):
    """The update ``B @ A`` (float64 tensors) in the layout of a base tensor of ``shape``,
    as PEFT's ``get_delta_weight`` computes it."""
    import torch

    if kind == "conv":
        if a.shape[2:] == (1, 1) and b.shape[2:] == (1, 1):
            d = (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:
            d = torch.nn.functional.conv2d(a.permute(1, 0, 2, 3), b).permute(1, 0, 2, 3)
        return d.reshape(tuple(shape))
    d = b @ a
    if kind == "embedding":
        d = d.T
    if transpose:
        d = d.T
    return d.reshape(tuple(shape))


class LoraStored(Stored):
    """A base tensor with LoRA updates folded in: W + sum_j weight_j * scale_j * (B_j @ A_j),
    in float64, rounded once to the base's dtype; computed when written or read. Memory
    holds the base tensor, its float64 copy and one update at a time."""

    label = "merge_lora"

    def __init__(self, name: str, base: Stored, updates: Sequence[LoraUpdate], device="cpu"):
        self.name = name
        self.base = base
        self.updates = tuple(updates)
        self.dtype = base.dtype
        self.shape = tuple(base.shape)
        self.device = device

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.base.name,)

    @property
    def how(self) -> str:
        return f"+ {len(self.updates)} LoRA update{'s' if len(self.updates) != 1 else ''}"

    def stored_inputs(self) -> tuple[Stored, ...]:
        """The stored tensors it reads (for ``Checkpoint.close``)."""
        extra = [s for u in self.updates for s in (u.a, u.b, u.magnitude) if s is not None]
        return (self.base, *extra)

    def _value(self):
        import torch

        w = _read(self.base, self.device).to(torch.float64)
        w0 = w.clone() if any(u.magnitude is not None for u in self.updates) else None
        for u in self.updates:
            a = _read(u.a, self.device).to(torch.float64)
            b = _read(u.b, self.device).to(torch.float64)
            d = lora_delta(a, b, u.kind, u.transpose, self.shape)
            d.mul_(u.scale)
            if u.magnitude is None:
                w += d
            else:  # DoRA, as PEFT merges it: m / ||W0 + dW|| (per output row) times (W + dW)
                assert w0 is not None
                m = _read(u.magnitude, self.device).to(torch.float64)
                rows = (w0 + d).T if u.transpose else (w0 + d)
                factor = (m / torch.linalg.norm(rows, dim=1)).view(-1, 1)
                w = (factor.T if u.transpose else factor) * (w + d)
            del a, b, d
        return w

    def tensor(self, device="cpu"):
        with _one_thread(self.device):
            out = round_once(self._value(), self.dtype)
        return out if str(out.device) == str(device) else out.to(device)

    def write(self, f) -> None:
        with _one_thread(self.device):
            f.write_bytes(tensor_bytes(round_once(self._value(), self.dtype)))
