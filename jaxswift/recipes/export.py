"""Export: `python -m jaxswift.recipes.export --adapters DIR --merge_lora true --output_dir OUT`.

Writes a full Hugging Face folder: the base model (from --model, or the adapter's base_model_name_or_path) with the
PEFT LoRA adapter merged into its weights (a vision-language model's adapter may reach its vision tower and
aligner too; the processor files are copied along). Without --adapters it converts --model (e.g. a GGUF) to an HF folder.

With --quant_method the (merged) model is quantized on the way out, in the layout others load:
  gptq (--quant_bits 4|8, --group_size, --desc_act, calibrated on --dataset) -> AutoGPTQ/optimum/vLLM "gptq";
  awq (--quant_bits 4, --group_size, calibrated on --dataset) -> AutoAWQ/vLLM "awq" GEMM;
  fp8 (e4m3, --quant_per_channel true|false) and int8 (per channel) -> compressed-tensors, which vLLM serves and
  transformers loads on CPU. jaxswift.load_model reads all four back (see jaxswift.quant.load).

With --to_gguf true the (merged) model is written as OUTPUT_DIR/model-<gguf_type>.gguf instead, --gguf_type
f16 | q8_0 | q4_0 | q4_k_m (llama.cpp's names; see jaxswift.checkpoints.gguf_export), for llama/mistral/qwen2/qwen3.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import field
from pathlib import Path
from typing import Optional

from jaxswift.recipes.common import run_main


@dataclasses.dataclass
class ExportArguments:
    model: Optional[str] = field(default=None, metadata={"help": "base model (default: the adapter's base)"})
    adapters: Optional[str] = field(default=None, metadata={"help": "PEFT LoRA adapter folder"})
    merge_lora: bool = True
    output_dir: Optional[str] = None
    dtype: Optional[str] = None
    quant_method: Optional[str] = field(default=None, metadata={"help": "gptq | awq | fp8 | int8"})
    quant_bits: Optional[int] = field(default=None, metadata={"help": "gptq 4|8 (default 4), awq 4, fp8/int8 8"})
    dataset: list[str] = field(default_factory=list, metadata={"help": "calibration data for gptq/awq"})
    group_size: int = field(default=128, metadata={"help": "gptq/awq rows per scale; -1 = per channel"})
    desc_act: bool = field(default=False, metadata={"help": "gptq act-order (g_idx)"})
    sym: bool = field(default=True, metadata={"help": "gptq symmetric grid"})
    quant_per_channel: bool = field(default=True, metadata={"help": "fp8 scale per output channel (else tensor)"})
    quant_n_samples: int = 128
    quant_seqlen: int = 512
    to_gguf: bool = field(default=False, metadata={"help": "write one GGUF file (llama.cpp) instead of a folder"})
    gguf_type: Optional[str] = field(default=None, metadata={"help": "with --to_gguf: f16 (default) | q8_0 | q4_0 | q4_k_m"})
    config: Optional[str] = None


def _base_model(args: ExportArguments) -> str:
    from jaxswift.errors import ConfigError

    if args.model:
        return args.model
    if not args.adapters:
        raise ConfigError("give --model (to convert) or --adapters (to merge)")
    config = Path(args.adapters) / "adapter_config.json"
    if not config.is_file():
        raise ConfigError(f"--adapters {args.adapters}: no adapter_config.json")
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{config}: no base_model_name_or_path; pass --model")
    return base


def _merged(model, adapters: str):
    """The model with the PEFT LoRA adapter folded into its weights (W + scale*BA), text or vision-language."""
    from jaxswift.tuners.lora import merge_lora

    if model.is_vlm:  # the adapter may reach the vision tower and the aligner as well as the LLM
        from jaxswift.checkpoints.vlm_peft import load_vlm_peft_adapter

        params, _ = load_vlm_peft_adapter(model.params, model.config, adapters)
    else:
        from jaxswift.checkpoints.hf import seq_cls_body
        from jaxswift.checkpoints.peft import is_seq_cls_adapter, load_peft_adapter, load_seq_cls_adapter

        if is_seq_cls_adapter(adapters):  # a classifier's adapter: merged into an XxxForSequenceClassification folder
            params, _, head = load_seq_cls_adapter(model.params, model.config, adapters)
            return dataclasses.replace(model, params=merge_lora(params), head=head, config=seq_cls_body(model.config))
        params, _ = load_peft_adapter(model.params, model.config, adapters)
    return dataclasses.replace(model, params=merge_lora(params))


def _quantized_export(args: ExportArguments, model, out: Path):
    from jaxswift.errors import ConfigError
    from jaxswift.quant.calibration import calibration_tokens
    from jaxswift.quant.export_formats import CALIBRATED, QuantSpec, check_spec, quantize_model, save_quantized

    if model.is_vlm:
        raise ConfigError(f"--quant_method {args.quant_method}: quantized export covers the text families; "
                          f"{model.source} is a vision-language model (export it merged, without --quant_method)")
    if args.adapters:
        model = _merged(model, args.adapters)
    bits = args.quant_bits or (4 if args.quant_method in ("gptq", "awq") else 8)
    spec = QuantSpec(args.quant_method, bits, args.group_size, args.desc_act, args.sym, args.quant_per_channel)
    check_spec(spec, model.config)
    calibration = None
    if spec.method in CALIBRATED:
        calibration = calibration_tokens(args.dataset, model.tokenizer, n_samples=args.quant_n_samples,
                                         seqlen=args.quant_seqlen)
    elif args.dataset:
        raise ConfigError(f"--quant_method {spec.method} is calibration-free: drop --dataset")
    save_quantized(model, quantize_model(model, spec, calibration), spec, out)


def _check_gguf_flags(args: ExportArguments) -> None:
    """Flag checks that need no model, so a typo fails before loading one."""
    from jaxswift.checkpoints.gguf_export import check_gguf_type
    from jaxswift.errors import ConfigError

    if args.quant_method:
        raise ConfigError(f"--to_gguf and --quant_method {args.quant_method} exclude each other: pick the GGUF "
                          "block format with --gguf_type")
    check_gguf_type(args.gguf_type or "f16")


def _gguf_export(args: ExportArguments, model, out: Path) -> Path:
    import jax

    from jaxswift.checkpoints.gguf_export import check_gguf_export, save_gguf
    from jaxswift.errors import ConfigError
    from jaxswift.quant.qweight import is_quantized

    if model.is_vlm:
        raise ConfigError(f"--to_gguf: {model.source} is a vision-language model; GGUF export covers text models")
    if any(is_quantized(leaf) for leaf in jax.tree_util.tree_leaves(model.params, is_leaf=is_quantized)):
        raise ConfigError(f"--to_gguf: {model.source} holds quantized weights (GPTQ/AWQ/FP8/int8); export the GGUF "
                          "from the float model, --gguf_type picks its block format")
    gguf_type = args.gguf_type or "f16"
    check_gguf_export(model.config, gguf_type, model.tokenizer)  # before a merge that may take a while
    if args.adapters:
        model = _merged(model, args.adapters)
    return save_gguf(model, out / f"model-{gguf_type}.gguf", gguf_type)


def main(argv: list[str]) -> int:
    import jaxswift
    from jaxswift.errors import ConfigError
    from jaxswift.train.args import parse_args

    args = parse_args(ExportArguments, argv)
    if args.adapters and not args.merge_lora:
        raise ConfigError("--merge_lora false: the adapter folder already is the unmerged export")
    if args.gguf_type is not None and not args.to_gguf:
        raise ConfigError(f"--gguf_type {args.gguf_type} needs --to_gguf true")
    if args.to_gguf:
        _check_gguf_flags(args)
    model = jaxswift.load_model(_base_model(args), dtype=args.dtype)
    out = Path(args.output_dir or (f"{args.adapters.rstrip('/')}-merged" if args.adapters else "exported"))
    if args.to_gguf:
        out = _gguf_export(args, model, out)
    elif args.quant_method:
        _quantized_export(args, model, out)
    elif args.adapters:
        jaxswift.save_model(_merged(model, args.adapters), out)
    else:
        jaxswift.save_model(model, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
