"""Calibration for GPTQ / AWQ: token windows from a dataset, and the model run one decoder layer at a time.

`quantize_layer_by_layer` embeds the calibration tokens, then for each layer records the inputs of its matmuls
(one array [N, I] per shared input: q/k/v, o, gate/up, down), lets the method quantize the layer from them, and
feeds the next layer the output of the layer the method returns (quantized for GPTQ, rescaled float for AWQ), so
each layer is calibrated on what the layers before it will really produce.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.errors import ConfigError, DataError
from jaxswift.models.config import ModelConfig
from jaxswift.models.transformer import decoder_layer, linear
from jaxswift.quant.qweight import flat_shape, input_axes

# Matmul weights of a layer grouped by the input they share; the first key names the group.
INPUT_GROUPS = (("wq", "wk", "wv"), ("wo",), ("w_gate", "w_up"), ("w_down",))


def flat_weight(w, key: str):
    """A per-layer weight as [I, O], its contracted axes merged (wo's N, H); numpy or jax, dtype kept."""
    return w.reshape(flat_shape(w.shape, input_axes(key)))


def sequence_positions(batch: int, length: int):
    """(positions, segment ids) [B, T] of calibration windows: each row one sequence from position 0."""
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return positions, jnp.ones((batch, length), jnp.int32)


def subsample_rows(x_NI, n: int):
    """At most n rows of x, evenly strided (AutoAWQ's n_sample_token subsampling)."""
    step = max(1, x_NI.shape[0] // n)
    return x_NI[::step][:n]


def _row_text(row, where: str, tokenizer) -> str:
    from jaxswift.data.formats import row_to_messages
    from jaxswift.data.templates import render_chat

    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    return render_chat(tokenizer, row_to_messages(row, where))


def calibration_tokens(datasets: list[str], tokenizer, *, n_samples: int, seqlen: int) -> np.ndarray:
    """[n_samples, seqlen] int32: the dataset rows ('text' rows as they are, chats rendered with the chat
    template), tokenized, concatenated and cut into consecutive windows."""
    from jaxswift.data.formats import iter_rows, parse_dataset_spec

    if not datasets:
        raise ConfigError("GPTQ and AWQ need calibration data: pass --dataset FILE (rows with a 'text' field or "
                          "any chat format)")
    if n_samples < 1 or seqlen < 2:
        raise ConfigError(f"--quant_n_samples must be >= 1 and --quant_seqlen >= 2 (got {n_samples}, {seqlen})")
    if tokenizer is None:
        raise ConfigError("calibration needs the model's tokenizer, and this model has none")
    need, stream = n_samples * seqlen, []
    for spec in datasets:
        path, limit = parse_dataset_spec(spec)
        for k, (where, row) in enumerate(iter_rows(path)):
            if (limit is not None and k >= limit) or len(stream) >= need:
                break
            stream.extend(tokenizer.encode(_row_text(row, where, tokenizer), add_special_tokens=False))
    if len(stream) < need:
        raise DataError(f"calibration data {', '.join(datasets)} has {len(stream)} tokens; --quant_n_samples "
                        f"{n_samples} x --quant_seqlen {seqlen} needs {need} (add rows or lower either)")
    return np.asarray(stream[:need], np.int32).reshape(n_samples, seqlen)


class _Tap:
    """A weight leaf that records its input (flattened to [N, I], float32) while tracing, then does the matmul."""

    def __init__(self, weight, key: str, record: dict):
        self.weight, self.key, self.record = weight, key, record

    def apply(self, equation: str, x):
        inputs, out = equation.split("->")
        x_spec, w_spec = inputs.split(",")
        n_in = sum(c in w_spec and c not in out for c in x_spec)  # contracted axes lead the weight
        in_features = int(np.prod(self.weight.shape[:n_in]))
        self.record.setdefault(self.key, x.astype(jnp.float32).reshape(-1, in_features))
        return linear(equation, x, self.weight)


@functools.partial(jax.jit, static_argnames=("cfg",))
def layer_inputs(layer: dict, x_BTD, window, cfg: ModelConfig, positions, segments) -> dict:
    """{group's first key: [N, I] float32 input} of one float layer's matmuls."""
    record: dict = {}
    tapped = dict(layer)
    for group in INPUT_GROUPS:
        for key in group:
            tapped[key] = _Tap(layer[key], group[0], record)
    decoder_layer(x_BTD, tapped, window, cfg, positions, segments)
    return record


_run_layer = jax.jit(decoder_layer, static_argnames=("cfg",))


def quantize_layer_by_layer(params: dict, cfg: ModelConfig, tokens_BT: np.ndarray,
                            quantize_layer: Callable[[int, dict, dict], tuple[dict, dict]]) -> list[dict]:
    """Runs `quantize_layer(i, float_layer, inputs) -> (exported_layer, layer_to_run)` over the layers in order.

    Returns the exported layers (per-layer trees); the caller stacks them.
    """
    tokens = jnp.asarray(tokens_BT)
    positions, segments = sequence_positions(*tokens.shape)
    x = jnp.take(params["embed"], tokens, axis=0).astype(jnp.float32)
    exported = []
    for i in range(cfg.num_layers):
        layer = jax.tree.map(lambda a: a[i].astype(jnp.float32), params["layers"])
        window = cfg.window_per_layer[i]
        inputs = jax.tree.map(np.asarray, layer_inputs(layer, x, window, cfg, positions, segments))
        done, to_run = quantize_layer(i, layer, inputs)
        exported.append(done)
        x = _run_layer(x, to_run, window, cfg, positions, segments)[0]
    return exported
