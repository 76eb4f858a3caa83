"""The launch commands' own logic around the work they hand off, with stand-ins for that work:
`kiln sample`'s batches of prompts, their seeds, the options passed on and the rows written;
`kiln tokenizer`'s input files."""
import json
import types

import jax
import pytest

from data.sources import DataError
from launch import sample, tokenizer_cli


class Sampler:
    """Records each `complete` call; sample s of prompt p is the text "p/s"."""

    def __init__(self, chat_template="kiln"):
        self.calls, self.chat_template = [], chat_template
        self.tokenizer = types.SimpleNamespace(name="byte")
        self.model = types.SimpleNamespace(cfg=types.SimpleNamespace(family="llama"))

    def complete(self, prompts, **options):
        self.calls.append(dict(options, prompts=prompts))
        return [{"prompt_index": i, "sample_index": s, "text": f"{p if isinstance(p, str) else 'chat'}/{s}"}
                for i, p in enumerate(prompts) for s in range(options["num_samples"])]


def test_sample_batches_prompts_with_a_seed_each_and_writes_every_sample(tmp_path, monkeypatch):
    """Three prompts in batches of 2: the second batch's seed is the --seed key folded with its first
    prompt's index (2), the options reach the sampler as given, and the rows come back in prompt
    order, each sample numbered, with the prompt record it answers."""
    sampler, loaded = Sampler(), []
    monkeypatch.setattr(sample, "load_sampler", lambda path, **kw: loaded.append((path, kw)) or (sampler, kw["chat"]))
    messages = [{"role": "user", "content": "hello"}]
    (tmp_path / "prompts.jsonl").write_text(
        '{"prompt": "a"}\n\n{"prompt": "b"}\n' + json.dumps({"messages": messages}) + "\n")
    out = tmp_path / "out.jsonl"
    assert sample.main(["--checkpoint=ck", f"--prompts={tmp_path / 'prompts.jsonl'}", "--batch_size=2",
                        "--num_samples=2", "--seed=5", "--max_new_tokens=7", "--temperature=0.5", "--top_k=3",
                        "--top_p=0.9", "--stop=X", "--no-chat", "--tokenizer=byte", f"--output={out}"]) == 0
    assert loaded[0][0] == "ck" and (loaded[0][1]["tokenizer"], loaded[0][1]["chat"]) == ("byte", False)
    assert [c["prompts"] for c in sampler.calls] == [["a", "b"], [messages]]
    for call, start in zip(sampler.calls, (0, 2)):
        assert (jax.random.key_data(call.pop("seed")) == jax.random.key_data(
            jax.random.fold_in(jax.random.key(5), start))).all()
        assert call == dict(prompts=call["prompts"], stop=["X"], max_new_tokens=7, temperature=0.5, top_k=3, top_p=0.9,
                            num_samples=2, chat=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": "a", "sample": 0, "text": "a/0"}, {"prompt": "a", "sample": 1, "text": "a/1"},
                    {"prompt": "b", "sample": 0, "text": "b/0"}, {"prompt": "b", "sample": 1, "text": "b/1"},
                    {"messages": messages, "sample": 0, "text": "chat/0"},
                    {"messages": messages, "sample": 1, "text": "chat/1"}]


def test_sample_refuses_chat_messages_without_a_chat_template(tmp_path, monkeypatch):
    """One messages record among text prompts is enough: without a template it cannot be rendered."""
    monkeypatch.setattr(sample, "load_sampler", lambda path, **kw: (Sampler(chat_template=None), False))
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match="the prompts hold chat messages but tokenizer byte has no chat control"):
        sample.main(["--checkpoint=ck", f"--prompts={tmp_path / 'prompts.jsonl'}"])


def test_tokenizer_inputs_are_each_pattern_matches_sorted_in_the_order_given(tmp_path):
    """Comma-separated parts in the order given, each glob's matches sorted (the same inputs give the
    same model), blank parts ignored; a part matching nothing, or no part at all, is an error."""
    for name in ("b2.txt", "b1.txt", "a.txt"):
        (tmp_path / name).write_text("x")
    assert tokenizer_cli.input_paths(f"{tmp_path}/b*.txt, ,{tmp_path}/a.txt,") == [
        f"{tmp_path}/b1.txt", f"{tmp_path}/b2.txt", f"{tmp_path}/a.txt"]
    with pytest.raises(DataError, match=r"--input '.*/c\*.txt' matches no file"):
        tokenizer_cli.input_paths(f"{tmp_path}/a.txt,{tmp_path}/c*.txt")
    with pytest.raises(DataError, match="--input names no file"):
        tokenizer_cli.input_paths(" , ")
