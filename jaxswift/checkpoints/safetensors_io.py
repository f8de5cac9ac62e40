"""Reading and writing .safetensors files with numpy memory maps.

Our own small reader because it (1) reads bfloat16/fp8 into numpy via ml_dtypes, (2) maps tensors lazily, one
at a time, without a whole-file copy, and (3) checks offsets against the file size so a truncated download gets a
clear error instead of a crash deep inside a copy.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from jaxswift.errors import CheckpointError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsFile:
    """Lazily mapped tensors of one file; `get(name)` returns a read-only numpy view."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise CheckpointError(f"{self.path}: truncated or not a safetensors file (header length {header_len} "
                                      f"exceeds file size {size})")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self.data_start = 8 + header_len
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise CheckpointError(f"{self.path}: truncated safetensors file: tensors need {self.data_start + end} "
                                  f"bytes, file has {size}")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        if entry["dtype"] not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        raw = self._map[self.data_start + begin: self.data_start + end]
        return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _header(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> bytes:
    """The file's first bytes: the header's length, then the JSON header naming each tensor's dtype, shape and
    byte range (in the order given), padded so the data starts 8-byte aligned as the format wants."""
    header, offset = {}, 0
    for name, arr in tensors.items():
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": NAMES[np.dtype(arr.dtype)], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Writes tensors in order, streaming each one (no concatenated copy of the whole file)."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_header(tensors, metadata))
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
    tmp.replace(path)


def iter_folder_tensors(folder: Path) -> Iterator[tuple[str, np.ndarray, Path]]:
    """(name, array view, file) for every tensor of an HF folder: one model.safetensors or a sharded index."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = list(dict.fromkeys(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        found = sorted(p.name for p in folder.iterdir())
        hint = " (pickled .bin checkpoints are not loaded: convert them to safetensors)" if any(
            n.endswith(".bin") for n in found) else ""
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
    opened = [SafetensorsFile(folder / name) for name in files]  # open all first: header errors before any work
    for st in opened:
        for name in st.keys():
            yield name, st.get(name), st.path


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors encoding of `tensors` in memory (a weight push's HTTP body): the same header and layout
    as write_safetensors, bfloat16 / fp8 included."""
    return b"".join([_header(tensors, metadata), *(np.ascontiguousarray(a).tobytes() for a in tensors.values())])


def tensors_from_bytes(data: bytes, source: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(name -> read-only array view into `data`, metadata) of a safetensors encoding; a malformed one gets a
    CheckpointError naming `source` (where the bytes came from)."""
    if len(data) < 8:
        raise CheckpointError(f"{source}: not a safetensors body ({len(data)} bytes, no header)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise CheckpointError(f"{source}: truncated safetensors body (header length {header_len}, body "
                              f"{len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", {}) or {}
    buffer, start, out = memoryview(data), 8 + header_len, {}
    for name, entry in header.items():
        if entry.get("dtype") not in DTYPES:
            raise CheckpointError(f"{source}: tensor {name!r} has unsupported dtype {entry.get('dtype')}")
        begin, end = entry["data_offsets"]
        if start + end > len(data):
            raise CheckpointError(f"{source}: truncated safetensors body: tensor {name!r} ends at byte "
                                  f"{start + end} of {len(data)}")
        out[name] = np.frombuffer(buffer[start + begin:start + end], DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return out, metadata
