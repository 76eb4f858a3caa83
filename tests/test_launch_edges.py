"""The launch commands' own logic around the work they hand off, with stand-ins for that work:
`kiln sample`'s batches of prompts, their seeds, the options passed on and the rows written;
`kiln tokenizer`'s input files; what `kiln convert` asks of the loaders and writers; the `kiln`
command's own argument splitting and error line."""
import json
import os
import types

import jax
import pytest

from data.sources import DataError
from launch import bench, convert, generate, main as kiln, sample, tokenizer_cli
from launch.config import ConfigError
from launch.train import split_args


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


def test_sample_takes_prompts_from_one_place(tmp_path):
    """--prompt and --prompts together would drop one of them in silence."""
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="give prompts with --prompt=TEXT .* or --prompts=FILE.jsonl, not both"):
        sample.main(["--checkpoint=ck", "--prompt=b", f"--prompts={tmp_path / 'prompts.jsonl'}"])


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


@pytest.fixture
def converted(monkeypatch):
    """Stand-ins for the checkpoint and Hugging Face readers and writers; the calls they got."""
    calls = []
    cfg = types.SimpleNamespace(family="llama", prefix=None, lora=types.SimpleNamespace(rank=4, targets=("q", "v")))
    monkeypatch.setattr(convert.hf, "load", lambda path, dtype: calls.append(("hf.load", path, dtype)) or (cfg, "m"))
    monkeypatch.setattr(convert.hf, "save", lambda model, c, path, dtype, files: calls.append(
        ("hf.save", path, dtype, files)))
    monkeypatch.setattr(convert.hf_peft, "save_adapter", lambda model, path, base_model_name_or_path: calls.append(
        ("save_adapter", path, base_model_name_or_path)))
    monkeypatch.setattr(convert.checkpoint, "save_params", lambda path, step, model, c: calls.append(
        ("save_params", path, step)))
    monkeypatch.setattr(convert.checkpoint, "load_params", lambda path, step: calls.append(
        ("load_params", path, step)) or (cfg, "m"))
    monkeypatch.setattr(convert.modeldir, "run_config", lambda path: None)
    monkeypatch.setattr(convert.checkpoint, "base_of", lambda path: f"{path}/base")
    monkeypatch.setattr(convert.modeldir, "tokenizer_of", lambda path: "byte")
    monkeypatch.setattr(convert, "_count", lambda model: 7)
    monkeypatch.setattr(convert.lora, "adapters", lambda model: [])
    return calls


def test_convert_passes_on_its_dtype_step_and_adapter_flags(tmp_path, converted):
    """--from-hf reads float32 unless --dtype says otherwise and writes step 0 unless --step does;
    --from-kiln writes --dtype (None: as stored) with the run's tokenizer files; --adapter-only
    writes the adapter naming the base model, and refuses a --dtype."""
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    assert convert.main(["--from-hf", src, "--to", out]) == 0
    assert convert.main(["--from-hf", src, "--to", out, "--dtype=bfloat16", "--step=5"]) == 0
    assert converted == [("hf.load", src, "float32"), ("save_params", out, 0),
                         ("hf.load", src, "bfloat16"), ("save_params", out, 5)]
    converted.clear()
    assert convert.main(["--from-kiln", src, "--to-hf", out, "--step=3", "--dtype=float16"]) == 0
    assert convert.main(["--from-kiln", src, "--to-hf", out, "--adapter-only"]) == 0
    assert converted == [("load_params", src, 3), ("hf.save", out, "float16", {}),
                         ("load_params", src, None), ("save_adapter", out, f"{src}/base")]
    with pytest.raises(SystemExit):
        convert.main(["--from-kiln", src, "--to-hf", out, "--adapter-only", "--dtype=float32"])


def test_convert_never_replaces_a_run_that_holds_a_config_json(tmp_path, converted):
    """A directory with config.json beside checkpoints/ is a Kiln run, not an earlier export."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a directory holding other files"):
        convert.main(["--from-kiln", str(tmp_path / "src"), "--to-hf", str(tmp_path / "run")])
    assert converted == []


def test_convert_exports_the_runs_tokenizer_files(tmp_path, monkeypatch):
    """A tokenizer directory's files that exist, under their own names; one file under the name the
    loader looks for (a .json as tokenizer.json, else tokenizer.model); none for the byte tokenizer."""
    (tmp_path / "tok").mkdir()
    for name in ("tokenizer.json", "chat_template.jinja", "notes.txt"):
        (tmp_path / "tok" / name).write_text("x")
    for name, files in ((str(tmp_path / "tok"), {f: str(tmp_path / "tok" / f) for f in ("tokenizer.json",
                                                                                       "chat_template.jinja")}),
                        (str(tmp_path / "spm.model"), {"tokenizer.model": str(tmp_path / "spm.model")}),
                        (str(tmp_path / "hf.json"), {"tokenizer.json": str(tmp_path / "hf.json")}),
                        ("byte", {}), (None, {})):
        monkeypatch.setattr(convert.modeldir, "tokenizer_of", lambda path: name)
        assert convert.tokenizer_files("run")[0] == files


def test_config_arguments_split_at_their_first_equals_sign():
    """A config path may hold '=' (a directory named a=b); the override values keep theirs too."""
    assert split_args(["--config=runs/a=b/c.py:v", "--config.data.sources.train.path=x=y", "--other=1"], "kiln x") == (
        "runs/a=b/c.py:v", ["--config.data.sources.train.path=x=y"], ["--other=1"])
    assert split_args(["--config", "c.py"], "kiln x")[0] == "c.py"


def test_a_key_error_is_one_line_without_its_quotes(monkeypatch, capsys):
    """A KeyError's message is printed as given (str() of a KeyError adds quotes)."""
    def fail(argv):
        raise KeyError("no tokenizer named 'x'")
    monkeypatch.setattr(bench, "main", fail)
    assert kiln.main(["bench"]) == 1
    assert capsys.readouterr().err == "kiln bench: error: no tokenizer named 'x'\n"


def test_generate_runs_rejection_sampling_only(monkeypatch):
    """`kiln generate` on another stage's config is refused before anything runs (kiln train runs it)."""
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.setattr(generate.rejection, "run", lambda config: pytest.fail("rejection sampling ran"))
    with pytest.raises(ConfigError, match=r"kiln generate runs stage rejection_sampling, not 'sft' \(use kiln train\)"):
        generate.main(["--config=configs/sft.py:smoke"])
