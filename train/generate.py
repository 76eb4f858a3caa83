"""Text in, text out: the sampler of `model.sampling` behind a tokenizer and a chat template.

`Sampler(model, tokenizer, chat_template=...)` is what evaluation, rejection sampling and RL use:
`generate` takes token ids and returns a `SampleBatch`; `complete` takes strings or chat messages
and returns one dict per sample with the decoded text, its token ids and their log-probs.
`load_sampler(path)` builds one for a Kiln run or Hugging Face directory, with the tokenizer and
chat template the checkpoint names (`kiln sample`, `kiln eval`).

Stop strings work at two levels: their token ids stop the decode loop early when the model spells
them that way, and the decoded text is always cut at the first stop string (however it was
tokenized), with the tokens and log-probs cut to the shortest prefix whose text contains it.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh

from data import tokenizer as tokenizers
from data.chat import FORMATS, missing_token, render
from data.pipeline import STAGE_KINDS
from data.sources import expand_path
from data.tokenizer import Tokenizer
from model.sampling import STOP, SampleBatch, generate
from model.sharding import Rules, shard_module, state_shardings
from train import checkpoint, modeldir

Prompt = str | Sequence[dict[str, str]]  # text, or chat messages [{role, content}, ...]
# A tokenizer's control tokens -> the chat template they belong to (for directories that do not say).
_TEMPLATE_MARKERS = (("<|eot_id|>", "llama3"), ("<|im_end|>", "chatml"), ("<end_of_turn>", "gemma"),
                     ("<|end|>", "kiln"))


class Sampler:
    """Samples from `model` (an nnx Transformer, adapters and all) with `tokenizer`.

    `chat_template` (a `data.chat` format name, or None) renders chat messages, ending in the
    assistant header, and adds its end-of-turn token to the stop ids. A text prompt becomes one user
    turn of it when `chat` is on (default: whenever there is a template), else BOS + text. With
    `mesh`, sampling runs on it: the parameters are placed by their logical axes and `rules`, the
    batch is split over data/fsdp. The model is read at every call, so training it in place between
    calls samples the new weights.
    """

    def __init__(self, model: nnx.Module, tokenizer: Tokenizer, *, mesh: Mesh | None = None,
                 rules: Rules | None = None, chat_template: str | None = None):
        if chat_template is not None and chat_template not in FORMATS:
            raise ValueError(f"unknown chat template {chat_template!r}; expected one of {', '.join(FORMATS)}")
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"the tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} tokens but the model only "
                             f"{model.cfg.vocab_size}; use the tokenizer the model was trained with")
        self.model, self.tokenizer, self.mesh, self.rules = model, tokenizer, mesh, rules
        self.chat_template = chat_template

    def stop_ids(self) -> list[int]:
        """Token ids that end a reply: EOS (the tokenizer's and the model's) and the chat template's end of turn."""
        eos = self.model.cfg.eos_token_id
        ids = {self.tokenizer.eos_id, *((eos,) if isinstance(eos, int) else eos or ())}
        if self.chat_template is not None:
            end = self.tokenizer.token_id(FORMATS[self.chat_template].end)
            if end is not None:
                ids.add(end)
        return sorted(ids)

    def encode(self, prompt: Prompt, chat: bool | None = None) -> list[int]:
        """The token ids of one prompt (see the class docstring)."""
        if isinstance(prompt, str):
            if not (self.chat_template is not None if chat is None else chat):
                return self.tokenizer.encode(prompt, add_bos=True)
            prompt = [{"role": "user", "content": prompt}]
        if self.chat_template is None:
            raise ValueError("chat messages need a chat template (none is set for this model)")
        return render(list(prompt), self.tokenizer, self.chat_template, add_generation_prompt=True)[0]

    def generate(self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_k: int | None = 0, top_p: float = 1.0, stop_ids: Sequence[int] | None = None,
                 stop_sequences: Sequence[Sequence[int]] = (), seed: int | jax.Array = 0,
                 num_samples: int = 1) -> SampleBatch:
        """Samples from token ids (`model.sampling.generate`); `stop_ids` None: `self.stop_ids()`."""
        model = self.model
        if self.mesh is not None:  # a copy on the mesh; arrays already placed there are not moved
            graphdef, state = nnx.split(model)
            model = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, self.mesh, self.rules)))
        return generate(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, stop_ids=self.stop_ids() if stop_ids is None else stop_ids,
                        stop_sequences=stop_sequences, seed=seed, num_samples=num_samples,
                        pad_id=self.tokenizer.pad_id, mesh=self.mesh, rules=self.rules)

    def complete(self, prompts: Sequence[Prompt], *, stop: Sequence[str] = (), max_new_tokens: int = 256,
                 temperature: float = 1.0, top_k: int | None = 0, top_p: float = 1.0, seed: int | jax.Array = 0,
                 num_samples: int = 1, chat: bool | None = None) -> list[dict[str, Any]]:
        """One dict per (prompt, sample), prompt-major: `prompt_index`, `sample_index`, `text` (cut
        before the first stop string), `token_ids` and `logprobs` (the reply's tokens, the stop id or
        stop string's tokens included) and `finish_reason` ("stop" or "length"). `chat`: see the class."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of prompts, not one string")
        stop = [s for s in stop if s]
        batch = self.generate([self.encode(p, chat) for p in prompts], max_new_tokens=max_new_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p,
                              stop_sequences=[self.tokenizer.encode_text(s) for s in stop], seed=seed,
                              num_samples=num_samples)
        out = []
        for r in range(len(batch.lengths)):
            ids, logprobs = batch.row(r)
            text, keep = self._cut(ids, stop)  # keep None: all of them
            out.append(dict(prompt_index=int(batch.prompt_index[r]), sample_index=r % num_samples, text=text,
                            token_ids=ids[:keep], logprobs=logprobs[:keep],
                            finish_reason=batch.finish_reasons[r] if keep is None else STOP))
        return out

    def _cut(self, ids: list[int], stop: Sequence[str]) -> tuple[str, int | None]:
        """(text before the first stop string, number of tokens to keep; None: no stop string)."""
        text = self.tokenizer.decode(ids)
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        if not hits:
            return text, None

        def has_stop(n: int) -> bool:
            prefix = self.tokenizer.decode(ids[:n])
            return any(s in prefix for s in stop)

        # The shortest prefix of tokens whose text holds a stop string (a prefix's text grows with it).
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if has_stop(mid) else (mid + 1, hi)
        return text[:min(hits)], lo


def load_sampler(path: str, *, tokenizer: str | None = None, chat_template: str | None = None, chat: bool | None = None,
                 mesh: Mesh | None = None, rules: Rules | None = None) -> tuple[Sampler, bool]:
    """(a Sampler for the model in `path`, whether text prompts should be chat turns).

    `path`: a Kiln run, checkpoints or step directory, or a Hugging Face directory. The tokenizer is
    `tokenizer` ("byte" or a path), else the run's `data.tokenizer` (its config.json), else the
    Hugging Face directory's own. The chat template is `chat_template`, else the run's
    `data.chat_template`, else the one whose control tokens the tokenizer has (None if none).
    `chat` None: text prompts are chat turns for a run whose stage trained on conversations (sft,
    dpo, ...), not for pre-training runs or Hugging Face directories. With `mesh`, the parameters
    are placed on it.
    """
    path = expand_path(path, "checkpoint")
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {path}: no such directory")
    run_config = modeldir.run_config(path)
    if run_config is not None and run_config.get("stage") == "reward":
        raise ValueError(f"{path} is a reward model (stage reward): it scores replies and writes none; "
                         "sample from (or evaluate) the policy it scores, and use it as rollout.reward")
    tok = _tokenizer(tokenizer, path)
    named = chat_template is not None
    if named and chat_template not in FORMATS:
        raise ValueError(f"--chat_template={chat_template!r} is no chat template Kiln knows: use one of "
                         f"{', '.join(FORMATS)}")
    if chat_template is None and run_config is not None:
        chat_template = run_config.get("data", {}).get("chat_template")
    if chat_template is None:
        chat_template = next((name for marker, name in _TEMPLATE_MARKERS if tok.token_id(marker) is not None), None)
    if chat is None:
        chat = run_config is not None and STAGE_KINDS.get(run_config.get("stage"), "pretrain") != "pretrain"
    if chat and chat_template is None:
        raise ValueError(f"chat prompts: tokenizer {tok.name} has no chat control tokens that Kiln knows; name a "
                         f"chat template ({', '.join(FORMATS)})")
    lacking = chat_template is not None and (named or chat) and missing_token(chat_template, tok)
    if lacking:  # found by the first prompt rendered, once the model was loaded
        fits = " or ".join(name for name in FORMATS if missing_token(name, tok) is None)
        given = "--chat_template" if named else f"the data.chat_template of {path}"
        fix = f"use {fits}" if fits else "it has the tokens of no template Kiln knows"
        raise ValueError(f"chat template {chat_template!r} ({given}) needs the token {lacking!r}, which tokenizer "
                         f"{tok.name} lacks; {fix}")
    model = checkpoint.load_model(path, mesh=mesh, rules=rules)[1]
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} tokens, more than the {model.cfg.vocab_size} of "
                         f"the model in {path}; use the tokenizer it was trained with")
    if mesh is not None:
        shard_module(model, mesh, rules)
    return Sampler(model, tok, mesh=mesh, rules=rules, chat_template=chat_template), chat


def _tokenizer(name: str | None, path: str) -> Tokenizer:
    """`name`'s tokenizer, else the one `path` records; ValueError if `name` splits text otherwise than the
    recorded one (the model would read other tokens than it was trained on)."""
    recorded = modeldir.tokenizer_of(path)
    if (name or recorded) is None:
        checkpoint.latest_step(path)  # a directory holding no model at all is named as such
        raise ValueError(f"{path} holds no config.json naming its tokenizer; pass a tokenizer (--tokenizer; "
                         "data.tokenizer for kiln generate)")
    tok = _load_tokenizer(name or recorded)
    if name and recorded:
        try:
            trained = _load_tokenizer(recorded)
        except (OSError, ValueError):  # moved or gone: --tokenizer stands in for it
            trained = None
        if trained is not None and _splits(trained) != _splits(tok):
            raise ValueError(f"tokenizer {name!r} ({tok.vocab_size} tokens) is not the one the model in {path} was "
                             f"trained with ({recorded}, {trained.vocab_size} tokens); drop --tokenizer to use it")
    return tok


def _splits(tok: Tokenizer) -> tuple[int, list[int]]:
    """What tells two tokenizers apart: their size and how they split a probe text."""
    return tok.vocab_size, tok.encode_text("Kiln's probe: 12 + 30 = 42, then Überprüfung.")


def _load_tokenizer(name: str) -> Tokenizer:
    return tokenizers.load(name if name == "byte" else expand_path(name, "tokenizer"))
