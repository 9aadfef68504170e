"""A training run's --output folder: the checks before a run, resuming, and a model published whole.

A model is saved into a staging folder inside --output, with its record, its report and its merged copy;
then every file moves into place at once, with Ctrl-C held back for those few renames. An interrupted run
leaves the earlier model or the new one, never a mix, and nothing of an earlier model of another kind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from .device import choose_placement
from .errors import ChatkitError
from .files import (LOCK_FILE, TRAINING_INFO_FILE, is_complete, latest_checkpoint, read_json_object, reproducibility,
                    training_info, uninterrupted, write_training_info)
from .models import ModelSource, load_model, merge_adapter
from .options import TrainOptions
from .output import say

CHECKPOINTS = "checkpoints"
RUNS = "runs"
STAGING_PREFIX = ".saving-"

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
WHOLE_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                     "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")
# What a model saved here consists of: each is replaced by the new model's, or removed when it has none.
MODEL_FILES = (*ADAPTER_FILES, *WHOLE_MODEL_FILES, *TOKENIZER_FILES, TRAINING_INFO_FILE,
               "merged", "report.md", "loss.png", "README.md")
SHARDS = "model-*-of-*.safetensors"


class RunFolder:
    """The --output folder of one training run."""

    def __init__(self, options: TrainOptions):
        self.options = options
        self.path = Path(options.output)

    def check(self) -> None:
        """Refuse a file, a folder holding another model (without --overwrite or --resume), or a folder of
        the user's other files."""
        output, options = self.path, self.options
        if output.exists() and not output.is_dir():
            raise ChatkitError(f"--output {output} is a file; name a folder for the trained model")
        if options.resume is not None or options.overwrite or not output.exists():
            return
        markers = ("adapter_config.json", "config.json", TRAINING_INFO_FILE, CHECKPOINTS)
        if any((output / marker).exists() for marker in markers):
            raise ChatkitError(
                f"--output {output} already holds a trained model; pass --overwrite to replace it, "
                f"--resume to continue its run, or another --output"
            )
        others = sorted(entry.name for entry in output.iterdir() if entry.name != LOCK_FILE)
        if others:
            raise ChatkitError(
                f"--output {output} holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) "
                "and no model; name a new or empty folder, such as --output chat-model, or pass --overwrite to "
                "write the model among them"
            )

    def resume_checkpoint(self) -> Optional[str]:
        """The newest checkpoint under --resume DIR (a checkpoint itself, or an output directory)."""
        options = self.options
        if options.resume is None:
            return None
        where = Path(options.resume or options.output)
        if (where / "trainer_state.json").exists():
            if not is_complete(where):
                raise ChatkitError(f"--resume {where}: this checkpoint was not saved whole (the run stopped while "
                                   f"saving it); resume from its folder {where.parent} to use the last complete one")
            return str(where)
        found = latest_checkpoint(where / CHECKPOINTS) or latest_checkpoint(where)
        if found is None:
            partial = sorted(path.name for folder in (where / CHECKPOINTS, where) if folder.is_dir()
                             for path in folder.glob("checkpoint-*"))
            raise ChatkitError(f"--resume {where}: no complete checkpoint-* folder found there to resume from" + (
                f" ({', '.join(partial)}: trainer_state.json missing or damaged, saved only in part); start again "
                "without --resume" if partial else ""))
        self.check_resumable(Path(found))
        return found

    def check_resumable(self, checkpoint: Path) -> None:
        """A checkpoint resumes only the run that wrote it: readable state, the same kind and size of adapter."""
        options = self.options
        read_json_object(checkpoint / "trainer_state.json", f"delete {checkpoint} to resume from the one before, "
                                                            "or start again without --resume")
        adapter = checkpoint / "adapter_config.json"
        if options.lora and not adapter.is_file():
            raise ChatkitError(f"--resume: {checkpoint} holds a full fine-tune (--no-lora); resume it with --no-lora")
        if not options.lora and adapter.is_file():
            raise ChatkitError(f"--resume: {checkpoint} holds a LoRA adapter; resume it without --no-lora")
        if adapter.is_file():
            saved = read_json_object(adapter, "restore it, or start again without --resume")
            for flag, name in (("--lora-r", "r"), ("--lora-alpha", "lora_alpha")):
                wanted = getattr(options, name if name != "r" else "lora_r")
                if saved.get(name) is not None and saved[name] != wanted:
                    raise ChatkitError(f"--resume: {checkpoint}'s adapter was trained with {flag} {saved[name]}, "
                                       f"not {wanted}; resume with {flag} {saved[name]}, or start again without "
                                       "--resume")

    def clear_old_run(self) -> None:
        """With --overwrite, the earlier run's checkpoints and logs go, so a later --resume cannot pick them up."""
        if self.options.overwrite and self.options.resume is None:
            for folder in (CHECKPOINTS, RUNS):
                shutil.rmtree(self.path / folder, ignore_errors=True)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A folder to save the whole model in; when the block ends without an error, it is published."""
        self.path.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.path))
        try:
            yield staging
            publish(staging, self.path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def stale_files(output: Path, staged: Path) -> List[Path]:
    """The files of a model saved in `output` that the model in `staged` does not have: an earlier run's
    adapter beside a whole model (the folder would load as the old adapter), or the reverse, another
    tokenizer's files, merged/, a report of the earlier model."""
    found = [output / name for name in MODEL_FILES if (output / name).exists() and not (staged / name).exists()]
    return found + [path for path in sorted(output.glob(SHARDS)) if not (staged / path.name).exists()]


def publish(staging: Path, output: Path) -> None:
    """Move a model saved whole in `staging` into `output`, every file or none (Ctrl-C waits for the renames);
    chatkit.json goes last, so a folder with a record holds the model it describes."""
    names = sorted((entry.name for entry in staging.iterdir()), key=lambda name: name == TRAINING_INFO_FILE)
    with uninterrupted():
        for path in stale_files(output, staging):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for name in names:
            target = output / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(staging / name, target)


def base_model_spec(source: ModelSource) -> str:
    """How a trained adapter names its base: friendly names and Hub ids as typed, local paths absolute."""
    base = source.base if source.kind == "adapter" else source
    return os.path.abspath(base.spec) if os.path.exists(os.path.expanduser(base.spec)) else base.spec


def run_record(tokenizer, options: TrainOptions, source: ModelSource, metrics: dict,
               rehearsed: Sequence[List[dict]] = (), plan=None, conversations: Optional[dict] = None,
               recorded: Optional[dict] = None) -> dict:
    """The chatkit.json record of a trained model."""
    return training_info(
        "lora" if options.lora else "full", tokenizer.chat_template,
        base_model=base_model_spec(source) if options.lora else None, system_prompt=options.system_prompt,
        options=recorded or dataclasses.asdict(options) | {"learning_rate": options.effective_learning_rate},
        metrics=metrics, rehearsal=list(rehearsed),  # the general prompts and own answers trained alongside
        plan=plan.to_json() if plan is not None else None,
        reproducibility=reproducibility([*options.data, *([options.preferences] if options.preferences else [])],
                                        options.seed, conversations),
    )


def save_model(staging: Path, model, tokenizer, options: TrainOptions, info: dict) -> None:
    """The model, its tokenizer and (with --merge) a standalone merged copy, saved into `staging`."""
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if options.merge and options.lora:
        say(f"Writing a standalone merged model to {Path(options.output) / 'merged'} ...")
        write_training_info(staging, info)  # the adapter loads with its record: its base model, its template
        merged = merge_adapter(load_model(str(staging), choose_placement("cpu", "float32")).model)
        merged.save_pretrained(staging / "merged")
        tokenizer.save_pretrained(staging / "merged")
        write_training_info(staging / "merged", dict(info, base_model=None, method="lora-merged"))


def push_to_hub(options: TrainOptions) -> None:
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(options.hub_name, private=True, exist_ok=True)
        api.upload_folder(folder_path=options.output, repo_id=options.hub_name,
                          ignore_patterns=[f"{CHECKPOINTS}/*", f"{RUNS}/*"])
    except Exception as exc:  # network, authentication, permissions: all reported the same way
        raise ChatkitError(
            f"--push-to-hub {options.hub_name}: upload failed ({type(exc).__name__}); log in with "
            "`huggingface-cli login` (or set HF_TOKEN) and check the name. The model is saved in "
            f"{options.output}"
        ) from None
    say(f"Pushed to https://huggingface.co/{options.hub_name} (private)")

