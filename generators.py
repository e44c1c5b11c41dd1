"""The two hybrid text generators of CRoCoDiL and the latent sampler they share.

Paper map (arXiv 2603.20210):
- Latent sampling, App. E: DDIM (eta = 0) from Gaussian noise with the x0-predicting DiT g_psi (latent_dit.py)
  over the cosine DDPM schedule (schedules.py), `prior_steps` denoiser calls (paper: 128). Register j runs at
  clip(t + Delta_b(j), 0, 1) as in training (schedules.register_times) while the base time t walks the grid
  from 1 down to -max_offset, so later blocks are always noisier and every block ends at 0. The result is
  renormalised to norm sqrt(d) per register (App. C), the encoder's scale. `sample_registers`.
- ConThenDisc, Alg. 2 (Sec. 4.3.1): z_0 ~ G_psi(eps) from the unconditional prior, then the guided MDM
  (mdm.generate with the registers fixed at every step). `conthendisc`.
- ConWithinDisc, Alg. 3 (Sec. 4.3.2, App. G): the same guided MDM, but before the steps at fractions
  `refresh_at` of the loop (default 0.5, App. G's best setting) the registers are redrawn from the
  conditional prior, z_0 ~ G_psi(eps, h(x_t)), with its own number of DDIM steps (paper: 32). h(x_t): the
  encoder's registers of the canvas with the [M] positions hidden, the view conditional training takes
  (Alg. 4; `embed_canvas`). Alg. 3 refreshes at every step; a subset is the variant the paper evaluates
  (Sec. 4.3.2 comment (i)); refresh_at = () is ConThenDisc exactly (tested). The first registers come from
  the unconditional prior (App. G: "@0 is ConThenDisc"), without one from the conditional prior given the
  all-[M] canvas (Alg. 3 line 6 at t = 1). `conwithindisc`.
- Tokenizers: with one shared tokenizer (the tiny setting) h embeds x_t directly; with the paper's pair (Qwen3
  / LLaDA) the canvas goes through cross_tokenizer's view (visible runs re-tokenised for the encoder, hidden
  slots over the gaps): Prior.view, built by load_prior from prior.json's "cross_tokenizer".

Every generator returns its tokens and a cost report: NFE as the paper counts it (demasker calls plus the
other models' calls weighted by parameters, Sec. 5 footnote 4), a FLOP-based equivalent and the seconds per
sample (evaluation/nfe.py, whose names are re-exported here).
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from evaluation.nfe import (  # noqa: F401  (the NFE / FLOP names, re-exported)
    _clock, config_param_count, demasker_flops, dit_flops, encoder_flops, nfe_report, paper_nfe, param_count)
from infra.atomic import read_json
from mdm import LLADA, _model_device, _resolve_mask_id, check_schedule, generate, mdm_loop
from schedules import base_time_range, ddim_step, register_blocks, register_times

PRIOR_SETTINGS_FILE = "prior.json"  # written by train_prior.py next to dit/


@dataclass
class Prior:
    """g_psi plus the settings sampling must repeat from training (train_prior.py's prior.json)."""
    dit: torch.nn.Module                  # LatentDiT (EMA weights), x0-prediction
    num_registers: int                    # K modelled (the first K registers of the encoder's bank)
    max_offset: float = 0.0               # App. E block offset of the last block
    block_offsets: bool = True            # False = the ablation (all registers at the same time)
    encoder: Optional[torch.nn.Module] = None  # conditional prior: the encoder that embeds x_t
    shared_tokenizer: bool = True         # encoder and demasker read the same token ids
    view: Optional[object] = None         # cross_tokenizer view of a demasker canvas (None: shared ids)

    @property
    def conditional(self):
        return bool(self.dit.cfg.cond_dim)


# ------------------------------------------------------------------------------------------------
# Latent sampling (App. E): DDIM with per-register block times
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_registers(prior, batch_size, steps=128, cond=None, cond_mask=None, generator=None, z_init=None,
                     t_start=1.0):
    """z_0 ~ G_psi(eps [, cond]): deterministic DDIM over the base-time grid (App. E).

    batch_size: B. steps: denoiser calls. cond (B, S, cond_dim), cond_mask (B, S) bool | None: the
    conditioning of a conditional prior. generator: the source of the initial noise (the only random
    draw). z_init (B, K, d) and t_start: start from a given noisy bank at base time t_start instead of
    pure noise at 1 (tests; register-space editing). The grid runs from t_start to -max_offset (0
    without offsets) so that every block ends at time 0. Returns (registers (B, K, d) float32 of norm
    sqrt(d) each, denoiser calls).
    """
    dit = prior.dit
    K, d = prior.num_registers, dit.cfg.register_dim
    device = _model_device(dit)
    dtype = next(dit.parameters()).dtype  # the condition follows the DiT's dtype (bf16 / fp16 runs)
    cond = cond.to(dtype) if cond is not None else None
    lo, _ = base_time_range(prior.max_offset, prior.block_offsets)
    z = _randn((batch_size, K, d), generator, device) if z_init is None else z_init.to(device, torch.float32)
    grid = torch.linspace(t_start, lo, steps + 1, dtype=torch.float64)  # = ddim_timesteps(steps, lo) from 1
    blocks = (K, prior.max_offset, prior.block_offsets)
    for i in range(steps):
        t = register_times(grid[i].expand(batch_size), *blocks).to(device)  # (B, K) per-register times
        t_next = register_times(grid[i + 1].expand(batch_size), *blocks).to(device)
        z0_hat = dit(z.to(dtype), t, cond, cond_mask).float()  # (B, K, d)
        z = ddim_step(z, z0_hat, t, t_next)
    return F.normalize(z, dim=-1) * math.sqrt(d), steps


def _randn(shape, generator, device):
    """N(0, I) drawn on the generator's device (a CPU generator also serves a CUDA model), then moved."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source).to(device)


@torch.no_grad()
def embed_canvas(encoder, x, mask_id, eos_id, view=None):
    """h(x_t) for ConWithinDisc: the encoder's registers of the canvas x (B, L) with [M] positions hidden
    and the text after the first visible EOS treated as padding, the same view conditional training builds
    from x^(r). view None (one shared tokenizer): latent_data.visible_view on x itself, hidden ids replaced
    by the encoder's pad id so that the [M] id need not exist in its vocabulary. view (cross_tokenizer): the
    canvas re-tokenised for the encoder, hidden slots over the masked runs.
    Returns (cond (B, Kc, d), cond_mask None: all valid)."""
    masked = x == mask_id  # (B, L)
    if view is None:
        from dataprep.latent_data import visible_view
        attention_mask, hide = visible_view(x, masked, eos_id)
        ids = x.masked_fill(masked, encoder.cfg.pad_token_id)
    else:
        ids, attention_mask, hide = view(x, masked)
    device = _model_device(encoder)
    cond = encoder(ids.to(device), attention_mask=attention_mask.to(device), hide=hide.to(device))
    return cond.float(), None  # (B, Kc, d)


# ------------------------------------------------------------------------------------------------
# ConThenDisc (Alg. 2)
# ------------------------------------------------------------------------------------------------


def conthendisc(demasker, prior, batch_size, gen_length=256, block_length=None, steps=None, temperature=0.0,
                remasking="low_confidence", mask_id=None, prior_steps=128, generator=None,
                prior_generator=None, decoding=None, stats=None, keep=None):
    """Alg. 2: registers from the unconditional prior, then the guided MDM with them fixed.

    keep: the demasker reads the first k registers of the sampled bank (a prior over all K = 128, the
    paper's 1024 x 128 latent, serving any k); None = all the prior models.
    block_length defaults to gen_length (one block, the paper's setting), steps to gen_length.
    generator: the MDM's random stream (sample.generate); prior_generator: the prior's initial noise
    (None = the global RNG, drawn before the MDM's draws). decoding, stats: mdm.Decoding (adaptive rules,
    guidance, random stream) and the per-sample statistics dict of mdm.mdm_loop.
    Returns (tokens (B, gen_length), nfe_report).
    """
    _check_prior(prior, demasker, "prior", conditional=False, keep=keep)
    block_length, steps = block_length or gen_length, steps or gen_length
    check_schedule(gen_length, block_length, steps)
    device = _model_device(demasker)
    started = _clock(device)
    # lines 2-3: eps ~ N(0, I), z_0 <- G_psi(eps)
    registers, prior_calls = sample_registers(prior, batch_size, prior_steps, generator=prior_generator)
    # lines 4-11: the guided MDM from x_1 = all [M], z_0 fixed
    tokens, calls = generate(demasker, batch_size, gen_length, block_length, steps, temperature, remasking,
                             mask_id, registers=_first(registers, keep), generator=generator,
                             decoding=decoding, stats=stats)
    return tokens, nfe_report(demasker.cfg, gen_length, keep or prior.num_registers, calls, prior,
                              prior_calls, demasker_params=param_count(demasker),
                              seconds=_clock(device) - started, batch_size=batch_size)


# ------------------------------------------------------------------------------------------------
# ConWithinDisc (Alg. 3)
# ------------------------------------------------------------------------------------------------


def conwithindisc(demasker, cond_prior, batch_size, gen_length=256, block_length=None, steps=None,
                  temperature=0.0, remasking="low_confidence", mask_id=None, prior=None, prior_steps=128,
                  refresh_at=(0.5,), refresh_prior_steps=32, generator=None, prior_generator=None,
                  on_refresh=None, decoding=None, stats=None, keep=None):
    """Alg. 3 / App. G: the guided MDM whose registers are redrawn from P(z | h(x_t)) at `refresh_at`.

    prior: the unconditional prior for the initial registers (None: the conditional prior given the
    all-[M] canvas). refresh_prior_steps: DDIM steps of each redraw (paper: 32). on_refresh: optional
    callable(step, x, old_registers, new_registers) for inspection. With an adaptive decoding rule
    (threshold, factor) the number of steps is not known in advance: see refresh_due. keep: the demasker
    reads the first k registers of every bank drawn (initial and refreshed; on_refresh sees those). Other
    arguments as conthendisc. Returns (tokens (B, gen_length), nfe_report).
    """
    _check_conditional(cond_prior, demasker, keep)
    block_length, steps = block_length or gen_length, steps or gen_length
    check_schedule(gen_length, block_length, steps)
    mask_id, eos_id = _resolve_mask_id(demasker, mask_id), demasker.cfg.eos_token_id
    device = _model_device(demasker)
    started = _clock(device)
    counts = {"prior": 0, "cond_prior": 0, "encoder": 0}

    def draw(canvas, denoiser_steps):  # lines 5-6: eps ~ N(0, I), z_0 <- G_psi(eps, h(x_t))
        cond, cond_mask = embed_canvas(cond_prior.encoder, canvas, mask_id, eos_id, cond_prior.view)
        counts["encoder"] += 1
        registers, calls = sample_registers(cond_prior, batch_size, denoiser_steps, cond, cond_mask,
                                            generator=prior_generator)
        counts["cond_prior"] += calls
        return _first(registers, keep)

    x = torch.full((batch_size, gen_length), mask_id, dtype=torch.long, device=device)  # lines 2-3: all [M]
    if prior is not None:  # App. G: the first registers from the unconditional prior (Alg. 2 lines 2-3)
        _check_prior(prior, demasker, "prior", conditional=False, keep=keep)
        registers, counts["prior"] = sample_registers(prior, batch_size, prior_steps,
                                                      generator=prior_generator)
        registers = _first(registers, keep)
    else:
        registers = draw(x, prior_steps)
    due = refresh_due(refresh_at, steps, (decoding or LLADA).rule != "fixed", mask_id)

    def refresh(step, x, old, register_mask):  # called by the MDM loop before each step's line 7
        if not due(step, x):
            return None
        new = draw(x, refresh_prior_steps)
        if on_refresh is not None:
            on_refresh(step, x, old, new)
        return new, None

    # lines 4-10: the guided MDM, the registers redrawn where due
    tokens, calls = mdm_loop(demasker, x, 0, block_length, steps, temperature, remasking, mask_id,
                             registers=registers, generator=generator, decoding=decoding, stats=stats,
                             refresh_registers=refresh if due is not None else None)
    return tokens, nfe_report(demasker.cfg, gen_length, keep or cond_prior.num_registers, calls, prior,
                              counts["prior"], cond_prior, counts["cond_prior"], counts["encoder"],
                              demasker_params=param_count(demasker), seconds=_clock(device) - started,
                              batch_size=batch_size)


def refresh_steps(refresh_at, steps):
    """Fractions of the MDM loop -> the set of step indices before which the registers are redrawn.

    A fraction a in [0, 1) refreshes before step round(a * steps) (a = 0.5 with 32 steps: before the
    17th demasker call, 16 steps done). a = 0 means no refresh (App. G's @0 reference = ConThenDisc)."""
    chosen = set()
    for fraction in refresh_at:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"refresh fractions must lie in [0, 1) (0 = no refresh), got {fraction}")
        step = round(fraction * steps)
        if fraction > 0 and 0 < step < steps:
            chosen.add(step)
    return chosen


def refresh_due(refresh_at, steps, adaptive, mask_id):
    """When ConWithinDisc redraws: due(step, x) -> bool, or None when it never does. The fixed rule: before
    the steps of refresh_steps. The adaptive rules: a fraction a refreshes before the first step at which a
    share a of the canvas x (B, L) is revealed (once per fraction)."""
    when = refresh_steps(refresh_at, steps)
    if not adaptive:
        return (lambda step, x: step in when) if when else None
    pending = sorted(fraction for fraction in set(refresh_at) if fraction > 0)

    def due(step, x):
        if not pending:  # every refresh done: no more host syncs
            return False
        revealed = float((x != mask_id).float().mean())  # share of the canvas revealed so far
        if revealed >= pending[0] and revealed < 1:
            while pending and revealed >= pending[0]:
                pending.pop(0)
            return True
        return False

    return due if pending else None


# ------------------------------------------------------------------------------------------------
# Checks and loading a trained prior
# ------------------------------------------------------------------------------------------------


def _first(registers, keep):
    """The registers the demasker reads: the first k of the bank (B, K, d) -> (B, k, d); keep None: all."""
    return registers if keep is None else registers[:, :keep]


def _check_prior(prior, demasker, name, conditional, keep=None):
    cfg = demasker.cfg
    if keep is not None and not 1 <= keep <= prior.num_registers:
        raise ValueError(f"keep={keep}: the demasker reads the first k of the {prior.num_registers} "
                         f"registers {name} models; choose 1 <= keep <= {prior.num_registers}")
    if prior.conditional != conditional:
        kind = "conditional (cond_dim set)" if conditional else "unconditional"
        raise ValueError(f"{name} must be an {kind} prior; got the other kind. Train it with train_prior.py"
                         + (" --conditional" if conditional else " (without --conditional)"))
    if prior.dit.cfg.register_dim != cfg.register_dim:
        raise ValueError(f"{name} samples registers of width {prior.dit.cfg.register_dim} but the demasker "
                         f"reads register_dim={cfg.register_dim}; use the prior trained on this AE run's "
                         f"encoder")
    if (keep or prior.num_registers) > cfg.max_registers:
        raise ValueError(f"{name} feeds {keep or prior.num_registers} registers but the demasker takes at "
                         f"most max_registers={cfg.max_registers}; pass keep <= that, or train the prior "
                         f"with --num-registers <= that")


def _check_conditional(cond_prior, demasker, keep):
    """ConWithinDisc's prior: conditional, with an encoder and, over two tokenizers, its view."""
    _check_prior(cond_prior, demasker, "cond_prior", conditional=True, keep=keep)
    if not cond_prior.shared_tokenizer and cond_prior.view is None:
        raise ValueError(
            "this conditional prior's encoder has its own tokenizer, and ConWithinDisc needs the "
            "cross-tokenizer view it was trained with (prior.json 'cross_tokenizer': slots_per_token); a "
            "prior.json without it belongs to a prior that masked the encoder's ids, not the demasker's "
            "canvas: retrain it with train_prior.py --conditional (or set Prior.view to a "
            "cross_tokenizer.CrossTokenizerView)")
    if cond_prior.encoder is None:
        raise ValueError("cond_prior has no encoder to embed x_t; load it with generators.load_prior")


def check_prior_matches_ae(folder, settings, ae):
    """A prior belongs to the encoder whose register bank it was trained on: refuse another AE run, naming
    both (prior.json's encoder_fingerprint against the fingerprint of `ae`'s encoder/)."""
    from dataprep.latent_data import encoder_fingerprint
    recorded, ae_dir = settings.get("encoder_fingerprint"), _ae_checkpoint(ae)
    if not (ae_dir / "encoder").is_dir():
        return  # a base-only run: no encoder to compare
    if recorded is None:
        raise ValueError(f"{folder}/prior.json records no encoder_fingerprint, so nothing shows that it was "
                         f"trained on the registers of --ae {ae}; retrain it with train_prior.py --ae {ae} "
                         f"(which records it), or add the fingerprint of the AE it was trained on")
    actual = encoder_fingerprint(ae_dir / "encoder")
    if actual != recorded:
        raise ValueError(f"the prior {folder} was trained on the registers of {settings.get('ae')} (encoder "
                         f"fingerprint {recorded[:12]}), but --ae {ae} has another encoder ({actual[:12]}); "
                         f"pass the AE run the prior was trained on, or train a prior on this one "
                         f"(train_prior.py --ae {ae})")


def load_prior(folder, ae=None, device="cpu", dtype=None):
    """A train_prior.py run folder -> Prior. A conditional prior also loads its encoder: the run's own
    cond_encoder/ (--train-cond-encoder, h_mu) or else the AE run's encoder/ (h_phi, frozen), with as many
    registers as the DiT's conditioning saw. `ae` overrides the AE folder recorded in prior.json."""
    from encoder import Encoder
    from latent_dit import LatentDiT

    folder = Path(folder)
    if not (folder / PRIOR_SETTINGS_FILE).is_file() or not (folder / "dit").is_dir():
        raise FileNotFoundError(f"{folder} is not a train_prior.py run folder (needs {PRIOR_SETTINGS_FILE} "
                                f"and dit/); pass --prior / --cond-prior the --out folder of train_prior.py")
    settings = read_json(folder / PRIOR_SETTINGS_FILE, f"retrain the prior with train_prior.py --out-dir "
                                                       f"{folder}")
    K, recorded_blocks = settings["num_registers"], settings.get("register_blocks")
    if recorded_blocks is not None and list(recorded_blocks) != register_blocks(K):
        raise ValueError(f"the prior {folder} was trained with register blocks {recorded_blocks}, but this "
                         f"code groups K={K} registers as {register_blocks(K)} (schedules.register_blocks); "
                         f"sampling would meet other block times than training. Retrain the prior with this "
                         f"code")
    if ae is not None:
        check_prior_matches_ae(folder, settings, ae)
    dit = LatentDiT.from_pretrained(str(folder / "dit"), dtype=dtype, device=device).eval()
    encoder = view = None
    shared = settings.get("shared_tokenizer", True)
    if dit.cfg.cond_dim:
        ae_dir = _ae_checkpoint(ae or settings["ae"])
        encoder_dir = folder / "cond_encoder"
        if not encoder_dir.is_dir():
            encoder_dir = ae_dir / "encoder"
            if not encoder_dir.is_dir():
                raise FileNotFoundError(f"the conditional prior {folder} embeds x_t with the AE encoder, but "
                                        f"{encoder_dir} does not exist; pass --ae the train_ae.py run it was "
                                        f"trained on")
        encoder = Encoder.from_pretrained(str(encoder_dir), num_registers=settings["cond_registers"],
                                          dtype=dtype, device=device).eval()
        view = _load_view(settings, folder, ae_dir) if not shared else None
    return Prior(dit=dit, num_registers=K, max_offset=settings["max_offset"],
                 block_offsets=settings["block_offsets"], encoder=encoder, shared_tokenizer=shared, view=view)


def _ae_checkpoint(ae):
    """A train_ae.py run folder -> its checkpoint/ (where encoder/ is); any other folder as it is."""
    ae_dir = Path(ae)
    return ae_dir / "checkpoint" if (ae_dir / "checkpoint" / "encoder").is_dir() else ae_dir


def _load_view(settings, folder, ae_dir):
    """The cross-tokenizer view a two-tokenizer conditional prior was trained with: prior.json's
    "cross_tokenizer" ({"slots_per_token", "max_length"}) and the tokenizer files of the prior folder or of
    the AE checkpoint. None when prior.json records no view (ConWithinDisc then refuses the prior)."""
    from dataprep.cross_tokenizer import view_from_files

    recorded = settings.get("cross_tokenizer") or {}
    if "slots_per_token" not in recorded:
        return None
    for source in (folder, ae_dir):
        if (source / "tokenizer.json").is_file() and (source / "encoder_tokenizer.json").is_file():
            return view_from_files(source, recorded["slots_per_token"], recorded.get("max_length"))
    raise FileNotFoundError(f"the conditional prior {folder} reads the demasker canvas through two "
                            f"tokenizers, but neither {folder} nor {ae_dir} holds tokenizer.json and "
                            f"encoder_tokenizer.json; pass --ae the train_ae.py run it was trained on")
