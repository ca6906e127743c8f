"""GGUF files: metadata as plain Python values, tensors dequantized one at a time.

The file is memory-mapped; nothing is read until a tensor is asked for, so a loader that
converts tensor by tensor never holds more than one extra tensor in host memory, and once it
is done with a tensor `release` drops its file pages from the process's resident memory (the
page cache keeps them). The `gguf` package supplies the quantization tables and dequantizers.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
_PLAIN_DTYPES: dict[Any, np.dtype] = {}  # filled below once gguf is imported


class GGUFError(ValueError):
    """A file that is missing, not GGUF, or lacks what the model needs. The message names it."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), the reverse of ggml's ne[]
    qtype: str  # GGML quantization type name, e.g. "Q4_K", "F32"
    n_bytes: int


class GGUFFile:
    """A GGUF file opened read-only.

    `metadata` maps every key to a Python value (str, int, float, bool, list, or a numpy
    array for long numeric arrays such as token scores). `tensor(name)` returns a float32 (or
    `dtype`) numpy array in numpy shape order. The header is parsed here directly (the gguf
    package's reader builds a numpy view per array element, ~10 s for a 262k vocabulary);
    tensor bytes stay memory-mapped until asked for.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"model file not found: {self.path}")
        try:
            with self.path.open("rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._mm = np.frombuffer(self._map, np.uint8)
        except (OSError, ValueError) as e:
            raise GGUFError(f"cannot read {self.path}: {e}") from e
        if bytes(self._mm[:4]) != GGUF_MAGIC:
            raise GGUFError(
                f"{self.path} is not a GGUF file (magic {bytes(self._mm[:4])!r}, expected b'GGUF')"
            )
        try:
            self.metadata, self._tensors = _parse_header(self._mm)
        except (IndexError, ValueError, struct.error, UnicodeDecodeError) as e:
            raise GGUFError(f"{self.path} is corrupt or truncated: {e}") from e

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path} has no general.architecture")
        return arch

    @property
    def name(self) -> str:
        return self.path.name

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        t = self._get(name)
        return TensorInfo(name, t.shape, t.qtype.name, t.n_bytes)

    def tensor(self, name: str, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Dequantize one tensor to `dtype`, shaped in numpy order."""
        from gguf import GGMLQuantizationType as Q
        from gguf import quants

        t = self._get(name)
        raw = self._mm[t.offset : t.offset + t.n_bytes]
        if len(raw) != t.n_bytes:
            raise GGUFError(f"{self.path} is truncated inside tensor {name}")
        if t.qtype in _PLAIN_DTYPES:
            arr = raw.view(_PLAIN_DTYPES[t.qtype])
        else:
            rows = int(np.prod(t.shape[:-1], dtype=np.int64))
            try:
                arr = quants.dequantize(raw.reshape(rows, -1), Q(t.qtype))
            except NotImplementedError as e:
                raise GGUFError(
                    f"{self.path}: tensor {name} has type {t.qtype.name}, "
                    "which the installed gguf package cannot dequantize"
                ) from e
        return np.asarray(arr, dtype=dtype).reshape(t.shape)

    def raw(self, name: str) -> np.ndarray:
        """One tensor's own bytes as stored, uint8 [rows, bytes per row] (a memory-mapped
        view: rows are the outermost numpy axes flattened)."""
        t = self._get(name)
        raw = self._mm[t.offset : t.offset + t.n_bytes]
        if len(raw) != t.n_bytes:
            raise GGUFError(f"{self.path} is truncated inside tensor {name}")
        return raw.reshape(int(np.prod(t.shape[:-1], dtype=np.int64)), -1)

    def release(self, name: str | None = None) -> None:
        """Drop the file pages of tensor `name` (every tensor's: None) from this process's
        resident memory. The mapping stays valid: a later read faults them back in from the
        page cache. Without it a loaded model would keep the whole file resident beside its
        params (what was read stays mapped)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        start, end = 0, len(self._map)
        if name is not None:
            t = self._get(name)
            start, end = t.offset, t.offset + t.n_bytes
        start -= start % mmap.PAGESIZE  # madvise takes whole pages
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def total_tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self._tensors.values())

    def _get(self, name: str) -> _Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path} has no tensor {name!r}") from None

    def meta(self, key: str, default: Any = ...) -> Any:
        """A metadata value; without a default, a missing key is a GGUFError naming it."""
        if key in self.metadata:
            return self.metadata[key]
        if default is ...:
            raise GGUFError(f"{self.path} lacks metadata key {key!r}")
        return default


@dataclass(frozen=True)
class _Tensor:
    shape: tuple[int, ...]  # numpy order
    qtype: Any  # gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int


# Value type codes of the GGUF format (gguf.GGUFValueType).
_SCALARS = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY, _BOOL = 8, 9, 7


class _Cursor:
    def __init__(self, buf: np.ndarray):
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        out = self.buf[self.pos : self.pos + n]
        if len(out) != n:
            raise ValueError(f"unexpected end of file at byte {self.pos}")
        self.pos += n
        return out

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size).tobytes())

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        return self.take(n).tobytes().decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.unpack("<IQ")
            if itype == _STRING:
                return [self.string() for _ in range(n)]
            if itype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(n)]
            dt = np.dtype(_SCALARS[itype])
            arr = self.take(n * dt.itemsize).view(dt).copy()
            if itype == _BOOL:
                arr = arr.astype(bool)
            return arr.tolist() if n < 4096 else arr
        dt = np.dtype(_SCALARS[vtype])
        v = self.take(dt.itemsize).view(dt)[0]
        if vtype == _BOOL:
            return bool(v)
        return float(v) if dt.kind == "f" else int(v)


def _parse_header(buf: np.ndarray) -> tuple[dict[str, Any], dict[str, _Tensor]]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    cur = _Cursor(buf)
    cur.take(4)
    (version,) = cur.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version} (big-endian files are not supported)")
    n_tensors, n_kv = cur.unpack("<QQ")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        (vtype,) = cur.unpack("<I")
        metadata[key] = cur.value(vtype)
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        (n_dims,) = cur.unpack("<I")
        dims = cur.unpack(f"<{n_dims}Q")
        qtype, offset = cur.unpack("<IQ")
        infos.append((name, dims, GGMLQuantizationType(qtype), offset))
    align = int(metadata.get("general.alignment", 32))
    data_start = (cur.pos + align - 1) // align * align
    tensors: dict[str, _Tensor] = {}
    for name, dims, qtype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_elems = int(np.prod(dims, dtype=np.int64))
        shape = tuple(int(d) for d in reversed(dims))
        tensors[name] = _Tensor(shape, qtype, data_start + offset, n_elems // block * type_size)
    return metadata, tensors


def _plain_dtypes() -> None:
    from gguf import GGMLQuantizationType as Q

    _PLAIN_DTYPES.update(
        {
            Q.F32: np.dtype("<f4"),
            Q.F16: np.dtype("<f2"),
            Q.F64: np.dtype("<f8"),
            Q.I8: np.dtype("<i1"),
            Q.I16: np.dtype("<i2"),
            Q.I32: np.dtype("<i4"),
        }
    )


_plain_dtypes()
