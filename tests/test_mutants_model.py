"""Holes a mutation pass over the model, the sampler, the data views and evaluation found: each test here
fails under a small plausible bug (named in its docstring) that the rest of the suite let through."""
import json
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers.activations import ACT2FN

from data import chat, tokenizer, views
from model import attention_kernels, hf, hf_peft, layers, lora, prefix, presets, sampling, transformer
from model.config import LoraConfig, PrefixConfig, RopeScaling
from model.transformer import Transformer
from train import tasks


# -- data views and chat templates -------------------------------------------------------------------------------
def test_gsm8k_drops_each_calculator_call_of_a_line_alone():
    """Two `<<...>>` calls on one line: each goes, the text between them stays (a greedy `<<.*>>` would
    drop everything from the first call to the last)."""
    record = {"question": "Q?", "answer": "3 * 4 = <<3*4=12>>12 and 12 + 1 = <<12+1=13>>13\n#### 13"}
    assert views.gsm8k({}, "pretrain")(record) == {"text": "Q?\n3 * 4 = 12 and 12 + 1 = 13\n#### 13"}


def test_a_gsm8k_answer_without_its_final_line_is_refused():
    """No "#### N" line: there is no reference answer to verify a reply against."""
    view = views.gsm8k({}, "prompts")
    assert view({"question": "Q?", "answer": "2 + 3 = 5\n#### 5"})["answer"] == "5"
    with pytest.raises(views.RecordError, match="the answer has no final '#### N' line"):
        view({"question": "Q?", "answer": "2 + 3 = 5"})


def test_a_blank_sft_completion_is_refused_like_an_empty_one():
    """A completion of blanks trains the end-of-turn token alone, as an empty one does (a check of
    `not value` instead of `not value.strip()` lets it through)."""
    view = views.jsonl({}, "sft")
    with pytest.raises(views.RecordError, match="field 'completion' is empty"):
        view({"prompt": "2+2?", "completion": " \n "})
    assert view({"prompt": "2+2?", "completion": " 4"})["messages"][-1] == {"role": "assistant", "content": " 4"}


def test_sft_conversations_are_read_from_the_configured_messages_field():
    """A source's messages_field names where its conversations are (the default "messages" is one name only)."""
    turns = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert views.jsonl({"messages_field": "conversation"}, "sft")({"conversation": turns}) == {"messages": turns}


def test_an_hh_dialogue_with_text_before_its_first_turn_is_refused():
    """Text before the first "\\n\\nHuman:" belongs to no turn: split silently, it would vanish from the prompt."""
    chosen, rejected = "\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: hi\n\nAssistant: go away"
    assert views.split_hh(chosen, rejected) == ([{"role": "user", "content": "hi"}], "hello", "go away")
    with pytest.raises(views.RecordError, match="the dialogue does not start with"):
        views.split_hh("Rules: be kind." + chosen, "Rules: be kind." + rejected)


def test_a_templates_bos_is_never_a_missing_control_token():
    """BOS stands for the tokenizer's own BOS (none at all is fine): the byte tokenizer has every kiln control
    token, and of gemma's it lacks <end_of_turn> first, not the BOS placeholder (an empty name, which the
    sampler's check reads as "nothing missing" and its list of templates that fit as "missing")."""
    byte = tokenizer.load("byte")
    assert chat.missing_token("kiln", byte) is None
    assert chat.missing_token("gemma", byte) == "<end_of_turn>"


def test_an_empty_conversation_is_refused_by_name():
    """No messages at all: a ChatError saying what a conversation is, not an IndexError of the renderer."""
    for messages in ([], {}):
        with pytest.raises(chat.ChatError, match=r"messages must be a non-empty list of \{role, content\} objects"):
            chat.check_messages(messages)


# -- few-shot tasks ----------------------------------------------------------------------------------------------
def test_the_longest_prompt_is_looked_for_among_every_problem():
    """The sampler's length budget is the longest prompt of all (here the second problem's), not the first's."""
    sampler = SimpleNamespace(encode=lambda text, chat: list(text))
    evaluated = [tasks.Item("Q?", "#### 1", "1"), tasks.Item("A much longer question?", "#### 2", "2")]
    shots = [tasks.Item("Shot?", "x\n#### 3", "3")]
    want = len("Shot?\n#### 3\n\nA much longer question?\n#### ")
    assert tasks.prompt(evaluated[1], shots, cot=False, chat=False) == "Shot?\n#### 3\n\nA much longer question?\n#### "
    assert tasks.longest_prompt(sampler, evaluated, shots, cot=False, chat=False) == want


# -- Hugging Face config.json and checkpoints --------------------------------------------------------------------
MINIMAL = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=30, num_attention_heads=4)


def test_a_config_without_kv_heads_is_multi_head_as_in_transformers():
    """No num_key_value_heads: transformers gives every query head its own key/value head (a default of 1
    would read a Llama file as multi-query attention and fail on its k_proj shapes)."""
    theirs = transformers.AutoConfig.for_model("llama", **MINIMAL)
    assert hf.config_from_hf(dict(MINIMAL, model_type="llama")).n_kv_heads == theirs.num_key_value_heads == 4


def test_special_token_ids_travel_both_ways_each_in_its_own_field():
    """bos, eos and pad ids are read and written each under its own key (the sampler stops at eos and pads
    with pad): a swapped or dropped id changes what generation does, not the logits parity tests see."""
    cfg = hf.config_from_hf(dict(MINIMAL, model_type="llama", bos_token_id=5, eos_token_id=[6, 7], pad_token_id=8))
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (5, (6, 7), 8)
    written = hf.config_to_hf(cfg)
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (5, (6, 7), 8)


@pytest.mark.parametrize("name", ["gelu_new", "gelu_fast", "gelu_pytorch_tanh"])
def test_tanh_approximated_gelus_read_as_gelu_tanh(name):
    """transformers' gelu_new and gelu_fast are the tanh approximation, as gelu_pytorch_tanh is (exact erf
    GeLU differs by up to 1e-3: logits parity would break on such a checkpoint)."""
    x = torch.linspace(-4, 4, 33)
    np.testing.assert_allclose(ACT2FN[name](x).numpy(), torch.nn.functional.gelu(x, approximate="tanh").numpy(),
                               atol=1e-6)
    assert hf.config_from_hf(dict(MINIMAL, model_type="llama", hidden_act=name)).act == "gelu_tanh"


def test_qwen2_slides_from_layer_28_when_the_file_does_not_say():
    """use_sliding_window without max_window_layers: transformers' default 28 layers of full attention first."""
    fields = dict(MINIMAL, use_sliding_window=True, sliding_window=9)
    theirs = transformers.AutoConfig.for_model("qwen2", **fields)
    want = tuple(9 if t == "sliding_attention" else 0 for t in theirs.layer_types)
    assert want == (0,) * 28 + (9, 9)
    assert hf.config_from_hf(dict(fields, model_type="qwen2")).layer_windows() == want


@pytest.mark.parametrize("fields, message", [
    (dict(model_type="llama", rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
     "partial_rotary_factor != 1 is not supported"),
    (dict(model_type="gemma2", use_bidirectional_attention=True), "bidirectional Gemma2 attention is not supported"),
    (dict(model_type="gemma2", rope_parameters=dict(full_attention=dict(rope_type="default", rope_theta=1e6),
                                                    sliding_attention=dict(rope_type="default", rope_theta=1e4))),
     "per-layer-type rope_parameters are not supported"),
])
def test_a_config_kiln_would_compute_differently_is_refused(fields, message):
    """Rotary on part of the head, attention both ways, a theta per layer type: read past, each would load a
    model computing something else than the checkpoint's (without a word: the weights' shapes all fit)."""
    hf.config_from_hf(dict(MINIMAL, model_type=fields["model_type"]))  # the same file without the setting reads
    with pytest.raises(hf.HFFormatError, match=f"config.json: {message}"):
        hf.config_from_hf(dict(MINIMAL, **fields))


def test_rope_scaling_in_either_key_style_and_with_a_full_rotary_factor_reads():
    """transformers 4.3x wrote rope_scaling {"type": ...}; 5.x may write partial_rotary_factor 1.0 beside the
    scaling. Both mean the scaling they name (read as "default", a linear-scaled model would lose its factor)."""
    old = hf.config_from_hf(dict(MINIMAL, model_type="llama", rope_scaling={"type": "linear", "factor": 2.0}))
    assert old.rope_scaling == RopeScaling(type="linear", factor=2.0)
    llama3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=16, rope_theta=5e5, partial_rotary_factor=1.0)
    new = hf.config_from_hf(dict(MINIMAL, model_type="llama", rope_parameters=llama3))
    assert new.rope_scaling.type == "llama3" and new.rope_theta == 5e5


def test_a_shard_takes_tensors_up_to_exactly_its_limit(tmp_path):
    """max_shard_bytes is the most a shard may hold: tensors that fill it exactly make one file, one byte less
    makes two."""
    cfg = presets.get("tiny")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    total = sum(a.nbytes for _, a in hf.hf_tensors(model, cfg))
    hf.save(model, cfg, str(tmp_path / "exact"), max_shard_bytes=total)
    assert sorted(os.listdir(tmp_path / "exact")) == ["config.json", "model.safetensors"]
    hf.save(model, cfg, str(tmp_path / "less"), max_shard_bytes=total - 1)
    assert sum(f.endswith(".safetensors") for f in os.listdir(tmp_path / "less")) == 2


def test_a_shard_index_without_a_weight_map_is_named(tmp_path):
    """A damaged index (no weight_map) is named as such, not a TypeError of the reader."""
    cfg = presets.get("tiny")
    hf.save(Transformer(cfg, rngs=nnx.Rngs(0)), cfg, str(tmp_path), max_shard_bytes=100_000)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}}))
    with pytest.raises(hf.HFFormatError, match="model.safetensors.index.json: no weight_map; the file is damaged"):
        hf.load(str(tmp_path))


def test_rotary_buffers_older_checkpoints_store_are_skipped(tmp_path):
    """Checkpoints saved by older transformers hold each layer's rotary_emb.inv_freq buffer: recomputed from
    the config, it is no weight to map, and the checkpoint loads as if it were absent."""
    cfg = presets.get("tiny")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    hf.save(model, cfg, str(tmp_path))
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    for i in range(cfg.n_layers):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = np.ones(cfg.dim_head // 2, np.float32)
    save_file(tensors, file, metadata={"format": "pt"})
    _, loaded = hf.load(str(tmp_path))
    toks = jnp.arange(8)[None]
    np.testing.assert_array_equal(np.asarray(loaded(toks)), np.asarray(model(toks)))


def test_a_directory_without_config_or_weights_is_named(tmp_path):
    """Not a Hugging Face directory (no config.json), or one without weights: each named, never a bare
    FileNotFoundError."""
    with pytest.raises(hf.HFFormatError, match=r"no config.json \(is this a Hugging Face model directory\?\)"):
        hf.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(presets.get("tiny"))))
    with pytest.raises(hf.HFFormatError, match="no model.safetensors or model.safetensors.index.json"):
        hf.load(str(tmp_path))


# -- PEFT adapter directories ------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting, value", [
    ("use_dora", True), ("fan_in_fan_out", True), ("modules_to_save", ["lm_head"]), ("layers_to_transform", [0]),
    ("rank_pattern", {"q_proj": 2}), ("alpha_pattern", {"q_proj": 4}), ("bias", "all"), ("bias", "lora_only"),
])
def test_a_lora_adapter_kiln_would_misread_is_refused_by_name(tmp_path, setting, value):
    """Each of these changes what PEFT computes (transposed weights, other ranks, trained biases, ...) in a way
    Kiln's plain LoRA does not: read as plain LoRA, the adapter would load without a word and compute another
    model."""
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert hf_peft.read_config(str(tmp_path)) == LoraConfig(rank=4, alpha=8.0, targets=("q",))
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(config, **{setting: value})))
    with pytest.raises(hf_peft.AdapterError, match=f"Kiln does not support {setting} in LoRA adapters"):
        hf_peft.read_config(str(tmp_path))


def test_a_lora_adapter_of_other_projections_is_refused_by_name(tmp_path):
    """target_modules Kiln has no projection for (lm_head) are named, not a KeyError."""
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "lm_head"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(hf_peft.AdapterError, match=r"target_modules \['lm_head'\] are not projections Kiln adapts"):
        hf_peft.read_config(str(tmp_path))


def test_a_prompt_learning_adapter_is_refused_where_lora_is_read(tmp_path):
    """A PREFIX_TUNING directory has no r or lora_alpha: named by its peft_type, not a KeyError."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}))
    with pytest.raises(hf_peft.AdapterError, match="peft_type 'PREFIX_TUNING'; Kiln reads LORA adapters"):
        hf_peft.read_config(str(tmp_path))


def test_a_lora_tensor_stored_transposed_is_refused_not_reshaped(tmp_path):
    """lora_A must be [r, in]: one stored [in, r] holds as many numbers, and reshaped into place it would load
    without a word as another adapter."""
    model = Transformer(presets.get("tiny", lora=LoraConfig(rank=2, targets=("q",))), rngs=nnx.Rngs(0))
    path = tmp_path / "adapter"
    hf_peft.save_adapter(model, str(path))
    tensors = load_file(str(path / "adapter_model.safetensors"))
    name = hf_peft.tensor_name("q", 0, "A")
    assert tensors[name].shape == (2, 64)
    tensors[name] = np.ascontiguousarray(tensors[name].T)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(hf_peft.AdapterError, match=r"has shape \(64, 2\); the model needs \(2, 64\)"):
        hf_peft.load_adapter(model, str(path))


def test_an_adapter_directory_missing_a_part_is_named(tmp_path):
    """A missing lora tensor or weights file, or LoRA settings off (peft.method not lora): each an AdapterError
    naming it, never a KeyError or a safetensors error."""
    cfg = LoraConfig(rank=2, targets=("q",))
    model = Transformer(presets.get("tiny", lora=cfg), rngs=nnx.Rngs(0))
    path = tmp_path / "adapter"
    hf_peft.save_adapter(model, str(path))
    with pytest.raises(hf_peft.AdapterError, match=f"peft.adapter_from={path}: set peft.method=lora"):
        hf_peft.check_adapter(str(path), None)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    name = hf_peft.tensor_name("q", 1, "B")
    save_file({k: v for k, v in tensors.items() if k != name}, str(path / "adapter_model.safetensors"))
    with pytest.raises(hf_peft.AdapterError, match=f"tensor '{name}' is missing"):
        hf_peft.load_adapter(model, str(path))
    os.remove(path / "adapter_model.safetensors")
    with pytest.raises(hf_peft.AdapterError, match="no adapter_model.safetensors"):
        hf_peft.load_adapter(model, str(path))


def test_exporting_a_model_without_adapters_is_refused(tmp_path):
    """A plain model has no adapter to write: refused by name, and no empty adapter directory is left behind."""
    with pytest.raises(hf_peft.AdapterError, match="the model has no adapters to export"):
        hf_peft.save_adapter(Transformer(presets.get("tiny"), rngs=nnx.Rngs(0)), str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()


# -- the decoder, adapters and attention kernels -----------------------------------------------------------------
def test_gemma_virtual_tokens_are_scaled_like_token_embeddings():
    """Gemma multiplies its input embeddings by sqrt(d_model), virtual tokens' included (transformers scales
    inputs_embeds, which is how PEFT feeds a prompt): a prompt holding TEXT's embeddings equals prepending TEXT.
    The prompt-tuning tests run a Llama config, where an unscaled prompt is not told apart."""
    from test_prefix import X, prepended, tuned

    gemma = presets.get("tiny", family="gemma2", norm_plus_one=True, sandwich_norm=True, embed_scale=True,
                        tie_embeddings=True)
    base = Transformer(gemma, rngs=nnx.Rngs(0))
    err = float(jnp.abs(tuned(base, "prompt")(X) - prepended(base, X)).max())
    assert err < 1e-5, err


def test_a_vocab_initialised_prompt_draws_from_the_whole_vocabulary():
    """prompt_init=vocab copies embeddings of ids drawn uniformly from [0, vocab): 64 draws from 4 ids take
    every one, the first and the last included (a range off by one at either end never draws it)."""
    cfg = presets.get("tiny", vocab_size=4, prefix=PrefixConfig(kind="prompt", num_tokens=64))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    prefix.init_prompt(model, "vocab", [], jax.random.key(0))
    table, rows = np.asarray(model.embed.table[...]), np.asarray(model.prefix.embeddings[...])
    ids = [int(np.flatnonzero((table == row).all(axis=1))[0]) for row in rows]
    assert sorted(set(ids)) == [0, 1, 2, 3]


def test_an_unknown_prompt_initialisation_is_refused_by_name():
    """An initialisation that is none of random, vocab and text: refused by name, not an unbound variable."""
    cfg = presets.get("tiny", prefix=PrefixConfig(kind="prompt", num_tokens=2))
    with pytest.raises(ValueError, match="peft.prompt_init='zeros': choose random, vocab or text"):
        prefix.init_prompt(Transformer(cfg, rngs=nnx.Rngs(0)), "zeros", [], jax.random.key(0))


def test_values_of_a_model_without_a_reward_head_are_refused_by_name():
    """A language model has no scalar head to read values from: said so, not an AttributeError on `score`."""
    with pytest.raises(ValueError, match="this model has no reward head"):
        Transformer(presets.get("tiny"), rngs=nnx.Rngs(0)).values(jnp.zeros((1, 2), jnp.int32))


def test_a_bfloat16_reward_head_reads_out_in_float32():
    """values() (and so rewards()) are float32 whatever the compute dtype: the dot with the score head runs over
    float32 copies of the bf16 hidden states (a bf16 read-out keeps 8 bits of a reward)."""
    model = Transformer(presets.get("tiny", dtype="bfloat16", reward_head=True, init_std=0.5), rngs=nnx.Rngs(0))
    toks = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 8)))
    values = model.values(toks)
    h = np.asarray(model.hidden(toks).astype(jnp.float32), np.float64)
    want = h @ np.asarray(model.score[...], np.float64)
    assert values.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(values), want, rtol=1e-5, atol=1e-5)


def test_a_lora_update_comes_back_in_its_inputs_dtype():
    """The adapter computes s * B(A x) in float32 and returns it in x's dtype, so a bfloat16 model stays bfloat16
    (a float32 update added to a bf16 projection turns the residual stream float32, which the layer scan
    refuses). No other test runs adapters under bfloat16 compute."""
    adapter = lora.LoRA(LoraConfig(rank=2, alpha=4.0), (8,), (6,), ("embed",), ("mlp",), nnx.Rngs(0))
    rng = np.random.default_rng(0)
    adapter.b.set_value(jnp.asarray(rng.normal(0, 1, (2, 6)), jnp.float32))
    x = jnp.asarray(rng.normal(0, 1, (3, 8)), jnp.bfloat16)
    out = adapter(x)
    assert out.dtype == jnp.bfloat16
    want = np.asarray(x, np.float64) @ np.asarray(adapter.a[...], np.float64) @ np.asarray(adapter.b[...]) * 2.0
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=1e-2, atol=1e-2)
    cfg = presets.get("tiny", dtype="bfloat16", lora=LoraConfig(rank=2, targets=("o", "down")))
    logits = Transformer(cfg, rngs=nnx.Rngs(0))(jnp.zeros((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_each_layer_draws_its_own_residual_dropout(monkeypatch):
    """Two layers, two dropped branches each: four distinct dropout keys, so no two layers share a mask (one
    key for the whole stack would drop the same units in every layer)."""
    seen = []

    def spy(x, rate, key):
        if key is not None:
            jax.debug.callback(lambda k: seen.append(tuple(np.asarray(k).ravel().tolist())), jax.random.key_data(key))
        return layers.dropout(x, rate, key)

    monkeypatch.setattr(transformer, "dropout", spy)
    model = Transformer(presets.get("tiny", dropout=0.5), rngs=nnx.Rngs(0))
    jax.block_until_ready(model(jnp.zeros((1, 4), jnp.int32), dropout_key=jax.random.key(0)))
    assert len(seen) == 2 * model.cfg.n_layers and len(set(seen)) == len(seen)


def softcapped_attention(q_BTHD, k_BTKD, v_BTKD, scale, softcap):
    """Causal attention of one document in float64, scores soft-capped: cap * tanh(scale * q.k / cap)."""
    G = q_BTHD.shape[2] // k_BTKD.shape[2]
    k, v = (np.repeat(x.astype(np.float64), G, axis=2) for x in (k_BTKD, v_BTKD))  # query head h: kv head h // G
    scores = np.einsum("bthd,bshd->bhts", q_BTHD.astype(np.float64), k) * scale
    scores = softcap * np.tanh(scores / softcap)
    T = scores.shape[-1]
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v)


def test_splash_kernel_soft_caps_the_scores():
    """Scores of about +-10 under a cap of 2: the splash kernel's output is the capped attention's, far from the
    uncapped one. (The model-level kernel test runs Gemma 2's cap of 20 over scores far below it, where a
    kernel that drops the cap agrees to 1e-5.)"""
    rng = np.random.default_rng(0)
    T, D = 128, 16
    q, k, v = (rng.normal(0, s, (1, T, n, D)).astype(np.float32) for s, n in ((2.5, 2), (2.5, 1), (1.0, 1)))
    got = np.asarray(attention_kernels.attend("splash", jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None,
                                              jnp.ones((1, T), jnp.int32), 0, D ** -0.5, 2.0))
    want, uncapped = (softcapped_attention(q, k, v, D ** -0.5, cap) for cap in (2.0, 1e9))
    assert np.abs(want - uncapped).max() > 0.3
    np.testing.assert_allclose(got, want, atol=2e-5)


# -- the sampler -------------------------------------------------------------------------------------------------
def test_no_prompts_is_refused_by_name():
    """An empty prompt list: the sampler says so (not max() of an empty sequence)."""
    with pytest.raises(ValueError, match="no prompts to sample from"):
        sampling.generate(Transformer(presets.get("tiny"), rngs=nnx.Rngs(0)), [], max_new_tokens=2)


def test_prompt_ids_must_lie_in_the_vocabulary_both_ends_included():
    """Ids 0 and vocab_size - 1 are tokens; vocab_size is not (an embedding lookup would clamp it silently)."""
    cfg = presets.get("tiny", vocab_size=264)
    sampling._check(cfg, [[0, 263]], 4, 1.0, 0, 1.0, 1)
    for bad in ([264], [-1]):
        with pytest.raises(ValueError, match=r"prompt 0 holds token ids outside the vocabulary \[0, 264\)"):
            sampling._check(cfg, [bad], 4, 1.0, 0, 1.0, 1)


@pytest.fixture(scope="module")
def greedy():
    """test_sampling's greedy continuations of its three prompts (its model and settings)."""
    from test_sampling import generate

    return generate()


def test_a_stop_sequence_never_matches_before_the_first_generated_token(greedy):
    """A stop sequence (0, t) where t is a row's first generated token: nothing before t was generated or is
    0 (the prompts hold ids >= 8), so no row stops. A window of recent tokens that starts as zeros, a real
    token id, would match at the first step and end every row after one token."""
    from test_sampling import N, generate

    pairs = [[0, t] for t in sorted(set(greedy.tokens[:, 0].tolist()))]
    assert not any(row[i:i + 2] in pairs for row in greedy.tokens.tolist() for i in range(N - 1))
    out = generate(stop_sequences=pairs)
    assert out.finish_reasons == ["length"] * 3 and out.lengths.tolist() == [N] * 3
    np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_every_stop_sequence_is_matched_not_only_the_first(greedy):
    """Row 1's own tokens 6..8 given as the second of two stop sequences still end it after token 8."""
    from test_sampling import generate

    seq = greedy.tokens[1, 6:9].tolist()
    text = greedy.tokens[1].tolist()
    end = next(i + 3 for i in range(len(text) - 2) if text[i:i + 3] == seq)
    out = generate(stop_sequences=[[1, 2, 3, 4, 5], seq])
    assert out.finish_reasons[1] == "stop" and out.lengths[1] == end


def test_a_prompt_longer_than_the_first_ones_bucket_is_sampled_whole():
    """Prompts of 5 and 70 tokens: the batch is padded to the longest one's bucket (128), not the first's
    (64), and each row continues exactly as the full forward recomputed every step does."""
    from test_sampling import MODEL, generate, greedy_reference

    prompts = [list(np.random.RandomState(i).randint(8, 264, n)) for i, n in ((5, 5), (6, 70))]
    out = generate(prompts=prompts, max_new_tokens=4)
    np.testing.assert_array_equal(out.tokens, greedy_reference(MODEL, prompts, 4))


def test_temperature_zero_is_argmax_even_over_exact_ties():
    """All-zero weights give exactly uniform logits: greedy decoding takes the first id every step, whatever
    the seed. (Sampling at a tiny temperature instead agrees with argmax everywhere but at ties, where it
    draws at random.)"""
    from test_sampling import MODEL, N, generate

    graphdef, state = nnx.split(MODEL)
    zero = nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, state))
    for seed in (0, 1):
        out = generate(model=zero, seed=seed)
        assert (out.tokens == 0).all() and out.lengths.tolist() == [N] * 3
