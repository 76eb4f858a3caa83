"""Mutation-found holes in the lm-eval adapter (train/harness.py), the text sampler (train/generate.py) and the
run checks (train/preflight.py): each test here failed against a planted bug that the rest of the suite let
through."""
import dataclasses
import types

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from configs import base  # noqa: E402
from data import sources  # noqa: E402
from model import presets  # noqa: E402
from model.sampling import generate  # noqa: E402
from model.sharding import make_mesh  # noqa: E402
from test_config_overrides import load  # noqa: E402
from test_harness import BYTE, Request, ScriptedSampler, lm  # noqa: E402,F401  (lm: the module's fixture)
from test_misuse import ROOT  # noqa: E402
from test_tokenizer import hf_dir  # noqa: E402
from train import preflight  # noqa: E402
from train.generate import Sampler, load_sampler  # noqa: E402
from train.harness import KilnLM  # noqa: E402


def test_generate_until_samples_at_temperature_one_when_a_request_names_none(lm):
    """do_sample without a temperature samples at 1.0 (lm-eval's default), not greedily at 0."""
    sampler = ScriptedSampler(lm.sampler.model, " 42")
    KilnLM(sampler=sampler).generate_until([Request("Q: a", {"do_sample": True, "max_gen_toks": 8})])
    (_, kw), = sampler.calls
    assert (kw["temperature"], kw["top_p"]) == (1.0, 1.0)


def test_generate_until_batches_only_requests_with_the_same_top_p_and_at_most_batch_size_of_them(lm):
    """Five requests alike but for top_p (0.9 for the fourth) make three sampler calls of batch_size=2 at
    top_p 1.0 ([a, b], [c, e]) and one at 0.9 ([d]); each output goes back to its own request."""
    sampler = ScriptedSampler(lm.sampler.model, " 42\nQ")
    ask = {"until": ["\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 0.5}
    prompts = ["Q: a", "Q: b", "Q: c", "Q: d", "Q: e"]
    out = KilnLM(sampler=sampler, batch_size=2).generate_until(
        [Request(p, dict(ask, top_p=0.9 if p == "Q: d" else 1.0)) for p in prompts])
    assert out == [" 42"] * 5
    calls = [([BYTE.decode(ids[1:]) for ids in rows], kw["top_p"]) for rows, kw in sampler.calls]
    assert calls == [(["Q: a", "Q: b"], 1.0), (["Q: c", "Q: e"], 1.0), (["Q: d"], 0.9)]


def test_generate_until_ignores_an_empty_stop_string(lm):
    """An empty `until` string is no stop (it is found at 0 and cut every output to nothing) and no stop sequence."""
    sampler = ScriptedSampler(lm.sampler.model, " 42\nQ")
    out = KilnLM(sampler=sampler).generate_until([Request("Q: a", {"until": ["", "\n"], "max_gen_toks": 8})])
    assert out == [" 42"]
    (_, kw), = sampler.calls
    assert kw["stop_sequences"] == [BYTE.encode_text("\n")]


def test_sampler_complete_and_generate_pass_every_sampling_setting_through(lm):
    """Sampler.complete and Sampler.generate sample exactly what model.sampling.generate samples with the same
    seed, top_k, top_p, temperature and stop ids: a setting dropped on the way (left at its default) samples
    other tokens."""
    sampler, prompts = lm.sampler, ["Ava has", "Ben"]
    settings = dict(max_new_tokens=6, temperature=0.8, top_k=5, top_p=0.3, seed=3, num_samples=2)  # top_p cuts the 5
    want = generate(sampler.model, [BYTE.encode(p, add_bos=True) for p in prompts], stop_ids=sampler.stop_ids(),
                    pad_id=BYTE.pad_id, **settings)
    got = sampler.complete(prompts, chat=False, **settings)
    assert [o["token_ids"] for o in got] == [want.row(r)[0] for r in range(4)]
    direct = sampler.generate([BYTE.encode(p, add_bos=True) for p in prompts], stop_ids=[], **settings)
    assert direct.tokens.tolist() == generate(sampler.model, [BYTE.encode(p, add_bos=True) for p in prompts],
                                              stop_ids=[], pad_id=BYTE.pad_id, **settings).tokens.tolist()
    other = sampler.complete(prompts, chat=False, **dict(settings, seed=4))
    assert [o["token_ids"] for o in other] != [o["token_ids"] for o in got]


def test_an_rl_run_with_evaluation_sources_is_refused():
    """RL stages evaluate through `kiln eval`: a grpo config that names data.eval_sources is refused, one without
    them passes."""
    config = load("grpo.py:smoke")
    preflight.stage_kind(config)
    with config.unlocked():
        config.data.eval_sources.heldout = base.source(format="synthetic", start=0.95)
    with pytest.raises(ValueError, match="leave data.eval_sources empty"):
        preflight.stage_kind(config)


def test_evaluation_sources_are_read_before_a_run_that_evaluates_every_step(tmp_path):
    """train.eval_every=1 (the smallest positive interval) evaluates, so a missing evaluation source stops the run."""
    missing = [f"--config.data.eval_sources.heldout.path={tmp_path}/missing.jsonl",
               "--config.data.eval_sources.heldout.format=jsonl", "--config.data.eval_sources.heldout.start=0.0"]
    with pytest.raises(sources.DataError, match="missing.jsonl"):
        preflight.check_eval_sources(load("sft.py:smoke", *missing, "--config.train.eval_every=1"), "sft")


def test_sampler_generate_stops_at_the_stop_ids_it_is_given(lm):
    """Stop ids passed to Sampler.generate replace the sampler's own: the row ends at its first greedy token when
    that is the one stop id, and runs its whole length under the default stop ids (EOS, never its greedy pick)."""
    sampler, prompt = lm.sampler, BYTE.encode("Ava has", add_bos=True)
    free = sampler.generate([prompt], max_new_tokens=4, temperature=0.0)
    first = int(free.tokens[0, 0])
    assert free.lengths.tolist() == [4] and first not in sampler.stop_ids()
    stopped = sampler.generate([prompt], max_new_tokens=4, temperature=0.0, stop_ids=[first])
    assert stopped.lengths.tolist() == [1] and stopped.finish_reasons == ["stop"]


def test_rejection_sampling_one_prompt_more_than_the_sources_hold_is_refused(monkeypatch):
    """The boundary of rollout.num_prompts: 38 of 38 held prompts pass, 39 are refused."""
    monkeypatch.chdir(ROOT)
    argv = ["--config.data.synthetic.num_examples=40", "--config.model.init_from=/nonexistent/policy"]  # 38 prompts
    preflight.check_sampling(load("rejection_sampling.py:smoke", *argv, "--config.rollout.num_prompts=38"))
    with pytest.raises(ValueError, match="rollout.num_prompts=39, but data.sources hold 38 prompts"):
        preflight.check_sampling(load("rejection_sampling.py:smoke", *argv, "--config.rollout.num_prompts=39"))


def test_a_sequence_one_token_longer_than_the_model_is_refused():
    """data.seq_len=257 for a model of max_seq_len=256 is refused (256 fits: test_shape_checks_at_their_boundaries)."""
    cfg = load("pretrain.py:smoke", "--config.data.seq_len=257")
    with pytest.raises(ValueError, match="data.seq_len=257 is longer than the model's max_seq_len=256"):
        preflight.check_shapes(cfg, presets.get("tiny"), make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))


class FakeAccelerator:
    """A device as check_memory reads one: its platform, kind and memory limit."""

    platform, device_kind = "gpu", "Fake H200"

    def __init__(self, limit: int):
        self.limit = limit

    def memory_stats(self) -> dict[str, int]:
        return {"bytes_limit": self.limit}


def test_accelerator_memory_is_summed_over_the_meshs_devices():
    """On accelerators the floor is compared with bytes_limit times the number of devices: two devices holding
    half the floor each fit, a byte less each does not."""
    cfg, model = load("pretrain.py:smoke", "--config.data.seq_len=256"), presets.get("tiny")
    need = sum(preflight.memory_floor(cfg, model).values())
    assert need % 2 == 0
    fits = types.SimpleNamespace(devices=np.array([FakeAccelerator(int(need) // 2)] * 2))
    preflight.check_memory(cfg, model, fits)
    short = types.SimpleNamespace(devices=np.array([FakeAccelerator(int(need) // 2 - 1)] * 2))
    with pytest.raises(ValueError, match=r"but 2 x Fake H200 has"):
        preflight.check_memory(cfg, model, short)


def test_a_training_source_of_weight_zero_is_not_read(tmp_path):
    """A source weighted 0 is never sampled from: its missing file does not stop the run; weighted, it does."""
    config = load("sft.py:smoke")
    with config.unlocked():
        config.data.sources.unused = base.source(str(tmp_path / "missing.jsonl"), "jsonl", weight=0.0)
    preflight.check_train_sources(config, "sft")
    config.data.sources.unused.weight = 1.0
    with pytest.raises(sources.DataError, match="missing.jsonl"):
        preflight.check_train_sources(config, "sft")


def test_a_recipe_reward_stage_may_go_on_from_an_earlier_reward_model():
    """A reward stage started from an earlier stage's reward-model run goes on training that scorer (its head
    included): check_earlier_runs refuses such a start only for the policies of other stages."""
    runs = {"x/rm": load("reward.py:smoke")}
    preflight.check_earlier_runs(load("reward.py:smoke", "--config.model.init_from=x/rm/checkpoints/2"), runs)
    with pytest.raises(ValueError, match="model.init_from='x/rm/checkpoints/2' is a reward model"):
        preflight.check_earlier_runs(load("sft.py:smoke", "--config.model.init_from=x/rm/checkpoints/2"), runs)


@pytest.mark.parametrize("key", ["batch_prompts", "num_samples", "epochs"])
def test_an_rl_rollout_of_no_prompts_samples_or_epochs_is_refused(key):
    """Each of rollout.batch_prompts, num_samples and epochs at 0 is one ValueError naming them (epochs=0 was a
    ZeroDivisionError from the steps-per-rollout check), even when set past the config's own validation."""
    config = load("grpo.py:smoke")
    config.rollout[key] = 0
    with pytest.raises(ValueError, match="rollout.batch_prompts, rollout.num_samples and rollout.epochs must be"):
        preflight.check_rollout(config)


def test_a_sampler_refuses_a_tokenizer_larger_than_its_model(lm):
    """A tokenizer with more ids than the model's embedding rows is refused when the Sampler is built (its
    top ids would index past the table); one that fits is taken."""
    small = types.SimpleNamespace(cfg=dataclasses.replace(lm.sampler.model.cfg, vocab_size=BYTE.vocab_size - 1))
    with pytest.raises(ValueError, match=f"has {BYTE.vocab_size} tokens but the model only {BYTE.vocab_size - 1}"):
        Sampler(small, BYTE)
    Sampler(types.SimpleNamespace(cfg=dataclasses.replace(small.cfg, vocab_size=BYTE.vocab_size)), BYTE)


def test_chat_prompts_need_a_tokenizer_with_a_known_chat_template(tmp_path):
    """chat=True with a tokenizer whose control tokens match no Kiln template is refused by name before any model
    is loaded (the directory holds none)."""
    (tmp_path / "tok").mkdir()
    (tmp_path / "model").mkdir()
    tok = hf_dir(tmp_path / "tok", ["<|endoftext|>"], {"bos_token": None, "eos_token": "<|endoftext|>"})
    with pytest.raises(ValueError, match="chat prompts: tokenizer .* has no chat control tokens that Kiln knows"):
        load_sampler(str(tmp_path / "model"), tokenizer=tok, chat=True)
