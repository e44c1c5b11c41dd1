"""Random tiny models shared by the generator tests (test_generators.py, test_prompting.py): a demasker-sized
DiT prior that does not predict exactly zero, an encoder matching a demasker's vocabulary, and a copy of an AE run
with another encoder (the provenance tests of the trainers)."""

from pathlib import Path

import torch

from encoder import Encoder, EncoderConfig
from latent_dit import DiTConfig, LatentDiT

K, D = 8, 64  # registers, register width


def random_dit(seed=0, conditional=False, reads_condition=False):
    """A tiny LatentDiT with a random output layer (a fresh one predicts 0 exactly); conditional: cross-attends
    to a D-wide condition; reads_condition: its cross-attention outputs random too (zero at init)."""
    torch.manual_seed(seed)
    dit = LatentDiT(DiTConfig.tiny(register_dim=D, num_registers=K, cond_dim=D if conditional else None))
    with torch.no_grad():
        dit.final_layer.linear.weight.normal_(0, 0.2)
        if reads_condition:
            for block in dit.blocks:
                block.cross_attn.o_proj.weight.normal_(0, 0.2)
    return dit.eval()


def tiny_encoder(demasker_cfg, seed, registers=K):
    """A tiny Encoder with the demasker's vocabulary (the shared-tokenizer setting)."""
    torch.manual_seed(seed)
    c = demasker_cfg
    return Encoder(EncoderConfig.tiny(vocab_size=c.vocab_size, hidden_size=D, num_registers=registers,
                                      pad_token_id=c.pad_token_id, eos_token_id=c.eos_token_id)).eval()


def copy_with_other_encoder(ae, folder):
    """A copy of the AE run folder `ae` at `folder` whose encoder/ weights differ (its first tensor + 1): another
    encoder fingerprint, for the provenance tests."""
    import shutil
    shutil.copytree(ae, folder)
    encoder = Encoder.from_pretrained(str(Path(folder) / "encoder"))
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)
    encoder.save_pretrained(Path(folder) / "encoder")
    return folder
