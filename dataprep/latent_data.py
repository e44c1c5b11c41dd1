"""Register banks: the training data of the latent prior, z_0 = h_phi(x_0) for every program (App. E).

Paper map (arXiv 2603.20210):
- App. E / Sec. 5: "we used the 22 million text sequences ... and converted them to latent matrices of
  size 1024 x 128": the frozen encoder maps each program to a bank of K registers (K, d), each of norm
  sqrt(d). The prior models only the first K of them (paper: K = 8 for generation, App. G (i)); the
  encoder's registers are causal in their index (register j sees registers < j only), so encoding with
  an encoder truncated to K registers gives exactly the first K registers of the full bank, cheaper.
- Alg. 4 / App. E (conditional prior): x^(r) = x_0 with a fraction r of its positions masked, embedded by
  the encoder with the masked positions hidden. `visible_view` builds that view; generators.py builds
  the same view of the MDM canvas x_t at sampling time, so training and sampling condition alike.

On disk (one folder per (split, K, key)), written in chunks so an interrupted run resumes:
    <cache>/bank-<split>-K<K>-<key16>/registers.npy   (N, K, d) float32|float16 (np.lib.format memmap)
                                      done.npy        (num_chunks,) uint8, 1 = chunk written and flushed
                                      meta.json       key, sources, shape; "complete": true when finished
The key is a sha256 of the encoder checkpoint (config.json and every weight file, byte for byte), of K
and the storage dtype, and of the data cache's settings (dataprep/data.py meta.json: corpus file hash, tokenizer,
sequence length) and the split's shape. A changed encoder or data cache gets a new folder; old folders are
left in place (delete them by hand). Under torchrun every rank encodes its own chunks (c % world == rank)
into the shared file; resumption does not depend on the world size.

Token ids for the conditional prior come from dataprep/data.py's cache (`TokenData`), row-aligned with the bank.

CLI: `python -m dataprep.latent_data --ae RUN --data DATA --num-registers 8` builds the train and val banks ahead
of training (train_prior.py builds them itself when missing).
"""

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from infra.atomic import read_json, write_json
from infra.atomic import exclusive

BANK_DTYPES = {"float32": np.float32, "float16": np.float16}


# ------------------------------------------------------------------------------------------------
# The conditioning view x^(r) (Alg. 4 line 6, App. E) and the masking draw
# ------------------------------------------------------------------------------------------------


def visible_view(ids, masked, eos_id):
    """What the encoder may see of a partially masked sequence: (attention_mask, hide), both (B, L) bool.

    ids (B, L) long; masked (B, L) bool (True = [M]). The text after the first VISIBLE EOS is padding
    (data rows are BOS program EOS, padded with EOS), so attention_mask is True up to and including it
    (all positions when no EOS is visible); hide = masked positions inside that range. With nothing
    masked this is exactly the attention mask of the clean program (sample.through_first_eos).
    """
    B, L = ids.shape
    visible_eos = (ids == eos_id) & ~masked
    first = torch.where(visible_eos.any(dim=1), visible_eos.float().argmax(dim=1),
                        torch.full((B,), L - 1, device=ids.device))
    attention_mask = torch.arange(L, device=ids.device)[None, :] <= first[:, None]
    return attention_mask, masked & attention_mask


def mask_positions(uniforms, ratios):
    """x^(r): position i masked iff u_i < r (each position masked with probability r, App. E's
    "masking an r fraction of tokens" in expectation). uniforms (B, L), ratios (B,) -> (B, L) bool."""
    return uniforms < ratios[:, None]


# ------------------------------------------------------------------------------------------------
# Cache keys
# ------------------------------------------------------------------------------------------------


def _hash_file(digest, path):
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


def encoder_fingerprint(encoder_dir):
    """sha256 hex of an encoder checkpoint folder: config.json and every weight file, byte for byte."""
    from infra.checkpoint import weight_files

    folder = Path(encoder_dir)
    digest = hashlib.sha256()
    for path in [folder / "config.json"] + list(weight_files(folder)):
        digest.update(path.name.encode())
        _hash_file(digest, path)
    return digest.hexdigest()


def bank_key(encoder_dir, data_dir, split, num_registers, bank_dtype):
    """The cache key of one bank (see the module docstring). Returns (key hex, encoder fingerprint)."""
    from dataprep.data import load_meta, load_split

    encoder_hash = encoder_fingerprint(encoder_dir)
    arrays = load_split(data_dir, split)
    shape = tuple((arrays["encoder_ids"] if arrays["encoder_ids"] is not None else arrays["ids"]).shape)
    source = {"encoder": encoder_hash, "data": load_meta(data_dir)["settings"], "split": split, "shape": shape,
              "num_registers": num_registers, "dtype": bank_dtype}
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest(), encoder_hash


# ------------------------------------------------------------------------------------------------
# Building and reading banks
# ------------------------------------------------------------------------------------------------


class RegisterBank:
    """A finished bank: `registers` (N, K, d) memmap; `batch(indices)` -> (B, K, d) float32 tensor."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.meta = read_json(self.folder / "meta.json", f"delete {self.folder} and run dataprep/latent_data.py (or "
                              f"train_prior.py) again to rebuild the bank")
        if not self.meta.get("complete"):
            raise ValueError(f"{self.folder} is an unfinished register bank; run dataprep/latent_data.py again to finish it")
        self.registers = np.load(self.folder / "registers.npy", mmap_mode="r")

    def __len__(self):
        return self.registers.shape[0]

    @property
    def num_registers(self):
        return self.registers.shape[1]

    @property
    def dim(self):
        return self.registers.shape[2]

    def batch(self, indices):
        return torch.from_numpy(np.asarray(self.registers[np.asarray(indices)], dtype=np.float32))


def _write_json(path, payload):
    """Atomic JSON write under a temporary name of its own (two writers never share a .tmp file)."""
    write_json(path, payload, sort_keys=True)


def _stored_meta(meta_path):
    """A bank's meta.json, or None when absent or unreadable (a bank killed while its meta was first written:
    it is started over)."""
    try:
        return read_json(meta_path) if meta_path.is_file() else None
    except ValueError:
        return None


def build_bank(encoder_dir, data_dir, split, num_registers, cache_dir, batch_size=32, chunk_size=1024,
               device="cpu", dtype=None, bank_dtype="float32", env=None, progress=True):
    """Encode `split` of the data cache with the frozen encoder into a bank, or reuse a finished one.

    encoder_dir: the AE run's encoder/ folder; num_registers: K <= the encoder's K. chunk_size rows are
    encoded in micro-batches of batch_size, written, flushed and marked done, so a killed run resumes at
    the first unfinished chunk. dtype: the encoder's compute dtype (None = as stored). env: a
    distributed.DistEnv (every rank must call; chunks are dealt round-robin). Returns the bank folder.
    """
    from infra.checkpoint import read_config

    if bank_dtype not in BANK_DTYPES:
        raise ValueError(f"bank_dtype must be one of {sorted(BANK_DTYPES)}, got {bank_dtype!r}")
    rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
    stored_k = read_config(encoder_dir)["num_registers"]
    if not 1 <= num_registers <= stored_k:
        raise ValueError(f"num_registers={num_registers} but the encoder in {encoder_dir} was trained with K={stored_k}; "
                         f"choose 1 <= --num-registers <= {stored_k}")
    key, encoder_hash = bank_key(encoder_dir, data_dir, split, num_registers, bank_dtype)
    folder = Path(cache_dir) / f"bank-{split}-K{num_registers}-{key[:16]}"
    meta_path = folder / "meta.json"
    if (_stored_meta(meta_path) or {}).get("complete"):
        return folder
    if rank == 0:  # a read-only or full cache folder: refused before the encoder runs, naming the fix
        from infra.run_folder import refuse_location
        refuse_location(cache_dir, "the register bank folder (--bank-cache)")
    # One builder at a time per bank, across processes (two priors trained side by side on one AE run);
    # the ranks of one job share rank 0's lock.
    with exclusive(Path(cache_dir) / f".{folder.name}.lock", enabled=rank == 0):
        _barrier(env)
        return _build_locked(folder, meta_path, key, encoder_hash, encoder_dir, data_dir, split, num_registers,
                             batch_size, chunk_size, device, dtype, bank_dtype, env, progress, rank, world)


def _build_locked(folder, meta_path, key, encoder_hash, encoder_dir, data_dir, split, num_registers, batch_size,
                  chunk_size, device, dtype, bank_dtype, env, progress, rank, world):
    """build_bank's body, under the bank's lock: reuse a bank another process finished meanwhile."""
    from dataprep.data import TokenData
    from encoder import Encoder

    if (_stored_meta(meta_path) or {}).get("complete"):
        return folder

    data = TokenData(data_dir, split)
    encoder = Encoder.from_pretrained(str(encoder_dir), num_registers=num_registers, dtype=dtype, device=device).eval()
    N, d = len(data), encoder.cfg.hidden_size
    if N == 0:
        raise ValueError(f"the {split} split of {data_dir} holds no programs; nothing to encode")
    num_chunks = max(1, -(-N // chunk_size))
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if _stored_meta(meta_path) is None:  # a fresh bank: allocate; an unfinished one keeps its files
            np.lib.format.open_memmap(folder / "registers.npy", mode="w+", dtype=BANK_DTYPES[bank_dtype],
                                      shape=(N, num_registers, d)).flush()
            np.save(folder / "done.npy", np.zeros(num_chunks, dtype=np.uint8))
            _write_json(meta_path, {"key": key, "encoder": str(Path(encoder_dir).resolve()),
                                    "encoder_fingerprint": encoder_hash, "data": str(Path(data_dir).resolve()),
                                    "split": split, "shape": [N, num_registers, d], "dtype": bank_dtype,
                                    "chunk_size": chunk_size, "complete": False})
    _barrier(env)
    stored = read_json(meta_path)
    if stored["chunk_size"] != chunk_size:
        chunk_size = stored["chunk_size"]  # resume with the layout the bank was started with
        num_chunks = max(1, -(-N // chunk_size))
    registers = np.load(folder / "registers.npy", mmap_mode="r+")
    done = np.load(folder / "done.npy", mmap_mode="r+")
    mine = [c for c in range(num_chunks) if c % world == rank and not done[c]]
    bar = _progress(len(mine), f"encoding {split} -> K={num_registers} bank", progress and rank == 0)
    with torch.no_grad():
        for chunk in mine:
            start, stop = chunk * chunk_size, min(N, (chunk + 1) * chunk_size)
            for first in range(start, stop, batch_size):
                rows = np.arange(first, min(stop, first + batch_size))
                batch = data.batch(rows)
                z0 = encoder(batch["encoder_ids"].to(device), attention_mask=batch["encoder_mask"].to(device))  # (b, K, d)
                registers[first:first + len(rows)] = z0.float().cpu().numpy().astype(registers.dtype)
            registers.flush()
            done[chunk] = 1
            done.flush()
            bar.update(1)
    bar.close()
    del registers, done
    _barrier(env)
    if rank == 0:
        if not np.load(folder / "done.npy").all():
            raise RuntimeError(f"{folder}: some chunks were not written; run again to finish the bank")
        _write_json(meta_path, {**read_json(meta_path), "complete": True})
    _barrier(env)
    return folder


def _barrier(env):
    if env is not None and env.distributed:
        from infra.distributed import barrier
        barrier(env)


def _progress(total, desc, enabled):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="chunk", disable=not enabled)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def default_cache_dir(ae_dir):
    return Path(ae_dir) / "register_banks"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Encode a data cache with the frozen encoder of a train_ae.py run "
                                                 "into register banks (N, K, d) for train_prior.py (App. E).")
    parser.add_argument("--ae", required=True, help="train_ae.py run folder (its encoder/ is used, frozen)")
    parser.add_argument("--data", required=True, help="data cache folder written by dataprep/data.py")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to encode")
    parser.add_argument("--num-registers", type=int, default=8,
                        help="K: registers kept per program (the first K; paper: 8 of 128 for generation)")
    parser.add_argument("--cache", default=None, help="where banks live (default: <ae>/register_banks)")
    parser.add_argument("--batch-size", type=int, default=32, help="programs per encoder call")
    parser.add_argument("--chunk-size", type=int, default=1024, help="programs per resumable chunk")
    parser.add_argument("--bank-dtype", choices=sorted(BANK_DTYPES), default="float32", help="storage dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="encoder compute dtype (default: as stored)")
    args = parser.parse_args(argv)
    for name in ("num_registers", "batch_size", "chunk_size"):  # K <= the encoder's K is checked once it is read
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None):
    from infra.distributed import cleanup, setup

    args = parse_args(argv)
    env = setup(device=args.device)
    cache = args.cache or default_cache_dir(args.ae)
    for split in args.splits:
        folder = build_bank(Path(args.ae) / "encoder", args.data, split, args.num_registers, cache, args.batch_size,
                            args.chunk_size, env.device, getattr(torch, args.dtype) if args.dtype else None,
                            args.bank_dtype, env)
        if env.is_main:
            print(f"{split}: {folder} {tuple(RegisterBank(folder).registers.shape)}")
    cleanup(env)


if __name__ == "__main__":
    main()
