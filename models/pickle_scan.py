"""What a pickled PyTorch checkpoint would import, read with :mod:`pickletools` (nothing is
unpickled), so that planning refuses one that carries objects other than tensors.

``torch.load(weights_only=True)`` refuses any global outside its allowlist, but only when the
weights load, after the stages before it have run. Planning lists the pickle's globals first
and refuses what that allowlist does not hold outside torch (a training callback such as
PyTorch Lightning's ``ModelCheckpoint``, or code: ``os.system``, ``builtins.getattr``).
torch's own names are left to the load, which stays the authority. Written here because no
library reads a pickle's globals without unpickling it; :mod:`pickletools` parses.
"""

from __future__ import annotations

import _compat_pickle
import functools
import pickletools
import zipfile
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from editflow.errors import ModelUnavailableError

# What torch.load(weights_only=True) allows outside torch itself (torch 2.13's
# _get_allowed_globals); names in torch are left to its allowlist when the file loads.
ALLOWED_OUTSIDE_TORCH = frozenset({
    "_codecs.encode", "builtins.bytearray", "builtins.complex", "builtins.set",
    "collections.Counter", "collections.OrderedDict",
})  # fmt: skip
_STRINGS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
                      "SHORT_BINSTRING", "BINSTRING", "STRING"})  # fmt: skip
_GETS = frozenset({"BINGET", "LONG_BINGET", "GET"})
_PUTS = frozenset({"BINPUT", "LONG_BINPUT", "PUT"})
_LEGACY_PICKLES = 5  # magic number, protocol, system info, the object, the storage keys


def refused(model_id: str, key: str, names: Sequence[str] = ()) -> ModelUnavailableError:
    """The error for a checkpoint that holds more than tensors (naming what, where known)."""
    what = f" ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})" if names else ""
    return ModelUnavailableError(
        f"refused to load checkpoint '{model_id}': it holds Python objects other than"
        f" tensors{what}, and editflow unpickles only tensors (torch.load with weights_only=True)",
        key=key,
        hint="use the model's .safetensors release, or convert the file to safetensors where"
        " you trust it",
    )


@functools.lru_cache(maxsize=16)
def foreign_globals(file: Path, size: int, mtime_ns: int) -> tuple[str, ...]:
    """``module.name`` of each global the checkpoint's pickles name that is neither torch's
    nor in :data:`ALLOWED_OUTSIDE_TORCH`, sorted; empty for a checkpoint of tensors. Only
    the pickles are read (a zip member, or the first pickles of the pre-1.6 format), never
    the tensor data; ``size`` and ``mtime_ns`` (the file's) key the memo.

    Raises:
        ValueError: Its pickles cannot be parsed.
    """
    found = set()
    for stream, count in _pickles(file):
        with stream:
            for module, name in _globals(stream, count):
                module, name = _python3_name(module, name)
                if (
                    module.split(".")[0] != "torch"
                    and f"{module}.{name}" not in ALLOWED_OUTSIDE_TORCH
                ):
                    found.add(f"{module}.{name}")
    return tuple(sorted(found))


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """A global as unpickling finds it: pickles of protocol 2 (torch.save's) write Python 2's
    names (``__builtin__.set``), which the unpickler maps as :mod:`pickle` does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _pickles(file: Path) -> Iterator[tuple[IO[bytes], int]]:
    """(stream, how many pickles it starts with) for each of a ``torch.save`` file's object
    pickles: ``*/data.pkl`` in the zip format; in the pre-1.6 format, the file's first five
    (magic number, protocol, system facts, the object, its storage keys)."""
    if zipfile.is_zipfile(file):
        with zipfile.ZipFile(file) as archive:
            for member in archive.infolist():
                if member.filename.endswith("data.pkl"):
                    yield archive.open(member), 1
        return
    yield open(file, "rb"), _LEGACY_PICKLES


def _globals(stream: IO[bytes], count: int) -> Iterator[tuple[str, str]]:
    """(module, name) of each global the first ``count`` pickles of ``stream`` name. Strings are
    followed through the memo as far as ``STACK_GLOBAL`` needs them (its module and name are
    the two values pushed just before it)."""
    for _ in range(count):
        memo: dict[int, str | None] = {}
        pushed: deque[str | None] = deque(maxlen=2)  # the last pushes: a string, else None
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                module, _, attribute = str(arg).partition(" ")
                yield module, attribute
            elif name == "STACK_GLOBAL" and len(pushed) >= 2:
                yield str(pushed[-2]), str(pushed[-1])
            if name in _STRINGS:
                pushed.append(str(arg))
            elif name in _GETS:
                pushed.append(memo.get(int(arg)))
            elif name in _PUTS:
                memo[int(arg)] = pushed[-1] if pushed else None
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            else:
                pushed.append(None)
