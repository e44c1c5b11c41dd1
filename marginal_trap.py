"""The marginal trap: App. B's "cat meows / dog barks" example as a measurable experiment.

Paper map (arXiv 2603.20210, App. B):
- B.1 (Independence gap, semantic incoherence): an MDM that reveals several tokens per step samples them
  from the product of their marginals, eq. (8). With two equally likely sequences (cat, meows) and
  (dog, barks), revealing both tokens at once gives an invalid pair half of the time, even with the
  optimal demasker.
- B.2, Theorem B.1: if the tokens are conditionally independent given a latent z_0 that carries the
  cross-token dependencies, the reverse transition factorises exactly: a guided demasker can reveal many
  tokens per step without leaving the data's support.

The synthetic corpus (`TrapTask`). A sequence is BOS, P subject slots, then P object slots,
    x = (BOS, s_1, ..., s_P, o_1, ..., o_P),  s_i ~ U{A subjects},  o_i = the object of s_i,
so the pair (x_i, x_{P+i}) must co-occur (subject "cat" goes with object "meows", P positions apart),
and every other pair of positions is independent. There
are A^P valid sequences out of (2A)^(2P); validity is checked exactly. BOS is never masked and is the
prompt when sampling: with RoPE only and every input [M], all positions of a bidirectional demasker would
compute the same output (attention over identical values), so a fixed token is needed to tell slots apart.

What is trained, on CPU in seconds (tiny configs, Alg. 1 without the latent noise):
- base: a Demasker without registers (a plain LLaDA MDM) on the corpus;
- guided: an Encoder + a conditioned Demasker trained jointly (App. C, with all-mask utilisation).
Sampling uses sample.generate (LLaDA's loop) with temperature 1, at T steps, i.e. L/T tokens revealed per
step. The guided model is given z_0 = h_phi(x) for fresh valid x ("oracle prior": exact samples of the
register distribution of the data, which isolates the demasking stage that Theorem B.1 is about; a learned
prior adds its own error). The analytic reference `optimal_factorized_validity` is the validity of the
OPTIMAL factorised demasker (exact marginals) under random remasking, computed by Monte Carlo over reveal
orders: the Independence-gap prediction the trained base model should approach from below.

Reported (eval.py marginal-trap): fraction of valid samples vs tokens per step, for base and guided, under
random and low-confidence remasking; and distinct valid sequences / min(num, A^P) (a collapse check; exact
uniform sampling of the valid set reaches `distinct_valid_of_uniform_sampling`, below 1 by collisions).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from demasker import Demasker, DemaskerConfig
from encoder import Encoder, EncoderConfig
from mdm import generate
from schedules import mask_tokens, masked_diffusion_loss, num_transfer_tokens


@dataclass
class TrapTask:
    """BOS, P subject slots, P object slots over A choices; ids: subjects 0..A-1, objects A..2A-1, then
    [M], EOS (unused, the configs need one), BOS. `length` counts the 2P generated tokens (BOS excluded)."""
    pairs: int = 4
    choices: int = 4

    @property
    def length(self):
        return 2 * self.pairs

    @property
    def mask_id(self):
        return 2 * self.choices

    @property
    def bos_id(self):
        return 2 * self.choices + 2

    @property
    def vocab_size(self):
        return 2 * self.choices + 3

    @property
    def num_valid(self):
        return self.choices ** self.pairs

    def object_of(self, subjects):
        """(n, P) subject ids -> (n, P) object ids: subject s goes with object A + s."""
        return self.choices + subjects

    def sample(self, n, generator=None):
        """n valid sequences (n, 1 + 2P) long: BOS, subjects uniform, their objects."""
        subjects = torch.randint(0, self.choices, (n, self.pairs), generator=generator)
        bos = torch.full((n, 1), self.bos_id, dtype=torch.long)
        return torch.cat([bos, subjects, self.object_of(subjects)], dim=1)

    def is_valid(self, x):
        """(n, 1 + 2P) -> (n,) bool: every subject slot holds a subject and its object slot the matching
        object (position 0, BOS, is not checked)."""
        subjects, objects = x[:, 1:1 + self.pairs], x[:, 1 + self.pairs:]
        subject_ok = (subjects >= 0) & (subjects < self.choices)
        return (subject_ok & (objects == self.object_of(subjects.clamp(0, self.choices - 1)))).all(dim=1)


def demasker_config(task, register_dim=0, max_registers=0, width=64):
    return DemaskerConfig.tiny(vocab_size=task.vocab_size, d_model=width, mask_token_id=task.mask_id,
                               eos_token_id=task.mask_id + 1, bos_token_id=task.mask_id + 2,
                               pad_token_id=task.mask_id + 1, register_dim=register_dim,
                               max_registers=max_registers, max_sequence_length=task.length + 1)


def encoder_config(task, num_registers=2, width=64):
    return EncoderConfig.tiny(vocab_size=task.vocab_size, hidden_size=width, num_registers=num_registers,
                              pad_token_id=task.mask_id + 1, eos_token_id=task.mask_id + 1)


def train_mdm(task, demasker, encoder=None, steps=400, batch_size=128, lr=3e-3, all_mask=0.25, seed=0,
              progress=None):
    """Alg. 1 on the trap corpus: t ~ U, x_t = mask(x_0, t), logits = f(x_t, h(x_0)), Eq. 5 loss.

    encoder=None trains the base MDM. With an encoder, each example is fully masked with probability
    `all_mask` (App. C) so the demasker must read the registers. Returns the list of losses."""
    generator = torch.Generator().manual_seed(seed)
    params = list(demasker.parameters()) + (list(encoder.parameters()) if encoder is not None else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    demasker.train()
    if encoder is not None:
        encoder.train()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:  # cosine decay to 10%
            group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        x0 = task.sample(batch_size, generator)  # (B, 1 + L)
        t = torch.rand(batch_size, generator=generator)
        if encoder is not None:
            t = torch.where(torch.rand(batch_size, generator=generator) < all_mask, torch.ones_like(t), t)
        maskable = torch.ones_like(x0, dtype=torch.bool)
        maskable[:, 0] = False  # BOS stays
        x_t, masked, p_mask = mask_tokens(x0, t, task.mask_id, generator=generator, maskable=maskable)
        registers = encoder(x0) if encoder is not None else None  # (B, K, d)
        loss = masked_diffusion_loss(demasker(x_t, registers=registers), x0, masked, p_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, float(loss))
    demasker.eval()
    if encoder is not None:
        encoder.eval()
    return losses


def optimal_factorized_validity(task, steps, trials=20000, seed=0):
    """P(valid) for the OPTIMAL factorised demasker with random remasking at `steps` steps (one block).

    A pair is broken only when both of its tokens are revealed at the same step while neither was known
    before (then they are drawn independently from uniform marginals and agree with probability 1/A);
    otherwise the revealed token's partner is determined. Monte Carlo over LLaDA's reveal schedule
    (num_transfer_tokens) with uniformly random positions; exact in expectation."""
    rng = np.random.default_rng(seed)
    L, P = task.length, task.pairs
    counts = num_transfer_tokens(torch.ones(1, L, dtype=torch.bool), steps)[0].tolist()
    step_of = np.empty((trials, L), dtype=np.int64)
    for trial in range(trials):
        order = rng.permutation(L)
        step_of[trial, order] = np.repeat(np.arange(steps), counts)
    together = step_of[:, :P] == step_of[:, P:]  # (trials, P): both tokens of the pair revealed at once
    probability = (1.0 / task.choices) ** together.sum(axis=1)
    return float(probability.mean())


@torch.no_grad()
def sample_validity(task, demasker, steps, num=512, encoder=None, temperature=1.0, remasking="random",
                    batch_size=256, seed=0):
    """Sample `num` sequences at `steps` steps; guided (encoder given) uses z_0 = h_phi(x) of fresh valid x.

    Returns {"valid": fraction valid, "distinct_valid": distinct valid sequences / min(num, A^P)}."""
    generator = torch.Generator().manual_seed(seed)
    valid, seen = 0, set()
    for first in range(0, num, batch_size):
        count = min(batch_size, num - first)
        registers = encoder(task.sample(count, generator)) if encoder is not None else None
        prompt = torch.full((count, 1), task.bos_id, dtype=torch.long)
        x, _ = generate(demasker, prompt, task.length, task.length, steps, temperature, remasking, task.mask_id,
                        registers=registers, generator=generator)
        ok = task.is_valid(x)
        valid += int(ok.sum())
        seen.update(tuple(row) for row in x[ok].tolist())
    return {"valid": valid / num, "distinct_valid": len(seen) / min(num, task.num_valid)}


def run(pairs=4, choices=4, train_steps=400, batch_size=128, num_samples=512, num_registers=2, width=64,
        seed=0, remaskings=("random", "low_confidence"), trials=20000, log=print):
    """The whole experiment: train base and guided, sample at every divisor T of L. Returns a dict."""
    task = TrapTask(pairs, choices)
    L = task.length
    torch.manual_seed(seed)
    base = Demasker(demasker_config(task, width=width))
    encoder = Encoder(encoder_config(task, num_registers, width))
    guided = Demasker(demasker_config(task, register_dim=width, max_registers=num_registers, width=width))
    base_losses = train_mdm(task, base, None, train_steps, batch_size, seed=seed)
    guided_losses = train_mdm(task, guided, encoder, train_steps, batch_size, seed=seed + 1)
    log(f"marginal trap: trained base (final loss {np.mean(base_losses[-20:]):.3f}) and guided "
        f"(final loss {np.mean(guided_losses[-20:]):.3f}) for {train_steps} steps")
    step_list = [T for T in range(L, 0, -1) if L % T == 0]  # L, L/2, ..., 1 for L a power of two
    rows = []
    for T in step_list:
        row = {"steps": T, "tokens_per_step": L / T,
               "optimal_factorized_random": optimal_factorized_validity(task, T, trials, seed)}
        for remasking in remaskings:
            for name, model, enc in (("base", base, None), ("guided", guided, encoder)):
                stats = sample_validity(task, model, T, num_samples, enc, 1.0, remasking, seed=seed + T)
                row[f"{name}_{remasking}"] = stats["valid"]
                row[f"{name}_{remasking}_distinct"] = stats["distinct_valid"]
        rows.append(row)
        log("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    n_valid = task.num_valid
    expected_distinct = n_valid * (1 - (1 - 1 / n_valid) ** num_samples) / min(num_samples, n_valid)
    return {"task": {"pairs": pairs, "choices": choices, "length": L, "num_valid": n_valid,
                     "chance_valid_at_one_step": (1.0 / choices) ** pairs,
                     "distinct_valid_of_uniform_sampling": expected_distinct},
            "training": {"steps": train_steps, "batch_size": batch_size, "width": width,
                         "num_registers": num_registers, "base_final_loss": float(np.mean(base_losses[-20:])),
                         "guided_final_loss": float(np.mean(guided_losses[-20:]))},
            "sampling": {"num_samples": num_samples, "temperature": 1.0, "remasking": list(remaskings),
                         "guided_registers": "oracle prior: h_phi(x) of fresh valid sequences"},
            "rows": rows}
