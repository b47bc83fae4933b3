"""A seeded mutation engine for the readers' fuzz tests (tests/test_fuzz.py).

Each generator takes a valid file's bytes and yields Mutants: a description (enough to rebuild the
mutant by hand) and the mutated bytes. Systematic mutants come first (every metadata key removed or
retyped, every field of every JSON object set to each value of VALUES, tensors dropped, renamed,
reshaped and retyped, header entries and the length field corrupted); then `n` random ones drawn
from a `random.Random` seeded by DIFFCLI_FUZZ_SEED and the reader's name. DIFFCLI_FUZZ sets `n`
(`make fuzz` runs 5000 per reader); the CI default is small enough for the whole file to take a few
seconds.

`run_mutant` runs one mutant through a reader and returns how it ended, failing the test (with the
mutant's description) on any exception other than InputError, on a run over the time limit (a
SIGALRM turns a hang into a failure) and on a peak resident memory growth beyond the bound.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import struct
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from diffcli.errors import InputError

SEED = int(os.environ.get("DIFFCLI_FUZZ_SEED", "0"))
RANDOM_MUTANTS = int(os.environ.get("DIFFCLI_FUZZ", "0"))  # 0: each test's CI default
TIME_LIMIT_S = 5.0  # per mutant (the target is no hang over 10 s; a mutant takes milliseconds)
MEMORY_FACTOR, MEMORY_SLACK = 10, 96 * 2**20  # peak RSS growth <= 10 x the file + 96 MiB

REMOVE = object()
NAN, INF = float("nan"), float("inf")
# what every field of a JSON object is set to, in turn (NaN and Infinity as the JSON tokens Python writes)
VALUES: list[tuple[str, Any]] = [
    ("removed", REMOVE), ("a string", "x"), ("an empty string", ""), ("a list", [1]), ("an object", {"a": 1}),
    ("true", True), ("false", False), ("null", None), ("1.5", 1.5), ("0", 0), ("-1", -1), ("2**62", 2**62),
    ("1e308", 1e308), ("NaN", NAN), ("Infinity", INF), ("-Infinity", -INF), ("a 100 kB string", "y" * 100_000),
]
# what every metadata string is set to, in turn
META_STRINGS: list[tuple[str, str | object]] = [
    ("removed", REMOVE), ("empty", ""), ("not JSON", "{not json"), ("[]", "[]"), ("{}", "{}"), ("null", "null"),
    ("NaN", "NaN"), ("1e999", "1e999"), ("a number", "7"), ("nested 100000 deep", "[" * 100_000 + "]" * 100_000),
    ("a 5000-digit integer", "9" * 5000),
]
JSON_TOKENS = ["0", "-1", "1e999", "-1e999", "NaN", "Infinity", '"x"', "[]", "{}", "null", "true", "9" * 30, "1.5", '""']


@dataclass
class Mutant:
    what: str
    data: bytes
    data_changed: bool = False  # tensor bytes differ from the valid file's (values may be anything)


# --------------------------------------------------------------------------------------------------
# safetensors files taken apart and put back together (with any values, valid or not)
# --------------------------------------------------------------------------------------------------


@dataclass
class Parts:
    meta: dict[str, str]
    tensors: list[list[Any]]  # [name, dtype, shape, raw bytes], in data order

    def copy(self) -> Parts:
        return Parts(dict(self.meta), [list(t) for t in self.tensors])


def split(data: bytes) -> Parts:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    body = data[8 + n :]
    order = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return Parts(meta, [[k, v["dtype"], v["shape"], body[v["data_offsets"][0] : v["data_offsets"][1]]] for k, v in order])


def pack(p: Parts, entries: Callable[[dict[str, Any]], None] | None = None) -> bytes:
    """The file: header JSON (any values, NaN tokens allowed), padded to 8 bytes, then the data.
    `entries` may edit the header dict (tensor entries included) before it is written."""
    header: dict[str, Any] = {"__metadata__": p.meta} if p.meta is not None else {}
    pos = 0
    for name, dtype, shape, raw in p.tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(raw)]}
        pos += len(raw)
    if entries:
        entries(header)
    text = json.dumps(header, allow_nan=True).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(t[3] for t in p.tensors)


def set_path(obj: Any, path: list[Any], value: Any) -> Any:
    """A copy of obj with obj[path[0]][path[1]]... set to value (or removed)."""
    if not path:
        return value
    out = dict(obj) if isinstance(obj, dict) else list(obj)
    key = path[0]
    if len(path) == 1 and value is REMOVE:
        del out[key]
    else:
        out[key] = set_path(out[key], path[1:], value)
    return out


def leaf_paths(obj: Any, prefix: list[Any] | None = None) -> list[list[Any]]:
    prefix = prefix or []
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in ([prefix + [k]] + leaf_paths(v, prefix + [k]))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in ([prefix + [i]] + leaf_paths(v, prefix + [i]))]
    return []


def _dump(v: Any) -> str:
    return json.dumps(v, allow_nan=True)


# --------------------------------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------------------------------


def metadata_mutants(data: bytes, json_keys: tuple[str, ...], max_fields: int = 16) -> Iterator[Mutant]:
    """Every metadata key removed or set to each of META_STRINGS; every field of the JSON-valued
    keys (and every item of JSON lists) set to each of VALUES. A JSON value with more than
    max_fields fields and items (a saved option list) has that many of them mutated, picked by the seed
    (all of them when DIFFCLI_FUZZ is set)."""
    base = split(data)
    rng = random.Random(f"{SEED}-fields")
    for key in list(base.meta):
        for label, value in META_STRINGS:
            p = base.copy()
            if value is REMOVE:
                del p.meta[key]
            else:
                p.meta[key] = value  # type: ignore[assignment]
            yield Mutant(f"metadata {key} {label}", pack(p))
    for key in json_keys:
        if key not in base.meta:
            continue
        parsed = json.loads(base.meta[key])
        paths = leaf_paths(parsed)
        if len(paths) > max_fields and not RANDOM_MUTANTS:
            paths = [paths[i] for i in sorted(rng.sample(range(len(paths)), max_fields))]
        for path in paths:
            for label, value in VALUES:
                p = base.copy()
                p.meta[key] = _dump(set_path(parsed, path, value))
                yield Mutant(f"metadata {key}{''.join(f'[{k!r}]' for k in path)} {label}", pack(p))
        if isinstance(parsed, list):  # one item more, one item fewer
            for label, changed in (("one more item", parsed + [parsed[-1] if parsed else "z"]), ("one item fewer", parsed[:-1])):
                p = base.copy()
                p.meta[key] = _dump(changed)
                yield Mutant(f"metadata {key} {label}", pack(p))


def tensor_mutants(data: bytes, rng: random.Random, per_kind: int = 6) -> Iterator[Mutant]:
    """Tensors dropped, renamed, reshaped (same bytes in another shape, and one element more), given
    another dtype (the bytes re-sized to match), duplicated under a new name, and filled with NaN:
    each for the first, the last and per_kind - 2 random tensors."""
    base = split(data)
    n = len(base.tensors)
    picks = sorted({0, n - 1, *rng.sample(range(n), min(n, max(0, per_kind - 2)))})
    for i in picks:
        name, dtype, shape, raw = base.tensors[i]
        size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1}.get(dtype, 4)
        count = len(raw) // size
        variants: list[tuple[str, list[list[Any]] | None, bool]] = [  # (what, tensors in place of tensor i, data changed)
            ("dropped", [], False),
            ("renamed", [[name + "_x", dtype, shape, raw]], False),
            ("renamed into a block that does not exist", [["blocks.999." + name, dtype, shape, raw]], False),
            (f"reshaped to {list(reversed(shape))}", [[name, dtype, list(reversed(shape)), raw]], False),
            ("flattened", [[name, dtype, [count], raw]], False),
            ("given a trailing dimension of 1", [[name, dtype, [*shape, 1], raw]], False),
            ("duplicated under another name", [[name, dtype, shape, raw], [name + ".copy", dtype, shape, raw]], False),
        ]
        if shape:
            grown = [shape[0] + 1, *shape[1:]]
            variants.append((f"grown to {grown}", [[name, dtype, grown, raw + bytes(size * math.prod(shape[1:]))]], True))
        for other, osize in (("F64", 8), ("F16", 2), ("BF16", 2), ("I32", 4), ("U8", 1), ("BOOL", 1), ("F8_E4M3", 1)):
            if other != dtype:
                variants.append((f"as {other}", [[name, other, shape, bytes(count * osize)]], True))
        if dtype in ("F32", "F16") and count:
            fmt = "<f" if dtype == "F32" else "<e"
            variants.append(("with a NaN", [[name, dtype, shape, struct.pack(fmt, NAN) + raw[size:]]], True))
            variants.append(("with an infinity", [[name, dtype, shape, raw[:-size] + struct.pack(fmt, INF)]], True))
        for what, replacement, changed in variants:
            p = base.copy()
            p.tensors[i : i + 1] = replacement
            yield Mutant(f"tensor {name} {what}", pack(p), changed)


def header_mutants(data: bytes) -> Iterator[Mutant]:
    """The header's own structure: tensor entries with bad dtypes, shapes and offsets, duplicate
    names, no metadata, and the 8-byte length field set wrong."""
    base = split(data)
    first = base.tensors[0][0]
    last = base.tensors[-1][0]

    def entry(what: str, fn: Callable[[dict[str, Any]], None]) -> Mutant:
        return Mutant(f"header: {what}", pack(base, fn))

    for label, value in VALUES:
        for part in ("dtype", "shape", "data_offsets"):
            def fn(h: dict[str, Any], part: str = part, value: Any = value) -> None:
                if value is REMOVE:
                    del h[first][part]
                else:
                    h[first][part] = value
            yield entry(f"{first}.{part} {label}", fn)
    bad = [
        ("dtype F4 (unknown)", lambda h: h[first].__setitem__("dtype", "F4")),
        ("shape with a negative dimension", lambda h: h[first].__setitem__("shape", [-1] + h[first]["shape"][1:])),
        ("shape [2**62, 2**62]", lambda h: h[first].__setitem__("shape", [2**62, 2**62])),
        ("shape with 100 dimensions", lambda h: h[first].__setitem__("shape", [1] * 100)),
        ("shape with a float", lambda h: h[first].__setitem__("shape", [1.0] * len(h[first]["shape"]))),
        ("first offsets shifted by 1", lambda h: h[first].__setitem__("data_offsets", [o + 1 for o in h[first]["data_offsets"]])),
        ("last offsets past the end", lambda h: h[last].__setitem__("data_offsets", [o + 8 for o in h[last]["data_offsets"]])),
        ("offsets reversed", lambda h: h[first].__setitem__("data_offsets", h[first]["data_offsets"][::-1])),
        ("offsets [0, 2**64]", lambda h: h[first].__setitem__("data_offsets", [0, 2**64])),
        ("two tensors share their data", lambda h: h[last].__setitem__("data_offsets", h[first]["data_offsets"])),
        ("an entry that is a list", lambda h: h.__setitem__(first, [1, 2, 3])),
        ("an extra key in an entry", lambda h: h[first].__setitem__("extra", 1)),
        ("no __metadata__", lambda h: h.pop("__metadata__")),
        ("__metadata__ a list", lambda h: h.__setitem__("__metadata__", ["format"])),
        ("__metadata__ with a number", lambda h: h["__metadata__"].__setitem__("format_version", 1)),
        ("__metadata__ with an object", lambda h: h["__metadata__"].__setitem__("model_config", {"depth": 2})),
    ]
    for what, fn in bad:
        yield entry(what, fn)
    (n,) = struct.unpack("<Q", data[:8])
    body = data[8:]
    for label, value in (("0", 0), ("1", 1), ("n - 1", n - 1), ("n + 1", n + 1), ("n + 8", n + 8),
                         ("the file size", len(data)), ("2**63", 2**63), ("2**64 - 1", 2**64 - 1)):
        yield Mutant(f"length field {label}", struct.pack("<Q", value) + body)
    text = data[8 : 8 + n]
    dup = text.replace(b'{"__metadata__"', b'{"' + first.encode() + b'": 1, "__metadata__"', 1)
    if dup != text:
        dup += b" " * (-len(dup) % 8)
        yield Mutant(f"header names {first} twice", struct.pack("<Q", len(dup)) + dup + data[8 + n :])
    yield Mutant("header in UTF-16", struct.pack("<Q", 2 * n) + text.decode().encode("utf-16-le") + data[8 + n :])
    yield Mutant("empty file", b"")
    yield Mutant("7 bytes", data[:7])
    yield Mutant("the header alone", data[: 8 + n])


def random_mutants(data: bytes, rng: random.Random, count: int, json_keys: tuple[str, ...] = ()) -> Iterator[Mutant]:
    """Truncations at random offsets, random bytes flipped (mostly in the header) or appended,
    random JSON tokens written over the header, random fields of the JSON metadata set to random
    VALUES, and files of random bytes."""
    (n,) = struct.unpack("<Q", data[:8]) if len(data) >= 8 else (0,)
    end = 8 + n
    for k in range(count):
        kind = rng.randrange(7)
        if kind == 0:
            cut = rng.randrange(len(data))
            yield Mutant(f"random #{k}: truncated at byte {cut} of {len(data)}", data[:cut])
        elif kind == 1:
            b = bytearray(data)
            spots = [rng.randrange(end if rng.random() < 0.7 else len(data)) for _ in range(rng.randint(1, 4))]
            for s in spots:
                b[s] = rng.randrange(256)
            yield Mutant(f"random #{k}: bytes {spots} set at random", bytes(b), any(s >= end for s in spots))
        elif kind == 2:
            extra = rng.randbytes(rng.randint(1, 64))
            yield Mutant(f"random #{k}: {len(extra)} random bytes appended", data + extra)
        elif kind == 3:
            text = data[8:end].decode("latin-1")
            at = rng.randrange(len(text))
            span = rng.randint(1, 12)
            token = rng.choice(JSON_TOKENS)
            new = (text[:at] + token + text[at + span :]).encode("latin-1")
            new += b" " * (-len(new) % 8)
            yield Mutant(f"random #{k}: header chars {at}..{at + span} replaced by {token[:12]}",
                         struct.pack("<Q", len(new)) + new + data[end:])
        elif kind == 4 and json_keys:
            p = split(data)
            key = rng.choice([k2 for k2 in json_keys if k2 in p.meta])
            parsed = json.loads(p.meta[key])
            paths = leaf_paths(parsed)
            if not paths:
                continue
            path = rng.choice(paths)
            label, value = rng.choice(VALUES)
            p.meta[key] = _dump(set_path(parsed, path, value))
            yield Mutant(f"random #{k}: metadata {key}{path} {label}", pack(p))
        elif kind == 5:
            size = rng.choice([0, 1, 8, 9, 64, 4096])
            yield Mutant(f"random #{k}: {size} random bytes", rng.randbytes(size))
        else:
            value = rng.choice([0, 1, n - 1, n + 1, rng.randrange(2**64), len(data) - 8])
            yield Mutant(f"random #{k}: length field {value}", struct.pack("<Q", value) + data[8:])


# --------------------------------------------------------------------------------------------------
# Running one mutant
# --------------------------------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(field)


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


MEMORY_MEASURED = _reset_peak()


class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang


@dataclass
class Outcome:
    result: Any = None
    error: InputError | None = None
    seconds: float = 0.0
    peak_growth: int = 0


def run_mutant(m: Mutant, fn: Callable[[], Any], file_size: int | None = None) -> Outcome:
    """fn() for one mutant (already written where fn reads it): its result, or the InputError it
    raised. Any other exception, a run over TIME_LIMIT_S, or a peak RSS growth over
    MEMORY_FACTOR x file_size + MEMORY_SLACK fails the test, naming the mutant."""
    size = len(m.data) if file_size is None else file_size
    measured = MEMORY_MEASURED and _reset_peak()
    before = _status("VmRSS") if measured else 0
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 2 * TIME_LIMIT_S)
    out = Outcome()
    t0 = time.perf_counter()
    try:
        out.result = fn()
    except InputError as e:
        out.error = e
    except Hang:
        raise AssertionError(f"mutant {m.what!r}: still running after {2 * TIME_LIMIT_S} s") from None
    except Exception as e:  # noqa: BLE001 (anything else would be a traceback for the user)
        raise AssertionError(f"mutant {m.what!r}: {type(e).__name__}: {e}\n{traceback.format_exc()}") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    out.seconds = time.perf_counter() - t0
    assert out.seconds < TIME_LIMIT_S, f"mutant {m.what!r} took {out.seconds:.1f} s"
    if measured:
        out.peak_growth = _status("VmHWM") - before
        bound = MEMORY_FACTOR * size + MEMORY_SLACK
        assert out.peak_growth <= bound, f"mutant {m.what!r}: peak memory grew {out.peak_growth >> 20} MiB (bound {bound >> 20})"
    if out.error is not None:
        message = str(out.error)
        assert message and "\n" not in message and len(message) < 1000, f"mutant {m.what!r}: message {message!r}"
    return out


def count(default: int) -> int:
    """How many random mutants a test draws: DIFFCLI_FUZZ, else the test's CI default."""
    return RANDOM_MUTANTS or default
