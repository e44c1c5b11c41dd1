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

The real generators. Beside the oracle row, two learned priors are trained in-process on
the trap's own register bank (`register_bank`: z_0 = h_phi(x) of fresh valid sequences, the frozen trap
encoder) with train_prior.py's objective (`prior_loss`, x0-prediction MSE, App. E block offsets, EMA):
- ConThenDisc (Alg. 2): registers from the unconditional prior (generators.sample_registers, DDIM), then the
  guided MDM with them fixed; it adds the prior's error to the oracle row's demasking;
- ConWithinDisc (Alg. 3): the same start, and once half of the slots are revealed the registers are redrawn
  from the conditional prior given h(x_t) (generators.embed_canvas, the view conditional training takes of
  x^(r), Alg. 4); with one step (every token at once) nothing is refreshed and it equals ConThenDisc.
  What the conditional prior reads of x_t (CONDITIONINGS, one ConWithinDisc row each; docs/conditioning.md):
  "frozen", h_phi(x_t) with the trap's frozen encoder (Alg. 3/4 as written; the row "conwithindisc"); "hmu",
  h_mu(x_t), a copy of h_phi trained jointly with the prior (Sec. 4.3.2 comment iii; train_prior.py
  --train-cond-encoder, its PriorTrainee; the row "conwithindisc_hmu"); "xt", x_t itself through learned token +
  position embeddings trained with the prior (comment ii, `CanvasTokens`; the row "conwithindisc_xt", not run by
  default). h_phi was trained on clean sequences only, so a half-masked canvas is off its training distribution:
  the frozen row's redraw lands below ConThenDisc; the jointly trained h_mu (and x_t) do not.
The trap's sequences carry a BOS prompt, which generators.conthendisc / conwithindisc do not take (they
decode from an all-[M] canvas), so `prior_source` runs Alg. 2 / 3 from the same pieces (sample_registers,
embed_canvas, and conwithindisc's progress rule for the refresh: the first step at which a share
`refresh_at` of the canvas is revealed, the same step as generators.refresh_steps under the fixed schedule).

Threshold decoding (Fast-dLLM; docs/decoding.md): mdm.Decoding(rule="threshold", threshold=tau) reveals every [M] whose
confidence is >= tau (at least one); validity is reported against the MEASURED tokens per step (L / mean
demasker calls per sample). The optimal base model's marginals are 1/A until a partner is revealed, so a base
MDM with tau > 1/A reveals the one forced token of a fresh pair per step, then its (now certain) partner at the
next step: valid, but at one token per step; tau < 1/A reveals everything at step one and falls into the trap.
A guided model is confident everywhere and may reveal the whole sequence at once.

Reported (eval.py marginal-trap): fraction of valid samples vs tokens per step, for base, guided (oracle
registers), ConThenDisc and ConWithinDisc, under random and low-confidence remasking and under threshold
decoding; and distinct valid sequences / min(num, A^P) (a collapse check; exact uniform sampling of the valid
set reaches `distinct_valid_of_uniform_sampling`, below 1 by collisions).

The demo's first stage (demo.sh; about 3 minutes on one core: 180 s measured on a busy 2-core machine, 119 s before
the h_mu row): `python -m experiments.trap_demo` trains the same models and prints, with random remasking, the
fraction valid per tokens revealed per step for the base MDM, the eq. 8 bound, ConThenDisc and ConWithinDisc (one
row per --conditioning: frozen h_phi and h_mu by default), and one line on what Theorem B.1 predicts (--help; --out
writes the table as JSON).
"""

import copy
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


def masked_canvas(task, x, generator):
    """x^(r) of Alg. 4: r ~ U[0, 1], each slot masked ([M]) with probability r; BOS stays, as at sampling time."""
    from dataprep.latent_data import mask_positions
    masked = mask_positions(torch.rand(x.shape, generator=generator), torch.rand(x.shape[0], generator=generator))
    masked[:, 0] = False
    return x.masked_fill(masked, task.mask_id)


def masked_condition(task, encoder, x, generator):
    """h(x^(r)) of Alg. 4 with a frozen encoder: the encoder's view of masked_canvas (generators.embed_canvas,
    what ConWithinDisc presents at sampling time). (B, K, d)."""
    from generators import embed_canvas
    return embed_canvas(encoder, masked_canvas(task, x, generator), task.mask_id, eos_id(task))[0]


def canvas_inputs(task, canvas, pad_id):
    """The (ids, attention_mask, hide) that generators.embed_canvas hands its encoder for a canvas (B, 1 + L), here
    for a conditioning module trained with the prior (h_mu, or CanvasTokens): [M] slots hidden and their ids set to
    pad_id (latent_data.visible_view; embed_canvas runs under no_grad, so the view is rebuilt here)."""
    from dataprep.latent_data import visible_view
    masked = canvas == task.mask_id
    attention_mask, hide = visible_view(canvas, masked, eos_id(task))
    return canvas.masked_fill(masked, pad_id), attention_mask, hide


class CanvasTokens(torch.nn.Module):
    """Sec. 4.3.2 comment (ii): condition the prior on x_t itself rather than on an encoder's registers of it. The
    conditioning sequence is the canvas as learned token + position embeddings (B, 1 + L, d), trained with the
    prior; [M] slots arrive as the pad id (embed_canvas / canvas_inputs), whose embedding is the [M] vector. It
    takes the Encoder's call (ids, attention_mask, hide) and exposes cfg.pad_token_id, so train_prior.PriorTrainee
    and generators.embed_canvas use it in place of an encoder."""

    def __init__(self, task, dim):
        super().__init__()
        from types import SimpleNamespace
        self.cfg = SimpleNamespace(pad_token_id=eos_id(task), hidden_size=dim)
        self.tokens = torch.nn.Embedding(task.vocab_size, dim)
        self.positions = torch.nn.Embedding(task.length + 1, dim)

    def forward(self, input_ids, attention_mask=None, hide=None):
        return self.tokens(input_ids) + self.positions.weight[:input_ids.shape[1]]  # (B, 1 + L, d)


CONDITIONINGS = {  # how ConWithinDisc's conditional prior reads the canvas (Sec. 4.3.2)
    "frozen": "h_phi(x_t), the frozen trap encoder (Alg. 3/4 as written)",
    "hmu": "h_mu(x_t), an encoder initialised from h_phi and trained jointly with the prior (comment iii)",
    "xt": "x_t directly: learned token + position embeddings trained jointly with the prior (comment ii)",
}


def train_prior(task, encoder, conditional=False, steps=800, batch_size=128, bank_size=2048, width=64, lr=3e-3,
                max_offset=0.2, seed=0, conditioning="frozen"):
    """A tiny LatentDiT on the trap's register bank with train_prior.py's loss (Alg. 5; Alg. 4 when
    conditional: cross-attention to h(x^(r))), App. E block offsets, cosine LR, EMA (sampled).
    conditioning (conditional only; CONDITIONINGS): "frozen" h = the trap encoder h_phi; "hmu" h_mu, a copy of
    h_phi trained jointly with the DiT (train_prior.py --train-cond-encoder: PriorTrainee, one AdamW and one EMA
    over both); "xt" CanvasTokens, likewise trained jointly. Prior.encoder is what embeds x_t at sampling time
    (the EMA h_mu / CanvasTokens, or h_phi).
    Returns (generators.Prior, losses). Measured at 4 pairs x 4 choices (256 samples, ConThenDisc at 8 tokens
    per step): 400 steps at lr 1e-3 0.71 valid, 400 at 3e-3 0.81, 1000 at 3e-3 0.98 (the oracle row: 0.99);
    a step costs the same at batch 128 and 256 (overhead-bound), so the defaults take steps, not batch."""
    from generators import Prior
    from latent_dit import DiTConfig, LatentDiT
    from schedules import register_times, sample_base_times
    from train_prior import EMA, PriorTrainee, ema_decay, prior_loss
    if conditional and conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {sorted(CONDITIONINGS)}, not {conditioning!r}")
    joint = conditional and conditioning != "frozen"  # a conditioning module trained with the DiT
    bank, sequences = register_bank(task, encoder, bank_size, seed)
    K, d = bank.shape[1:]
    torch.manual_seed(seed)
    dit = LatentDiT(DiTConfig.tiny(register_dim=d, num_registers=K, hidden_size=width, depth=2, num_heads=4,
                                   cond_dim=d if conditional else None))
    if joint:
        cond_module = (copy.deepcopy(encoder).float() if conditioning == "hmu" else CanvasTokens(task, d))
        model = PriorTrainee(dit, cond_module.train().requires_grad_(True))
    else:
        model = dit
    ema = EMA(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:  # cosine decay to 10%
            group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        rows = torch.randint(0, bank_size, (batch_size,), generator=generator)
        t = register_times(sample_base_times(batch_size, max_offset, True, generator=generator), K, max_offset, True)
        noise = torch.randn(batch_size, K, d, generator=generator)
        if joint:  # PriorTrainee runs the conditioning module on the x^(r) view, with gradients
            ids, attention, hide = canvas_inputs(task, masked_canvas(task, sequences[rows], generator),
                                                 model.cond_encoder.cfg.pad_token_id)
            cond = {"cond_ids": ids, "cond_attention": attention, "cond_hide": hide}
        else:
            cond = {"cond": masked_condition(task, encoder, sequences[rows], generator)} if conditional else {}
        loss = prior_loss(model, bank[rows], t, noise, **cond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update(model, ema_decay(0.999, step))
        losses.append(loss.item())
    if joint:
        return Prior(dit=ema.module.dit, num_registers=K, max_offset=max_offset, block_offsets=True,
                     encoder=ema.module.cond_encoder), losses
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


METHODS = ("base", "guided", "conthendisc", "conwithindisc", "conwithindisc_hmu", "conwithindisc_xt")
LABELS = {"base": "base MDM", "guided": "guided (oracle registers)", "conthendisc": "ConThenDisc (learned prior)",
          "conwithindisc": "ConWithinDisc (learned priors, frozen h_phi)",
          "conwithindisc_hmu": "ConWithinDisc (learned priors, h_mu)",
          "conwithindisc_xt": "ConWithinDisc (learned priors, x_t)"}
CONDITIONING_METHOD = {"frozen": "conwithindisc", "hmu": "conwithindisc_hmu", "xt": "conwithindisc_xt"}
DEFAULT_CONDITIONINGS = ("frozen", "hmu")
THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9, 0.99)


def train_models(task, train_steps, batch_size, num_registers, width, seed, prior_steps=None, log=print,
                 conditionings=DEFAULT_CONDITIONINGS):
    """Base MDM, encoder + guided demasker (Alg. 1), the unconditional prior and one conditional prior per entry of
    `conditionings` (CONDITIONINGS) on the trap encoder's bank. Returns (prior, {conditioning: cond_prior},
    {"base", "guided", "encoder"}, training record). Every prior reseeds (seed + 2, + 3, + 4, + 5), so the
    conditionings asked for do not change one another's numbers."""
    import time
    unknown = set(conditionings) - set(CONDITIONINGS)
    if unknown:
        raise ValueError(f"unknown conditioning {sorted(unknown)}; choose from {sorted(CONDITIONINGS)}")
    torch.manual_seed(seed)
    base = Demasker(demasker_config(task, width=width))
    encoder = Encoder(encoder_config(task, num_registers, width))
    guided = Demasker(demasker_config(task, register_dim=width, max_registers=num_registers, width=width))
    base_losses = train_mdm(task, base, None, train_steps, batch_size, seed=seed)
    guided_losses = train_mdm(task, guided, encoder, train_steps, batch_size, seed=seed + 1)
    prior_train = 2 * train_steps if prior_steps is None else prior_steps
    prior, prior_losses = train_prior(task, encoder, False, prior_train, batch_size, width=width, seed=seed + 2)
    cond_priors, cond_losses, seconds = {}, {}, {}
    for offset, conditioning in enumerate(CONDITIONINGS, start=3):  # fixed seeds: frozen + 3, hmu + 4, xt + 5
        if conditioning in conditionings:
            began = time.time()
            cond_priors[conditioning], cond_losses[conditioning] = train_prior(
                task, encoder, True, prior_train, batch_size, width=width, seed=seed + offset,
                conditioning=conditioning)
            seconds[conditioning] = round(time.time() - began, 1)
    final = {name: float(np.mean(losses[-20:])) for name, losses in (
        ("base_final_loss", base_losses), ("guided_final_loss", guided_losses), ("prior_final_loss", prior_losses),
        *((("cond_prior_final_loss" if c == "frozen" else f"cond_prior_{c}_final_loss"), cond_losses[c])
          for c in cond_priors))}
    log(f"marginal trap: trained base, guided and the priors for {train_steps} / {prior_train} steps: "
        + ", ".join(f"{k} {v:.3f}" for k, v in final.items()))
    return prior, cond_priors, {"base": base, "guided": guided, "encoder": encoder}, {
        "prior_steps": prior_train, "conditionings": list(cond_priors), "cond_prior_seconds": seconds, **final}


def run(pairs=4, choices=4, train_steps=400, batch_size=128, num_samples=512, num_registers=2, width=64,
        seed=0, remaskings=("random", "low_confidence"), trials=20000, thresholds=THRESHOLDS, prior_train_steps=None,
        prior_steps=32, refresh_prior_steps=16, log=print, conditionings=DEFAULT_CONDITIONINGS):
    """The whole experiment: train base and guided (train_steps each) and the priors (prior_train_steps each,
    default 2 x train_steps: the unconditional one and a conditional one per `conditionings` entry, see
    CONDITIONINGS); sample every method at every divisor T of L (fixed schedule), and with threshold decoding at
    each tau. ConWithinDisc's rows: "conwithindisc" (frozen h_phi), "conwithindisc_hmu", "conwithindisc_xt".
    Returns a dict ("rows": fixed, one per T; "threshold_rows": one per method and tau)."""
    task = TrapTask(pairs, choices)
    L = task.length
    prior, cond_priors, models, training = train_models(task, train_steps, batch_size, num_registers, width, seed,
                                                        prior_train_steps, log, conditionings)
    encoder = models["encoder"]
    methods = {"base": (models["base"], None), "guided": (models["guided"], oracle_source(task, encoder)),
               "conthendisc": (models["guided"], prior_source(task, prior, None, prior_steps))}
    for conditioning, cond_prior in cond_priors.items():
        methods[CONDITIONING_METHOD[conditioning]] = (
            models["guided"], prior_source(task, prior, cond_prior, prior_steps, refresh_prior_steps))
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
                         "conditionings": {c: CONDITIONINGS[c] for c in cond_priors},
                         "methods": {m: LABELS[m] for m in methods}},
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
                     "revealed (none at one step); the prior reads h_phi(x_t), the frozen encoder (Alg. 4)",
    "conwithindisc_hmu": "ConWithinDisc with the prior reading h_mu(x_t), an encoder trained jointly with it "
                         "(Sec. 4.3.2 comment iii)",
    "conwithindisc_xt": "ConWithinDisc with the prior reading x_t itself through learned token embeddings "
                        "(Sec. 4.3.2 comment ii)",
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
