"""Writes tests/data/kquants_llama_cpp.npz: llama.cpp's own Q4_K / Q6_K bytes for a few inputs, the reference
tests/test_gguf_export.py compares jaxswift's quantizers with (llama.cpp is not installable offline in CI).

How it was made (2026-12-03): the llama-cpp-python 0.3.36 sdist (`pip download llama-cpp-python --no-deps
--no-binary :all: --no-build-isolation`), its vendor/llama.cpp/ggml/src/ggml-quants.c compiled alone
(`gcc -O2 -shared -fPIC -Iggml/include -Iggml/src ggml-quants.c shim.c -lm`, shim.c defining ggml_abort,
ggml_log_internal, ggml_row_size, ggml_type_name, ggml_type_size, none of which the *_ref quantizers call), then
`python make_kquants_golden.py /path/to/libq.so`.
"""

import ctypes
import sys
from pathlib import Path

import numpy as np


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"gauss": rng.standard_normal((4, 512)).astype(np.float32),
            "wide": (rng.standard_normal((4, 512)) * np.linspace(0.01, 5, 512)).astype(np.float32),
            "sparse": (rng.standard_normal((4, 512)) * (rng.random((4, 512)) < 0.1)).astype(np.float32)}


def main(lib_path: str) -> None:
    lib = ctypes.CDLL(lib_path)

    def quantize(fn, x, nbytes):
        out = np.zeros(x.size // 256 * nbytes, np.uint8)
        getattr(lib, fn)(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
        return out.reshape(x.shape[0], -1)

    arrays = {}
    for name, x in inputs().items():
        arrays[f"{name}_x"] = x
        arrays[f"{name}_q4_k"] = quantize("quantize_row_q4_K_ref", x, 144)
        arrays[f"{name}_q6_k"] = quantize("quantize_row_q6_K_ref", x, 210)
    np.savez_compressed(Path(__file__).parent / "kquants_llama_cpp.npz", **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
