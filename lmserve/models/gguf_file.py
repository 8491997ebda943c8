"""A GGUF file read once: its metadata parsed lazily (arrays stay undecoded) and its tensors as memory-map views."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format of one item (8 = string, 9 = array are walked separately)
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

# GGML tensor types (ggml.h) -> (name, values per block, bytes per block), for the common ones: gguf-py's full
# table costs ~0.7 s of imports (its package imports its writer), a third of a start; others are looked up there.
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 3, 8, 12, 14, 30
_COMMON_TYPES = {
    F32: ("F32", 1, 4),
    F16: ("F16", 1, 2),
    Q4_0: ("Q4_0", 32, 18),
    Q4_1: ("Q4_1", 32, 20),
    Q8_0: ("Q8_0", 32, 34),
    Q4_K: ("Q4_K", 256, 144),
    Q6_K: ("Q6_K", 256, 210),
    BF16: ("BF16", 1, 2),
}


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array not decoded yet: GGUFReader decodes the 49k-token vocabulary in ~4 s, we only count it."""

    file: GGUFFile
    item_type: int
    count: int
    offset: int

    def __len__(self) -> int:
        return self.count

    def contents(self) -> list[Any]:
        return self.file.decode_array(self)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor: `data` is a read-only view of the memory map (quantized types as bytes, rows last),
    `shape` the logical shape in numpy order (outermost first)."""

    name: str
    tensor_type: int
    """The GGML type id (equal to gguf-py's GGMLQuantizationType member)."""
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def type_name(self) -> str:
        return ggml_type_info(self.tensor_type, self.name)[0]


class GGUFFile:
    """The header of a GGUF file parsed in one pass; arrays are located, not decoded; tensors memory-mapped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.buffer = np.memmap(path, mode="r")
        self.view: memoryview = self.buffer.data  # struct reads on the map without copying
        self.fields: dict[str, Any] = {}
        self.tensors: list[GGUFTensor] = []
        self._parse()

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value (arrays decoded on demand), or `default` when absent."""
        value = self.fields.get(key, default)
        return value.contents() if isinstance(value, GGUFArray) else value

    def decode_array(self, array: GGUFArray) -> list[Any]:
        values, _ = self._read_items(array.item_type, array.count, array.offset)
        return values

    # -- parsing -------------------------------------------------------------------

    def _parse(self) -> None:
        if bytes(self.view[:4]) != GGUF_MAGIC:
            raise ValueError("GGUF magic invalid")
        (version,) = self._unpack("<I", 4)
        if (
            version & 0xFFFF == 0
            and int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS
        ):
            raise ValueError("big-endian GGUF files are not supported")
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"GGUF version {version} is not supported (supported: {list(SUPPORTED_VERSIONS)})"
            )
        num_tensors, num_fields = self._unpack("<QQ", 8)
        offset = 24
        for _ in range(num_fields):
            key, offset = self._read_string(offset)
            (value_type,) = self._unpack("<I", offset)
            self.fields[key], offset = self._read_value(value_type, offset + 4)
        infos = []
        for _ in range(num_tensors):
            info, offset = self._read_tensor_info(offset)
            infos.append(info)
        alignment = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-offset // alignment) * alignment
        self.tensors = [self._tensor(*info, data_start) for info in infos]

    def _unpack(self, fmt: str, offset: int) -> tuple[Any, ...]:
        try:
            return struct.unpack_from(fmt, self.view, offset)
        except struct.error as error:
            raise ValueError(f"truncated GGUF header at byte {offset}") from error

    def _read_string(self, offset: int) -> tuple[str, int]:
        (length,) = self._unpack("<Q", offset)
        start = offset + 8
        if start + length > len(self.view):
            raise ValueError(f"truncated GGUF string at byte {offset}")
        return bytes(self.view[start : start + length]).decode("utf-8", errors="replace"), start + length

    def _read_value(self, value_type: int, offset: int) -> tuple[Any, int]:
        if value_type == _ARRAY:
            item_type, count = self._unpack("<IQ", offset)
            end = self._skip_items(item_type, count, offset + 12)
            return GGUFArray(self, item_type, count, offset + 12), end
        values, end = self._read_items(value_type, 1, offset)
        return values[0], end

    def _read_items(self, item_type: int, count: int, offset: int) -> tuple[list[Any], int]:
        if item_type == _STRING:
            strings = []
            for _ in range(count):
                text, offset = self._read_string(offset)
                strings.append(text)
            return strings, offset
        if item_type == _ARRAY:
            nested = []
            for _ in range(count):
                value, offset = self._read_value(_ARRAY, offset)
                nested.append(value.contents())
            return nested, offset
        fmt = _scalar_format(item_type)
        values = list(self._unpack(f"<{count}{fmt}", offset))
        return values, offset + count * struct.calcsize(fmt)

    def _skip_items(self, item_type: int, count: int, offset: int) -> int:
        """The offset after `count` items, reading only string lengths (one struct call per string)."""
        if item_type == _STRING:
            for _ in range(count):
                (length,) = self._unpack("<Q", offset)
                offset += 8 + length
            return offset
        if item_type == _ARRAY:
            for _ in range(count):
                offset = self._read_value(_ARRAY, offset)[1]
            return offset
        return offset + count * struct.calcsize(_scalar_format(item_type))

    def _read_tensor_info(self, offset: int) -> tuple[tuple[str, tuple[int, ...], int, int], int]:
        name, offset = self._read_string(offset)
        (num_dims,) = self._unpack("<I", offset)
        dims = self._unpack(f"<{num_dims}Q", offset + 4)
        offset += 4 + 8 * num_dims
        raw_type, data_offset = self._unpack("<IQ", offset)
        return (name, tuple(reversed(dims)), raw_type, data_offset), offset + 12

    def _tensor(
        self, name: str, shape: tuple[int, ...], raw_type: int, data_offset: int, data_start: int
    ) -> GGUFTensor:
        type_name, block_size, type_size = ggml_type_info(raw_type, name)
        if shape[-1] % block_size:
            raise ValueError(f"tensor {name!r}: row of {shape[-1]} is not a multiple of {type_name} blocks")
        byte_shape = (*shape[:-1], shape[-1] // block_size * type_size)
        start = data_start + data_offset
        end = start + int(np.prod(byte_shape))
        if end > len(self.buffer):
            raise ValueError(f"tensor {name!r} ends past the end of the file")
        return GGUFTensor(name, raw_type, shape, self.buffer[start:end].reshape(byte_shape))


def ggml_type_info(raw_type: int, tensor_name: str) -> tuple[str, int, int]:
    """(name, values per block, bytes per block) of a GGML tensor type; ValueError naming the tensor if unknown."""
    if raw_type in _COMMON_TYPES:
        return _COMMON_TYPES[raw_type]
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        tensor_type = GGMLQuantizationType(raw_type)
    except ValueError as error:
        raise ValueError(f"tensor {tensor_name!r} has an unknown GGML type {raw_type}") from error
    return (tensor_type.name, *GGML_QUANT_SIZES[tensor_type])


def _scalar_format(item_type: int) -> str:
    fmt = _SCALAR_FORMATS.get(item_type)
    if fmt is None:
        raise ValueError(f"unknown GGUF metadata type {item_type}")
    return fmt


def read_gguf_file(path: str | Path) -> GGUFFile:
    """The parsed file, shared by every reader in this process while its size and mtime are unchanged."""
    path = Path(path).resolve()
    stat = path.stat()
    return _read_cached(path, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=2)
def _read_cached(path: Path, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)
