"""Checkpoints: every part of the train state round-trips exactly, and a damaged checkpoint is never
restored: it is detected (checksums, finiteness), set aside, and the previous good step used instead.

The state is the tiny model's real TrainState with every field made distinctive (random optimizer
moments, an unusual step, RNG and counters), so a field that is not saved, or restored into the wrong
place, shows as a difference.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from launch.config import load_config
from model.sharding import make_mesh, var_sharding
from train import checkpoint, checksums, modeldir, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = {"sources": {"train": {"epoch": 3, "position": 17}}}  # stands in for the data iterator's state


@pytest.fixture(scope="module")
def run():
    config = load_config(os.path.join(ROOT, "configs/pretrain.py:smoke"), ["--config.run_dir=/nonexistent"])
    return trainer.setup(config)


def distinctive(state, seed):
    """`state` with every array replaced by random values of its shape, dtype and sharding."""
    rng = np.random.default_rng(seed)

    def one(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            value = rng.standard_normal(x.shape)
        else:
            value = rng.integers(1, 1000, x.shape)
        return jax.device_put(np.asarray(value).astype(x.dtype), x.sharding)
    return jax.tree.map(one, state)


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_same_state(a, b):
    (la, ta), (lb, tb) = jax.tree.flatten(host(a)), jax.tree.flatten(host(b))
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def save_steps(run_dir, run, steps):
    """A checkpoint per step (synchronous writes), each state distinct; returns the states."""
    ckpt = checkpoint.Checkpointer(run_dir, async_save=False)
    states = {}
    for step in steps:
        states[step] = distinctive(run.state, step)._replace(step=jnp.asarray(step, jnp.int32))
        ckpt.save(states[step], DATA, run.model_cfg)
    ckpt.close()
    return states


def damage(run_dir, step, how):
    """Damages the largest file of `step`'s parameters: random bytes in its middle, or cut to half."""
    root = os.path.join(run_dir, "checkpoints", str(step), "params")
    files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
    path = max(files, key=os.path.getsize)
    size = os.path.getsize(path)
    if how == "random bytes":
        with open(path, "r+b") as f:
            f.seek(size // 2)
            f.write(np.random.default_rng(0).bytes(min(4096, size // 4)))
    else:
        os.truncate(path, size // 2)


def test_every_field_of_the_train_state_round_trips(run, tmp_path):
    saved = save_steps(str(tmp_path), run, [7])[7]
    # The restore target is a fresh state: nothing of `saved` can leak in except through the files.
    state, data = checkpoint.Checkpointer(str(tmp_path)).restore(7, run.state)
    assert data == DATA
    assert_same_state(state, saved)
    assert int(state.step) == 7 and int(state.nonfinite_total) != int(run.state.nonfinite_total)
    # Restored onto the same shardings as the target (a mesh change restores onto the new one).
    for got, like in zip(jax.tree.leaves(state), jax.tree.leaves(run.state)):
        assert got.sharding == like.sharding



def test_retention_keeps_the_latest_keep_and_every_keep_every(run, tmp_path):
    """keep=1, keep_every=2 over steps 1-4: the latest step (4) and the multiples of 2 (2, 4); step 3 goes
    when step 4 is written, step 1 when step 2 is."""
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, keep_every=2, async_save=False)
    for step in range(1, 5):
        ckpt.save(run.state._replace(step=jnp.asarray(step, jnp.int32)), DATA, run.model_cfg)
    ckpt.close()
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2, 4]

@pytest.mark.parametrize("how", ["random bytes", "truncated"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(run, tmp_path, how):
    run_dir = str(tmp_path)
    states = save_steps(run_dir, run, [1, 2, 3])
    for bad, good in ((3, 2), (2, 1)):  # twice: the second lands beside the first in checkpoints.corrupt
        damage(run_dir, bad, how)
        ckpt, warnings = checkpoint.Checkpointer(run_dir), []
        step, state, data = ckpt.restore_latest(run.state, warn=warnings.append)
        assert step == good and data == DATA
        assert_same_state(state, states[good])
        # One warning naming the bad step and where it went (the directory the README names).
        assert len(warnings) == 1 and f"checkpoint step {bad}" in warnings[0] and "checkpoints.corrupt" in warnings[0]
        assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [str(s) for s in range(1, good + 1)]
        assert ckpt.latest_step() == good and checkpoint.latest_step(run_dir) == good
    # Moved, not deleted.
    moved = sorted(os.listdir(os.path.join(run_dir, "checkpoints.corrupt")))
    assert [m.split("-")[0] for m in moved] == ["2", "3"]
    assert all(os.path.isdir(os.path.join(run_dir, "checkpoints.corrupt", m, "params")) for m in moved)



def test_a_checkpoint_without_checksums_still_restores(run, tmp_path):
    """Checkpoints written before checksums were saved have no fingerprint item: they restore (checked for
    finiteness only), through the trainer's path and the init_from path alike."""
    saved = save_steps(str(tmp_path), run, [5])[5]
    shutil.rmtree(tmp_path / "checkpoints" / "5" / "fingerprint")
    state, data = checkpoint.Checkpointer(str(tmp_path)).restore(5, run.state)
    assert_same_state(state, saved)
    assert data == DATA
    model = checkpoint.load_params(str(tmp_path))[1]
    np.testing.assert_array_equal(np.asarray(model.embed.table[...]), np.asarray(saved.params["embed"]["table"][...]))

def test_damage_that_still_decodes_is_caught_by_the_checksum(run, tmp_path):
    """Bytes that decode: other (finite, well-formed) parameters written over step 3's. Orbax restores them
    without complaint, as it restored random bytes in an uncompressed chunk as finite garbage (measured:
    values up to 3.5e37); only the checksum taken at save time tells them from the saved parameters."""
    run_dir = str(tmp_path)
    save_steps(run_dir, run, [3])
    params_dir = os.path.join(run_dir, "checkpoints", "3", "params")
    shutil.rmtree(params_dir)
    with ocp.StandardCheckpointer() as writer:
        writer.save(params_dir, nnx.to_pure_dict(distinctive(run.state, 99).params))
    with pytest.raises(checkpoint.CheckpointError, match=r"step 3 .*: params/.* does not match the checksum"):
        checkpoint.Checkpointer(run_dir).restore(3, run.state)
    with pytest.raises(checkpoint.CheckpointError, match=r"/3: params/.* does not match the checksum"):
        checkpoint.load_params(run_dir)  # the init_from path checks as well


def test_no_readable_checkpoint_is_an_error_that_moves_nothing(run, tmp_path):
    run_dir = str(tmp_path)
    save_steps(run_dir, run, [1, 2])
    damage(run_dir, 1, "random bytes")
    damage(run_dir, 2, "truncated")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint can be restored: checkpoint step 2.*step 1"):
        checkpoint.Checkpointer(run_dir).restore_latest(run.state, warn=print)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["1", "2"]
    assert not os.path.exists(os.path.join(run_dir, "checkpoints.corrupt"))


def test_nonfinite_parameters_are_refused(run, tmp_path):
    state = distinctive(run.state, 5)._replace(step=jnp.asarray(0, jnp.int32))
    table = state.params["embed"]["table"]
    table.value = table[...].at[3, 4].set(jnp.inf)
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(state, DATA, run.model_cfg)
    ckpt.close()
    with pytest.raises(checkpoint.CheckpointError, match="params/embed/table holds non-finite values"):
        checkpoint.Checkpointer(str(tmp_path)).restore(0, run.state)



def test_nonfinite_values_of_every_float_type_are_refused():
    """bfloat16 and float16 parameters (a run with param_dtype=bfloat16) are checked for finiteness as float32
    ones are; integer arrays (the step, counters) have nothing to check."""
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        tree = {"params": {"w": jnp.array([1.0, jnp.nan], dtype)}, "train_state": {"step": jnp.int32(7)}}
        with pytest.raises(checkpoint.CheckpointError, match="here: params/w holds non-finite values"):
            checkpoint.verify(tree, checksums.fingerprint(tree), "here")
    checkpoint.verify({"step": jnp.int32(-1)}, None, "here")

def test_checksum_sees_values_and_positions():
    tree = {"a": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": jnp.array([1, 2], jnp.int32),
            "c": jnp.ones((4,), jnp.bfloat16)}
    expected = checksums.fingerprint(tree)
    checkpoint.verify(tree, expected, "here")  # the same arrays pass
    one_bit = dict(tree, c=tree["c"].at[2].set(jnp.bfloat16(1.0078125)))  # the next bf16 above 1
    swapped = dict(tree, a=tree["a"][:, ::-1])  # same values, other places: the plain sum is blind to it
    assert checksums.fingerprint(swapped)["a"][0] == expected["a"][0]
    for bad, key in ((one_bit, "c"), (swapped, "a")):
        with pytest.raises(checkpoint.CheckpointError, match=f"here: {key} does not match the checksum"):
            checkpoint.verify(bad, expected, "here")
    with pytest.raises(checkpoint.CheckpointError, match="here: b does not match"):
        checkpoint.verify({"a": tree["a"], "c": tree["c"]}, expected, "here")  # a missing array



def test_checksums_by_hand():
    """The checksum's formula is part of the format: every saved checkpoint is verified against it, so a
    change would refuse them all. Per array: the sum of its bits as uint32 words, and the sum weighted by
    position (1 + i x 2654435761), both mod 2**32; bf16 and bool widen to one word each."""
    K, M = 2654435761, 2 ** 32
    one = 0x3F800000  # float32 1.0; bf16 1.0 is its top half, 0x3F80
    tree = {"i": jnp.array([3, 5, 7], jnp.int32), "f": jnp.array([[1.0, -0.0]], jnp.float32),
            "h": jnp.array([1.0, 2.0], jnp.bfloat16), "b": jnp.array([True, False, True])}
    weighted = lambda words: sum(w * (1 + i * K) for i, w in enumerate(words)) % M  # noqa: E731
    assert checksums.fingerprint(tree) == {
        "i": [15, weighted([3, 5, 7])],
        "f": [(one + 0x80000000) % M, weighted([one, 0x80000000])],
        "h": [0x3F80 + 0x4000, weighted([0x3F80, 0x4000])],
        "b": [2, weighted([1, 0, 1])]}


def test_a_checksum_missing_on_either_side_is_a_mismatch():
    tree = {"params": {"a": jnp.arange(4.0), "b": jnp.ones((2, 3), jnp.bfloat16)}, "train_state": {"step": jnp.int32(7)}}
    sums = checksums.fingerprint(tree)
    assert sorted(sums) == ["params/a", "params/b", "train_state/step"]
    checkpoint.verify(tree, sums, "here")
    for key in sums:  # an array without its checksum, or a checksum without its array
        with pytest.raises(checkpoint.CheckpointError, match=f"here: {key} does not match the checksum"):
            checkpoint.verify(tree, {k: v for k, v in sums.items() if k != key}, "here")
    with pytest.raises(checkpoint.CheckpointError, match="here: params/c does not match the checksum"):
        checkpoint.verify(tree, dict(sums, **{"params/c": [0, 0]}), "here")


def test_locate_accepts_run_checkpoints_and_step_directories(run, tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    save_steps(run_dir, run, [2, 4])
    inner = os.path.join(run_dir, "checkpoints")
    monkeypatch.setenv("KILN_TEST_RUNS", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert modeldir.locate(run_dir) == (inner, None)
    assert modeldir.locate(inner) == (inner, None)
    assert modeldir.locate("$KILN_TEST_RUNS/run/checkpoints/2") == (inner, 2)
    assert modeldir.locate("~/run") == (inner, None)
    assert checkpoint.latest_step("~/run") == 4 and checkpoint.latest_step("${KILN_TEST_RUNS}/run/checkpoints/2") == 2
    # A run directory named like a step is still a run directory (no `params` inside it).
    os.makedirs(tmp_path / "2024" / "checkpoints")
    assert modeldir.locate(str(tmp_path / "2024")) == (str(tmp_path / "2024" / "checkpoints"), None)


def test_unwritable_directory_is_one_clear_error(tmp_path):
    blocker = tmp_path / "checkpoints"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint directory {blocker} is not writable"):
        checkpoint.ensure_writable(str(blocker))
    checkpoint.ensure_writable(str(tmp_path / "fresh" / "checkpoints"))  # created when missing
    assert os.listdir(tmp_path / "fresh" / "checkpoints") == []  # and the probe removed


def test_load_params_restores_a_step_onto_another_mesh(run, tmp_path):
    """The init_from path: the step named, every parameter as saved, placed as the rules say on a mesh
    other than the saving one (orbax would otherwise restore the saved placement)."""
    saved = save_steps(str(tmp_path), run, [2, 4])
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert dict(mesh.shape) != dict(run.mesh.shape)
    cfg, model = checkpoint.load_params(str(tmp_path / "checkpoints" / "2"), mesh=mesh, rules=run.config.mesh.rules)
    assert cfg == run.model_cfg
    got = jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
    want = jax.tree.leaves(saved[2].params)
    assert len(got) == len(want)
    for var, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(w))
        expected = var_sharding(var, mesh, run.config.mesh.rules)
        assert var[...].sharding.is_equivalent_to(expected, w.ndim), (var[...].sharding, expected)
    assert any("tensor" in str(var[...].sharding.spec) for var in got)  # really placed on the new mesh


def test_adapters_keep_the_base_step_they_trained_on(run, tmp_path):
    """A checkpoint of adapters pointed to its base run alone, so once that run trained on (or a pipeline
    re-ran it longer) the adapters loaded onto other weights without a word. The base's step is saved
    with the pointer; a step the base run no longer holds is an error, not its latest."""
    saved = save_steps(str(tmp_path / "base"), run, [2])
    adapters = checkpoint.Checkpointer(str(tmp_path / "lora"), async_save=False, base=str(tmp_path / "base"))
    item = adapters.base_item()
    assert item == {"init_from": str(tmp_path / "base"), "step": 2}
    save_steps(str(tmp_path / "base"), run, [4])  # the base run trains on
    values = checkpoint._base_values(item, run.model_cfg, None, None, "lora")
    for got, want in zip(jax.tree.leaves(values), jax.tree.leaves(saved[2].params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Adapters continued from these (the trainer takes their base from base_of) stay on step 2 as well.
    adapters.save(run.state, DATA, run.model_cfg)
    adapters.close()
    assert checkpoint.base_of(str(tmp_path / "lora")) == str(tmp_path / "base" / "checkpoints" / "2")
    continued = checkpoint.Checkpointer(str(tmp_path / "more"), async_save=False,
                                        base=checkpoint.base_of(str(tmp_path / "lora")))
    assert continued.base_item() == {"init_from": str(tmp_path / "base" / "checkpoints" / "2"), "step": 2}
    continued.close()
    shutil.rmtree(tmp_path / "base" / "checkpoints" / "2")  # retention removed the step
    with pytest.raises(checkpoint.CheckpointError, match=r"lora holds adapters trained on .*base/checkpoints/2, "
                                                         "which no longer exists"):
        checkpoint._base_values(item, run.model_cfg, None, None, "lora")


def test_resuming_adapters_on_a_base_that_trained_on_is_refused(run, tmp_path):
    """Resuming a LoRA run after its base run trained on rebuilt the frozen weights from the base's new
    latest step under the adapters, silently; it is refused, naming the step directory to resume on."""
    save_steps(str(tmp_path / "base"), run, [2])
    adapters = checkpoint.Checkpointer(str(tmp_path / "lora"), async_save=False, base=str(tmp_path / "base"))
    adapters.save(run.state, DATA, run.model_cfg)
    adapters.close()
    resumed = checkpoint.Checkpointer(str(tmp_path / "lora"), async_save=False, base=str(tmp_path / "base"))
    assert resumed.restore_latest(run.state, print)[0] == int(run.state.step)  # the same base: resumes
    save_steps(str(tmp_path / "base"), run, [4])
    moved = checkpoint.Checkpointer(str(tmp_path / "lora"), async_save=False, base=str(tmp_path / "base"))
    with pytest.raises(checkpoint.CheckpointError, match=f"were trained on step 2 of {tmp_path}/base, which now gives "
                                                         f"step 4; .*init_from={tmp_path}/base/checkpoints/2"):
        moved.restore_latest(run.state, print)
    assert not os.path.exists(tmp_path / "lora" / "checkpoints.corrupt")


def test_resuming_a_whole_model_whose_start_trained_on_is_refused(run, tmp_path):
    """A whole-model DPO or RL run rebuilds its reference from model.init_from when it resumes: after the
    start's run trained on, that was a new reference midway, silently. The start's step is recorded and a
    resume from another step refused, naming the step directory to resume from."""
    save_steps(str(tmp_path / "sft"), run, [2])
    dpo = checkpoint.Checkpointer(str(tmp_path / "dpo"), async_save=False, start=str(tmp_path / "sft"))
    dpo.save(run.state, DATA, run.model_cfg)
    dpo.close()
    resumed = checkpoint.Checkpointer(str(tmp_path / "dpo"), async_save=False, start=str(tmp_path / "sft"))
    assert resumed.restore_latest(run.state, print)[0] == int(run.state.step)  # the same start: resumes
    save_steps(str(tmp_path / "sft"), run, [4])
    moved = checkpoint.Checkpointer(str(tmp_path / "dpo"), async_save=False, start=str(tmp_path / "sft"))
    with pytest.raises(checkpoint.CheckpointError, match=f"started \\(its reference\\) from step 2 of {tmp_path}/sft, "
                                                         f"which now gives step 4; .*init_from={tmp_path}/sft/checkpoints/2"):
        moved.restore_latest(run.state, print)
    on_step = checkpoint.Checkpointer(str(tmp_path / "dpo"), async_save=False,
                                      start=str(tmp_path / "sft" / "checkpoints" / "2"))
    assert on_step.restore_latest(run.state, print)[0] == int(run.state.step)


def test_adapters_saved_without_a_base_step_resume_on_the_base_run(tmp_path):
    """Adapters saved before the base's step was recorded name only the base run: they resume on it (its
    latest step, as they always did) rather than being refused, and their base is the run itself. A base
    that is gone is named as it was given, not as a step directory inside it."""
    base, lora = str(tmp_path / "base"), str(tmp_path / "lora")
    with ocp.CheckpointManager(os.path.join(base, "checkpoints")) as mgr:
        mgr.save(4, args=ocp.args.Composite(model_config=ocp.args.JsonSave({})))
    with ocp.CheckpointManager(os.path.join(lora, "checkpoints")) as mgr:
        mgr.save(6, args=ocp.args.Composite(base=ocp.args.JsonSave({"init_from": base})))
    resumed = checkpoint.Checkpointer(lora, base=base)
    resumed._check_same_base()
    resumed.close()
    assert checkpoint.base_of(lora) == base
    assert checkpoint._base_path({"init_from": base, "step": 4}) == os.path.join(base, "checkpoints", "4")
    assert checkpoint._base_path({"init_from": str(tmp_path / "gone"), "step": 4}) == str(tmp_path / "gone")


def test_adapters_on_a_hugging_face_base_record_its_directory_alone(tmp_path):
    """A Hugging Face directory has no steps: the base item is its path, with no step to check on resume."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    adapters = checkpoint.Checkpointer(str(tmp_path / "lora"), base=str(tmp_path / "hf"))
    assert adapters.base_item() == {"init_from": str(tmp_path / "hf")}
    adapters.close()


def test_run_config_is_the_runs_own_never_a_parent_folders(tmp_path):
    """A run's config.json is found from the run, its checkpoints or a step directory; a bare checkpoint
    directory has none, even inside a folder that holds another run's config.json."""
    run_dir = tmp_path / "run"
    for path in (run_dir / "checkpoints" / "2" / "params", tmp_path / "bare" / "2" / "params"):
        path.mkdir(parents=True)
    for folder in (run_dir, tmp_path):
        (folder / "config.json").write_text(json.dumps({"seed": 3}))
    for path in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "2"):
        assert modeldir.run_config(str(path)) == {"seed": 3, "run_dir": str(run_dir)}
    assert modeldir.run_config(str(tmp_path / "bare")) is None
    assert modeldir.run_config(str(tmp_path / "bare" / "2")) is None
