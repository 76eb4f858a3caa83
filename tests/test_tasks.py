"""Verifiable-task evaluation: problems and shots from separate splits, prompts with and without a
chain of thought, answers read after '####', accuracy counted from what the sampler wrote."""
from types import SimpleNamespace

import pytest

from configs import base
from data import tokenizer
from data.chat import render
from train import tasks
from train.generate import Sampler

DATA = base.get_config().data
DATA.synthetic.num_examples = 200


def split(start, end, limit=0):
    return tasks.items("t", base.source(format="synthetic", start=start, end=end), DATA, limit)


def test_items_carry_question_solution_and_answer():
    item = split(0.95, 1.0)[0]
    assert item.solution.endswith(f"#### {item.answer}") and item.answer.isdigit()
    assert item.question.endswith("?") and len(split(0.95, 1.0)) == 10 and len(split(0.0, 0.95, limit=7)) == 7


def test_items_of_conversations_are_the_first_question_and_the_last_solution(tmp_path):
    """A task record that opens with a system message was read as (system text, question): the question
    became the solution and no answer was found. A longer conversation is its first question and its last
    (worked) reply; a record without a user turn is named."""
    import json

    path = tmp_path / "task.jsonl"
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
             {"role": "assistant", "content": "1+1=2\n#### 2"}]
    path.write_text(json.dumps({"messages": turns}) + "\n")
    src = base.source(str(path), "jsonl")
    assert tasks.items("t", src, DATA) == [tasks.Item("1+1?", "1+1=2\n#### 2", "2")]
    longer = [turns[1], {"role": "assistant", "content": "Let me see."}, {"role": "user", "content": "Go on."},
              turns[2]]
    path.write_text(json.dumps({"messages": longer}) + "\n")
    assert tasks.items("t", src, DATA) == [tasks.Item("1+1?", "1+1=2\n#### 2", "2")]
    path.write_text(json.dumps({"messages": [turns[0], turns[2]]}) + "\n")
    with pytest.raises(ValueError, match=r"t: record 0 of .*task.jsonl has no user turn"):
        tasks.items("t", src, DATA)


def test_shots_never_include_an_evaluated_problem():
    evaluated, pool = split(0.95, 1.0), split(0.0, 0.95)
    shots = tasks.choose_shots(pool, 4, evaluated, seed=0)
    assert len(shots) == 4 and shots == tasks.choose_shots(pool, 4, evaluated, seed=0)
    assert shots != tasks.choose_shots(pool, 4, evaluated, seed=1)
    with pytest.raises(ValueError, match="also an evaluated problem"):
        tasks.choose_shots(evaluated, 2, evaluated)
    with pytest.raises(ValueError, match="eval.shots asks for 300-shot prompts, which need 300 examples"):
        tasks.choose_shots(pool, 300, evaluated)
    # One evaluated problem (the last) slipped into the pool: drawing the whole pool shows it.
    with pytest.raises(ValueError, match="also an evaluated problem"):
        tasks.choose_shots(pool + [evaluated[-1]], len(pool) + 1, evaluated)
    assert len(tasks.choose_shots(pool, len(pool), evaluated)) == len(pool)  # all of a clean pool is fine


def test_prompts_with_and_without_chain_of_thought():
    item, (s1, s2) = split(0.95, 1.0)[0], split(0.0, 0.95)[:2]
    cot = tasks.prompt(item, [s1, s2], cot=True, chat=False)
    assert cot == f"{s1.question}\n{s1.solution}\n\n{s2.question}\n{s2.solution}\n\n{item.question}\n"
    direct = tasks.prompt(item, [s1], cot=False, chat=False)
    assert direct == f"{s1.question}\n#### {s1.answer}\n\n{item.question}\n#### "
    messages = tasks.prompt(item, [s1], cot=False, chat=True)
    assert messages == [{"role": "user", "content": s1.question}, {"role": "assistant", "content": f"#### {s1.answer}"},
                        {"role": "user", "content": item.question}]
    assert tasks.prompt(item, [], cot=True, chat=True) == [{"role": "user", "content": item.question}]


def test_scoring_reads_the_final_answer():
    item = tasks.Item("q", "s\n#### 1234", "1234")
    assert tasks.score("a = 2\n#### 1,234", item, cot=True, chat=False)
    assert not tasks.score("#### 1234 then #### 5", item, cot=True, chat=False)  # the last #### counts
    assert tasks.score("1234", item, cot=False, chat=False)  # after the prompt's "#### "
    assert not tasks.score("1234", item, cot=True, chat=False)  # a chain of thought must end in "#### N"
    assert tasks.score("#### 1234.", item, cot=False, chat=True)
    assert not tasks.score("1234", item, cot=False, chat=True)  # a chat reply writes its own "#### "
    assert tasks.score("-3.0", tasks.Item("q", "s\n#### -3", "-3"), cot=False, chat=False)  # numerically equal
    assert not tasks.score("3", tasks.Item("q", "s\n#### -3", "-3"), cot=False, chat=False)


class Scripted:
    """A stand-in sampler: answers each question with the scripted text and records its calls."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def complete(self, prompts, **kw):
        self.calls.append((prompts, kw))
        return [{"text": self.answers[p if isinstance(p, str) else p[-1]["content"]]} for p in prompts]


def test_accuracy_counts_right_answers_in_batches():
    evaluated = split(0.95, 1.0)
    answers = {tasks.prompt(it, [], cot=True, chat=False): f"work\n#### {it.answer if i % 3 else 0}"
               for i, it in enumerate(evaluated)}
    sampler = Scripted(answers)
    out = tasks.accuracy(sampler, evaluated, [], cot=True, chat=False, max_new_tokens=64, batch_size=4)
    assert out["correct"] == sum(1 for i in range(10) if i % 3) == 6 and out["accuracy"] == 0.6 and out["n"] == 10
    assert [len(p) for p, _ in sampler.calls] == [4, 4, 2]
    assert sampler.calls[0][1]["temperature"] == 0.0 and sampler.calls[0][1]["stop"] == ("\n\n",)
    assert [e["correct"] for e in out["examples"]] == [False, True, True]


def test_accuracy_stops_plain_text_at_the_end_of_the_example_and_chat_at_end_of_turn():
    """A direct plain-text answer ends its line; a chain of thought ends at a blank line; chat stops at the
    template's end of turn (no stop strings)."""
    evaluated = split(0.95, 1.0)[:3]
    direct = Scripted({tasks.prompt(it, [], cot=False, chat=False): f"{it.answer}" for it in evaluated})
    out = tasks.accuracy(direct, evaluated, [], cot=False, chat=False, max_new_tokens=8, batch_size=8)
    assert out["correct"] == 3 and direct.calls[0][1]["stop"] == ("\n",)
    chat = Scripted({it.question: f"#### {it.answer}" for it in evaluated})
    out = tasks.accuracy(chat, evaluated, [], cot=False, chat=True, max_new_tokens=8, batch_size=8)
    assert out["correct"] == 3 and tuple(chat.calls[0][1]["stop"]) == () and chat.calls[0][1]["chat"] is True


def test_longest_prompt_counts_the_tokens_of_the_prompts_as_sent():
    """Plain text is BOS and one byte token per byte, also for a sampler with a chat template; chat prompts
    are the rendered turns up to the assistant header. The shots count in every prompt."""
    byte = tokenizer.load("byte")
    sampler = Sampler(SimpleNamespace(cfg=SimpleNamespace(vocab_size=384)), byte, chat_template="kiln")
    evaluated, shots = split(0.95, 1.0)[:3], split(0.0, 0.95)[:2]
    plain = max(1 + len(tasks.prompt(it, shots, cot=False, chat=False).encode()) for it in evaluated)
    assert tasks.longest_prompt(sampler, evaluated, shots, cot=False, chat=False) == plain
    chat = max(len(render(tasks.prompt(it, shots, cot=True, chat=True), byte, "kiln", add_generation_prompt=True)[0])
               for it in evaluated)
    assert tasks.longest_prompt(sampler, evaluated, shots, cot=True, chat=True) == chat > plain
    assert tasks.longest_prompt(sampler, [], shots, cot=True, chat=True) == 0
