#!/usr/bin/env python3
"""Export a model as one GGUF file for llama.cpp, Ollama and LM Studio.

Examples:
    python export_model.py chat-model --gguf chat-model.gguf
    python export_model.py chat-model --gguf chat-model-q8.gguf --type q8_0 --ollama
    python export_model.py smollm2-135m --gguf smollm2.gguf --type f32
    python export_model.py chat-model --lora-gguf chat-lora.gguf    # the adapter alone, for llama.cpp --lora

MODEL is anything the other scripts take as --model: the output folder of train_chatgpt_model.py (a
LoRA adapter is merged into its base in memory), a merged or other model folder, a .gguf file, a Hugging
Face Hub id or a friendly name. The file carries the tokenizer and the chat template the model was
trained with, so llama.cpp, Ollama and LM Studio format the conversation as training did. Supported:
SmolLM/Llama, Qwen2.5, Qwen3, Gemma 2, Gemma 3 (text), Phi-3, Mistral and GPT-2 (the "Models" table of
docs/README-CHATGPT-TRAINING.md).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from chatkit.cli import make_parser as build_parser, parse, run_main
from chatkit.files import check_outputs
from chatkit.options import ExportOptions
from chatkit.output import say


def make_parser():
    return build_parser(ExportOptions, __doc__)


def export(argv: Optional[Sequence[str]] = None) -> int:
    options = parse(ExportOptions, __doc__, argv)
    outputs = {"--gguf": options.gguf} if options.gguf else {}
    if options.lora_gguf:
        outputs["--lora-gguf"] = options.lora_gguf
    if options.ollama:
        outputs["the Modelfile beside --gguf"] = str(Path(options.gguf).parent / "Modelfile")
    check_outputs(outputs, model_files(options.model), options.overwrite, example="model.gguf")
    if options.lora_gguf:
        export_adapter(options.model, options.lora_gguf, options.type)
    if options.gguf:
        export_whole(options)
    return 0


def model_files(spec: Optional[str]) -> list:
    """The files an export reads: the model's own GGUF file, or the GGUF an adapter was trained on."""
    from chatkit.models import resolve_model

    source, files = resolve_model(spec), []
    while source is not None:
        files += [source.gguf_file] if source.gguf_file else []
        source = source.base
    return files


def export_adapter(model: Optional[str], out: str, kind: str) -> None:
    from chatkit.gguf_writer import write_lora_gguf

    say(f"Exporting the LoRA adapter {model} to {out} ...")
    exported = write_lora_gguf(model, out, kind)
    say(f"Wrote {out}: a {exported.architecture} LoRA adapter, {exported.tensors} tensors, "
        f"{exported.bytes / 2**20:.1f} MiB")
    say(f"llama.cpp:  llama-cli -m BASE.gguf --lora {out} -cnv   (BASE.gguf: export_model.py BASE-MODEL --gguf "
        "BASE.gguf, from the model it was trained on)")


def export_whole(options: ExportOptions) -> None:
    from chatkit.files import atomic_output
    from chatkit.gguf_writer import modelfile_can_quote, modelfile_text, write_gguf

    out = Path(options.gguf)
    modelfile = out.parent / "Modelfile"
    say(f"Exporting {options.model or 'the starter model'} to {out} ({options.type}) ...")
    exported = write_gguf(options.model, str(out), options.type)
    say(f"Wrote {out}: {exported.architecture}, {exported.tensors} tensors, {exported.bytes / 2**20:.0f} MiB, "
        f"with its tokenizer and chat template")
    say(f"llama.cpp:  llama-cli -m {out} -cnv")
    if options.ollama:
        with atomic_output(modelfile) as handle:
            handle.write(modelfile_text(exported))
        if exported.system_prompt and not modelfile_can_quote(exported.system_prompt):
            say("warning: the trained system prompt has quotes a Modelfile cannot hold, so the Modelfile leaves it "
                "out; set it in Ollama with /set system")
        name = out.stem.lower().replace("_", "-")
        say(f"Wrote {modelfile}. Ollama:  cd {out.parent.resolve()} && ollama create {name} -f Modelfile && "
            f"ollama run {name}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(export, argv)


if __name__ == "__main__":
    sys.exit(main())
