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

The real generators (issue 12 item 8). Beside the oracle row, two learned priors are trained in-process on
the trap's own register bank (`register_bank`: z_0 = h_phi(x) of fresh valid sequences, the frozen trap
encoder) with train_prior.py's objective (`prior_loss`, x0-prediction MSE, App. E block offsets, EMA):
- ConThenDisc (Alg. 2): registers from the unconditional prior (generators.sample_registers, DDIM), then the
  guided MDM with them fixed; it adds the prior's error to the oracle row's demasking;
- ConWithinDisc (Alg. 3): the same start, and once half of the slots are revealed the registers are redrawn
  from the conditional prior given h(x_t) (generators.embed_canvas, the view conditional training takes of
  x^(r), Alg. 4); with one step (every token at once) nothing is refreshed and it equals ConThenDisc.
The trap's sequences carry a BOS prompt, which generators.conthendisc / conwithindisc do not take (they
decode from an all-[M] canvas), so `prior_source` runs Alg. 2 / 3 from the same pieces (sample_registers,
embed_canvas, and conwithindisc's progress rule for the refresh: the first step at which a share
`refresh_at` of the canvas is revealed, the same step as generators.refresh_steps under the fixed schedule).

Threshold decoding (issue 14): mdm.Decoding(rule="threshold", threshold=tau) reveals every [M] whose
confidence is >= tau (at least one); validity is reported against the MEASURED tokens per step (L / mean
demasker calls per sample). The optimal base model's marginals are 1/A until a partner is revealed, so a base
MDM with tau > 1/A reveals the one forced token of a fresh pair per step, then its (now certain) partner at the
next step: valid, but at one token per step; tau < 1/A reveals everything at step one and falls into the trap.
A guided model is confident everywhere and may reveal the whole sequence at once.

Reported (eval.py marginal-trap): fraction of valid samples vs tokens per step, for base, guided (oracle
registers), ConThenDisc and ConWithinDisc, under random and low-confidence remasking and under threshold
decoding; and distinct valid sequences / min(num, A^P) (a collapse check; exact uniform sampling of the valid
set reaches `distinct_valid_of_uniform_sampling`, below 1 by collisions).

The demo's first stage (demo.sh; about 1.5 minutes on one core): `python -m experiments.marginal_trap` trains the
same models and prints, with random remasking, the fraction valid per tokens revealed per step for the base
MDM, the eq. 8 bound, ConThenDisc and ConWithinDisc, and one line on what Theorem B.1 predicts (--help; --out
writes the table as JSON).
"""

import argparse
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


# ------------------------------------------------------------------------------------------------
# Learned priors on the trap's register bank (ConThenDisc, ConWithinDisc)
# ------------------------------------------------------------------------------------------------


def eos_id(task):
    return task.mask_id + 1  # never in a sequence: the whole canvas is visible to the encoder


@torch.no_grad()
def register_bank(task, encoder, num, seed=0):
    """The trap's register bank: (z_0 = h_phi(x) (num, K, d) float32, x (num, 1 + L)) of fresh valid x."""
    x = task.sample(num, torch.Generator().manual_seed(seed))
    return encoder(x).float(), x


def masked_condition(task, encoder, x, generator):
    """h(x^(r)) of Alg. 4: r ~ U[0, 1], each slot masked with probability r (BOS stays, as at sampling time),
    then the encoder's view of that canvas (generators.embed_canvas, what ConWithinDisc presents)."""
    from dataprep.latent_data import mask_positions
    from generators import embed_canvas
    masked = mask_positions(torch.rand(x.shape, generator=generator), torch.rand(x.shape[0], generator=generator))
    masked[:, 0] = False
    return embed_canvas(encoder, x.masked_fill(masked, task.mask_id), task.mask_id, eos_id(task))[0]  # (B, K, d)


def train_prior(task, encoder, conditional=False, steps=800, batch_size=128, bank_size=2048, width=64, lr=3e-3,
                max_offset=0.2, seed=0):
    """A tiny LatentDiT on the trap's register bank with train_prior.py's loss (Alg. 5; Alg. 4 when
    conditional: cross-attention to h(x^(r))), App. E block offsets, cosine LR, EMA (sampled).
    Returns (generators.Prior, losses). Measured at 4 pairs x 4 choices (256 samples, ConThenDisc at 8 tokens
    per step): 400 steps at lr 1e-3 0.71 valid, 400 at 3e-3 0.81, 1000 at 3e-3 0.98 (the oracle row: 0.99);
    a step costs the same at batch 128 and 256 (overhead-bound), so the defaults take steps, not batch."""
    from generators import Prior
    from latent_dit import DiTConfig, LatentDiT
    from schedules import register_times, sample_base_times
    from train_prior import EMA, ema_decay, prior_loss
    bank, sequences = register_bank(task, encoder, bank_size, seed)
    K, d = bank.shape[1:]
    torch.manual_seed(seed)
    dit = LatentDiT(DiTConfig.tiny(register_dim=d, num_registers=K, hidden_size=width, depth=2, num_heads=4,
                                   cond_dim=d if conditional else None))
    ema = EMA(dit)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:  # cosine decay to 10%
            group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        rows = torch.randint(0, bank_size, (batch_size,), generator=generator)
        t = register_times(sample_base_times(batch_size, max_offset, True, generator=generator), K, max_offset, True)
        noise = torch.randn(batch_size, K, d, generator=generator)
        cond = {"cond": masked_condition(task, encoder, sequences[rows], generator)} if conditional else {}
        loss = prior_loss(dit, bank[rows], t, noise, **cond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        optimizer.step()
        ema.update(dit, ema_decay(0.999, step))
        losses.append(loss.item())
    return Prior(dit=ema.module, num_registers=K, max_offset=max_offset, block_offsets=True,
                 encoder=encoder if conditional else None), losses


def oracle_source(task, encoder):
    """Registers for sample_validity: z_0 = h_phi(x) of fresh valid x (the oracle prior), no refresh."""
    return lambda count, generator: (encoder(task.sample(count, generator)), None)


def prior_source(task, prior, cond_prior=None, prior_steps=32, refresh_prior_steps=16, refresh_at=0.5):
    """Registers for sample_validity from a learned prior: ConThenDisc (cond_prior None: z_0 ~ G_psi, fixed) or
    ConWithinDisc (then one redraw z_0 ~ G_psi(eps, h(x_t)) at the first step at which a share refresh_at of
    the slots is revealed, and < 1: conwithindisc's progress rule). Returns callable(count, generator) ->
    (registers (count, K, d), refresh_registers hook | None)."""
    from generators import embed_canvas, sample_registers

    def source(count, generator):
        registers, _ = sample_registers(prior, count, prior_steps, generator=generator)
        if cond_prior is None:
            return registers, None
        done = []

        def refresh(step, x, old, register_mask):
            revealed = float((x[:, 1:] != task.mask_id).float().mean())
            if done or not refresh_at <= revealed < 1:
                return None
            done.append(step)
            cond, cond_mask = embed_canvas(cond_prior.encoder, x, task.mask_id, eos_id(task))
            new, _ = sample_registers(cond_prior, count, refresh_prior_steps, cond, cond_mask, generator=generator)
            return new, None
        return registers, refresh
    return source


# ------------------------------------------------------------------------------------------------
# Sampling and the whole experiment
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_validity(task, demasker, steps, num=512, encoder=None, temperature=1.0, remasking="random",
                    batch_size=256, seed=0, source=None, decoding=None):
    """Sample `num` sequences at `steps` steps (the fixed rule; `decoding`: an mdm.Decoding, e.g. threshold).
    Registers: `source` (oracle_source / prior_source), else the oracle h_phi(x) of fresh valid x when an
    encoder is given, else none (the base MDM).

    Returns {"valid": fraction valid, "distinct_valid": distinct valid sequences / min(num, A^P),
    "tokens_per_step": L / mean demasker calls per sample (measured)}."""
    if source is None and encoder is not None:
        source = oracle_source(task, encoder)
    generator = torch.Generator().manual_seed(seed)
    valid, seen, calls = 0, set(), []
    for first in range(0, num, batch_size):
        count = min(batch_size, num - first)
        registers, refresh = source(count, generator) if source is not None else (None, None)
        prompt = torch.full((count, 1), task.bos_id, dtype=torch.long)
        stats = {}
        x, _ = generate(demasker, prompt, task.length, task.length, steps, temperature, remasking, task.mask_id,
                        registers=registers, generator=generator, refresh_registers=refresh, decoding=decoding,
                        stats=stats)
        ok = task.is_valid(x)
        valid += int(ok.sum())
        seen.update(tuple(row) for row in x[ok].tolist())
        calls += stats["nfe_per_sample"]
    return {"valid": valid / num, "distinct_valid": len(seen) / min(num, task.num_valid),
            "tokens_per_step": task.length / float(np.mean(calls))}


METHODS = ("base", "guided", "conthendisc", "conwithindisc")
LABELS = {"base": "base MDM", "guided": "guided (oracle registers)", "conthendisc": "ConThenDisc (learned prior)",
          "conwithindisc": "ConWithinDisc (learned priors)"}
THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9, 0.99)


def train_models(task, train_steps, batch_size, num_registers, width, seed, prior_steps=None, log=print):
    """Base MDM, encoder + guided demasker (Alg. 1), and the two priors on the trap encoder's bank. Returns
    (prior, cond_prior, {"base", "guided", "encoder"}, training record)."""
    torch.manual_seed(seed)
    base = Demasker(demasker_config(task, width=width))
    encoder = Encoder(encoder_config(task, num_registers, width))
    guided = Demasker(demasker_config(task, register_dim=width, max_registers=num_registers, width=width))
    base_losses = train_mdm(task, base, None, train_steps, batch_size, seed=seed)
    guided_losses = train_mdm(task, guided, encoder, train_steps, batch_size, seed=seed + 1)
    prior_train = 2 * train_steps if prior_steps is None else prior_steps
    prior, prior_losses = train_prior(task, encoder, False, prior_train, batch_size, width=width, seed=seed + 2)
    cond_prior, cond_losses = train_prior(task, encoder, True, prior_train, batch_size, width=width, seed=seed + 3)
    final = {name: float(np.mean(losses[-20:])) for name, losses in (
        ("base_final_loss", base_losses), ("guided_final_loss", guided_losses),
        ("prior_final_loss", prior_losses), ("cond_prior_final_loss", cond_losses))}
    log(f"marginal trap: trained base, guided and both priors for {train_steps} / {prior_train} steps: "
        + ", ".join(f"{k} {v:.3f}" for k, v in final.items()))
    return prior, cond_prior, {"base": base, "guided": guided, "encoder": encoder}, {
        "prior_steps": prior_train, **final}


def run(pairs=4, choices=4, train_steps=400, batch_size=128, num_samples=512, num_registers=2, width=64,
        seed=0, remaskings=("random", "low_confidence"), trials=20000, thresholds=THRESHOLDS, prior_train_steps=None,
        prior_steps=32, refresh_prior_steps=16, log=print):
    """The whole experiment: train base and guided (train_steps each) and the two priors (prior_train_steps
    each, default 2 x train_steps); sample every method at every divisor T of L (fixed schedule), and with
    threshold decoding at each tau. Returns a dict ("rows": fixed, one per T; "threshold_rows": one per method
    and tau)."""
    task = TrapTask(pairs, choices)
    L = task.length
    prior, cond_prior, models, training = train_models(task, train_steps, batch_size, num_registers, width, seed,
                                                       prior_train_steps, log)
    encoder = models["encoder"]
    methods = {"base": (models["base"], None), "guided": (models["guided"], oracle_source(task, encoder)),
               "conthendisc": (models["guided"], prior_source(task, prior, None, prior_steps)),
               "conwithindisc": (models["guided"], prior_source(task, prior, cond_prior, prior_steps,
                                                                refresh_prior_steps))}
    step_list = [T for T in range(L, 0, -1) if L % T == 0]  # L, L/2, ..., 1 for L a power of two
    rows = []
    for T in step_list:
        row = {"steps": T, "tokens_per_step": L / T,
               "optimal_factorized_random": optimal_factorized_validity(task, T, trials, seed)}
        for remasking in remaskings:
            for name, (model, source) in methods.items():
                stats = sample_validity(task, model, T, num_samples, remasking=remasking, seed=seed + T, source=source)
                row[f"{name}_{remasking}"] = stats["valid"]
                row[f"{name}_{remasking}_distinct"] = stats["distinct_valid"]
        rows.append(row)
        log("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    threshold_rows = threshold_sweep(task, methods, thresholds, num_samples, seed, log)
    n_valid = task.num_valid
    expected_distinct = n_valid * (1 - (1 - 1 / n_valid) ** num_samples) / min(num_samples, n_valid)
    return {"task": {"pairs": pairs, "choices": choices, "length": L, "num_valid": n_valid,
                     "chance_valid_at_one_step": (1.0 / choices) ** pairs,
                     "distinct_valid_of_uniform_sampling": expected_distinct},
            "training": {"steps": train_steps, "batch_size": batch_size, "width": width,
                         "num_registers": num_registers, **training},
            "sampling": {"num_samples": num_samples, "temperature": 1.0, "remasking": list(remaskings),
                         "thresholds": list(thresholds), "prior_steps": prior_steps,
                         "refresh_prior_steps": refresh_prior_steps, "refresh_at": 0.5,
                         "guided_registers": "oracle prior: h_phi(x) of fresh valid sequences",
                         "methods": dict(LABELS)},
            "rows": rows, "threshold_rows": threshold_rows}


def threshold_sweep(task, methods, thresholds, num_samples, seed, log=print):
    """Every method with mdm.Decoding(rule="threshold", threshold=tau): validity vs measured tokens per step."""
    from mdm import Decoding
    rows = []
    for tau in thresholds:
        for name, (model, source) in methods.items():
            stats = sample_validity(task, model, task.length, num_samples, remasking="low_confidence",
                                    seed=seed + 1000, source=source, decoding=Decoding(rule="threshold", threshold=tau))
            rows.append({"method": name, "threshold": tau, **stats})
        log(f"  threshold {tau}: " + ", ".join(f"{r['method']} {r['valid']:.3f} valid at {r['tokens_per_step']:.2f} "
                                             "tokens/step" for r in rows[-len(methods):]))
    return rows


# ------------------------------------------------------------------------------------------------
# Tables and plots (eval.py marginal-trap)
# ------------------------------------------------------------------------------------------------

WHAT_ROWS_SHOW = {
    "base": "a plain MDM: it cannot beat the factorised bound of eq. (8) (Theorem B.1's independence gap)",
    "guided": "the demasking stage of Theorem B.1 alone: registers of fresh valid sequences, an oracle prior",
    "conthendisc": "generation (Alg. 2): registers from a prior trained on the trap's bank; the gap to the oracle "
                   "row is the prior's error",
    "conwithindisc": "generation (Alg. 3): ConThenDisc plus one redraw from the conditional prior at half the slots "
                     "revealed (none at one step)",
}


def report(result):
    """(markdown text, report.panel dicts) of a run() result: one table per remasking (fixed schedule), one for
    threshold decoding (validity at the measured tokens per step), and what each row shows."""
    from evaluation.report import md_table, panel
    task, rows = result["task"], result["rows"]
    methods = [m for m in METHODS if f"{m}_{result['sampling']['remasking'][0]}" in rows[0]]
    sections = [f"{task['pairs']} pairs over {task['choices']} choices ({task['num_valid']} valid sequences of "
                f"{task['length']} tokens), {result['sampling']['num_samples']} samples per point; fraction of "
                "valid samples. Rows:\n\n" + "\n".join(f"- {LABELS[m]}: {WHAT_ROWS_SHOW[m]}" for m in methods)]
    x = [r["tokens_per_step"] for r in rows]
    panels = []
    for remasking in result["sampling"]["remasking"]:
        headers = ["tokens/step"] + (["best factorised (eq. 8)"] if remasking == "random" else [])
        sections.append(f"Fixed schedule (LLaDA's), {remasking} remasking:\n\n" + md_table(
            headers + [LABELS[m] for m in methods],
            [[f"{r['tokens_per_step']:g}"] + ([f"{r['optimal_factorized_random']:.3f}"] if remasking == "random" else [])
             + [f"{r[f'{m}_{remasking}']:.3f}" for m in methods] for r in rows]))
        series = {LABELS[m]: (x, [r[f"{m}_{remasking}"] for r in rows]) for m in methods}
        if remasking == "random":
            series["best factorised (eq. 8)"] = (x, [r["optimal_factorized_random"] for r in rows])
        panels.append(panel(f"App. B: valid vs tokens per step ({remasking})", "tokens revealed per step",
                            "fraction valid", series, logx=True))
    by_tau = result.get("threshold_rows") or []
    if by_tau:
        taus = sorted({r["threshold"] for r in by_tau})
        cell = {(r["method"], r["threshold"]): r for r in by_tau}
        sections.append("Threshold decoding (every [M] with confidence >= tau, at least one per step): fraction "
                        "valid @ measured tokens per step:\n\n" + md_table(
                            ["tau"] + [LABELS[m] for m in methods],
                            [[f"{tau:g}"] + [f"{cell[m, tau]['valid']:.3f} @ {cell[m, tau]['tokens_per_step']:.2f}"
                                             for m in methods] for tau in taus]))
        points = {m: sorted((cell[m, t]["tokens_per_step"], cell[m, t]["valid"]) for t in taus) for m in methods}
        panels.append(panel("App. B: threshold decoding", "measured tokens per step", "fraction valid",
                            {LABELS[m]: ([x for x, _ in p], [y for _, y in p]) for m, p in points.items()}, logx=True))
    return "\n\n".join(sections), panels


# ------------------------------------------------------------------------------------------------
# Command line: the demo's first stage (python -m experiments.marginal_trap)
# ------------------------------------------------------------------------------------------------

DEMO_ROWS = (  # (key in run()'s rows, label); run() also samples the oracle-register row, not shown here
    ("base_random", "base MDM (Demasker, no registers)"),
    ("optimal_factorized_random", "best factorised sampler (eq. 8 bound)"),
    ("conthendisc_random", "ConThenDisc (Alg. 2, learned prior)"),
    ("conwithindisc_random", "ConWithinDisc (Alg. 3, redraw at 1/2)"),
)


def demo_table(result):
    """run() result -> {"tokens_per_step": [1, 2, ..., L], "rows": [{"method", "label", "valid": [...]}]}: the
    fraction of valid samples (random remasking) per tokens revealed per step, one row per DEMO_ROWS entry."""
    rows = result["rows"]
    return {"tokens_per_step": [r["tokens_per_step"] for r in rows],
            "rows": [{"method": key.removesuffix("_random"), "label": label, "valid": [r[key] for r in rows]}
                     for key, label in DEMO_ROWS]}


def demo_text(table, length):
    """The printed table (methods as rows, tokens per step as columns) and the one-line reading."""
    width = max(len(label) for _, label in DEMO_ROWS)
    lines = [f"{'fraction valid / tokens per step':<{width}}" + "".join(f"{t:>7g}" for t in table["tokens_per_step"])]
    lines += [f"{row['label']:<{width}}" + "".join(f"{v:>7.3f}" for v in row["valid"]) for row in table["rows"]]
    valid = {row["method"]: row["valid"][-1] for row in table["rows"]}  # at L tokens per step (one step)
    reading = (f"Theorem B.1 predicts: a per-token (factorised) sampler that reveals coupled tokens in the same step "
               f"cannot beat the eq. 8 bound (up to sampling noise); registers drawn first carry the coupling, so "
               f"ConThenDisc stays valid with many tokens per step. Here, all {length:g} in one step: base "
               f"{valid['base']:.3f}, bound {valid['optimal_factorized']:.3f}, ConThenDisc {valid['conthendisc']:.3f}.")
    return "\n".join(lines), reading


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.marginal_trap",
        description="The marginal trap (App. B, Theorem B.1) in about 1.5 minutes on one CPU core: train the trap's "
                    "tiny base MDM, encoder + guided demasker (Alg. 1) and the two latent priors, then print the "
                    "fraction of valid samples per tokens revealed per step for the base MDM, the best factorised "
                    "sampler (eq. 8), ConThenDisc and ConWithinDisc, with random remasking. The full experiment "
                    "(low-confidence remasking, threshold decoding, the oracle-register row) is eval.py marginal-trap.")
    a = parser.add_argument
    a("--pairs", type=int, default=4, help="coupled (subject, object) pairs per sequence; length L = 2 x pairs "
      "tokens, and the table's columns are the tokens per step L/T for every divisor T of L (default: 4)")
    a("--choices", type=int, default=4, help="subjects per slot A; one step over L tokens is valid by chance "
      "with probability (1/A)^pairs (default: 4, so 1/256)")
    a("--train-steps", type=int, default=400, help="training steps of the base MDM and of the encoder + guided "
      "demasker (default: 400)")
    a("--prior-train-steps", type=int, default=1500, help="training steps of each latent prior (unconditional for "
      "ConThenDisc, conditional for ConWithinDisc's redraw) on the trap's register bank (default: 1500; at 800 "
      "ConThenDisc's one-step validity varies more between seeds)")
    a("--samples", type=int, default=512, help="samples per method and tokens-per-step point (default: 512)")
    a("--trials", type=int, default=5000, help="Monte Carlo reveal orders for the eq. 8 bound (default: 5000)")
    a("--seed", type=int, default=0, help="seed of the models, the training batches and the samples (default: 0)")
    a("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default, one per core; default: 1, "
      "the fastest for these tiny models)")
    a("--out", help="also write the table as JSON here (tokens_per_step, rows of {method, label, valid}, the "
      "reading, the settings and the seconds taken)")
    a("--reuse", action="store_true", help="with --out: when that file exists and was written with the same "
      "settings, print its table instead of training again (demo.sh reruns use this)")
    args = parser.parse_args(argv)
    if args.reuse and not args.out:
        parser.error("--reuse needs --out (the table to reuse)")
    from infra import guards
    for name in ("pairs", "train_steps", "prior_train_steps", "samples", "trials"):
        guards.check_range(parser, args, name, low=1, integer=True)
    guards.check_range(parser, args, "choices", low=2, integer=True)
    guards.check_range(parser, args, "threads", low=0, integer=True)
    return args


SETTINGS = ("pairs", "choices", "train_steps", "prior_train_steps", "samples", "trials", "seed")


def main(argv=None):
    """Train, print the heading, the table and the reading; write the JSON (--out). Returns the JSON payload."""
    import json
    import time
    from pathlib import Path
    args = parse_args(argv)
    settings = {name: getattr(args, name) for name in SETTINGS}  # what the numbers depend on (not --threads)
    task = TrapTask(args.pairs, args.choices)
    heading = (f"The marginal trap (App. B): sequences of {task.length} tokens in {args.pairs} coupled pairs over "
               f"{args.choices} choices ({task.num_valid} valid); {args.samples} samples per point, random remasking")
    if args.reuse and Path(args.out).is_file():
        try:
            saved = json.loads(Path(args.out).read_text())
        except ValueError:
            saved = {}
        if saved.get("settings") == settings:
            print(f"{heading} (reused: {args.out}, {saved['seconds']:g} s when it ran)")
            print(saved["text"])
            print(saved["reading"])
            return saved
        print(f"{args.out} was written with other settings (or is unreadable): training again")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    print(f"{heading}; training {args.train_steps} + {args.train_steps} + 2 x {args.prior_train_steps} steps "
          "first ...", flush=True)
    result = run(pairs=args.pairs, choices=args.choices, train_steps=args.train_steps, num_samples=args.samples,
                 seed=args.seed, remaskings=("random",), trials=args.trials, thresholds=(),
                 prior_train_steps=args.prior_train_steps, log=lambda message: None)
    table = demo_table(result)
    text, reading = demo_text(table, task.length)
    print(text)
    print(reading)
    payload = {**table, "text": text, "reading": reading, "task": result["task"], "settings": settings,
               "threads": args.threads, "seconds": round(time.time() - start, 1), "training": result["training"]}
    if args.out:
        from infra.atomic import write_json
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
