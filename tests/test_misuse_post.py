"""A careless user's inputs to the post-training stages and evaluations: data files, stage configs,
eval tasks and recipes. Each is one clear error naming what is wrong and where, before any model is
built or any stage runs, never a traceback or a run that trains (or scores) nothing in silence. Each
test calls the function the input reaches first, so all of them are fast."""
import re

import pytest

from data import sources
from launch.config import ConfigError
from test_config_overrides import load
from test_data_sources import data_cfg, records, write_jsonl


def test_a_jsonl_file_saved_with_a_byte_order_mark_reads(tmp_path):
    """A UTF-8 BOM (Windows editors write one) made line 1 "malformed JSON: Unexpected UTF-8 BOM (decode
    using utf-8-sig)", advice for a programmer, not for the user holding the file."""
    path = write_jsonl(tmp_path / "sft.jsonl", [b'\xef\xbb\xbf{"prompt": "hi", "completion": "yo"}'])
    got, _ = records(path, "jsonl", "sft")
    assert got == [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]


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
    ("eval.py:smoke", ["eval.shots=(-1,)"], "config key 'eval.shots' = (-1,): each is a number of few-shot examples"),
    ("eval.py:smoke", ["eval.shots=()"], "config key 'eval.shots' is empty, so no setting of eval.tasks would be "
                                         "scored; list the numbers of few-shot examples, such as (0, 4)"),
])
def test_post_training_settings_out_of_range_are_named_before_any_model(spec, overrides, message):
    """A negative GRPO beta (a reward for leaving the reference), rollout.num_prompts=-1 (every prompt but
    the last) and eval.num_problems=-1 (all) ran on in silence; eval.shots=() scored no task and (-1,) was
    "Sample larger than population or is negative"; the others were refused only once the model was
    loaded, in words naming no config key ("beta must be positive", "prefix kind must be prompt or prefix
    with num_tokens > 0 ...")."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(spec, *[f"--config.{o}" for o in overrides])
