"""`kiln convert`: Hugging Face directory <-> Kiln checkpoint; LoRA runs to merged weights or a PEFT adapter."""
from __future__ import annotations

import argparse
import os

import jax
from flax import nnx

from data.sources import expand_path
from model import hf, hf_peft, lora
from model.config import DTYPES
from train import checkpoint, modeldir


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln convert", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="Hugging Face directory (config.json + *.safetensors)")
    src.add_argument("--from-kiln", metavar="CKPT_DIR", help="Kiln run directory or checkpoints directory")
    p.add_argument("--to", metavar="CKPT_DIR", help="Kiln checkpoints directory to write (with --from-hf)")
    p.add_argument("--to-hf", metavar="DIR", help="Hugging Face directory to write (with --from-kiln)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to read (default: latest) or write (0)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="parameter dtype of the written weights (default: as stored)")
    p.add_argument("--adapter-only", action="store_true",
                   help="with --from-kiln of a LoRA, prompt- or prefix-tuning run: write only what was tuned, as a "
                        "Hugging Face PEFT adapter directory (adapter_config.json + adapter_model.safetensors); "
                        "default: merged weights (LoRA only)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.from_hf:
        if not args.to or args.to_hf:
            parser().error("--from-hf needs --to CKPT_DIR")
        check_target(args.to, args.from_hf, "--to")
        if modeldir.run_config(args.to) is not None:
            raise ValueError(f"--to {args.to} is a training run's directory; write the converted checkpoint into a "
                             "new directory")
        cfg, model = hf.load(args.from_hf, dtype=args.dtype or "float32")
        step = args.step or 0
        checkpoint.save_params(args.to, step, model, cfg)
        print(f"wrote Kiln checkpoint {args.to} step {step}: {cfg.family}, {_count(model):,} parameters")
    else:
        if not args.to_hf or args.to:
            parser().error("--from-kiln needs --to-hf DIR")
        check_target(args.to_hf, args.from_kiln, "--to-hf")
        if os.path.isdir(args.to_hf) and os.listdir(args.to_hf) and not _is_export(args.to_hf):
            raise ValueError(f"--to-hf {args.to_hf} is a directory holding other files, which writing it would "
                             "replace; choose a new or empty directory")
        cfg, model = checkpoint.load_params(args.from_kiln, step=args.step)
        if args.adapter_only:
            if args.dtype:
                parser().error("--adapter-only writes float32 adapters; drop --dtype")
            hf_peft.save_adapter(model, args.to_hf, base_model_name_or_path=checkpoint.base_of(args.from_kiln))
            if cfg.prefix is not None:
                what = f"{cfg.prefix.kind} tuning, {cfg.prefix.num_tokens} virtual tokens"
            else:
                what = f"LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}"
            print(f"wrote PEFT adapter directory {args.to_hf}: {what}")
            return 0
        tokenizer, said = tokenizer_files(args.from_kiln)
        hf.save(model, cfg, args.to_hf, dtype=args.dtype, files=tokenizer)
        merged = " (LoRA adapters merged)" if lora.adapters(model) else ""
        print(f"wrote Hugging Face directory {args.to_hf}: {cfg.family}, {_count(model):,} parameters{merged}; {said}")
    return 0


# A Hugging Face directory's tokenizer files, exported with the weights when the tokenizer is one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")


def tokenizer_files(source: str) -> tuple[dict[str, str], str]:
    """The files of the tokenizer the Kiln checkpoint `source` was trained with, named as an export holds
    them (where Kiln's tokenizer loader finds them: kiln sample, eval, init_from), and a line saying so."""
    name = modeldir.tokenizer_of(source)
    if name is None:
        return {}, "no tokenizer: the checkpoint names none (pass --tokenizer when sampling from the export)"
    if name == "byte":
        return {}, "tokenizer: Kiln's byte tokenizer, which has no file (pass --tokenizer=byte when sampling from it)"
    path = expand_path(name, "the run's data.tokenizer")
    if os.path.isdir(path):
        files = {f: os.path.join(path, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))}
    else:  # one file, under the name the directory loader looks for
        files = {"tokenizer.json" if path.endswith(".json") else "tokenizer.model": path}
    return files, f"tokenizer from {path} ({', '.join(files)})"


def check_target(target: str, source: str, flag: str) -> None:
    """ValueError if writing `target` would replace `source` (it is the source or holds it) or a file."""
    out, src = os.path.realpath(target), os.path.realpath(source)
    if out == src or src.startswith(out.rstrip(os.sep) + os.sep):
        raise ValueError(f"{flag} {target} is, or holds, the input {source}: writing it would replace the input; "
                         "choose another output directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{flag} {target} is a file, not a directory; choose another output directory")


def _is_export(path: str) -> bool:
    """An earlier Hugging Face or PEFT export, which a new export may replace: nothing of a Kiln run in it."""
    names = set(os.listdir(path))
    return bool(names & {"config.json", "adapter_config.json"}) and "checkpoints" not in names


def _count(model: nnx.Module) -> int:
    """Parameters of the model as written: adapters are merged into the weights, not counted beside them."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))))
