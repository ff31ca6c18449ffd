"""The shapes wsurgery can hold, checked without importing torch or numpy.

torch refuses a size past int64, or a shape whose element count, strides or byte size
overflow (``Storage size calculation overflowed``, ``Stride calculation overflowed``),
and numpy, through which wsurgery reads and computes tensor bytes, an array of more
than ``MAX_DIMS`` dimensions: each with an error in whatever call meets the shape first,
even for a tensor without elements. Yet ``(2**64 - 1, 0)`` and 65 dimensions are valid
in a safetensors header, and ``reshape(10**29, 0)`` infers from a 0-element tensor.
wsurgery checks these rules where it first meets a shape (a header, an alias record, a
transform's result), so such a shape is refused there as what it is, not met later as a
crash.
"""

from __future__ import annotations

MAX_DIMS = 64  # numpy's limit (NPY_MAXDIMS); torch's own is higher
INT64_MAX = 2**63 - 1
_U64_MAX = 2**64 - 1


def shape_problem(shape, itemsize: int) -> str | None:
    """Why a tensor of ``shape`` with ``itemsize``-byte elements cannot be held, or None.

    At most 64 dimensions (numpy's limit); then torch's rules: every size an int64, the
    running product of the sizes within 64 bits (multiplied in order, as torch does, so
    sizes before a 0 count), the byte size within int64, and every contiguous stride (the
    product of the sizes after it, a 0 counted as 1) within int64.
    """
    if len(shape) > MAX_DIMS:
        return f"{len(shape)} dimensions (at most {MAX_DIMS})"
    count = 1
    for d in shape:
        if d > INT64_MAX:
            return f"a size of {d}, past int64"
        count *= d
        if count > _U64_MAX:
            return "an element count that overflows 64 bits"
    if count * itemsize > INT64_MAX:
        return f"{count} elements of {itemsize} bytes, more bytes than int64 counts"
    stride = 1
    for d in reversed(shape[1:]):
        stride *= max(d, 1)
        if stride > INT64_MAX:
            return "strides that overflow int64"
    return None


# --- names and recipes ----------------------------------------------------------------

MAX_NAME_LENGTH = 4096  # characters of one tensor name a verb makes (real ones are under 300)
MAX_NAMES_BYTES = 64 << 20  # characters of all names together (a safetensors header is at most 100 MB)
# Names a verb's result may hold, unless its input already held more. The largest real
# checkpoints hold about 10**5 tensors (hundreds of experts times layers); each name a verb
# makes costs about 1 KiB of plan before anything is written, so this bounds a plan made
# from a tiny input (an unstack of a (10**9, 0) tensor, copies that double a prefix) to
# some 300 MB. The characters of the names are bounded by MAX_NAMES_BYTES the same way.
MAX_TENSORS = 1 << 18
MAX_INT_DIGITS = 100  # digits of an integer in a recipe (a dim, a size, a version)
