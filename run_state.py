"""What a resume restores besides weights and AdamW state: the global RNG states and the tokenizers' identity.

Paper map: none directly; this serves App. C's long runs (3 epochs of an 8B model, split into jobs): `--resume`
must continue the same run. Every per-example draw of train_ae.py comes from its own seeded generator
(corruption.py), so these global states only matter to code that draws from torch / numpy / python directly;
they are saved anyway (training_state.pt, in types torch.load(weights_only=True) reads). The tokenizer check
refuses a data cache whose tokenizer is not byte for byte the one the checkpoint was trained with.
"""

import hashlib
import random
from pathlib import Path

import numpy as np
import torch


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
