"""NF4 weights as bitsandbytes stores them (QLoRA), dequantized inside the matmul.

Format (bitsandbytes `quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)`): the torch-layout
weight (out, in) is flattened row-major and cut into blocks of 64; each block keeps its absmax and every value the
index of the nearest of the 16 NF4 levels to value / absmax (a value on a midpoint takes the lower level); two
codes per byte, the first in the high nibble. A last, shorter block and an odd count are zero-padded (as
bitsandbytes does), so any size is accepted. Double quantization stores the absmax as 8-bit codes of bitsandbytes'
signed dynamic map: absmax - offset (offset = their mean) in blocks of 256, each with its own float32 absmax.

`NF4Weight` keeps those arrays with the leading `layers` axis of the weight it replaces, so the decoder's scan
slices it like any leaf; `apply` dequantizes one layer to the compute dtype and runs the matmul. It holds no float
leaf, so gradients never reach it (it is frozen by construction); LoRA adapters sit beside it in a `LoraWeight`.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxswift.checkpoints.hf import dense_leaf, read_hf_config, set_path
from jaxswift.checkpoints.safetensors_io import iter_folder_tensors, write_safetensors
from jaxswift.errors import CheckpointError, ConfigError
from jaxswift.models.config import config_to_hf
from jaxswift.models.families import weight_maps
from jaxswift.models.spec import abstract_params, param_specs
from jaxswift.quant.int8 import quantize_int8

F32 = jnp.float32
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
CPU_GRID = 65535  # bitsandbytes' CPU kernel snaps value / absmax to this grid before its 8-bit lookup
# bitsandbytes' NF4 levels (functional.get_4bit_type("nf4")), as float32.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
NF4_ZERO_CODE = 7


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) bit for bit: a float32 step, each value computed from the
    nearer end as one fused multiply-add (float64 here, rounded once)."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    values = np.where(i < steps // 2, np.float64(start32) + step * i, np.float64(end32) - step * (steps - 1 - i))
    return values.astype(np.float32)


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`): 256 sorted float32 levels in
    [-1, 1], dense near zero; used to store the absmax of double quantization."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        bounds = _torch_linspace(0.1, 1.0, items)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        magnitude = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
        data += list(magnitude * means) + list(-magnitude * means)
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return np.sort(np.array(data, np.float32))


DYNAMIC_MAP = dynamic_map()


def _midpoints(levels: np.ndarray) -> np.ndarray:
    return ((levels[:-1] + levels[1:]) / np.float32(2.0)).astype(np.float32)


def _blocks(flat, blocksize: int):
    """[..., n] -> [..., ceil(n / blocksize), blocksize], zero-padded (zeros never raise a block's absmax)."""
    n = flat.shape[-1]
    pad = -n % blocksize
    if pad:
        flat = jnp.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, pad)])
    return flat.reshape(*flat.shape[:-1], -1, blocksize)


def quantize_blockwise(flat, levels: np.ndarray, blocksize: int, *, grid: int | None = None):
    """(codes uint8 [..., n], absmax float32 [..., blocks]): the level nearest to value / block absmax, a tie
    going to the lower level (bitsandbytes' bucketize over midpoints, its 4-bit path: value * (1 / absmax)).

    grid=65535 reproduces bitsandbytes' CPU kernel for 8-bit blockwise codes: value / absmax is first snapped to
    the nearest of 65536 evenly spaced points in [-1, 1] (its lookup table), whose nearest level is taken.
    """
    n = flat.shape[-1]
    blocks = _blocks(flat.astype(F32), blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    safe = jnp.where(absmax > 0, absmax, 1.0)[..., None]  # an all-zero block (XLA flushes 1e-38 to zero)
    if grid is None:
        scaled = jnp.clip(blocks * (1.0 / safe), -1.0, 1.0)
    else:  # the CPU kernel's 0 / 0 is NaN, which it stores as code 0
        normed = jnp.where(absmax[..., None] > 0, jnp.clip(blocks / safe, -1.0, 1.0), -1.0)
        index = jnp.floor((normed + 1.0) * 0.5 * grid + 0.5)
        scaled = index / grid * 2.0 - 1.0
    codes = jnp.searchsorted(jnp.asarray(_midpoints(levels)), scaled, side="left").astype(jnp.uint8)
    return codes.reshape(*codes.shape[:-2], -1)[..., :n], absmax


def dequantize_blockwise(codes, absmax, levels: np.ndarray, blocksize: int):
    n = codes.shape[-1]
    values = _blocks(jnp.asarray(levels)[codes.astype(jnp.int32)], blocksize) * absmax[..., None]
    return values.reshape(*values.shape[:-2], -1)[..., :n]


def pack_nibbles(codes, fill: int = NF4_ZERO_CODE):
    """[..., n] codes 0..15 -> [..., ceil(n/2)] bytes, the first code in the high nibble; an odd n gets `fill`
    last (bitsandbytes pads with a zero value, NF4 code 7)."""
    if codes.shape[-1] % 2:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)], constant_values=fill)
    pairs = codes.reshape(*codes.shape[:-1], -1, 2).astype(jnp.uint8)
    return (pairs[..., 0] << 4) | pairs[..., 1]


def unpack_nibbles(packed, n: int):
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]


def to_torch_layout(w, n_in: int, lead: int):
    """Our [lead..., *in, *out] -> torch's (out, in) per lead index, flattened row-major: [lead..., out*in]."""
    lead_shape = w.shape[:lead]
    n_inputs = math.prod(w.shape[lead:lead + n_in])
    matrix = w.reshape(*lead_shape, n_inputs, -1)
    return jnp.swapaxes(matrix, -1, -2).reshape(*lead_shape, -1)


@struct.dataclass
class NF4Weight:
    """A frozen NF4 weight; leading axes (layers) on every array, per-layer shapes in the static fields.

    packed uint8 [..., ceil(out*in/2)]; absmax uint8 [..., blocks] (double quant) or float32; nested_absmax
    float32 [..., ceil(blocks/256)] and offset float32 [...] with double quant, else None.
    """
    packed: Any
    absmax: Any
    nested_absmax: Any = None
    offset: Any = None
    in_shape: tuple = struct.field(pytree_node=False, default=())
    out_shape: tuple = struct.field(pytree_node=False, default=())
    blocksize: int = struct.field(pytree_node=False, default=BLOCKSIZE)
    dtype: str = struct.field(pytree_node=False, default="float32")  # the original weight's (bnb's quant_state)

    @property
    def shape(self) -> tuple:
        """The dequantized weight's shape in our layout, leading axes included."""
        return (*self.packed.shape[:-1], *self.in_shape, *self.out_shape)

    @property
    def torch_shape(self) -> tuple[int, int]:
        return math.prod(self.out_shape), math.prod(self.in_shape)

    def block_absmax(self):
        """float32 [..., blocks]: the per-block absmax, undoing double quantization."""
        if self.nested_absmax is None:
            return self.absmax.astype(F32)
        scaled = dequantize_blockwise(self.absmax, self.nested_absmax, DYNAMIC_MAP, NESTED_BLOCKSIZE)
        return scaled + self.offset[..., None]

    def dequantize_torch(self, dtype=F32):
        """[..., out, in] in torch's layout."""
        out, inp = self.torch_shape
        codes = unpack_nibbles(self.packed, out * inp)
        flat = dequantize_blockwise(codes, self.block_absmax(), NF4_LEVELS, self.blocksize)
        return flat.reshape(*flat.shape[:-1], out, inp).astype(dtype)

    def dequantize(self, dtype=F32):
        """[..., *in, *out] in our layout."""
        w = jnp.swapaxes(self.dequantize_torch(dtype), -1, -2)
        return w.reshape(self.shape)

    def apply(self, equation: str, x):
        return apply_dequantized(equation, x, self.dequantize_torch(x.dtype), self.in_shape, self.out_shape)


def apply_dequantized(equation: str, x, w_out_in, in_shape: tuple, out_shape: tuple):
    """x contracted with a torch-layout [out, in] matrix, for `linear`'s equations: x's trailing axes are the
    weight's input axes (e.g. BTD,DNH->BTNH or BTNH,NHD->BTD); the output axes come last in the result."""
    inputs, out = equation.replace(" ", "").split("->")
    x_spec, w_spec = inputs.split(",")
    n_in = len(in_shape)
    if x_spec[-n_in:] != w_spec[:n_in] or out != x_spec[:-n_in] + w_spec[n_in:]:
        raise ValueError(f"quantized weights need x's trailing axes to be the weight's inputs, got {equation!r}")
    kept = x.shape[:-n_in]
    y = jnp.einsum("...i,oi->...o", x.reshape(*kept, -1), w_out_in)
    return y.reshape(*kept, *out_shape)


def quantize_nf4(w, n_in: int, *, lead: int = 1, double_quant: bool = True, blocksize: int = BLOCKSIZE
                 ) -> NF4Weight:
    """Our-layout weight [lead..., *in, *out] -> NF4Weight, exactly as bitsandbytes quantizes each (out, in)
    matrix (per lead index: per layer)."""
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ConfigError(f"nf4 block size {blocksize}: expected one of 32, 64, ..., 4096 (bitsandbytes' sizes)")
    dtype = jnp.dtype(w.dtype).name
    in_shape, out_shape = tuple(w.shape[lead:lead + n_in]), tuple(w.shape[lead + n_in:])
    codes, absmax = quantize_blockwise(to_torch_layout(w, n_in, lead), NF4_LEVELS, blocksize)
    fields = dict(in_shape=in_shape, out_shape=out_shape, blocksize=blocksize, dtype=dtype)
    if not double_quant:
        return NF4Weight(pack_nibbles(codes), absmax, **fields)
    q_absmax, nested, offset = double_quantize(absmax)
    return NF4Weight(pack_nibbles(codes), q_absmax, nested, offset, **fields)


def double_quantize(absmax, offset=None):
    """(absmax codes uint8, nested absmax float32, offset float32): bitsandbytes' compress_statistics.

    offset defaults to the float32 mean of absmax. bitsandbytes takes torch's float32 mean, whose summation order is
    torch's own, so the two may differ in the last bit; given the same offset, the codes are identical.
    """
    offset = jnp.mean(absmax, axis=-1, dtype=F32) if offset is None else jnp.asarray(offset, F32)
    codes, nested = quantize_blockwise(absmax - offset[..., None], DYNAMIC_MAP, NESTED_BLOCKSIZE, grid=CPU_GRID)
    return codes, nested, offset


# --- the model's base weights ---------------------------------------------------------------------------------------

LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def _n_in(cfg, name: str) -> int:
    return len(param_specs(cfg)["layers"][name].fan_in_axes)


def quantize_params(params: dict, cfg, method: str = "nf4") -> dict:
    """params with every attention and MLP projection (what bitsandbytes replaces: the Linear layers, never
    embeddings, norms or lm_head) stored quantized: `nf4` (blocks of 64, double quant) or `int8` (per output
    channel, symmetric). Adapters added afterwards wrap the quantized base."""
    if method not in QUANT_METHODS:
        raise ConfigError(f"--quant_method {method!r}: expected one of {' | '.join(QUANT_METHODS)}")
    layers = dict(params["layers"])
    names = tuple(name for name in LINEAR_NAMES if name in layers)
    for name in names:
        if not hasattr(layers[name], "dtype") or hasattr(layers[name], "apply"):
            raise ConfigError(f"{name}: already quantized or adapted; quantize the plain base weights first")
    n_ins = tuple((name, _n_in(cfg, name)) for name in names)
    layers.update(_quantize_all({name: layers[name] for name in names}, n_ins, method))
    return {**params, "layers": layers}


@partial(jax.jit, static_argnums=(1, 2))
def _quantize_all(weights: dict, n_ins: tuple, method: str) -> dict:
    """All projections in one compiled call (one compile instead of one per weight)."""
    quantize = quantize_nf4 if method == "nf4" else quantize_int8
    return {name: quantize(weights[name], n_in) for name, n_in in n_ins}


QUANT_METHODS = ("nf4", "int8")


def abstract_quantized_params(cfg, method: str = "nf4", params_abstract=None) -> dict:
    """ShapeDtypeStruct leaves of the quantized base params of `cfg` (for memory planning and AOT lowering);
    nothing is allocated. params_abstract defaults to `models.spec.abstract_params(cfg)`."""
    params_abstract = abstract_params(cfg) if params_abstract is None else params_abstract
    return jax.eval_shape(lambda p: quantize_params(p, cfg, method), params_abstract)


# --- bitsandbytes / transformers serialization -----------------------------------------------------------------------

QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"


def bnb_tensors(w: NF4Weight, name: str) -> dict[str, np.ndarray]:
    """One layer's NF4Weight (no leading axes) as the tensors transformers + bitsandbytes save for a Linear4bit
    named `name` (e.g. model.layers.0.self_attn.q_proj.weight)."""
    if w.packed.ndim != 1:
        raise ValueError(f"{name}: bnb_tensors takes one layer's weight (slice the layers axis first)")
    state = {"quant_type": "nf4", "blocksize": w.blocksize, "dtype": w.dtype, "shape": list(w.torch_shape)}
    out = {name: np.asarray(w.packed)[:, None], f"{name}.quant_map": NF4_LEVELS.copy()}
    if w.nested_absmax is None:
        out[f"{name}.absmax"] = np.asarray(w.absmax, np.float32)
    else:
        out[f"{name}.absmax"] = np.asarray(w.absmax, np.uint8)
        out[f"{name}.nested_absmax"] = np.asarray(w.nested_absmax, np.float32)
        out[f"{name}.nested_quant_map"] = DYNAMIC_MAP.copy()
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=float(w.offset))
    out[f"{name}.{QUANT_STATE_KEY}"] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
    return out


def nf4_from_bnb_tensors(tensors: dict[str, np.ndarray], name: str, in_shape: tuple, out_shape: tuple,
                         source: str = "checkpoint") -> NF4Weight:
    """One layer's NF4Weight from bitsandbytes' tensors (see `bnb_tensors`); checks the maps and the shape."""
    def get(key):
        if key not in tensors:
            raise CheckpointError(f"{source}: missing tensor {key!r} (a bitsandbytes NF4 weight has {name}, "
                                  f"{name}.absmax, {name}.quant_map and {name}.{QUANT_STATE_KEY})")
        return np.asarray(tensors[key])

    state_key = f"{name}.{QUANT_STATE_KEY}"
    if state_key not in tensors and any(k.startswith(f"{name}.quant_state.") for k in tensors):
        raise CheckpointError(f"{source}: {name} is not NF4 (only bitsandbytes' nf4 quant_type is supported)")
    try:
        state = json.loads(bytes(get(state_key).astype(np.uint8)).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: {state_key} is not bitsandbytes' JSON quant state ({e})") from None
    expected = [math.prod(out_shape), math.prod(in_shape)]
    if list(state.get("shape", [])) != expected:
        raise CheckpointError(f"{source}: {name} has shape {state.get('shape')}, the config expects {expected}")
    if not np.array_equal(get(f"{name}.quant_map").astype(np.float32), NF4_LEVELS):
        raise CheckpointError(f"{source}: {name}.quant_map is not the NF4 table")
    fields = dict(in_shape=tuple(in_shape), out_shape=tuple(out_shape), blocksize=int(state["blocksize"]),
                  dtype=state.get("dtype", "float32"))
    packed = jnp.asarray(get(name).reshape(-1).view(np.uint8))
    if "nested_offset" not in state:
        return NF4Weight(packed, jnp.asarray(get(f"{name}.absmax"), F32), **fields)
    if state.get("nested_blocksize") != NESTED_BLOCKSIZE or not np.array_equal(
            get(f"{name}.nested_quant_map").astype(np.float32), DYNAMIC_MAP):
        raise CheckpointError(f"{source}: {name}: nested quantization other than bitsandbytes' dynamic map in blocks "
                              f"of {NESTED_BLOCKSIZE} is not supported")
    return NF4Weight(packed, jnp.asarray(get(f"{name}.absmax"), jnp.uint8),
                     jnp.asarray(get(f"{name}.nested_absmax"), F32), jnp.asarray(state["nested_offset"], F32),
                     **fields)


def stack_layers(weights: list[NF4Weight]) -> NF4Weight:
    """Per-layer NF4Weights -> one with a leading layers axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *weights)


# --- whole models: the folders transformers + bitsandbytes write and read ------------------------------------------

def bnb_quantization_config(compute_dtype: str = "float32") -> dict:
    """config.json's quantization_config for an NF4 model with double quantization (as transformers writes it)."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": compute_dtype,
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def save_bnb_nf4(params: dict, cfg, out_dir, *, tokenizer=None):
    """An HF folder that `AutoModelForCausalLM.from_pretrained` loads with bitsandbytes Linear4bit layers: NF4Weight
    leaves as bitsandbytes' tensors, everything else in float as `save_hf` writes it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for m in weight_maps(cfg):
        node = _get(params, m.path)
        layers = range(cfg.num_layers) if m.per_layer else [None]
        for i in layers:
            name = m.hf_name.format(i=i)
            one = node if i is None else jax.tree.map(lambda a: a[i], node)
            if isinstance(one, NF4Weight):
                tensors.update(bnb_tensors(one, name))
            elif hasattr(one, "apply"):
                raise ConfigError(f"save_bnb_nf4: {name} is {type(one).__name__}; merge or drop adapters first")
            else:
                tensors[name] = np.ascontiguousarray(m.to_hf(np.asarray(jax.device_get(one))))
    write_safetensors(out / "model.safetensors", tensors, {"format": "pt"})
    config = config_to_hf(cfg)
    config["quantization_config"] = bnb_quantization_config(cfg.dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _check_bnb_config(raw: dict, where: str):
    qc = raw.get("quantization_config") or {}
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit") \
            or qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise CheckpointError(f"{where}: quantization_config {qc or None} is not bitsandbytes 4-bit NF4 "
                              "(quant_method bitsandbytes, load_in_4bit true, bnb_4bit_quant_type nf4)")


def load_bnb_nf4(folder, dtype: str | None = None):
    """(ModelConfig, params) from an HF folder of bitsandbytes NF4 weights (transformers' save_pretrained of a
    load_in_4bit model, or `save_bnb_nf4`): Linear4bit weights become NF4Weight leaves, the rest float arrays."""
    folder = Path(folder)
    cfg, raw = read_hf_config(folder, dtype=dtype)
    _check_bnb_config(raw, str(folder / "config.json"))
    tensors = {name: array for name, array, _ in iter_folder_tensors(folder)}
    specs, params = param_specs(cfg), {}
    for m in weight_maps(cfg):
        spec = _get(specs, m.path)
        names = [m.hf_name.format(i=i) for i in range(cfg.num_layers)] if m.per_layer else [m.hf_name]
        if f"{names[0]}.{QUANT_STATE_KEY}" in tensors:
            n_in = len(spec.fan_in_axes)
            in_shape, out_shape = spec.shape[1:1 + n_in], spec.shape[1 + n_in:]
            leaf = stack_layers([nf4_from_bnb_tensors(tensors, n, in_shape, out_shape, str(folder)) for n in names])
        else:
            leaf = dense_leaf(tensors, names, m, cfg, str(folder))
        set_path(params, m.path, leaf)
    return cfg, params
