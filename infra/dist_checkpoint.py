"""Resumable checkpoints of FULL (unsharded) state: save on N ranks, resume on M (paper App. C's long runs).

Paper map: App. C trains LLaDA-8B + Qwen3-Embedding-0.6B for 3 epochs at global batch 512 under FSDP2; a run
that long is split into jobs, so it must stop and continue exactly, on any number of ranks. This file holds
that concept and builds on infra/distributed.py (process groups, wrapping, collectives); the trainers import it as
`import dist_checkpoint as DC` (DC.save_checkpoint / DC.load_checkpoint).

- full_state_dict / full_optimizer_state_dict: the whole model (and AdamW state keyed by parameter NAME)
  gathered to CPU with torch.distributed.checkpoint.state_dict (collective; DDP's "module." prefix and FSDP's
  DTensors removed), so nothing depends on the world size or the wrapper.
- load_full_state_dict: scatter full dicts into a (possibly sharded) model / optimizer; broadcast_from_rank0
  for the 8B route (only rank 0 reads, tensor by tensor).
- save_checkpoint: rank 0 writes folder/{part}/config.json + model.safetensors (readable by from_pretrained)
  and training_state.pt (optimizer, parts, extra), atomically and crash-safe (checkpoint.swap_folder); a NaN/inf
  tensor is never saved.
- load_checkpoint + check_resumable: strict resume: every model tensor present with its shape, every AdamW
  moment of every trainable parameter present; otherwise ONE CheckpointError listing all problems.
- rng_states / set_rng_states / check_same_tokenizers: what a resume restores besides weights and AdamW
  state: the global RNG states (torch, CUDA, numpy, python; in types torch.load(weights_only=True) reads) and
  the tokenizers' identity (a data cache whose tokenizer is not byte for byte the run's is refused).
"""

import hashlib
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    set_model_state_dict, set_optimizer_state_dict)

from infra import checkpoint
from infra import distributed as D

TRAINING_STATE_FILE = "training_state.pt"


def full_state_dict(model):
    """{name: fp32/bf16 CPU tensor} of the whole model, same names as the unwrapped module.

    Collective under FSDP (every rank must call it); with cpu_offload=True only rank 0 ends
    up holding the tensors (other ranks get an empty dict) so memory stays bounded.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def full_optimizer_state_dict(model, optimizer):
    """The optimizer state keyed by parameter names (not ids), gathered and on CPU. Collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state_dict(model, model_state, optimizer=None, optimizer_state=None,
                         broadcast_from_rank0=False):
    """Load FULL state dicts into a (possibly sharded) model / optimizer. Collective.

    broadcast_from_rank0=False: every rank passes the full dicts (each read the files).
    broadcast_from_rank0=True: only rank 0's dicts are used (others may pass {}); rank 0
      sends tensor by tensor, so an 8B model is never held in full by every rank.
    """
    distributed = dist.is_initialized()
    options = StateDictOptions(full_state_dict=True, strict=True,
                               broadcast_from_rank0=broadcast_from_rank0 and distributed)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def save_checkpoint(folder, model, optimizer, env, config=None, parts=None, extra=None):
    """Write a resumable checkpoint of FULL state; every rank must call, rank 0 writes.

    parts=None:  folder/config.json + model.safetensors        (checkpoint.save_model_dir)
    parts={"encoder": enc_config, "demasker": dem_config} (a joint model whose children are
                 named so): folder/encoder/{config.json, model.safetensors}, folder/demasker/...
                 with the child's own key names, so Encoder/Demasker.from_pretrained read them
                 when each config dict carries its "crocodil_model" key.
    always:      folder/training_state.pt  {"optimizer": full AdamW state keyed by parameter
                 name, "parts": [...], "extra": step, scheduler, data position, ...}
    The folder appears atomically (built in a temporary folder, then renamed).
    """
    if parts is not None:
        top_level = {key.split(".")[0] for key in D.unwrap(model).state_dict()}
        stray = sorted(top_level - set(parts))
        if stray:
            raise ValueError(f"parts={sorted(parts)} leave the model's {stray} unsaved; "
                             "list every child module that holds parameters")
    model_state = full_state_dict(model)
    optimizer_state = full_optimizer_state_dict(model, optimizer) if optimizer is not None else None
    folder = Path(folder)
    problem = None
    if env.is_main:  # a NaN must never replace a good checkpoint (train loops skip such steps; this is the last net)
        bad = checkpoint.non_finite(model_state) + checkpoint.non_finite(optimizer_state or {}, "optimizer.")
        if bad:
            problem = (f"refusing to save {folder}: {len(bad)} tensors hold NaN/inf ({', '.join(bad[:8])}"
                       f"{' ...' if len(bad) > 8 else ''}); the previous checkpoint is left as it was")
    problem = D.broadcast_object(problem, env)
    if problem:
        raise FloatingPointError(problem)
    if env.is_main:
        tmp_root = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=_parent(folder)))
        try:
            staged = tmp_root / "checkpoint"
            if parts is None:
                checkpoint.save_model_dir(staged, model_state, config or {})
            else:
                for name, part_config in parts.items():
                    checkpoint.save_model_dir(staged / name, _strip_prefix(model_state, name),
                                              part_config or {})
            torch.save({"optimizer": optimizer_state, "parts": sorted(parts or []),
                        "extra": extra or {}}, staged / TRAINING_STATE_FILE)
            _replace_folder(staged, folder)
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
    D.barrier(env)
    return folder


def load_checkpoint(folder, model, optimizer, env, broadcast_from_rank0=True):
    """Restore what save_checkpoint wrote, on any number of ranks; returns `extra`. Collective.

    broadcast_from_rank0=True: only rank 0 reads the files and sends the tensors (other
    ranks need not see the folder). False: every rank reads the files itself.
    """
    folder = Path(folder)
    broadcast_from_rank0 = broadcast_from_rank0 and env.distributed
    reads_files = env.is_main or not broadcast_from_rank0
    model_state, saved, problem = {}, {"optimizer": {}, "extra": None}, None
    if reads_files:
        checkpoint.recover_folder(folder)  # a save killed between its two renames left the old copy
        state_file = folder / TRAINING_STATE_FILE
        try:
            if not state_file.is_file():
                raise FileNotFoundError(f"{folder} has no {TRAINING_STATE_FILE}: it is not a training checkpoint "
                                        "written by distributed.save_checkpoint (resuming needs the optimizer state)")
            try:
                saved = torch.load(state_file, map_location="cpu", weights_only=True)
            except Exception as error:
                raise checkpoint.CheckpointError(
                    f"{state_file} is unreadable ({type(error).__name__}: {error}); restore the run folder from a "
                    f"good copy or start a new run (a killed save never leaves such a file)") from None
            if optimizer is not None and saved["optimizer"] is None:
                raise FileNotFoundError(f"{state_file} holds no optimizer state (it was saved with optimizer=None)")
            for name in saved["parts"] or [None]:
                part_state = checkpoint.read_safetensors(folder / name if name else folder)
                model_state.update(_add_prefix(part_state, name))
            check_resumable(folder, model, model_state, optimizer, saved["optimizer"] if optimizer else None)
        except (FileNotFoundError, checkpoint.CheckpointError) as error:
            problem = (type(error).__name__, str(error))
    if broadcast_from_rank0:
        problem = D.broadcast_object(problem, env)  # every rank raises, none waits forever
    if problem:
        raise (FileNotFoundError if problem[0] == "FileNotFoundError" else checkpoint.CheckpointError)(problem[1])
    load_full_state_dict(model, model_state, optimizer, saved["optimizer"] if optimizer else None,
                         broadcast_from_rank0=broadcast_from_rank0)
    return D.broadcast_object(saved["extra"], env) if broadcast_from_rank0 else saved["extra"]


def _strip_prefix(state, name):
    return {key[len(name) + 1:]: value for key, value in state.items() if key.startswith(name + ".")}


def _add_prefix(state, name):
    return state if name is None else {f"{name}.{key}": value for key, value in state.items()}


def _parent(folder):
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder.parent


def _replace_folder(staged, folder):
    checkpoint.swap_folder(staged, folder)  # crash-safe at every instant (infra/checkpoint.py)


def check_resumable(folder, model, model_state, optimizer=None, optimizer_state=None):
    """Strict resume: every model tensor present with the model's shape, and every AdamW moment of
    every trainable parameter present with its parameter's shape; else ONE CheckpointError listing
    the missing, unexpected and mis-shaped keys. (torch's set_model_state_dict alone would leave a
    missing tensor at its initial value.) Optimizer state may be absent as a whole (no step taken
    yet) and is not expected for frozen parameters (staged training)."""
    module = D.unwrap(model)
    expected = {name: tuple(value.shape) for name, value in module.state_dict().items()}
    missing = [name for name in expected if name not in model_state]
    unexpected = [name for name in model_state if name not in expected]
    shapes = [f"{name}: checkpoint {tuple(model_state[name].shape)} vs model {expected[name]}"
              for name in model_state if name in expected and tuple(model_state[name].shape) != expected[name]]
    if optimizer is not None and optimizer_state is not None:
        names = {id(param): name for name, param in module.named_parameters()}
        params = {name: param for name, param in module.named_parameters()}
        groups = [[names.get(id(p), "?") for p in group["params"]] for group in optimizer.param_groups]
        saved_groups = [list(group.get("params", [])) for group in optimizer_state.get("param_groups", [])]
        if saved_groups != groups:
            shapes.append(f"optimizer parameter groups: checkpoint {[len(g) for g in saved_groups]} parameters per "
                          f"group vs this run's {[len(g) for g in groups]} (or other names)")
        state = optimizer_state.get("state", {})
        for name, moments in state.items():
            if name not in params:
                unexpected.append(f"optimizer.{name}")
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                if key not in moments:
                    missing.append(f"optimizer.{name}.{key}")
                elif tuple(moments[key].shape) != tuple(params[name].shape):
                    shapes.append(f"optimizer.{name}.{key}: checkpoint {tuple(moments[key].shape)} vs parameter "
                                  f"{tuple(params[name].shape)}")
            if "step" not in moments:
                missing.append(f"optimizer.{name}.step")
        if state:
            trainable = [name for group in groups for name in group if params.get(name) is not None
                         and params[name].requires_grad]
            missing += [f"optimizer.{name}" for name in trainable if name not in state]
    if missing or unexpected or shapes:
        lines = [f"{folder} cannot be resumed exactly into this {type(module).__name__}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        lines.append("Resume with the flags the run was started with, restore the checkpoint from a good copy, "
                     "or start a new run in another folder.")
        raise checkpoint.CheckpointError("\n".join(lines))

def rng_states():
    """Global RNG states of torch (CPU, CUDA), numpy and python, in types torch.load(weights_only) reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate()}


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def check_same_tokenizers(resume_dir, files):
    """--resume: the data cache's tokenizer(s) must be byte for byte the checkpoint's copies."""
    for name, source in files.items():
        saved = resume_dir / name
        if not saved.is_file():
            continue  # a checkpoint written before tokenizers were copied
        hashes = [hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] for path in (saved, source)]
        if hashes[0] != hashes[1]:
            raise ValueError(f"--resume: the data cache's {source} (sha256 {hashes[1]}) is not the tokenizer the run "
                             f"was trained with, {saved} (sha256 {hashes[0]}); pass the run's --data folder or start a "
                             f"new run with another --out-dir")
