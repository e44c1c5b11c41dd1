"""Many processes, one script: the multi-GPU side of training and sampling (paper App. C).

The paper fine-tunes LLaDA-8B (demasker f_theta) jointly with Qwen3-Embedding-0.6B (encoder
h_phi) with AdamW (lr 2.5e-5, wd 0.1), global batch 512, 3 epochs, programs up to L = 4096.
That only fits on a GPU cluster (see scripts/memory_plan.py), while the tiny presets run on a laptop.
This file is the thin layer that lets the SAME scripts do both, using only PyTorch's own
engine: torch.distributed process groups, DistributedDataParallel, FSDP2 `fully_shard`,
and torch.distributed.checkpoint.state_dict for gathering / scattering full state dicts.

    env = setup()                                   # torchrun env -> process group; plain python -> 1 process
    enable_tf32(env)                                # Ampere+ GPUs only
    model = wrap_model(model.to(env.device), env, mode="fsdp",   # or "ddp" (small models), "none"
                       mixed_precision="bf16", activation_checkpointing=True)
    maybe_compile(model, args.compile, env)         # None = on for CUDA, off on CPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=2.5e-5, weight_decay=0.1)  # AFTER wrap_model
    accum = accumulation_steps(global_batch=512, micro_batch=2, world_size=env.world_size)
    step = load_checkpoint(resume_dir, model, optimizer, env)["step"] if resume_dir else 0
    for i, batch in enumerate(micro_batches):       # this rank's examples only (shard_indices)
        with grad_sync(model, enabled=(i + 1) % accum == 0), autocast(env, amp):  # amp="bf16" for DDP
            (loss_fn(model, batch) / accum).backward()   # loss = MEAN over the micro-batch
        if (i + 1) % accum == 0:
            clip_grad_norm(model, 1.0); optimizer.step(); optimizer.zero_grad(); step += 1
            metrics = all_reduce_mean({"loss": ...}, env)      # same on every rank; log if env.is_main
            save_checkpoint(run_dir / f"step_{step}", model, optimizer, env,   # every rank calls
                            parts={"encoder": enc_config, "demasker": dem_config}, extra={"step": step})
    cleanup(env)

Checkpoints (full state, save on N ranks, resume on M, strict resume) live in infra/dist_checkpoint.py, which
builds on this file (import dist_checkpoint as DC; DC.save_checkpoint, DC.load_checkpoint).

Facts the API relies on (each checked by tests/test_distributed.py and tests/test_dist_checkpoint.py):
- Gradients are AVERAGED over ranks (DDP all-reduce, FSDP2 reduce-scatter). With equal
  micro-batches per rank and a per-micro-batch mean loss divided by `accum`, the update equals
  one process taking the mean over the whole global batch.
- Checkpoints hold FULL, unsharded state, written by rank 0 only: the model as safetensors
  (checkpoint.save_model_dir: config.json + model.safetensors, readable by from_pretrained),
  the optimizer as `training_state.pt` (a torch.save we write ourselves, keyed by parameter
  NAME, not by id, loaded with weights_only=True). Nothing depends on the world size or the
  wrapper (DDP's "module." prefix and FSDP's DTensors are removed by get_model_state_dict),
  so a run saved on N ranks resumes on M ranks, or on one plain process.
- FSDP2 mixed precision keeps the sharded parameters in the dtype the model had when it was
  wrapped (fp32 -> the fp32 master weights AdamW updates), computes in bf16 and reduces
  gradients in fp32. DDP has no parameter-dtype policy: use `autocast(env, "bf16")` instead.
- Activation checkpointing sets the models' own `gradient_checkpointing` attribute (each block
  then runs under torch.utils.checkpoint(use_reentrant=False)); a model without that attribute
  gets torch's `checkpoint_wrapper` around each block instead.
- Staged training (App. C: demasker frozen for the first steps): freeze BEFORE wrap_model
  and just flip requires_grad later. DDP then registers every parameter and skips frozen
  ones (find_unused_parameters); freezing after a DDP wrap raises instead of drifting.
- The 8B route: build the model on the meta device, wrap_model(mode="fsdp"),
  model.to_empty(device=env.device), then load_full_state_dict(model, state_on_rank0,
  broadcast_from_rank0=True): no rank ever holds a second full copy.
- Per-rank randomness (masking, noise) must not depend on the world size if you want N-rank
  and 1-rank runs to agree: derive it from (seed, step, example index), not from the rank.
  Compute the loss from fp32 logits (`logits.float()`): under FSDP bf16 they come out bf16.
"""

import contextlib
import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:  # torch 2.4 / 2.5 kept FSDP2 under _composable
    from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


WRAP_MODES = ("none", "ddp", "fsdp")


# ---------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------

@dataclass
class DistEnv:
    """Where this process sits: rank among world_size processes, its device, rank 0 or not."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None = no process group (plain single process)

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.backend is not None


def launched_by_torchrun():
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def setup(device=None, backend=None, timeout_minutes=30):
    """Join the process group torchrun describes, or return a one-process env.

    device: None = cuda:LOCAL_RANK when CUDA exists, else cpu; "cpu" forces CPU.
    backend: None = nccl on CUDA, gloo on CPU. torchrun sets RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them no process group is created.
    """
    if not launched_by_torchrun():
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device.index or 0)
        return DistEnv(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are "
                               "visible; lower --nproc_per_node or fix CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"{name} is not set; launch with torchrun, which sets it")
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                   backend=backend)


def cleanup(env=None, barrier=True):
    """Leave the process group (no-op for a single process), on the success path only.

    All ranks meet at a barrier first, so no rank closes its connections while a peer is still inside
    the last collective; then the garbage collector frees the DDP/FSDP wrappers (they sit in
    reference cycles) while the group still exists, so that gloo's worker threads are not destroyed
    by the interpreter's own shutdown (a rare SIGABRT, "terminate called without an active exception",
    seen once in CI after a run had saved everything)."""
    if dist.is_initialized():
        if barrier:  # barrier=False on an error path: a peer may never arrive
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def barrier(env):
    if env.distributed:
        dist.barrier()


# ---------------------------------------------------------------------------
# Wrapping a model: DDP, FSDP2, activation checkpointing, compile, precision
# ---------------------------------------------------------------------------

def find_blocks(model):
    """The transformer blocks of a model: every child of every nn.ModuleList named `blocks`
    anywhere in the tree (Encoder.blocks, Demasker.blocks, LatentDiT.blocks, or all of them
    in a joint module), in module order."""
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "blocks":
            blocks.extend(module)
    return blocks


def default_shard_modules(model):
    """FSDP2 units: every block, plus each embedding table and `lm_head` outside the blocks.

    LLaDA-8B's embedding and LM head hold 0.5B parameters each; as units of their own they
    are all-gathered only while used instead of for the whole step with the root. A module
    whose parameters are shared with another one (tied embeddings) stays with the root.
    """
    blocks = find_blocks(model)
    inside = {id(m) for block in blocks for m in block.modules()}
    owners = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(id(module))
    large = [module for name, module in model.named_modules()
             if id(module) not in inside and module is not model
             and (isinstance(module, nn.Embedding) or name.split(".")[-1] == "lm_head")
             and all(len(owners[id(p)]) == 1 for p in module.parameters())]
    return blocks + large


def enable_activation_checkpointing(model, blocks=None):
    """Recompute each block's activations in backward instead of storing them.

    Models that own a `gradient_checkpointing` attribute (encoder, demasker) get it set
    to True (they wrap each block in torch.utils.checkpoint(use_reentrant=False)).
    A model without one gets torch's checkpoint_wrapper around each block. Returns which.
    """
    owners = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    if owners:
        for module in owners:
            module.gradient_checkpointing = True
        return "attribute"
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing)
    targets = set(map(id, blocks if blocks is not None else find_blocks(model)))
    if not targets:
        raise ValueError("activation checkpointing needs a `gradient_checkpointing` attribute or "
                         "an nn.ModuleList named `blocks` in the model; neither was found")
    apply_activation_checkpointing(model, check_fn=lambda module: id(module) in targets)
    return "checkpoint_wrapper"


def wrap_model(model, env, mode="ddp", shard_modules=None, mixed_precision=None,
               activation_checkpointing=False, find_unused_parameters=False):
    """Make `model` (already on env.device) data parallel.

    mode: "none" (returned as is), "ddp" (DistributedDataParallel; parameters replicated,
      gradients all-reduced: the default for small models) or "fsdp" (FSDP2 fully_shard:
      parameters, gradients and AdamW states sharded across ranks; needed for LLaDA-8B).
      Without a process group (plain `python`) both fall back to "none".
    shard_modules: modules that get their own fully_shard (one all-gather each) before the
      root; default: default_shard_modules(model) (blocks, embeddings, LM head). Deeper
      modules are sharded first. Activation checkpointing always targets the blocks.
    mixed_precision: "bf16" or None. FSDP2: MixedPrecisionPolicy(param_dtype=bf16,
      reduce_dtype=fp32). DDP/none: nothing changes here, run the forward under autocast().
    activation_checkpointing: see enable_activation_checkpointing (applied before sharding).
    find_unused_parameters: DDP only; needed when some trainable parameters get no gradient
      in a step (e.g. registers beyond the sampled k are still used, so normally False).
    Returns the wrapped model. Build the optimizer AFTER this call (FSDP2 replaces parameters).
    """
    if mode not in WRAP_MODES:
        raise ValueError(f"mode={mode!r}; choose one of {WRAP_MODES}")
    if mixed_precision not in (None, "bf16"):
        raise ValueError(f"mixed_precision={mixed_precision!r}; choose 'bf16' or None")
    units = list(shard_modules) if shard_modules is not None else default_shard_modules(model)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
        units = [_checkpoint_wrapper_of(model, unit) for unit in units]
    if mode == "none" or not env.distributed:
        return model
    if mode == "ddp":
        return _ddp(model, env, find_unused_parameters)
    block_policy, root_policy = MixedPrecisionPolicy(), MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        # Blocks keep their float inputs as given: x is already bf16 (it comes out of bf16
        # embeddings) and the rotary cos/sin must stay fp32 (RoPE in full precision, as in
        # LLaDA / Qwen3). The root casts float model inputs (e.g. registers) to bf16.
        block_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                            cast_forward_inputs=False)
        root_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    depth = {id(module): name.count(".") for name, module in model.named_modules()}
    for module in sorted(units, key=lambda m: -depth.get(id(m), 0)):
        if module is not model:
            fully_shard(module, mp_policy=block_policy)
    fully_shard(model, mp_policy=root_policy)
    return model


def _checkpoint_wrapper_of(model, block):
    """The checkpoint_wrapper that now holds `block`, if apply_activation_checkpointing made one."""
    for module in model.modules():
        if getattr(module, "_checkpoint_wrapped_module", None) is block:
            return module
    return block


def _ddp(module, env, find_unused_parameters):
    """DistributedDataParallel that stays correct when requires_grad changes later.

    DDP reduces only the parameters that were trainable when it was built: one unfrozen
    afterwards would silently train differently on every rank. So when anything is frozen
    at wrap time (staged training, App. C), every parameter is registered and
    find_unused_parameters=True lets DDP skip the frozen ones step by step.
    """
    frozen = [p for p in module.parameters() if not p.requires_grad]
    find_unused_parameters = find_unused_parameters or bool(frozen)
    for param in frozen:
        param.requires_grad_(True)
    try:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        wrapped = DistributedDataParallel(module, device_ids=device_ids,
                                          find_unused_parameters=find_unused_parameters)
    finally:
        for param in frozen:
            param.requires_grad_(False)
    wrapped.crocodil_trainable = _trainable_ids(module)
    return wrapped


def _trainable_ids(module):
    return frozenset(id(p) for p in module.parameters() if p.requires_grad)


def unwrap(model):
    """The user's module under a DDP wrapper (FSDP2 and the attribute path wrap in place)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def autocast(env, mixed_precision):
    """torch.autocast to bf16 on env.device when mixed_precision == 'bf16', else a no-op."""
    if mixed_precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=env.device.type, dtype=torch.bfloat16)


def enable_tf32(env):
    """TF32 tensor cores for fp32 matmuls on Ampere+ GPUs (no effect on CPU). Returns True if on."""
    if env.device.type != "cuda" or torch.cuda.get_device_capability(env.device)[0] < 8:
        return False
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9 API
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return True


def maybe_compile(model, enabled, env):
    """torch.compile each block in place (module names, hence checkpoints, do not change).

    enabled: True / False, or None = on for CUDA, off on CPU. Returns whether it compiled.
    A model without `blocks` is compiled as a whole, also in place.
    """
    if enabled is None:
        enabled = env.device.type == "cuda"
    if not enabled:
        return False
    blocks = find_blocks(unwrap(model))
    for module in blocks or [unwrap(model)]:
        module.compile()
    return True


# ---------------------------------------------------------------------------
# Gradient accumulation and clipping
# ---------------------------------------------------------------------------

def accumulation_steps(global_batch, micro_batch, world_size):
    """Micro-steps per optimizer step so that micro_batch * world_size * steps == global_batch."""
    for name, value in (("global_batch", global_batch), ("micro_batch", micro_batch),
                        ("world_size", world_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name}={value} must be a positive integer")
    per_pass = micro_batch * world_size
    if global_batch % per_pass:
        raise ValueError(
            f"global batch {global_batch} is not divisible by micro_batch {micro_batch} x "
            f"world_size {world_size} = {per_pass}; pick a micro batch or process count that "
            f"divides it (e.g. micro_batch in {_divisors(global_batch // world_size)})"
            if global_batch % world_size == 0 else
            f"global batch {global_batch} is not divisible by world_size {world_size}; "
            f"change --global-batch or the number of processes")
    return global_batch // per_pass


def _divisors(n):
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


@contextlib.contextmanager
def grad_sync(model, enabled):
    """Inside `with grad_sync(model, enabled=False)` backward keeps gradients local.

    Use enabled=False on every micro-step but the last of an accumulation window: DDP's
    no_sync(), FSDP2's set_requires_gradient_sync(False). A plain module ignores it.
    """
    if isinstance(model, DistributedDataParallel) and not model.find_unused_parameters and \
            _trainable_ids(model.module) != model.crocodil_trainable:
        raise RuntimeError("parameters were frozen after the model was wrapped in DDP; freeze them "
                           "before wrap_model (or pass find_unused_parameters=True) so that DDP "
                           "can skip them")
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(model, max_norm):
    """Clip the global gradient norm (over all ranks' shards); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor, already reduced over the shards
        norm = norm.full_tensor()
    return float(norm)


# ---------------------------------------------------------------------------
# Data sharding
# ---------------------------------------------------------------------------

def shard_indices(n, rank, world_size, epoch=0, seed=0):
    """This rank's example indices for one epoch: every example goes to exactly one rank.

    A permutation of range(n) drawn from (seed, epoch) (seed=None: no shuffling, for
    evaluation and sampling), dealt round-robin: rank r gets perm[r::world_size]. Dealing
    round-robin keeps global batches independent of the world size: micro-steps
    j*G/W .. (j+1)*G/W - 1 of every rank together hold exactly perm[j*G : (j+1)*G], the
    same examples a single process takes for global batch j. So runs on 1 and N ranks see
    the same global batches, and a data position saved as "examples consumed" resumes on
    any M ranks. Shards differ in length by at most one; training loops take
    n // global_batch steps per epoch so that every rank runs the same number of steps.
    Returns an int64 numpy array.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if seed is None:
        order = np.arange(n, dtype=np.int64)
    else:
        order = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)
    return order[rank::world_size]


# ---------------------------------------------------------------------------
# Collectives for metrics and sampling results
# ---------------------------------------------------------------------------

def all_reduce_mean(metrics, env):
    """{name: float} -> the mean of each value over ranks (same dict on every rank)."""
    return _all_reduce(metrics, env, divide=True)


def all_reduce_sum(metrics, env):
    """{name: float} -> the sum over ranks (e.g. token counts for a weighted mean)."""
    return _all_reduce(metrics, env, divide=False)


def _all_reduce(metrics, env, divide):
    names = sorted(metrics)
    if not env.distributed:
        return {name: float(metrics[name]) for name in names}
    values = torch.tensor([float(metrics[name]) for name in names], dtype=torch.float64,
                          device=env.device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    if divide:
        values /= env.world_size
    return dict(zip(names, values.tolist()))


def gather_objects(items, env, dst=0):
    """Concatenate every rank's list on rank `dst` in rank order; other ranks get None.

    Ranks hold different examples (sharded), so put the example index in each item and
    sort on rank 0 when order matters.
    """
    if not env.distributed:
        return list(items)
    gathered = [None] * env.world_size if env.rank == dst else None
    dist.gather_object(list(items), gathered, dst=dst)
    if env.rank != dst:
        return None
    return [item for rank_items in gathered for item in rank_items]


def broadcast_object(obj, env, src=0):
    """Rank `src`'s Python object on every rank (e.g. a run folder chosen by rank 0)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
