"""A careless user's inputs to the post-training stages and evaluations: data files, stage configs,
eval tasks and recipes. Each is one clear error naming what is wrong and where, before any model is
built or any stage runs, never a traceback or a run that trains (or scores) nothing in silence. Each
test calls the function the input reaches first, so all of them are fast."""
import os
import re

import pytest

from configs import base
from data import examples, sources
from launch import pipeline, stage_results
from launch.config import ConfigError, _get as config_value
from model import presets
from test_config_overrides import load
from test_data_sources import data_cfg, records, write_jsonl
from test_misuse import ROOT, one_error_line
from train import preflight


def test_a_jsonl_file_saved_with_a_byte_order_mark_reads(tmp_path):
    """A UTF-8 BOM (Windows editors write one) made line 1 "malformed JSON: Unexpected UTF-8 BOM (decode
    using utf-8-sig)", advice for a programmer, not for the user holding the file."""
    path = write_jsonl(tmp_path / "sft.jsonl", [b'\xef\xbb\xbf{"prompt": "hi", "completion": "yo"}'])
    got, _ = records(path, "jsonl", "sft")
    assert got == [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]


def test_a_text_file_with_windows_line_ends_splits_into_its_documents(tmp_path):
    """data.text_separator="\n\n" found no separator in a file saved with "\r\n" line ends: its documents were
    one document, trained on (and cut into windows) across their boundaries, in silence."""
    (tmp_path / "docs.txt").write_bytes(b"First doc,\r\nline two.\r\n\r\nSecond doc.\r\n\r\nThird.\r\n")
    got, _ = records(tmp_path / "docs.txt", "text", "pretrain", data_cfg(text_separator="\n\n"))
    assert got == [{"text": "First doc,\nline two."}, {"text": "Second doc."}, {"text": "Third.\n"}]


@pytest.mark.parametrize("messages", [[{"role": "user", "content": "2+2?"}],
                                      [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2?"}]])
def test_a_conversation_without_an_assistant_message_is_refused(tmp_path, messages):
    """SFT trains the assistant's turns; a conversation with none was dropped as "empty_mask", and a file of
    them stopped with "data.seq_len=512 may be too short", sending the user to the wrong setting."""
    path = write_jsonl(tmp_path / "chats.jsonl", [{"prompt": "1+1?", "completion": "2"}, {"messages": messages}])
    with pytest.raises(sources.DataError, match=f"{path}:2: field 'messages' has no assistant message: nothing to "
                                                "train on"):
        records(path, "jsonl", "sft")


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_precomputed_reference_log_probs_that_are_not_finite_are_refused(tmp_path, value):
    """Python's JSON reads NaN and Infinity: a pair carrying one made every DPO step it was in non-finite."""
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        b'{"prompt": "q", "chosen": "a", "rejected": "b", "ref_chosen_logps": -2.5, "ref_rejected_logps": -3}',
        f'{{"prompt": "q", "chosen": "a", "rejected": "b", "ref_chosen_logps": {value}, "ref_rejected_logps": -3}}'
        .encode()])
    with pytest.raises(sources.DataError, match=f"{path}:2: field 'ref_chosen_logps' is {value.lower()[:3]}"):
        records(path, "jsonl", "preference")


@pytest.mark.parametrize("fmt, row", [
    ("jsonl", {"prompt": "2+2?", "chosen": "4", "rejected": "4"}),
    ("hh_rlhf", {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 4 "}),
])
def test_a_pair_whose_replies_are_the_same_is_refused(tmp_path, fmt, row):
    """Chosen == rejected gives DPO and the reward model a loss of log 2 with no gradient: a file of such
    pairs trained for its whole run on nothing, and a few of them diluted every batch, in silence."""
    good = dict(row, rejected="5") if fmt == "jsonl" else dict(row, rejected=row["chosen"] + "5")
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, row])
    with pytest.raises(sources.DataError, match=f"{path}:2: chosen and rejected are the same reply: the pair "
                                                "prefers nothing"):
        records(path, fmt, "preference")
    got, src = records(path, fmt, "preference", data_cfg(skip_bad_records=True))
    assert [r["rejected"] for r in got] == ["5" if fmt == "jsonl" else "45"] and src.skipped == 1


def test_a_pair_cut_before_its_replies_differ_is_dropped_and_counted(tmp_path):
    """Replies that differ only past data.seq_len were truncated into one token sequence twice: a pair with no
    gradient and an accuracy of 0. The built-in task's pairs (the same steps, one slip) all were at
    data.seq_len=128 with the byte tokenizer, and DPO trained on nothing in silence."""
    from data import pipeline, tokenizer

    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "Same steps, then 5.",
                                                   "rejected": "Same steps, then 6."}] * 3)
    [pair, *_], _ = records(path, "jsonl", "preference")
    # BOS <|user|> q <|end|> <|assistant|> "Same steps, then ": the replies' targets first differ at position 21
    statuses = [examples.Encoder(tokenizer.load("byte"), n).preference(pair)[1] for n in (21, 22, 24)]
    assert statuses == [examples.SAME_REPLIES, examples.TRUNCATED, examples.OK]
    cfg = data_cfg(seq_len=21, sources={"p": base.source(str(path), "jsonl")})
    with pytest.raises(sources.DataError, match=r"the first 3 examples were all dropped \(same_replies: 3\); "
                                                "data.seq_len=21 may be too short"):
        pipeline.train_iterator(cfg, "preference", tokenizer.load("byte"), seed=0)


@pytest.mark.parametrize("prompt", ["", "  \n", [{"role": "system", "content": ""}, {"role": "user", "content": " "}]])
def test_an_empty_prompt_to_sample_from_is_refused(tmp_path, prompt):
    """RL and rejection sampling sampled replies to an empty user turn and trained on them."""
    rows = [{"prompt": "2+2?", "answer": "4"}, {"prompt": prompt, "answer": "4"}]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    with pytest.raises(sources.DataError, match=f"{path}:2: field 'prompt' is empty: there is nothing to reply to"):
        records(path, "jsonl", "prompts")


@pytest.mark.parametrize("spec, overrides, message", [
    ("dpo.py:smoke", ["loss.beta=0"], "config key 'loss.beta' must be positive, got 0"),
    ("grpo.py:smoke", ["loss.beta=-0.1"], "config key 'loss.beta' must be 0 or more, got -0.1"),
    ("sft.py:smoke", ["peft.method=lora", "peft.lora_rank=0"], "config key 'peft.lora_rank' must be positive, got 0"),
    ("sft.py:smoke", ["peft.method=prompt_tuning", "peft.num_virtual_tokens=0"],
     "config key 'peft.num_virtual_tokens' must be positive, got 0"),
    ("grpo.py:smoke", ["rollout.max_new_tokens=0"], "config key 'rollout.max_new_tokens' must be positive, got 0"),
    ("grpo.py:smoke", ["rollout.top_p=0"], "config key 'rollout.top_p' must be in (0, 1], got 0"),
    ("rejection_sampling.py:smoke", ["rollout.num_prompts=-1"],
     "config key 'rollout.num_prompts' must be 0 (all) or more, got -1"),
    ("eval.py:smoke", ["eval.num_problems=-1"], "config key 'eval.num_problems' must be 0 (all) or more, got -1"),
    ("sft.py:smoke", ["data.chat_template=chatmll"],
     "config key 'data.chat_template' = 'chatmll'; expected one of kiln, llama3, chatml, gemma"),
    ("dpo.py:smoke", ["loss.label_smoothing=0.5"],
     "config key 'loss.label_smoothing' must be in [0, 0.5) (the fraction of flipped labels), got 0.5"),
    ("reward.py:smoke", ["loss.center_coef=-0.01"], "config key 'loss.center_coef' must be 0 or more, got -0.01"),
    ("sft.py:smoke", ["peft.method=lora", "peft.lora_alpha=0"], "config key 'peft.lora_alpha' must be positive, got 0"),
    ("sft.py:smoke", ["peft.method=lora", "peft.lora_targets=('q_proj','v_proj')"],
     "config key 'peft.lora_targets' = ('q_proj', 'v_proj'): choose among q, k, v, o, gate, up, down ('q_proj' is 'q' "
     "here)"),
    ("grpo.py:smoke", ["loss.clip_eps_low=-0.2"], "config key 'loss.clip_eps_low' must be in (0, 1), got -0.2"),
    ("grpo.py:smoke", ["rollout.format_penalty=-1"],
     "config key 'rollout.format_penalty' must be 0 or more (it is subtracted from a cut-off reply), got -1"),
    ("ppo.py:smoke", ["rollout.lam=1.5"], "config key 'rollout.lam' must be in [0, 1], got 1.5"),
    ("ppo.py:smoke", ["rollout.kl_target=6", "rollout.kl_horizon=0"],
     "config key 'rollout.kl_horizon' must be positive, got 0"),
    ("eval.py:smoke", ["eval.shots=(-1,)"], "config key 'eval.shots' = (-1,): each is a number of few-shot examples"),
    ("eval.py:smoke", ["eval.shots=()"], "config key 'eval.shots' is empty, so no setting of eval.tasks would be "
                                         "scored; list the numbers of few-shot examples, such as (0, 4)"),
])
def test_post_training_settings_out_of_range_are_named_before_any_model(spec, overrides, message):
    """A negative GRPO beta (a reward for leaving the reference), rollout.num_prompts=-1 (every prompt but
    the last) and eval.num_problems=-1 (all) ran on in silence; eval.shots=() scored no task and (-1,) was
    "Sample larger than population or is negative"; the others were refused only once the model was
    loaded, in words naming no config key ("beta must be positive", "prefix kind must be prompt or prefix
    with num_tokens > 0 ..."). A negative reward-centring coefficient (scores pushed away from 0) or
    format penalty (a bonus for cut-off replies), LoRA's alpha 0 (adapters that never change the model),
    a negative clip epsilon and GAE's lambda above 1 trained on in silence; rollout.kl_horizon=0 divided
    by zero after the first rollout, and a misspelt chat template stopped the run only once its model was
    built (Hugging Face's LoRA target names once its tokenizer was trained, naming no key)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(spec, *[f"--config.{o}" for o in overrides])


def test_greedy_sampling_where_replies_must_differ_is_refused(capsys, monkeypatch):
    """At rollout.temperature=0 a prompt's replies are one reply repeated: GRPO's advantages were all 0 and
    its loss NaN, and rejection sampling's best of 4 was the one reply. (The policy named here does not
    exist: the check comes before it is loaded.) One greedy sample per prompt is fine."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match=r"rollout.temperature=0 samples greedily, and RL learns from sampled "
                                         r"replies: set a positive rollout.temperature$"):
        preflight.stage_kind(load("grpo.py:smoke", "--config.rollout.temperature=0"))
    argv = ["generate", "--config=configs/rejection_sampling.py:smoke", "--config.model.init_from=/nonexistent/policy",
            "--config.rollout.temperature=0"]
    assert one_error_line(capsys, argv) == (
        "kiln generate: error: rollout.temperature=0 samples greedily, and the rollout.num_samples=4 replies to each "
        "prompt would be one reply 4 times: set a positive rollout.temperature (or rollout.num_samples=1)")
    preflight.check_sampling(load("rejection_sampling.py:smoke", "--config.rollout.temperature=0",
                                  "--config.rollout.num_samples=1"))
    with pytest.raises(ValueError, match="the rollout.num_samples=2 replies to each prompt would be one reply 2 times"):
        preflight.check_sampling(load("rejection_sampling.py:smoke", "--config.rollout.temperature=0",
                                      "--config.rollout.num_samples=2"))


@pytest.mark.parametrize("answer", ["", "Two and two make four.\n#### 4"])
def test_prompts_whose_answers_the_verifier_cannot_match_are_refused(tmp_path, capsys, monkeypatch, answer):
    """An empty reference answer (or a worked solution in the answer field) is never equal to a reply's final
    '#### N': every reply scored 0, and GRPO and rejection sampling ran to the end on no signal."""
    monkeypatch.chdir(ROOT)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": answer}])
    message = (f"data.sources.train ({path}), prompt 2: rollout.reward=verifier compares a reply's final '#### ANSWER' "
               f"line with the reference answer, and {answer!r} can never match one; give each prompt its final "
               "answer alone, or score with a reward model or MODULE:FUNCTION")
    source = [f"--config.data.sources.train.path={path}", "--config.data.sources.train.format=jsonl",
              "--config.data.sources.train.end=1.0"]
    with pytest.raises(ValueError, match=re.escape(message)):
        preflight.stage_kind(load("grpo.py:smoke", *source))
    argv = ["generate", "--config=configs/rejection_sampling.py:smoke", *source, "--config.model.init_from=/no/p"]
    assert one_error_line(capsys, argv) == f"kiln generate: error: {message}"
    preflight.check_sampling(load("grpo.py:smoke", *source, "--config.rollout.reward=tests/rl_reward.py:digits"))
    unread = load("grpo.py:smoke", *source)
    unread.data.sources.train.weight = 0.0  # a source of weight 0 is never sampled from: its answers do not matter
    preflight.check_sampling(unread)


@pytest.mark.parametrize("overrides, message", [
    (["peft.method=lora", "peft.lora_rank=65"], "peft.lora_rank=65 is above the model's d_model=64, the most rank"),
    (["peft.method=prompt_tuning", "peft.num_virtual_tokens=256"],
     "peft.num_virtual_tokens=256: the virtual tokens sit at positions -N..-1, and the model's RoPE table reaches "
     "max_seq_len=256; use fewer than 256"),
])
def test_peft_sizes_the_model_cannot_use_are_refused(overrides, message):
    """A LoRA rank above d_model trained a bigger adapter than any update can use; prompt tuning's virtual
    tokens beyond the RoPE table were all given its last position, in silence (refused by the shape checks
    every stage runs before its model is built). d_model (and so rank 64) and 255 virtual tokens are fine."""
    from model.sharding import make_mesh

    model = presets.get("tiny")
    with pytest.raises(ValueError, match=re.escape(message)):
        preflight.check_shapes(load("sft.py:smoke", "--config.data.seq_len=128", *[f"--config.{o}" for o in overrides]),
                               model, make_mesh(1, -1, 1))
    for fits in (["peft.method=lora", "peft.lora_rank=64"],
                 ["peft.method=prompt_tuning", "peft.num_virtual_tokens=255"]):
        preflight.check_peft(load("sft.py:smoke", *[f"--config.{o}" for o in fits]), model)


PRE = {"name": "pre", "command": "train", "config": "configs/pretrain.py:smoke", "overrides": ["train.steps=1"]}
RS = {"name": "rs", "command": "generate", "config": "configs/rejection_sampling.py:smoke"}


@pytest.mark.parametrize("stages, message", [
    ([dict(PRE, overides=["train.steps=1"])],
     "stage 0 (pre): unknown field 'overides'; the fields are name, command, config, overrides, checkpoint, evaluate, "
     "part_of, minutes"),
    ([dict(PRE, evaluate={"config": "configs/eval.py:smoke", "overides": []})],
     "stage 0 (pre): evaluate: unknown field 'overides'; the fields are config, overrides"),
    ([{"name": "pre", "command": "train"}], "stage 0 (pre): `config` must name a config file"),
    ([dict(PRE, overrides="train.steps=1")], "stage 0 (pre): `overrides` must be a list of 'KEY=VALUE' strings, got "
                                             "'train.steps=1'"),
    ({"pre": PRE}, "stages(config) must return a list of stage dicts, got dict"),
    ([PRE, "rs"], "stage 1 is str, not a dict of stage fields"),
    ([RS, dict(PRE, name="sft", overrides=["data.sources.train.path=@rs/sft.json"])],
     "stage 1 (sft): @rs/sft.json is no file of stage rs, whose kiln generate writes sft.jsonl, pairs.jsonl, "
     "results.json"),
])
def test_a_recipe_stage_with_a_field_it_does_not_have_is_named(tmp_path, stages, message):
    """A misspelt field of a stage (`overides`, `evalute`) was ignored: the stage ran without it, in silence. A
    stage without `config` was "error: config", overrides given as one string were read letter by letter,
    stages returned as a dict were an AttributeError's traceback, and a misspelt file of an earlier stage
    failed only once every stage before it had run."""
    path = recipe(tmp_path, stages)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        pipeline.load_recipe(path, [])


def recipe(tmp_path, stages):
    """A recipe file whose stages(config) returns `stages`."""
    path = tmp_path / "recipe.py"
    path.write_text("from ml_collections import ConfigDict\n"
                    "def get_config(variant=''):\n    return ConfigDict(dict(run_dir='x'))\n"
                    f"def stages(c):\n    return {stages!r}\n")
    return str(path)


EVAL = {"name": "final", "command": "eval", "config": "configs/eval.py:smoke", "checkpoint": "@pre"}


@pytest.mark.parametrize("stages, message", [
    ([PRE, dict(EVAL, checkpoint=None)], "stage 1 (final): `checkpoint` must be a run directory such as '@sft', got None"),
    ([dict(PRE, minutes="2")], "stage 0 (pre): `minutes` must be a number of minutes, got '2'"),
    ([PRE, dict(EVAL, config="configs/sft.py:smoke")],
     "stage 1 (final): configs/sft.py:smoke is a config of stage 'sft', which kiln train runs, not kiln eval"),
    ([dict(PRE, evaluate={"config": "configs/pretrain.py:smoke"})],
     "stage 0 (pre): configs/pretrain.py:smoke is a config of stage 'pretrain', which kiln train runs, not kiln eval"),
    ([dict(RS, command="train")], "stage 0 (rs): configs/rejection_sampling.py:smoke is a config of stage "
                                  "'rejection_sampling', which kiln generate runs, not kiln train"),
    ([dict(PRE, name="rm", config="configs/reward.py:smoke", evaluate={"config": "configs/eval.py:smoke"})],
     "stage 0 (rm): rm is a reward model, which kiln eval does not evaluate (it writes no replies); its held-out pair "
     "accuracy is in its own metrics"),
    ([dict(PRE, name="rm", config="configs/reward.py:smoke"), dict(EVAL, checkpoint="@rm/checkpoints/1")],
     "stage 1 (final): rm is a reward model, which kiln eval does not evaluate"),
])
def test_a_recipe_stage_whose_command_cannot_run_its_config_is_named(tmp_path, monkeypatch, stages, message):
    """A stage whose config is not of its command's kind ran the stages before it and then failed (a generate
    or train stage) or ran the wrong work in silence: an eval stage (or `evaluate`) given a training config
    evaluated no task, into that config's run directory; a reward model to evaluate was refused only once it
    had trained. A checkpoint that is no string was a TypeError's traceback, and minutes given as text failed
    in the progress line once the first stage was running."""
    monkeypatch.chdir(ROOT)
    path = recipe(tmp_path, stages)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        pipeline.load_recipe(path, [])


def test_a_recipes_rejection_sampling_stage_checks_its_sampling_before_loading_the_policy(monkeypatch):
    """`kiln pipeline` called rejection sampling directly, past the checks `kiln generate` makes."""
    monkeypatch.chdir(ROOT)
    config = load("rejection_sampling.py:smoke", "--config.rollout.temperature=0",
                  "--config.model.init_from=/nonexistent/policy")
    with pytest.raises(ValueError, match="rollout.temperature=0 samples greedily"):
        pipeline._run_stage("generate", config, RS, "/nonexistent")


def test_an_eval_task_whose_problems_have_no_answer_is_refused(tmp_path):
    """A task file whose solutions lack a final '#### N' was scored: accuracy 0 for every setting, in silence.
    The check comes before any prompt is measured against the model, so no model is needed here."""
    import types

    from launch import eval as eval_cli

    path = write_jsonl(tmp_path / "task.jsonl", [{"prompt": "1+1?", "completion": "#### 2"},
                                                 {"prompt": "2+2?", "completion": "Four."}])
    config = load("eval.py:smoke", f"--config.eval.tasks.arithmetic.eval.path={path}",
                  "--config.eval.tasks.arithmetic.eval.format=jsonl", "--config.eval.tasks.arithmetic.eval.start=0.0",
                  "--config.data.synthetic.num_examples=40")  # the shots' pool: its first 95%
    no_model = types.SimpleNamespace(model=types.SimpleNamespace(cfg=types.SimpleNamespace(max_seq_len=256)))
    with pytest.raises(ValueError, match=re.escape("eval.tasks.arithmetic.eval: problem 2 has no answer to score: its "
                                                   "solution 'Four.' lacks a final '#### ANSWER' line")):
        eval_cli._task_runs(config, no_model, chat=True)


@pytest.mark.parametrize("kind, settings", [("simpo", []), ("orpo", ["--config.loss.nll_coef=1.0"])])
def test_a_reference_for_a_preference_type_that_has_none_is_refused(tmp_path, capsys, monkeypatch, kind, settings):
    """SimPO and ORPO compare the policy with no reference: `loss.reference=data` was ignored (the log-probs
    in the pairs unread), and `kiln data reference` loaded a model to compute log-probs nothing would read."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="loss.reference='data' is read by preference types with a reference model "
                                          rf"\(sigmoid, hinge, ipo, robust\), not '{kind}'"):
        load("dpo.py:smoke", f"--config.loss.preference_type={kind}", "--config.loss.reference=data")
    argv = ["data", "reference", "--config=configs/dpo.py:smoke", f"--config.loss.preference_type={kind}", *settings,
            f"--out={tmp_path / 'ref'}", "--config.model.init_from=/nonexistent/policy"]
    assert one_error_line(capsys, argv) == (f"kiln data: error: loss.preference_type={kind} compares the policy with "
                                            "no reference: there are no reference log-probs to precompute")


def test_kiln_eval_with_a_training_config_is_refused(tmp_path, capsys, monkeypatch):
    """`kiln eval --config=configs/sft.py` (the config the run trained with) evaluated no task, only the
    training config's held-out text, and wrote its results into the training run's directory, in silence."""
    monkeypatch.chdir(ROOT)
    argv = ["eval", f"--checkpoint={tmp_path / 'missing'}", "--config=configs/sft.py:smoke",
            f"--config.run_dir={tmp_path / 'sft'}"]
    assert one_error_line(capsys, argv) == ("kiln eval: error: --config=configs/sft.py:smoke is a config of stage 'sft'; "
                                            "kiln eval reads an evaluation config, such as configs/eval.py")


def test_evaluating_a_reward_model_as_a_policy_is_refused(tmp_path, capsys, monkeypatch):
    """`kiln eval` of a reward-model run sampled from its language-model head, which reward training leaves
    behind, and reported an accuracy for it. The run's config.json says what it is before anything loads."""
    monkeypatch.chdir(ROOT)
    (tmp_path / "rm" / "checkpoints").mkdir(parents=True)
    (tmp_path / "rm" / "config.json").write_text('{"stage": "reward"}')
    argv = ["eval", f"--checkpoint={tmp_path / 'rm'}", "--config=configs/eval.py:smoke",
            f"--config.run_dir={tmp_path / 'eval'}"]
    assert one_error_line(capsys, argv) == (f"kiln eval: error: {tmp_path / 'rm'} is a reward model (stage reward): "
                                            "it scores replies and writes none; sample from (or evaluate) the policy it "
                                            "scores, and use it as rollout.reward")
    assert sorted(os.listdir(tmp_path)) == ["rm"]


def test_a_ppo_value_model_start_that_does_not_exist_is_named_by_its_key(tmp_path, monkeypatch):
    """A missing rollout.value_from was reported, once the policy was built, as "model.init_from=...: does not
    exist", the key of the policy the user had set right. $VARS in it are expanded, as where it is loaded."""
    with pytest.raises(ValueError, match=re.escape(f"rollout.value_from='{tmp_path}/rm' does not exist; name the "
                                                   "reward-model run (configs/reward.py)")):
        preflight.stage_kind(load("ppo.py:smoke", f"--config.rollout.value_from={tmp_path}/rm"))
    (tmp_path / "rm").mkdir()
    preflight.stage_kind(load("ppo.py:smoke", f"--config.rollout.value_from={tmp_path}/rm"))
    monkeypatch.setenv("KILN_TEST_RUNS", str(tmp_path))
    preflight.stage_kind(load("ppo.py:smoke", "--config.rollout.value_from=$KILN_TEST_RUNS/rm"))


@pytest.mark.parametrize("spec, group, bound", [("sft.py:smoke", "data.sources.train", "end"),
                                                ("eval.py:smoke", "eval.tasks.arithmetic.eval", "start")])
def test_a_source_pointed_at_another_file_reads_it_whole(spec, group, bound, capsys):
    """configs/sft.py and dpo.py train on the built-in task's first 95% (end=0.95): pointed at the user's file,
    or at rejection sampling's sft.jsonl and pairs.jsonl in the lifecycle recipe, they left its last 5% out in
    silence; an eval task's start=0.95 read a small file's last problem alone. A slice given with the new
    path is kept."""
    moved = [f"--config.{group}.path=/data/mine.jsonl", f"--config.{group}.format=jsonl"]
    src = config_value(load(spec, *moved), group)
    assert (src.get("start", 0.0), src.get("end", 1.0)) == (0.0, 1.0)
    assert f"note: {group}.format is set, so {group} reads the whole new file, not the config file's slice" \
        in capsys.readouterr().err
    assert config_value(load(spec, *moved, f"--config.{group}.{bound}=0.5"), f"{group}.{bound}") == 0.5
    assert "note:" not in capsys.readouterr().err


def test_precomputed_reference_log_probs_scored_under_other_data_settings_are_refused(tmp_path):
    """`kiln data reference` records beside its files the data settings that chose the tokens it scored
    (reference.json); a DPO run on those files with another of them trained on log-probs of other tokens
    in silence. Every source is checked, evaluation sources too; a directory without the record (the user's
    own log-probs) and a source without a file are taken as they are."""
    import json

    from train import reference

    scored, own = tmp_path / "scored", tmp_path / "own"
    scored.mkdir()
    own.mkdir()
    on_files = ["--config.loss.reference=data", f"--config.data.eval_sources.heldout.path={scored}/eval.jsonl",
                "--config.data.eval_sources.heldout.format=jsonl"]
    own_train = [f"--config.data.sources.train.path={own}/train.jsonl", "--config.data.sources.train.format=jsonl"]
    config = load("dpo.py:smoke", *on_files, *own_train)
    (scored / "reference.json").write_text(json.dumps(reference.encoding(config.data)))
    reference.check_precomputed(config)
    for train, key, value, recorded, now in [(own_train, "truncate", "false", "True", "False"),
                                             (own_train, "chat_template", "chatml", "'kiln'", "'chatml'"),
                                             (own_train, "mask_special_tokens", "true", "False", "True"),
                                             ([], "seq_len", "200", "256", "200")]:
        with pytest.raises(ValueError, match=re.escape(
                f"data.eval_sources.heldout: its reference log-probs were computed with data.{key}={recorded} "
                f"({scored}/reference.json), and this run has {now}, so they score other tokens")):
            reference.check_precomputed(load("dpo.py:smoke", *on_files, *train, f"--config.data.{key}={value}"))


def test_precomputed_reference_log_probs_of_another_model_are_refused(tmp_path):
    """DPO's reference is the model it starts from: log-probs precomputed under another one (the base rather
    than the SFT model, or the SFT run before it was trained on) gave every pair an implicit reward before the
    first step, in silence. `kiln data reference` now records the model, as its checkpoint directory and step."""
    import json

    from train import reference

    saved_run(tmp_path / "base", 4)
    saved_run(tmp_path / "sft", 2, 6)
    (tmp_path / "scored").mkdir()
    on_files = ["--config.loss.reference=data", f"--config.data.sources.train.path={tmp_path}/scored/train.jsonl",
                "--config.data.sources.train.format=jsonl"]
    scored_under = load("dpo.py:smoke", *on_files, f"--config.model.init_from={tmp_path}/sft/checkpoints/2")
    (tmp_path / "scored" / "reference.json").write_text(json.dumps(dict(
        reference.encoding(scored_under.data), model=reference.reference_model(scored_under))))
    reference.check_precomputed(scored_under)
    for start, now in (("sft", "sft/checkpoints step 6"), ("base", "base/checkpoints step 4")):
        with pytest.raises(ValueError, match=re.escape(
                f"data.sources.train: its reference log-probs were computed under the model {tmp_path}/sft/checkpoints "
                f"step 2 ({tmp_path}/scored/reference.json), and this run starts from {tmp_path}/{now}, its reference; "
                f"compute them again with model.init_from={tmp_path}/{start}")):
            reference.check_precomputed(load("dpo.py:smoke", *on_files, f"--config.model.init_from={tmp_path}/{start}"))


def test_sampling_with_a_tokenizer_of_the_same_size_that_splits_otherwise_is_refused(tmp_path):
    """`kiln sample --tokenizer` (and eval, the lm-eval adapter): a tokenizer as large as the run's that numbers
    its tokens otherwise fed the model ids it was not trained on; the size alone does not tell them apart. The
    run's config.json names its tokenizer, so this is refused before any checkpoint is read. A directory that
    names none (a bare checkpoint) takes --tokenizer as it is."""
    from data import tokenizer as tokenizers
    from test_tokenizer import hf_dir
    from train.generate import _tokenizer, load_sampler

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    trained = hf_dir(tmp_path / "a", ["<|endoftext|>"], {"eos_token": "<|endoftext|>"})
    other = hf_dir(tmp_path / "b", ["<|endoftext|>", "<|im_end|>"], {"eos_token": "<|endoftext|>"})
    assert tokenizers.load(trained).vocab_size == tokenizers.load(other).vocab_size == 400
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(f'{{"stage": "sft", "data": {{"tokenizer": "{trained}"}}}}')
    with pytest.raises(ValueError, match=re.escape(f"tokenizer '{other}' (400 tokens) is not the one the model in "
                                                   f"{tmp_path / 'run'} was trained with ({trained}, 400 tokens)")):
        load_sampler(str(tmp_path / "run"), tokenizer=other)
    assert _tokenizer(other, str(tmp_path / "b")).vocab_size == 400


def test_rejection_sampling_rerun_with_other_settings_is_refused(tmp_path, monkeypatch):
    """A run directory holding rejection sampling's outputs was taken as finished whatever the settings:
    `kiln generate` with another rollout.num_samples (or policy, prompts, reward) printed the earlier run's
    results as its own, and a recipe re-run skipped the stage. The same settings still reuse the outputs.
    (The policy here samples a fixed reply; nothing is loaded.)"""
    import json
    import types

    from train import rejection

    def complete(prompts, *, num_samples, **sampling):
        return [{"text": "#### 2", "prompt_index": i} for i in range(len(prompts)) for _ in range(num_samples)]

    monkeypatch.setattr(rejection.generate, "load_sampler",
                        lambda path, tokenizer, chat: (types.SimpleNamespace(complete=complete), chat))
    saved_run(tmp_path / "policy", 2)
    settings = [f"--config.run_dir={tmp_path / 'rs'}", f"--config.model.init_from={tmp_path / 'policy'}",
                "--config.rollout.num_prompts=2", "--config.data.synthetic.num_examples=40"]
    first = rejection.run(load("rejection_sampling.py:smoke", *settings))
    assert first["sft_examples"] == 2 and rejection.run(load("rejection_sampling.py:smoke", *settings)) == first
    other = load("rejection_sampling.py:smoke", *settings, "--config.rollout.num_samples=2")
    message = (f"{tmp_path / 'rs'} holds the outputs of rejection sampling with rollout.num_samples=4, and this run "
               f"has 2; move {tmp_path / 'rs'} aside to sample again, or undo the change")
    for finished in (rejection.run, lambda config: stage_results.finished("generate", config)):
        with pytest.raises(ValueError, match=re.escape(message)):
            finished(other)
    assert json.loads((tmp_path / "rs" / "results.json").read_text()) == first


def saved_run(path, *steps):
    """A Kiln run directory with a checkpoint at each of `steps` (nothing in them): what the reference's step
    and the checks before any model is loaded read."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(str(path / "checkpoints")) as mgr:
        for step in steps:
            mgr.save(step, args=ocp.args.Composite(params=ocp.args.JsonSave({})))
    return str(path)


def fake_run(path, stage, init_from=""):
    """A directory laid out as a Kiln run of `stage` (config.json, checkpoints/): what the checks before any
    model is loaded read."""
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.json").write_text(f'{{"stage": "{stage}", "model": {{"init_from": "{init_from}"}}}}')
    return str(path)


def test_a_policy_started_from_a_reward_model_is_refused(tmp_path, capsys, monkeypatch):
    """`model.init_from=@rm` for DPO (or SFT, GRPO, a DPO reference) trained a policy on the reward model's
    body under the language-model head reward training leaves behind, in silence. A reward model may start
    from one (it goes on training), and a policy from a policy."""
    monkeypatch.chdir(ROOT)
    rm = fake_run(tmp_path / "rm", "reward", init_from="runs/sft")
    for spec in ("dpo.py:smoke", "grpo.py:smoke"):
        with pytest.raises(ValueError, match=re.escape(
                f"model.init_from='{rm}' is a reward model (stage reward): it scores replies and writes none; start "
                f"stage {spec.split('.')[0]} from the policy it scores (runs/sft), and use the reward model as "
                "rollout.reward")):
            preflight.stage_kind(load(spec, f"--config.model.init_from={rm}"))
    argv = ["data", "reference", "--config=configs/dpo.py:smoke", f"--out={tmp_path / 'ref'}",
            f"--config.model.init_from={rm}"]
    assert one_error_line(capsys, argv).startswith(f"kiln data: error: model.init_from='{rm}' is a reward model")
    preflight.stage_kind(load("reward.py:smoke", f"--config.model.init_from={rm}"))
    preflight.stage_kind(load("dpo.py:smoke", f"--config.model.init_from={fake_run(tmp_path / 'sft', 'sft')}"))
    assert sorted(os.listdir(tmp_path)) == ["rm", "sft"]


def test_a_lora_adapter_to_start_from_is_checked_before_the_model_is_built(tmp_path):
    """`peft.adapter_from` was read once the model was built: a Kiln LoRA run given there was "no
    adapter_config.json (is this a PEFT adapter directory?)", and an adapter of another rank was refused
    only then. A Kiln run starts through model.init_from instead."""
    from model import hf_peft

    lora = ["--config.peft.method=lora", "--config.peft.lora_rank=8", "--config.peft.lora_alpha=16"]
    run = fake_run(tmp_path / "lora", "sft")
    with pytest.raises(ValueError, match=re.escape(f"peft.adapter_from='{run}' is a Kiln run, not a PEFT adapter "
                                                   "directory: start from it with model.init_from")):
        preflight.stage_kind(load("sft.py:smoke", *lora, f"--config.peft.adapter_from={run}"))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}')
    with pytest.raises(hf_peft.AdapterError, match=re.escape("the adapter has lora_rank=4 but peft.lora_rank=8")):
        preflight.stage_kind(load("sft.py:smoke", *lora, f"--config.peft.adapter_from={tmp_path / 'adapter'}"))
    preflight.stage_kind(load("sft.py:smoke", *lora[:1], "--config.peft.lora_rank=4",
                              f"--config.peft.adapter_from={tmp_path / 'adapter'}"))


def test_a_reward_that_is_no_reward_model_is_refused_before_the_policy_loads(tmp_path, capsys, monkeypatch):
    """rollout.reward naming the SFT run (or a misspelt directory) was found out only once GRPO's models were
    built, or rejection sampling's policy loaded. (The policy named here does not exist.)"""
    monkeypatch.chdir(ROOT)
    sft = fake_run(tmp_path / "sft", "sft")
    message = (f"rollout.reward='{sft}' is neither 'verifier', a Kiln reward-model run nor MODULE:FUNCTION: it is a "
               "run of stage 'sft' (a reward model is trained by configs/reward.py)")
    with pytest.raises(ValueError, match=re.escape(message)):
        preflight.stage_kind(load("grpo.py:smoke", f"--config.rollout.reward={sft}"))
    argv = ["generate", "--config=configs/rejection_sampling.py:smoke", f"--config.rollout.reward={sft}",
            "--config.model.init_from=/nonexistent/policy"]
    assert one_error_line(capsys, argv) == f"kiln generate: error: {message}"
    preflight.stage_kind(load("grpo.py:smoke", f"--config.rollout.reward={fake_run(tmp_path / 'rm', 'reward')}"))


@pytest.mark.parametrize("flags, message", [
    (["--temperature=-1"], "--temperature must be 0 (greedy) or more, got -1.0"),
    (["--top_p=1.5"], "--top_p must be in (0, 1], got 1.5"),
    (["--top_k=-1"], "--top_k must be 0 (off) or more, got -1"),
    (["--temperature=0", "--num_samples=3"], "--temperature=0 samples greedily: the --num_samples=3 samples of each "
                                             "prompt would be one sample 3 times; set a positive --temperature (or "
                                             "--num_samples=1)"),
])
def test_sample_settings_are_checked_before_loading(tmp_path, capsys, flags, message):
    """`kiln sample` loaded the model before refusing a negative temperature or a top_p above 1, and greedy
    sampling of several samples per prompt wrote one sample that many times. The checkpoint does not exist."""
    argv = ["sample", f"--checkpoint={tmp_path / 'missing'}", "--prompt=hi", *flags]
    assert one_error_line(capsys, argv) == f"kiln sample: error: {message}"


def stub_eval(monkeypatch):
    """launch.eval with stand-ins for the sampler, the tasks and the metrics (eval/loss 2.5): only its run
    directory's files are real."""
    import types

    from launch import eval as eval_cli

    monkeypatch.setattr(eval_cli.generate, "load_sampler",
                        lambda path, **kw: (types.SimpleNamespace(model=None, tokenizer=None), False))
    monkeypatch.setattr(eval_cli, "_task_runs", lambda config, sampler, chat: [])
    monkeypatch.setattr(eval_cli.nnx, "split", lambda model, *filters: (None, None, None))
    monkeypatch.setattr(eval_cli.evaluate, "evaluate_sources", lambda *args: {"eval/loss": 2.5})
    return eval_cli


def test_evaluating_another_checkpoint_into_a_run_dir_keeps_the_earlier_results(tmp_path, capsys, monkeypatch):
    """Every `kiln eval` writes into configs/eval.py's runs/eval unless told otherwise: evaluating a second
    checkpoint replaced the first one's results in silence, and a run_dir holding rejection sampling's
    outputs lost its results.json (which a recipe reads as the finished stage). The earlier evaluation now
    moves to superseded/, the same checkpoint's is replaced, and another command's results are refused
    before the checkpoint is read. (Stand-ins for the model and the metrics: nothing is computed.)"""
    import json

    eval_cli = stub_eval(monkeypatch)
    config = load("eval.py:smoke", f"--config.run_dir={tmp_path / 'eval'}")
    for ckpt in ("a", "a", "b"):
        eval_cli.run(config, str(tmp_path / ckpt))
    [superseded] = os.listdir(tmp_path / "eval" / "superseded")
    kept = json.loads((tmp_path / "eval" / "superseded" / superseded / "results.json").read_text())
    assert kept["checkpoint"] == str(tmp_path / "a") and sorted(os.listdir(tmp_path / "eval")) == [
        "results.json", "results.md", "superseded"]
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["checkpoint"] == str(tmp_path / "b")
    assert capsys.readouterr().err == (f"note: moved the evaluation of {tmp_path / 'a'} to "
                                       f"{tmp_path / 'eval' / 'superseded' / superseded}\n")
    (tmp_path / "rs").mkdir()
    (tmp_path / "rs" / "results.json").write_text('{"pass@1": 0.25, "policy": "runs/sft"}')
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'rs' / 'results.json'} is not an evaluation's "
                                                   "results (rejection sampling's, or damaged): kiln eval would "
                                                   "replace it; choose another --config.run_dir")):
        eval_cli.run(load("eval.py:smoke", f"--config.run_dir={tmp_path / 'rs'}"), str(tmp_path / "missing"))


@pytest.mark.parametrize("path, message", [
    ("shards", "'{tmp}/shards' is a directory; format 'jsonl' reads one file: name it"),
    ("shards/*.jsonl", "'{tmp}/shards/*.jsonl' is a pattern; format 'jsonl' reads one file: give each file a source "
                       "of its own (array_record sources take patterns)"),
])
def test_a_source_path_that_is_no_file_says_what_it_is(tmp_path, path, message):
    """A jsonl source pointed at the directory of its files, or at a pattern matching them, was "file ... not
    found": the user looked, and the path was there."""
    (tmp_path / "shards").mkdir()
    write_jsonl(tmp_path / "shards" / "0.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(sources.DataError, match=re.escape(f"source s: {message.format(tmp=tmp_path)}")):
        records(tmp_path / path, "jsonl", "sft")


def test_a_reward_model_is_not_exported_as_a_causal_lm(tmp_path):
    """`kiln convert --from-kiln RM --to-hf DIR` wrote a LlamaForCausalLM without the score head: the reward
    model's body under a language-model head reward training leaves behind, a policy no one trained, and
    nothing said the head was gone. The check comes before any weight is read."""
    from flax import nnx

    from model import hf
    from model.transformer import Transformer

    cfg = presets.get("tiny", reward_head=True)
    with pytest.raises(hf.HFFormatError, match=re.escape("a reward model's score head has no place in a Hugging Face "
                                                         "causal LM, which would be written without it")):
        hf.save(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), cfg, str(tmp_path / "hf"))
    assert os.listdir(tmp_path) == []


def test_an_evaluation_source_of_the_wrong_kind_is_named_before_training(tmp_path, capsys, monkeypatch):
    """data.eval_sources were first read at the first evaluation: an SFT run (or a recipe's SFT stage) pointed
    at a file of preference pairs trained train.eval_every steps, then stopped before that step's checkpoint.
    (The model to start from does not exist: the check comes before it is loaded.)"""
    monkeypatch.chdir(ROOT)
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    argv = ["train", "--config=configs/sft.py:smoke", f"--config.run_dir={tmp_path / 'sft'}",
            f"--config.data.eval_sources.heldout.path={path}", "--config.data.eval_sources.heldout.format=jsonl",
            "--config.data.eval_sources.heldout.start=0.0", f"--config.model.init_from={tmp_path / 'policy'}"]
    assert one_error_line(capsys, argv) == (f"kiln train: error: {path}:1: missing field 'completion' (the record has: "
                                            "'prompt', 'chosen', 'rejected') (set data.skip_bad_records=true to skip "
                                            "such records)")
    config = load("sft.py:smoke", *argv[2:])
    with pytest.raises(sources.DataError, match=re.escape(f"{path}:1: missing field 'completion'")):
        pipeline._run_stage("train", config, {}, str(tmp_path))  # a recipe's train stage, checked as kiln train
    assert os.listdir(tmp_path) == ["pairs.jsonl"]


@pytest.mark.parametrize("spec, override, message", [
    ("sft.py:smoke", "data.sources.train.end=1.5", "config key 'data.sources.train.end' = 1.5: a source's start and "
                                                   "end are fractions of its records"),
    ("dpo.py:smoke", "data.eval_sources.heldout.start=-0.1", "config key 'data.eval_sources.heldout.start' = -0.1: a "
                                                             "source's start and end are fractions of its records"),
    ("eval.py:smoke", "eval.tasks.arithmetic.eval.start=1.5", "config key 'eval.tasks.arithmetic.eval.start' = 1.5: "
                                                              "a source's start and end are fractions of its records"),
    ("sft.py:smoke", "data.sources.train.end=0", "config keys 'data.sources.train.start' = 0.0 and "
                                                 "'data.sources.train.end' = 0.0: the slice is empty"),
])
def test_a_source_slice_that_is_no_fraction_is_refused_when_the_config_loads(spec, override, message):
    """A source's end=1.5 (a start of -0.1 or NaN, a slice ending where it starts) was refused only when the
    source was read: once the model was built (an eval task's split, once the checkpoint was loaded)."""
    with pytest.raises(ConfigError, match=re.escape(f"{message}; need 0 <= start < end <= 1 (such as start=0.0, "
                                                    "end=0.95)")):
        load(spec, f"--config.{override}")


def test_a_chat_template_the_tokenizer_lacks_is_refused_before_the_model_loads(tmp_path, capsys):
    """`kiln sample --chat_template=llama3` with the byte tokenizer (which has the kiln template's tokens only)
    loaded the model, then stopped at the first prompt naming data.chat_template, a key kiln sample has not;
    kiln eval's --chat_template (no argparse choices) took an unknown name as far. (The checkpoint is empty.)"""
    from train.generate import load_sampler

    run = fake_run(tmp_path / "sft", "sft")
    argv = ["sample", f"--checkpoint={run}", "--tokenizer=byte", "--prompt=hi", "--chat_template=llama3"]
    assert one_error_line(capsys, argv) == ("kiln sample: error: chat template 'llama3' (--chat_template) needs the "
                                            "token '<|begin_of_text|>', which tokenizer byte lacks; use kiln")
    with pytest.raises(ValueError, match=re.escape("--chat_template='chatmll' is no chat template Kiln knows: use one "
                                                   "of kiln, llama3, chatml, gemma")):
        load_sampler(run, tokenizer="byte", chat_template="chatmll")


SFT = {"name": "sft", "command": "train", "config": "configs/sft.py:smoke"}
RM = {"name": "rm", "command": "train", "config": "configs/reward.py:smoke", "overrides": ["model.init_from=@sft"]}


@pytest.mark.parametrize("stage, message", [
    ({"name": "dpo", "command": "train", "config": "configs/dpo.py:smoke", "overrides": ["model.init_from=@rm"]},
     "model.init_from='x/rm' is a reward model (stage reward): it scores replies and writes none; start stage dpo "
     "from the policy it scores (x/sft), and use the reward model as rollout.reward"),
    (dict(RS, overrides=["model.init_from=@rm/checkpoints/2"]),
     "model.init_from='x/rm/checkpoints/2' is a reward model"),
    ({"name": "grpo", "command": "train", "config": "configs/grpo.py:smoke", "overrides": ["rollout.reward=@sft"]},
     "rollout.reward='x/sft' is neither 'verifier', a Kiln reward-model run nor MODULE:FUNCTION: it is the run of "
     "stage 'sft' (a reward model is trained by configs/reward.py)"),
])
def test_a_recipe_stage_given_the_wrong_kind_of_earlier_run_is_named_when_the_recipe_loads(tmp_path, monkeypatch,
                                                                                           stage, message):
    """`model.init_from=@rm` (a reward model as a policy's start) and `rollout.reward=@sft` (a policy as the
    scorer) were refused only when the stage's turn came, after the stages before it had trained. A reward
    model starting from the SFT stage, and GRPO scored by it, load."""
    monkeypatch.chdir(ROOT)
    path = recipe(tmp_path, [SFT, RM, stage])
    with pytest.raises(ConfigError, match=re.escape(f"{path}: stage 2 ({stage['name']}): {message}")):
        pipeline.load_recipe(path, [])
    grpo = {"name": "grpo", "command": "train", "config": "configs/grpo.py:smoke",
            "overrides": ["model.init_from=@sft", "rollout.reward=@rm"]}
    pipeline.load_recipe(recipe(tmp_path, [SFT, RM, grpo]), [])


def test_rejection_sampling_more_prompts_than_the_sources_hold_is_refused(tmp_path, capsys, monkeypatch):
    """rollout.num_prompts=50 of a source holding 38 prompts sampled the 38, said only in results.json.
    (The policy does not exist: the check comes before it is loaded, and before the run directory is made.)"""
    monkeypatch.chdir(ROOT)
    argv = ["generate", "--config=configs/rejection_sampling.py:smoke", f"--config.run_dir={tmp_path / 'rs'}",
            "--config.rollout.num_prompts=50", "--config.data.synthetic.num_examples=40",  # its first 95%: 38
            f"--config.model.init_from={tmp_path / 'policy'}"]
    message = ("rollout.num_prompts=50, but data.sources hold 38 prompts; lower rollout.num_prompts to 38 (or 0: all "
               "of them), or add prompts")
    assert one_error_line(capsys, argv) == f"kiln generate: error: {message}"
    config = load("rejection_sampling.py:smoke", *argv[2:])
    with pytest.raises(ValueError, match=re.escape(message)):  # a recipe's rejection sampling stage
        pipeline._run_stage("generate", config, RS, str(tmp_path))
    assert os.listdir(tmp_path) == []
    preflight.check_sampling(load("rejection_sampling.py:smoke", *argv[2:], "--config.rollout.num_prompts=38"))


@pytest.mark.parametrize("row, message", [
    ({"prompt": "2+2?", "completion": ""}, "field 'completion' is empty"),
    ({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": " "}]},
     "field 'messages': message 1 is an empty assistant reply"),
])
def test_an_empty_sft_reply_is_refused(tmp_path, row, message):
    """An SFT completion of no text was trained on: the end-of-turn token alone, a model taught to say nothing.
    Rejection sampling no longer writes one into sft.jsonl. A preference pair may hold an empty reply, a reply
    to rank: 4 of HH-RLHF harmless-base's pairs prefer saying nothing to a harmful reply, and rejection
    sampling's pairs reject a policy's reply that ends at once."""
    import numpy as np

    from train import rejection

    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "1+1?", "completion": "2"}, row])
    with pytest.raises(sources.DataError, match=re.escape(f"{path}:2: {message}: it would train only the end-of-turn "
                                                          "token; give it a reply")):
        records(path, "jsonl", "sft")
    prompt = [{"role": "user", "content": "Hurt him?"}]
    sft, pairs = rejection._select([{"prompt": prompt}], [["", "Sure."]], np.array([[1.0, 0.0]]), None, "policy")
    assert sft == [] and [(p["chosen"], p["rejected"]) for p in pairs] == [("", "Sure.")]
    path = write_jsonl(tmp_path / "pairs.jsonl", [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    assert [r["chosen"] for r in records(path, "jsonl", "preference")[0]] == [""]


def test_a_bad_training_file_is_named_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    """The training sources were first read once the model was built (and loaded from model.init_from): a
    malformed line 3 cost a model load, and a run directory was left behind. Read before anything now; a file
    over preflight.FULL_CHECK_BYTES only on its first HEAD_RECORDS records (the data stream reads it whole
    again). (The model to start from does not exist.)"""
    monkeypatch.chdir(ROOT)
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "1+1?", "completion": "2"}] * 2 +
                       [b'{"prompt": "2+2?", completion: "4"}'])
    argv = ["train", "--config=configs/sft.py:smoke", f"--config.run_dir={tmp_path / 'sft'}",
            f"--config.data.sources.train.path={path}", "--config.data.sources.train.format=jsonl",
            "--config.data.sources.train.end=1.0", f"--config.model.init_from={tmp_path / 'policy'}"]
    assert one_error_line(capsys, argv) == (f"kiln train: error: {path}:3: malformed JSON: Expecting property name "
                                            "enclosed in double quotes (column 20) (set data.skip_bad_records=true "
                                            "to skip such records)")
    assert os.listdir(tmp_path) == ["sft.jsonl"]
    monkeypatch.setattr(preflight, "FULL_CHECK_BYTES", 0)
    monkeypatch.setattr(preflight, "HEAD_RECORDS", 2)
    preflight.check_train_sources(load("sft.py:smoke", *argv[2:]), "sft")  # line 3 is left to the data stream


def test_rejection_sampling_outputs_without_recorded_settings_are_not_reused(tmp_path):
    """Outputs written before results.json recorded its settings were taken as this run's, whatever the run's
    settings: `kiln generate` printed them as its results, and a recipe re-run skipped the stage."""
    from train import rejection

    (tmp_path / "rs").mkdir()
    for name in rejection.OUTPUTS:
        (tmp_path / "rs" / name).write_text('{"pass@1": 0.25, "policy": "runs/sft"}\n')
    config = load("rejection_sampling.py:smoke", f"--config.run_dir={tmp_path / 'rs'}")
    message = (f"{tmp_path / 'rs'} holds rejection sampling's outputs, but its results.json records no settings, so "
               f"they cannot be checked against this run's; delete {tmp_path / 'rs'} (or move it aside) to sample "
               "again, or choose another run_dir")
    for finished in (rejection.run, lambda config: stage_results.finished("generate", config)):
        with pytest.raises(ValueError, match=re.escape(message)):
            finished(config)
