"""infra/distributed.py: two gloo processes on CPU against one plain process.

One fixture spawns 2 ranks once (torch.multiprocessing.spawn, free port) and runs every
multi-rank scenario there (DDP, FSDP2, FSDP2 + bf16, FSDP2 + activation checkpointing,
staged freezing, save on 2 ranks, resume a 1-rank checkpoint on 2 ranks, meta-device init,
collectives); the tests compare what it recorded with single-process reference runs.

The model is the tiny Demasker (LLaDA) trained with LLaDA's masked-diffusion loss
(sum over masked tokens of CE / p_mask, divided by B * L), with registers as inputs. Masks
and registers are drawn once per EXAMPLE, so every split of a global batch over ranks and
micro-batches sees the same numbers.
"""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from infra import dist_checkpoint as DC
from infra import distributed as D
from demasker import Demasker, DemaskerConfig

GLOBAL_BATCH, SEQ_LEN, NUM_REGISTERS, STEPS, SAVE_AT = 8, 16, 3, 4, 2
LR, MAX_NORM = 3e-3, 0.5
WORLD = 2


# ---------------------------------------------------------------------------
# Model, data, loss, training loop shared by the reference and the ranks
# ---------------------------------------------------------------------------

def make_model(seed=0):
    torch.manual_seed(seed)
    return Demasker(DemaskerConfig.tiny(n_layers=2))


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def make_data(num_examples, seed=1):
    """Clean tokens, masked tokens, p_mask and registers, fixed per example."""
    cfg = DemaskerConfig.tiny()
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, cfg.mask_token_id, (num_examples, SEQ_LEN), generator=gen)
    p_mask = 0.1 + 0.9 * torch.rand(num_examples, 1, generator=gen)
    masked = torch.rand(num_examples, SEQ_LEN, generator=gen) < p_mask
    masked[:, 0] = True  # at least one masked token per example
    xt = torch.where(masked, torch.full_like(x0, cfg.mask_token_id), x0)
    registers = torch.randn(num_examples, NUM_REGISTERS, cfg.register_dim, generator=gen)
    return {"x0": x0, "xt": xt, "masked": masked, "p_mask": p_mask.expand(-1, SEQ_LEN),
            "registers": registers}


def llada_loss(model, batch):
    """LLaDA's Eq.: sum over masked positions of CE / p_mask, over B * L (a mean per example)."""
    logits = model(batch["xt"], registers=batch["registers"]).float()  # (B, L, V)
    ce = F.cross_entropy(logits.flatten(0, 1), batch["x0"].flatten(), reduction="none")
    weighted = ce.view_as(batch["x0"]) * batch["masked"] / batch["p_mask"]
    return weighted.sum() / batch["x0"].numel()


def train(model, optimizer, env, data, steps, micro_batch, start=0, freeze=None):
    """Steps start..steps-1 of global batch GLOBAL_BATCH over this rank's shard (shard_indices).

    freeze: (module_getter, until_step) freezes a submodule for the first steps (App. C staging).
    Returns the per-step losses and gradient norms, reduced over ranks.
    """
    accum = D.accumulation_steps(GLOBAL_BATCH, micro_batch, env.world_size)
    shard = torch.from_numpy(D.shard_indices(len(data["x0"]), env.rank, env.world_size, seed=0))
    per_rank = GLOBAL_BATCH // env.world_size
    losses, norms = [], []
    for step in range(start, steps):
        if freeze is not None:
            for param in freeze[0](D.unwrap(model)).parameters():
                param.requires_grad_(step >= freeze[1])
        ids = shard[step * per_rank:(step + 1) * per_rank]
        step_loss = 0.0
        for micro in range(accum):
            picked = ids[micro * micro_batch:(micro + 1) * micro_batch]
            batch = {key: value[picked] for key, value in data.items()}
            with D.grad_sync(model, enabled=micro == accum - 1):
                loss = llada_loss(model, batch) / accum
                loss.backward()
            step_loss += loss.item()
        norms.append(D.clip_grad_norm(model, MAX_NORM))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(D.all_reduce_mean({"loss": step_loss}, env)["loss"])
    return losses, norms


def reference(data, steps=STEPS, start_state=None, freeze=None, micro_batch=4):
    env = D.setup(device="cpu")
    model = make_model()
    optimizer = make_optimizer(model)
    losses, norms = train(model, optimizer, env, data, steps, micro_batch, freeze=freeze)
    return model, optimizer, losses, norms


def state_of(model):
    return {k: v.clone() for k, v in DC.full_state_dict(model).items()}


def assert_states_close(actual, expected, rel=1e-3, max_atol=2e-3):
    """Equal up to fp32 summation order, measured against the training update itself:
    |actual - expected| <= rel * |expected - initial| over all weights (Frobenius norms).

    Elementwise equality is the wrong yardstick: AdamW divides by sqrt(v), so the odd entry
    whose gradients nearly cancel turns a 1e-7 rounding difference into ~1e-4 after a few
    steps, while the update as a whole agrees to ~1e-5 relative. Every weight also stays
    within max_atol (updates are ~1e-2). AdamW is blind to the gradient's scale, so the
    tests compare the pre-clipping gradient norms too: they catch loss-normalisation errors.
    """
    assert actual.keys() == expected.keys()
    initial = make_model().state_dict()
    diff = torch.cat([(actual[k].float() - expected[k].float()).flatten() for k in expected])
    update = torch.cat([(expected[k].float() - initial[k].float()).flatten() for k in expected])
    assert diff.norm() <= rel * update.norm(), f"relative difference {diff.norm() / update.norm():.3g} > {rel}"
    assert diff.abs().max() <= max_atol, f"max |difference| {diff.abs().max():.3g} > {max_atol}"


# ---------------------------------------------------------------------------
# The two ranks
# ---------------------------------------------------------------------------

def _rank_main(rank, port, folder):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = D.setup(device="cpu")
    data = make_data(GLOBAL_BATCH * STEPS)
    out = {}

    def run(name, mode, micro_batch=2, **wrap):
        model = D.wrap_model(make_model(), env, mode=mode, **wrap)
        optimizer = make_optimizer(model)
        out[name] = train(model, optimizer, env, data, STEPS, micro_batch)
        out[name + "/state"] = DC.full_state_dict(model)
        return model

    run("ddp", "ddp")
    model = run("fsdp", "fsdp", micro_batch=1)
    out["fsdp/units"] = sorted(name or "<root>" for name, module in model.named_modules()
                               if isinstance(module, D.FSDPModule))
    run("fsdp_ac", "fsdp", activation_checkpointing=True)
    model = run("fsdp_bf16", "fsdp", mixed_precision="bf16")
    out["fsdp_bf16/dtypes"] = {p.dtype for p in model.parameters()}
    run("fsdp_bf16_ac", "fsdp", mixed_precision="bf16", activation_checkpointing=True)

    # Staged training: the first block frozen for 2 steps, frozen BEFORE wrapping.
    for mode in ("ddp", "fsdp"):
        model = make_model()
        for param in model.blocks[0].parameters():
            param.requires_grad_(False)
        model = D.wrap_model(model, env, mode=mode)
        optimizer = make_optimizer(model)
        train(model, optimizer, env, data, STEPS, 2, freeze=(lambda m: m.blocks[0], 2))
        out[f"staged_{mode}/state"] = DC.full_state_dict(model)

    # Save on 2 ranks at SAVE_AT, keep going; and resume the 1-rank checkpoint here.
    model = D.wrap_model(make_model(), env, mode="fsdp")
    optimizer = make_optimizer(model)
    train(model, optimizer, env, data, SAVE_AT, 2)
    DC.save_checkpoint(os.path.join(folder, "ckpt_2rank"), model, optimizer, env,
                      config={"saved_by": "2 ranks"}, extra={"step": SAVE_AT})
    out["saved_2rank/losses"] = train(model, optimizer, env, data, STEPS, 2, start=SAVE_AT)[0]
    out["saved_2rank/state"] = DC.full_state_dict(model)

    model = D.wrap_model(make_model(seed=123), env, mode="fsdp")
    optimizer = make_optimizer(model)
    extra = DC.load_checkpoint(os.path.join(folder, "ckpt_1rank"), model, optimizer, env)
    out["resumed_on_2/losses"] = train(model, optimizer, env, data, STEPS, 2, start=extra["step"])[0]
    out["resumed_on_2/state"] = DC.full_state_dict(model)

    # The 8B route: build on the meta device, shard, then receive rank 0's weights.
    with torch.device("meta"):
        model = make_model()
    model = D.wrap_model(model, env, mode="fsdp")
    model.to_empty(device=env.device)
    DC.load_full_state_dict(model, make_model().state_dict() if env.is_main else {},
                           broadcast_from_rank0=True)
    out["meta_init/state"] = DC.full_state_dict(model)

    # grad_sync(enabled=False) really keeps gradients local (no communication).
    for mode in ("ddp", "fsdp"):
        model = D.wrap_model(make_model(), env, mode=mode)
        batch = {key: value[rank::WORLD] for key, value in data.items()}
        norms = []
        for enabled in (False, True):
            with D.grad_sync(model, enabled=enabled):
                llada_loss(model, batch).backward()
            grad = D.unwrap(model).lm_head.weight.grad
            norms.append(None if grad is None else float(grad.full_tensor().norm() if mode == "fsdp"
                                                         else grad.norm()))
        out[f"nosync_{mode}"] = D.gather_objects([norms], env)

    # Freezing behind DDP's back must fail loudly, not drift silently.
    model = D.wrap_model(make_model(), env, mode="ddp")
    for param in model.module.blocks[0].parameters():
        param.requires_grad_(False)
    try:
        with D.grad_sync(model, enabled=True):
            pass
        out["late_freeze"] = "no error"
    except RuntimeError as error:
        out["late_freeze"] = str(error)

    out["mean"] = D.all_reduce_mean({"rank": float(rank), "one": 1.0}, env)
    out["sum"] = D.all_reduce_sum({"rank": float(rank)}, env)
    out["gathered"] = D.gather_objects([(rank, "a"), (rank, "b")], env)
    out["broadcast"] = D.broadcast_object(f"from {rank}", env)
    if env.is_main:
        torch.save(out, os.path.join(folder, "ranks.pt"))
    D.cleanup(env)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]




@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("dist")
    data = make_data(GLOBAL_BATCH * STEPS)
    env = D.setup(device="cpu")
    # Reference: one process, micro-batch 4 (a different split than the ranks use).
    model = make_model()
    optimizer = make_optimizer(model)
    first = train(model, optimizer, env, data, SAVE_AT, micro_batch=4)
    DC.save_checkpoint(folder / "ckpt_1rank", model, optimizer, env, extra={"step": SAVE_AT})
    rest = train(model, optimizer, env, data, STEPS, micro_batch=4, start=SAVE_AT)
    ref = {"losses": first[0] + rest[0], "norms": first[1] + rest[1], "state": state_of(model)}
    mp.spawn(_rank_main, args=(_free_port(), str(folder)), nprocs=WORLD, join=True)
    ranks = torch.load(folder / "ranks.pt", weights_only=False)
    return {"ref": ref, "ranks": ranks, "folder": folder, "data": data}


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

def test_ddp_two_ranks_equal_one_process(runs):
    ref, (losses, norms) = runs["ref"], runs["ranks"]["ddp"]
    assert max(ref["norms"]) > MAX_NORM  # clipping is active, so it is checked too
    assert losses == pytest.approx(ref["losses"], rel=1e-5)
    assert norms == pytest.approx(ref["norms"], rel=1e-5)
    assert_states_close(runs["ranks"]["ddp/state"], ref["state"])


def test_fsdp_two_ranks_same_losses_and_weights(runs):
    ref = runs["ref"]
    for name in ("fsdp", "fsdp_ac"):
        losses, norms = runs["ranks"][name]
        assert losses == pytest.approx(ref["losses"], rel=1e-5), name
        assert norms == pytest.approx(ref["norms"], rel=1e-5), name
        assert_states_close(runs["ranks"][name + "/state"], ref["state"])


def test_fsdp_units_are_blocks_embedding_and_head(runs):
    assert runs["ranks"]["fsdp/units"] == ["<root>", "blocks.0", "blocks.1", "lm_head", "wte"]


def test_fsdp_bf16_keeps_fp32_master_weights_and_tracks_fp32(runs):
    ranks = runs["ranks"]
    assert ranks["fsdp_bf16/dtypes"] == {torch.float32}
    assert all(v.dtype == torch.float32 for v in ranks["fsdp_bf16/state"].values())
    losses = ranks["fsdp_bf16"][0]
    assert losses == pytest.approx(runs["ref"]["losses"], rel=2e-2)
    assert losses != pytest.approx(runs["ref"]["losses"], rel=1e-6)  # bf16 really was used
    # the paper-preset combination: bf16 + activation checkpointing recomputes the same numbers
    assert ranks["fsdp_bf16_ac"][0] == pytest.approx(losses, rel=1e-4)
    assert_states_close(ranks["fsdp_bf16_ac/state"], ranks["fsdp_bf16/state"])


def test_staged_freezing_matches_one_process(runs):
    """Frozen block 0 for two steps, then joint (App. C): DDP must not drift across ranks."""
    env = D.setup(device="cpu")
    model = make_model()
    optimizer = make_optimizer(model)
    train(model, optimizer, env, runs["data"], STEPS, 4, freeze=(lambda m: m.blocks[0], 2))
    expected = state_of(model)
    initial = make_model().state_dict()
    assert not torch.equal(expected["blocks.0.attn.q_proj.weight"], initial["blocks.0.attn.q_proj.weight"])
    for mode in ("ddp", "fsdp"):
        assert_states_close(runs["ranks"][f"staged_{mode}/state"], expected)


def test_grad_sync_off_keeps_gradients_local(runs):
    (local0, synced0), (local1, synced1) = runs["ranks"]["nosync_ddp"]
    assert local0 != pytest.approx(local1, rel=1e-3)  # each rank kept its own gradient
    assert synced0 == pytest.approx(synced1, rel=1e-6)  # then the synced step averaged them
    (local0, synced0), (local1, synced1) = runs["ranks"]["nosync_fsdp"]
    assert local0 is None and local1 is None  # FSDP2: nothing reduce-scattered yet
    assert synced0 == pytest.approx(synced1, rel=1e-6) and synced0 > 0


def test_ddp_refuses_parameters_frozen_after_wrapping(runs):
    assert "frozen after the model was wrapped in DDP" in runs["ranks"]["late_freeze"]


def test_save_on_two_ranks_resume_on_one(runs):
    folder = runs["folder"] / "ckpt_2rank"
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    env = D.setup(device="cpu")
    model = make_model(seed=7)  # different init: everything must come from the checkpoint
    optimizer = make_optimizer(model)
    extra = DC.load_checkpoint(folder, model, optimizer, env)
    assert extra == {"step": SAVE_AT}
    losses = train(model, optimizer, env, runs["data"], STEPS, 4, start=SAVE_AT)[0]
    ranks = runs["ranks"]
    assert losses == pytest.approx(ranks["saved_2rank/losses"], rel=1e-5)
    assert_states_close(state_of(model), ranks["saved_2rank/state"])


def test_resume_on_one_is_exact_and_on_two_matches(runs):
    env = D.setup(device="cpu")
    model = make_model(seed=7)
    optimizer = make_optimizer(model)
    extra = DC.load_checkpoint(runs["folder"] / "ckpt_1rank", model, optimizer, env)
    losses = train(model, optimizer, env, runs["data"], STEPS, 4, start=extra["step"])[0]
    assert losses == runs["ref"]["losses"][SAVE_AT:]
    for key, value in state_of(model).items():
        assert torch.equal(value, runs["ref"]["state"][key]), key  # bitwise: same process, same order
    assert runs["ranks"]["resumed_on_2/losses"] == pytest.approx(runs["ref"]["losses"][SAVE_AT:], rel=1e-5)
    assert_states_close(runs["ranks"]["resumed_on_2/state"], runs["ref"]["state"])


def test_meta_device_init_receives_rank0_weights(runs):
    expected = make_model().state_dict()
    got = runs["ranks"]["meta_init/state"]
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_collectives(runs):
    ranks = runs["ranks"]
    assert ranks["mean"] == {"one": 1.0, "rank": 0.5}
    assert ranks["sum"] == {"rank": 1.0}
    assert ranks["gathered"] == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
    assert ranks["broadcast"] == "from 0"


# ---------------------------------------------------------------------------
# Single-process pieces
# ---------------------------------------------------------------------------

def test_accumulation_steps():
    assert D.accumulation_steps(512, 2, 8) == 32
    assert D.accumulation_steps(8, 4, 1) == 2
    with pytest.raises(ValueError, match="not divisible by micro_batch 3"):
        D.accumulation_steps(512, 3, 8)
    with pytest.raises(ValueError, match="not divisible by world_size 3"):
        D.accumulation_steps(512, 1, 3)
    with pytest.raises(ValueError, match="positive integer"):
        D.accumulation_steps(512, 0, 8)


def test_setup_without_torchrun_is_one_plain_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = D.setup(device="cpu")
    assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)
    model = make_model()
    for mode in D.WRAP_MODES:  # no process group: every mode is the plain module
        assert D.wrap_model(model, env, mode=mode) is model
    with pytest.raises(ValueError, match="choose one of"):
        D.wrap_model(model, env, mode="zero3")
    assert D.gather_objects([1, 2], env) == [1, 2]
    assert D.all_reduce_mean({"a": 2}, env) == {"a": 2.0}


class _NoAttributeModel(nn.Module):
    """A model without `gradient_checkpointing`: gets torch's checkpoint_wrapper instead."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(2))
        self.head = nn.Linear(8, 11)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def _count_block_calls(model, blocks, run):
    """How often the blocks' forward runs during `run` (forward hooks are not re-run by the
    checkpoint recomputation, so the forward method itself is wrapped)."""
    calls = []

    def counting(forward):
        def forward_and_count(*args, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)
        return forward_and_count

    for block in blocks:
        block.forward = counting(block.forward)
    run()
    for block in blocks:
        del block.forward  # back to the class method
    return len(calls)


def test_activation_checkpointing_both_routes_recompute_with_same_gradients():
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(0))

    def grads(model):
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = _NoAttributeModel()
    inner_blocks = list(plain.blocks)
    assert _count_block_calls(plain, inner_blocks, lambda: grads(plain)) == 2
    expected = grads(_NoAttributeModel())
    wrapped = _NoAttributeModel()
    inner_blocks = list(wrapped.blocks)
    assert D.enable_activation_checkpointing(wrapped) == "checkpoint_wrapper"
    assert type(wrapped.blocks[0]).__name__ == "CheckpointWrapper"
    assert DC.full_state_dict(wrapped).keys() == _NoAttributeModel().state_dict().keys()  # names kept
    got = []
    assert _count_block_calls(wrapped, inner_blocks, lambda: got.extend(grads(wrapped))) == 4  # recomputed
    assert len(got) == len(expected) == 7
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)

    demasker = make_model()
    batch = {key: value[:2] for key, value in make_data(2).items()}
    assert _count_block_calls(demasker, demasker.blocks, lambda: llada_loss(demasker, batch).backward()) == 2
    assert D.enable_activation_checkpointing(demasker) == "attribute"
    assert demasker.gradient_checkpointing is True
    assert _count_block_calls(demasker, demasker.blocks, lambda: llada_loss(demasker, batch).backward()) == 4


# Checkpoint parts, strict resume and non-finite saves on one process: tests/test_dist_checkpoint.py


def test_compile_and_tf32_flags_on_cpu():
    env = D.setup(device="cpu")
    model = make_model()
    assert D.enable_tf32(env) is False  # CPU: nothing to switch on
    assert D.maybe_compile(model, None, env) is False  # default: off on CPU
    names = list(model.state_dict())
    assert D.maybe_compile(model, True, env) is True
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert list(model.state_dict()) == names  # compiled in place: checkpoints unchanged


def test_shard_indices_partition_each_epoch_and_keep_global_batches():
    for n, world in ((10, 1), (10, 2), (11, 2), (7, 3), (64, 4)):
        for epoch in (0, 1):
            shards = [D.shard_indices(n, rank, world, epoch=epoch, seed=3) for rank in range(world)]
            merged = np.concatenate(shards)
            assert sorted(merged.tolist()) == list(range(n))  # each example exactly once
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert not np.array_equal(D.shard_indices(64, 0, 1, epoch=0, seed=3), D.shard_indices(64, 0, 1, epoch=1, seed=3))
    assert not np.array_equal(D.shard_indices(64, 0, 1, epoch=1, seed=0), D.shard_indices(64, 0, 1, epoch=0, seed=1))
    assert np.array_equal(D.shard_indices(64, 1, 2, epoch=2, seed=3), D.shard_indices(64, 1, 2, epoch=2, seed=3))
    assert D.shard_indices(5, 1, 2, seed=None).tolist() == [1, 3]
    # Global batch j on 4 ranks = global batch j of one process (same examples).
    single = D.shard_indices(64, 0, 1, epoch=1, seed=3)
    G, W = 16, 4
    shards = [D.shard_indices(64, r, W, epoch=1, seed=3) for r in range(W)]
    for j in range(64 // G):
        on_ranks = np.concatenate([shard[j * G // W:(j + 1) * G // W] for shard in shards])
        assert sorted(on_ranks.tolist()) == sorted(single[j * G:(j + 1) * G].tolist())
    with pytest.raises(ValueError, match="outside"):
        D.shard_indices(8, 2, 2)
