"""The model as a run trains it: loaded (quantized for QLoRA), wrapped with LoRA, its layers fused."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional

from .errors import ChatkitError
from .families import family_of
from .formatting import ensure_chat_template, ensure_pad_token
from .models import ModelSource, load_model

if TYPE_CHECKING:
    from .device import Placement
    from .options import TrainOptions


BNB_CPU_VERSION = "0.47"  # bnb_runs_on_cpu passes from 0.47 (0.45 has no CPU kernels); training measured with 0.50


def quantization_config(options: TrainOptions, placement: Placement):
    """bitsandbytes' settings for --load-in-4bit (nf4, QLoRA) or --load-in-8bit; None without either.

    On the CPU the layers compute in float32 (the CPU's fast precision) through bitsandbytes' CPU backend;
    on a GPU in the run's precision."""
    if not (options.load_in_4bit or options.load_in_8bit):
        return None
    if placement.device == "mps":
        raise ChatkitError("--load-in-4bit/--load-in-8bit: bitsandbytes has no Apple MPS backend; train on "
                           "the CPU (--device cpu) or drop the flag to train LoRA in float32 on MPS")
    try:
        import bitsandbytes
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ChatkitError(f"--load-in-4bit/--load-in-8bit need bitsandbytes: pip install "
                           f"'bitsandbytes>={BNB_CPU_VERSION}' ({exc})") from None
    if placement.device == "cpu" and not bnb_runs_on_cpu():
        raise ChatkitError(
            f"--load-in-4bit/--load-in-8bit on the CPU need bitsandbytes {BNB_CPU_VERSION} or newer with its CPU "
            f"backend; this is bitsandbytes {getattr(bitsandbytes, '__version__', '?')}: pip install -U "
            f"'bitsandbytes>={BNB_CPU_VERSION}', or drop the flag to train LoRA in float32")
    if options.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=placement.torch_dtype)


@functools.lru_cache(maxsize=None)
def bnb_runs_on_cpu() -> bool:
    """Whether this bitsandbytes quantizes and dequantizes CPU tensors (a round trip of a few numbers)."""
    import torch

    try:
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        values = torch.linspace(-1, 1, 64).reshape(8, 8)
        packed, state = quantize_4bit(values, quant_type="nf4")
        return bool((dequantize_4bit(packed, state) - values).abs().max() < 0.2)
    except Exception:  # noqa: BLE001 - a build without CPU kernels refuses in its own ways
        return False


def prepare_model(options: TrainOptions, source: ModelSource, placement: Placement, tokenizer=None,
                  gradient_checkpointing: Optional[bool] = None):
    """Load the model (and the tokenizer, unless given), and wrap the model with LoRA unless training it whole.
    `gradient_checkpointing` is the plan's choice (--gradient-checkpointing where there is no plan)."""
    if gradient_checkpointing is None:
        gradient_checkpointing = bool(options.gradient_checkpointing)
    loaded = load_model(source, placement, trust_remote_code=options.trust_remote_code,
                        quantization_config=quantization_config(options, placement), adapter_trainable=True,
                        tokenizer=tokenizer)
    model, tokenizer = loaded.model, loaded.tokenizer
    family = family_of(model.config)
    ensure_chat_template(tokenizer, family)
    ensure_pad_token(tokenizer)
    if gradient_checkpointing:
        model.config.use_cache = False
    from .kernels import fuse_lora

    if not options.lora or source.kind == "adapter":
        fuse_lora(model)  # an adapter trained further
        return model, tokenizer
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if options.load_in_4bit or options.load_in_8bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        keep_4bit_layout(model)
        release_weights_file(model)
    targets = lora_targets(options.lora_target_modules, family)
    config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:
        raise ChatkitError(f"--lora-target-modules {options.lora_target_modules}: {exc}") from None
    fuse_lora(model)
    return model, tokenizer


def keep_4bit_layout(model) -> None:
    """Keep every 4-bit layer in the one layout that trains.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer for its inference kernel the first time
    it runs in eval mode without gradients (a validation pass between steps, the report), and keeps it so.
    That kernel has no backward: the steps after it would train the adapter with wrong gradients, silently
    (and a layer narrower than a quantization block fails to repack at all)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def release_weights_file(model) -> None:
    """Copy a quantized model's full-precision tensors (embeddings, norms) out of the weights file.

    Loading reads every weight of the memory-mapped file to quantize it, and a tensor left as a view of
    the file keeps all of its pages resident: for the starter about 0.5 GiB more than the 4-bit model needs."""
    import gc

    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.clone()
    gc.collect()


def lora_targets(option: str, family):
    """--lora-target-modules as peft takes it: all-linear is the family's attention and MLP matrices
    (peft's own all-linear for a model the family table lacks)."""
    if option == "all-linear":
        return list(family.lora_targets) if family is not None else option
    return [name.strip() for name in option.split(",") if name.strip()]
