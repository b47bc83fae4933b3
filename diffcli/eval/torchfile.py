"""Tensors from a torch.save file (a .pth holding a dict of tensors), without running it.

A torch.save file describes its objects with Python's serialisation opcodes, which a normal loader
executes, so a crafted file can run any code. Here the opcodes are only decoded
(pickletools.genops parses, it never executes) and interpreted by a small stack machine that knows
exactly what a dict of tensors needs: strings, numbers, tuples, dicts, the OrderedDict and tensor
rebuild functions, and typed storages. Any other opcode or name is refused, so the file can build
nothing but tensors. Both layouts torch.save writes are read: the zip archive (torch >= 1.6:
data.pkl plus one record per storage) and the older single stream (pickles, then raw storages).
The FID Inception weights that torch-fidelity publishes are such a file.
"""

from __future__ import annotations

import io
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

_STORAGES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_REBUILD = "torch._utils _rebuild_tensor_v2"
_ORDERED_DICT = "collections OrderedDict"
_GLOBALS = {_REBUILD, _ORDERED_DICT} | {f"torch {name}" for name in _STORAGES}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MAX_OPS = 10_000_000


class NotTensors(ValueError):
    """The file is not a torch.save file of tensors this reader accepts; the message says why."""


class _Global:
    def __init__(self, name: str) -> None:
        self.name = name


class _Mark:
    pass


_MARK = _Mark()


def _interpret(ops: Iterator[tuple[Any, Any, Any]], storage: Any) -> Any:
    """Run the decoded opcodes of one serialised object; storage(persistent id) gives the typed storage
    (dtype, flat tensor) a BINPERSID names."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1 :]
                del stack[i:]
                return items
        raise NotTensors("a MARK is missing")

    for count, (op, arg, _) in enumerate(ops):
        if count > _MAX_OPS:
            raise NotTensors("too many opcodes")
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            if len(stack) != 1:
                raise NotTensors("the object stream ends with a malformed stack")
            return stack[0]
        if name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "BININT", "BININT1", "BININT2",
                    "LONG1", "BINFLOAT"):
            stack.append(arg)
        elif name == "NONE":
            stack.append(None)
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(name == "NEWTRUE")
        elif name == "MARK":
            stack.append(_MARK)
        elif name in ("EMPTY_DICT", "EMPTY_TUPLE", "EMPTY_LIST"):
            stack.append({} if name == "EMPTY_DICT" else () if name == "EMPTY_TUPLE" else [])
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            if len(stack) < n:
                raise NotTensors("a tuple of missing items")
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise NotTensors("a reference to nothing")
            stack.append(memo[arg])
        elif name == "GLOBAL":
            if arg not in _GLOBALS:
                raise NotTensors(f"it refers to {arg.replace(' ', '.')!r}, which a file of tensors never needs")
            stack.append(_Global(arg))
        elif name == "BINPERSID":
            stack.append(storage(stack.pop()))
        elif name == "REDUCE":
            args, fn = stack.pop(), stack.pop()
            if not isinstance(fn, _Global) or not isinstance(args, tuple):
                raise NotTensors("a call of something that is not a known function")
            if fn.name == _ORDERED_DICT and args == ():
                stack.append({})
            elif fn.name == _REBUILD:
                stack.append(_rebuild(args))
            else:
                raise NotTensors(f"a call of {fn.name.replace(' ', '.')}")
        elif name in ("SETITEM", "SETITEMS"):
            items = [stack.pop(), stack.pop()][::-1] if name == "SETITEM" else pop_mark()
            target = stack[-1]
            if not isinstance(target, dict) or len(items) % 2:
                raise NotTensors("dict items for something that is not a dict")
            for k, v in zip(items[::2], items[1::2]):
                if not isinstance(k, (str, int)):
                    raise NotTensors("a dict key that is not a string")
                target[k] = v
        elif name in ("APPEND", "APPENDS"):
            items = [stack.pop()] if name == "APPEND" else pop_mark()
            if not isinstance(stack[-1], list):
                raise NotTensors("list items for something that is not a list")
            stack[-1].extend(items)
        elif name == "BUILD":  # an OrderedDict's state: state_dict()'s _metadata (module versions); dropped
            state = stack.pop()
            if not isinstance(stack[-1], dict) or not isinstance(state, dict) or set(state) - {"_metadata"}:
                raise NotTensors("object state other than a state dict's _metadata")
        else:
            raise NotTensors(f"the opcode {name}, which a file of tensors never needs")
    raise NotTensors("the object stream ends early")


def _rebuild(args: tuple) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])"""
    if len(args) not in (6, 7) or not isinstance(args[0], torch.Tensor):
        raise NotTensors("a tensor with malformed arguments")
    flat, offset, size, stride = args[:4]
    ok = (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
          and all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride)))
    if not ok:
        raise NotTensors("a tensor with a malformed shape or stride")
    numel = 1
    for n in size:
        numel *= n
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if numel else offset - 1
    if last >= flat.numel() or numel > flat.numel():  # nor more elements than its storage (no stride-0 bombs)
        raise NotTensors("a tensor reaching past the end of its storage")
    return torch.as_strided(flat, size, stride, offset).clone()


def _storage_dtype(pid: Any) -> tuple[torch.dtype, str, int]:
    """(dtype, key, numel) of a persistent id ('storage', torch.XStorage, key, location, numel[, view])."""
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage" and isinstance(pid[1], _Global)
            and pid[1].name.startswith("torch ") and isinstance(pid[2], str) and isinstance(pid[4], int)):
        raise NotTensors("a reference to something other than a tensor storage")
    return _STORAGES[pid[1].name.split(" ", 1)[1]], pid[2], pid[4]


def _flat(raw: bytes, dtype: torch.dtype, numel: int) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    if numel < 0 or len(raw) < numel * size:
        raise NotTensors("a storage is shorter than its tensors need (truncated?)")
    return torch.frombuffer(bytearray(raw[: numel * size]), dtype=dtype) if numel else torch.empty(0, dtype=dtype)


def _read_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise NotTensors("a zip archive without torch's data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        order = z.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        if order != "little":
            raise NotTensors(f"{order}-endian tensors")

        def storage(pid: Any) -> torch.Tensor:
            dtype, key, numel = _storage_dtype(pid)
            record = f"{prefix}data/{key}"
            if record not in names:
                raise NotTensors(f"the storage {key!r} is missing")
            return _flat(z.read(record), dtype, numel)

        return _interpret(pickletools.genops(z.read(pkl[0])), storage)


def _read_legacy(data: bytes) -> Any:
    """The pre-1.6 layout: magic number, protocol, system info, the object, the storage keys, then each
    storage as an 8-byte element count and its bytes, in the order of the keys."""
    f = io.BytesIO(data)

    def no_storage(pid: Any) -> torch.Tensor:
        raise NotTensors("a storage reference in a header")

    if _interpret(pickletools.genops(f), no_storage) != _LEGACY_MAGIC:
        raise NotTensors("not a torch.save file")
    if _interpret(pickletools.genops(f), no_storage) != 1001:
        raise NotTensors("an unknown torch.save protocol version")
    _interpret(pickletools.genops(f), no_storage)  # system info: byte order and type sizes
    obj_ops = list(pickletools.genops(f))
    keys = _interpret(pickletools.genops(f), no_storage)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise NotTensors("a malformed storage list")
    # the object names each storage's type; a first pass on the meta device (no memory) collects them
    types: dict[str, torch.dtype] = {}

    def on_meta(pid: Any) -> torch.Tensor:
        dtype, key, numel = _storage_dtype(pid)
        types[key] = dtype
        return torch.empty(numel, dtype=dtype, device="meta")

    _interpret(iter(obj_ops), on_meta)
    raw: dict[str, torch.Tensor] = {}
    for key in keys:
        head = f.read(8)
        if len(head) != 8 or key not in types:
            raise NotTensors("a storage is missing (truncated?)")
        (numel,) = struct.unpack("<q", head)
        raw[key] = _flat(f.read(max(0, numel) * torch.empty((), dtype=types[key]).element_size()), types[key], numel)

    def stored(pid: Any) -> torch.Tensor:
        dtype, key, numel = _storage_dtype(pid)
        if key not in raw or raw[key].numel() < numel:
            raise NotTensors(f"the storage {key!r} is missing or short")
        return raw[key]

    return _interpret(iter(obj_ops), stored)


def read(path: str | Path) -> dict[str, torch.Tensor]:
    """The dict of tensors a torch.save file holds. NotTensors (a ValueError) for anything else."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        if head == b"PK\x03\x04":
            obj = _read_zip(path)
        elif head[:1] == b"\x80":
            obj = _read_legacy(path.read_bytes())
        else:
            raise NotTensors("neither a torch zip archive nor a torch.save stream")
    except NotTensors:
        raise
    except (zipfile.BadZipFile, EOFError, KeyError, IndexError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise NotTensors(f"a damaged file ({type(e).__name__})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise NotTensors("it does not hold a mapping of names to tensors")
    return obj
