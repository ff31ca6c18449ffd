"""torch.save files, loaded without ever executing pickled code.

Every torch file goes through three steps; nothing is allocated, imported or called
before the first has passed.

1. **Scan.** The pickle is read by wsurgery's own opcode interpreter (:class:`Unpickler`)
   with *no* callables: every global becomes an inert :class:`Placeholder`, calling one
   gives another placeholder, nothing is imported. The scan records the globals the
   pickle names and the storages it claims, and refuses:

   - a global on the refused list (:func:`refused_global`: ``os``, ``posix``,
     ``subprocess``, ``sys``, ``builtins.eval`` / ``exec`` / ``compile`` / ``getattr`` /
     ``open`` / ``__import__`` ...): :class:`UnsafePickleError` (exit 3) naming it, even
     when the file holds tensors too, because no honest checkpoint needs one;
   - a storage claim that the file cannot back: its zip entry is missing, compressed,
     outside the file, or not exactly ``numel x itemsize`` bytes (legacy files: the size
     record after the pickle disagrees, or the data runs past the end);
   - a zip archive whose entries overlap, repeat a name, are encrypted, claim more than
     they can inflate to, or that Python's and torch's zip readers see differently;
   - a dict key or set member nested deeper than ``MAX_KEY_DEPTH`` (hashing it would
     overflow the C stack and kill the process, in torch's unpickler as in ours);
   - anything malformed (truncated data, unknown opcodes, stack underflow): InputError.

2. **torch.load.** ``torch.load(weights_only=True, mmap=True)`` for zip files (tensor data
   stays in the page cache), ``weights_only=True`` for legacy files.

3. **Fallback.** When torch's allow-list refuses a global that the scan found harmless (a
   config object of a class that is not installed, a callback's state, a whole pickled
   ``nn.Module``, a pickle protocol above 2), the same interpreter loads the file again,
   now with an explicit allow-list of torch's tensor rebuild functions (re-implemented
   here with validated arguments) and of a few inert types (``OrderedDict``,
   ``torch.Size``, dtypes, storage types). Unknown globals stay placeholders; a REDUCE /
   NEWOBJ / BUILD on a placeholder yields or fills a placeholder; REDUCE on anything that
   is neither a placeholder nor an allow-listed function is an error. Tensors are rebuilt
   over a private (copy-on-write) memory map of the file, so the input is never
   modified. Legacy-format files take the same route.

The state dict is the top-level dict of tensors, or the dict found under ``state_dict`` /
``model`` / ``module`` (Lightning, DeepSpeed-style checkpoints); a pickled ``nn.Module``
(a placeholder holding ``_parameters`` / ``_buffers`` / ``_modules``) yields its
``state_dict()``. Entries that are not tensors are reported in ``PickleResult.skipped``
(``hyper_parameters: placeholder for my_pkg.Config``). A tensor that is a view claiming
more bytes than both its storage and the file (a stride-0 size bomb) is refused.

The package has one module a job; each uses only the ones listed before it:

- ``interpreter``: the opcode interpreter, its bounded byte source, and the inert values
  it hands around (placeholders, storage types, allow-listed callables);
- ``allowlist``: the refused globals, the allow-listed rebuild functions, and the
  resolver that turns a global into a value;
- ``layout``: zip and legacy archives and the storages a pickle claims (:func:`scan`);
- ``state_dict``: the tensors in what a checkpoint unpickled to (:func:`extract_state_dict`);
- ``load``: the three steps end to end (:func:`torch_load`, :func:`load_pickle`).

A leading underscore marks a name that one module keeps to itself; the names the modules
share have none. Callers outside the package use the names of ``__all__`` below.
"""

from __future__ import annotations

from .allowlist import refused_global
from .interpreter import Placeholder
from .layout import scan
from .load import load_pickle, torch_load
from .state_dict import STATE_DICT_KEYS, PickleResult, describe, extract_state_dict

__all__ = [
    "STATE_DICT_KEYS",
    "PickleResult",
    "Placeholder",
    "describe",
    "extract_state_dict",
    "load_pickle",
    "refused_global",
    "scan",
    "torch_load",
]
