"""The two hybrid text generators of CRoCoDiL and the latent sampler they share.

Paper map (arXiv 2603.20210):
- Latent sampling, App. E: DDIM (eta = 0) from Gaussian noise with the x0-predicting DiT g_psi
  (latent_dit.py) over the cosine DDPM schedule (schedules.py), `prior_steps` denoiser calls (paper:
  128). Per-register times follow App. E's geometric block offsets exactly as in training: the base
  time walks the DDIM grid from 1 down to -max_offset and register j runs at clip(t + Delta_b(j), 0, 1)
  (schedules.register_times), so later blocks are always noisier and every block ends at 0. The
  result is renormalised to norm sqrt(d) per register (App. C), the encoder's output scale.
- ConThenDisc, Alg. 2 (Sec. 4.3.1): z_0 ~ G_psi(eps) from the unconditional prior, then the guided MDM
  (mdm.generate with the registers fixed at every step).
- ConWithinDisc, Alg. 3 (Sec. 4.3.2, App. G): the same guided MDM, but before the steps at fractions
  `refresh_at` of the loop (default 0.5, App. G's best setting) the registers are redrawn from the
  conditional prior, z_0 ~ G_psi(eps, h(x_t)), with its own number of DDIM steps (paper: 32). h(x_t)
  is the encoder's register bank of the current canvas with the still-masked positions hidden
  (encoder `hide`), built by the cross_tokenizer view exactly as in conditional training (Alg. 4).
  Comment (i) of Sec. 4.3.2: Alg. 3 refreshes at every step; refreshing at a subset is the variant the
  paper evaluates. refresh_at = () gives ConThenDisc exactly (same seeds, same output; tested). The
  initial registers come from the unconditional prior (App. G: "@0 is ConThenDisc"); without one they
  come from the conditional prior given the all-masked canvas (Alg. 3 line 6 at t = 1).
- Tokenizers: h reads a canvas of demasker ids. With one shared tokenizer (the tiny setting) it embeds
  x_t directly; with the paper's pair (Qwen3 / LLaDA) the canvas goes through cross_tokenizer's view
  (visible runs detokenised and re-tokenised for the encoder, hidden slots over the gaps), the same view
  conditional training takes of x^(r). Prior.view holds it; load_prior builds it from the AE run's two
  tokenizer files and the slots-per-token ratio recorded in prior.json ("cross_tokenizer").

NFE, the way the paper counts it (Sec. 5 footnote 4, Fig. 6, App. G "adding less than 2 to the NFE"): the
number of demasker calls plus every other model's calls weighted by its size, nfe = demasker calls +
sum_m calls_m x params(m) / params(demasker) ("the denoiser (400M parameters) is activated 128 times,
leading to an overall load of ~6 demasker (8B) activations"; with the 32-step conditional refresh the
reported points are 32 + 8 = 40). `nfe_report` returns that count as "nfe" (with "prior_equivalent"), the
raw call counts (demasker, DiT, conditional DiT, encoder), the parameter counts, and beside it a FLOP-based
equivalent "nfe_flops" = demasker calls + sum(calls x forward FLOPs) / demasker forward FLOPs, all per
example. The FLOP count is ours, not the paper's: a DiT over K = 8 registers costs far less than its
parameter share (its 8 tokens against the demasker's L): at L = 512, K = 8 the 128-step prior is 6.53 by
parameters but 0.105 by FLOPs, the 32-step conditional one 1.69 vs 0.027 (the encoder call 0.074 vs 0.065).
The generators also time themselves ("seconds_per_sample", wall clock, CUDA synchronised).
Forward FLOPs come from the configs (`*_flops` below): 2 x (multiply-
adds of every matmul-like layer applied per token) + the attention matmuls 4 x T_q x T_k x heads x
head_dim per layer (QK^T and AV, a full score matrix also for causal attention, as SDPA with a mask
computes it). Norms, activations, softmax and RoPE are ignored (< 1% at these widths). Embedding
lookups cost nothing; the demasker's LM head is counted on the L text positions, the encoder has none.
tests/test_generators.py checks the formulas against torch's FlopCounterMode on the tiny models.
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from infra.atomic import read_json
from mdm import LLADA, _model_device, _resolve_mask_id, check_schedule, generate, mdm_loop
from schedules import base_time_range, ddim_step, register_blocks, register_times

PRIOR_SETTINGS_FILE = "prior.json"  # written by train_prior.py next to dit/


# ------------------------------------------------------------------------------------------------
# A trained prior: the DiT and how it was trained
# ------------------------------------------------------------------------------------------------


@dataclass
class Prior:
    """g_psi plus the settings sampling must repeat from training (train_prior.py's prior.json)."""
    dit: torch.nn.Module                  # LatentDiT (EMA weights), x0-prediction
    num_registers: int                    # K modelled (the first K registers of the encoder's bank)
    max_offset: float = 0.0               # App. E block offset of the last block
    block_offsets: bool = True            # False = the ablation (all registers at the same time)
    encoder: Optional[torch.nn.Module] = None  # conditional prior: the encoder that embeds x_t
    shared_tokenizer: bool = True         # encoder and demasker read the same token ids
    view: Optional[object] = None         # cross_tokenizer view of a demasker canvas (None: shared, today's)

    @property
    def conditional(self):
        return bool(self.dit.cfg.cond_dim)


def check_prior_matches_ae(folder, settings, ae):
    """A prior belongs to the encoder whose register bank it was trained on: refuse another AE run, naming both
    (prior.json's encoder_fingerprint against the fingerprint of `ae`'s encoder/)."""
    from dataprep.latent_data import encoder_fingerprint
    recorded = settings.get("encoder_fingerprint")
    ae_dir = Path(ae)
    if (ae_dir / "checkpoint" / "encoder").is_dir():
        ae_dir = ae_dir / "checkpoint"
    if recorded is None or not (ae_dir / "encoder").is_dir():
        return  # an old prior.json, or a base-only run: nothing to compare
    actual = encoder_fingerprint(ae_dir / "encoder")
    if actual != recorded:
        raise ValueError(f"the prior {folder} was trained on the registers of {settings.get('ae')} (encoder "
                         f"fingerprint {recorded[:12]}), but --ae {ae} has another encoder ({actual[:12]}); pass the "
                         f"AE run the prior was trained on, or train a prior on this one (train_prior.py --ae {ae})")


def load_prior(folder, ae=None, device="cpu", dtype=None):
    """A train_prior.py run folder -> Prior. A conditional prior also loads its encoder: the run's own
    cond_encoder/ (--train-cond-encoder, h_mu) or else the AE run's encoder/ (h_phi, frozen), with as many
    registers as the DiT's conditioning saw. `ae` overrides the AE folder recorded in prior.json."""
    from encoder import Encoder
    from latent_dit import LatentDiT

    folder = Path(folder)
    settings_file = folder / PRIOR_SETTINGS_FILE
    if not settings_file.is_file() or not (folder / "dit").is_dir():
        raise FileNotFoundError(f"{folder} is not a train_prior.py run folder (needs {PRIOR_SETTINGS_FILE} and "
                                f"dit/); pass --prior / --cond-prior the --out folder of train_prior.py")
    settings = read_json(settings_file, f"retrain the prior with train_prior.py --out-dir {folder}")
    recorded_blocks = settings.get("register_blocks")
    if recorded_blocks is not None and list(recorded_blocks) != register_blocks(settings["num_registers"]):
        raise ValueError(f"the prior {folder} was trained with register blocks {recorded_blocks}, but this code groups "
                         f"K={settings['num_registers']} registers as {register_blocks(settings['num_registers'])} "
                         f"(schedules.register_blocks); sampling would meet other block times than training. Retrain "
                         f"the prior with this code")
    if ae is not None:
        check_prior_matches_ae(folder, settings, ae)
    dit = LatentDiT.from_pretrained(str(folder / "dit"), dtype=dtype, device=device).eval()
    encoder = view = None
    shared = settings.get("shared_tokenizer", True)
    if dit.cfg.cond_dim:
        ae_dir = Path(ae or settings["ae"])
        if (ae_dir / "checkpoint" / "encoder").is_dir():  # a train_ae.py run folder: its checkpoint
            ae_dir = ae_dir / "checkpoint"
        if (folder / "cond_encoder").is_dir():
            encoder_dir = folder / "cond_encoder"
        else:
            encoder_dir = ae_dir / "encoder"
            if not encoder_dir.is_dir():
                raise FileNotFoundError(f"the conditional prior {folder} embeds x_t with the AE encoder, but "
                                        f"{encoder_dir} does not exist; pass --ae the train_ae.py run it was trained on")
        encoder = Encoder.from_pretrained(str(encoder_dir), num_registers=settings["cond_registers"],
                                          dtype=dtype, device=device).eval()
        view = _load_view(settings, folder, ae_dir) if not shared else None
    return Prior(dit=dit, num_registers=settings["num_registers"], max_offset=settings["max_offset"],
                 block_offsets=settings["block_offsets"], encoder=encoder, shared_tokenizer=shared, view=view)


def _load_view(settings, folder, ae_dir):
    """The cross-tokenizer view a two-tokenizer conditional prior was trained with: prior.json's
    "cross_tokenizer" ({"slots_per_token", "max_length"}) and the tokenizer files of the prior folder or of the
    AE checkpoint. None for a prior trained before the view existed (ConWithinDisc then refuses it)."""
    from dataprep.cross_tokenizer import view_from_files

    recorded = settings.get("cross_tokenizer") or {}
    if "slots_per_token" not in recorded:
        return None
    for source in (folder, ae_dir):
        if (source / "tokenizer.json").is_file() and (source / "encoder_tokenizer.json").is_file():
            return view_from_files(source, recorded["slots_per_token"], recorded.get("max_length"))
    raise FileNotFoundError(f"the conditional prior {folder} reads the demasker canvas through two tokenizers, but "
                            f"neither {folder} nor {ae_dir} holds tokenizer.json and encoder_tokenizer.json; pass --ae "
                            f"the train_ae.py run it was trained on")


# ------------------------------------------------------------------------------------------------
# Latent sampling (App. E): DDIM with per-register block times
# ------------------------------------------------------------------------------------------------


def _randn(shape, generator, device):
    """N(0, I) drawn on the generator's device (a CPU generator also serves a CUDA model), then moved."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source).to(device)


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
    dtype = next(dit.parameters()).dtype
    lo, _ = base_time_range(prior.max_offset, prior.block_offsets)
    z = _randn((batch_size, K, d), generator, device) if z_init is None else z_init.to(device, torch.float32)
    grid = torch.linspace(t_start, lo, steps + 1, dtype=torch.float64)  # = ddim_timesteps(steps, lo) from 1
    for i in range(steps):
        t = register_times(grid[i].expand(batch_size), K, prior.max_offset, prior.block_offsets).to(device)
        t_next = register_times(grid[i + 1].expand(batch_size), K, prior.max_offset, prior.block_offsets).to(device)
        z0_hat = dit(z.to(dtype), t, cond, cond_mask).float()  # (B, K, d)
        z = ddim_step(z, z0_hat, t, t_next)
    return F.normalize(z, dim=-1) * math.sqrt(d), steps


@torch.no_grad()
def embed_canvas(encoder, x, mask_id, eos_id, view=None):
    """h(x_t) for ConWithinDisc: the encoder's registers of the canvas x (B, L) with [M] positions hidden
    and the text after the first visible EOS treated as padding, the same view conditional training builds
    from x^(r). view None (one shared tokenizer): latent_data.visible_view on x itself, hidden ids replaced by
    the encoder's pad id so that the [M] id need not exist in its vocabulary. view (cross_tokenizer): the
    canvas re-tokenised for the encoder, hidden slots over the masked runs.
    Returns (cond (B, Kc, d), cond_mask None: all valid)."""
    masked = x == mask_id
    if view is None:
        from dataprep.latent_data import visible_view
        attention_mask, hide = visible_view(x, masked, eos_id)
        ids = x.masked_fill(masked, encoder.cfg.pad_token_id)
    else:
        ids, attention_mask, hide = view(x, masked)
    device = _model_device(encoder)
    return encoder(ids.to(device), attention_mask=attention_mask.to(device), hide=hide.to(device)).float(), None


# ------------------------------------------------------------------------------------------------
# NFE accounting: forward FLOPs from the configs
# ------------------------------------------------------------------------------------------------


def _linear(tokens, fan_in, fan_out):
    return 2 * tokens * fan_in * fan_out


def _attention(q_tokens, k_tokens, heads, head_dim):
    return 4 * q_tokens * k_tokens * heads * head_dim  # QK^T and AV


def _swiglu_block(tokens, width, heads, kv_heads, head_dim, mlp_hidden):
    q, kv = heads * head_dim, kv_heads * head_dim
    projections = _linear(tokens, width, q) + 2 * _linear(tokens, width, kv) + _linear(tokens, q, width)
    return projections + _attention(tokens, tokens, heads, head_dim) + 3 * _linear(tokens, width, mlp_hidden)


def demasker_flops(cfg, length, num_registers=0):
    """One demasker forward on one sequence of `length` tokens with k registers (prefix k + 2 tokens)."""
    tokens = length + (num_registers + 2 if num_registers else 0)
    block = _swiglu_block(tokens, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_hidden_size)
    projection = _linear(num_registers, cfg.register_dim, cfg.d_model) if num_registers else 0
    return cfg.n_layers * block + projection + _linear(length, cfg.d_model, cfg.vocab_size)


def encoder_flops(cfg, length):
    """One encoder forward on `length` tokens plus its K - 1 suffix registers (no LM head)."""
    tokens = length + cfg.num_registers - 1
    return cfg.num_layers * _swiglu_block(tokens, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                          cfg.intermediate_size)


def dit_flops(cfg, num_registers, cond_tokens=0):
    """One LatentDiT forward on K registers (and S conditioning tokens for a conditional model)."""
    K, h, S = num_registers, cfg.hidden_size, cond_tokens
    heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    embed = _linear(K, cfg.register_dim, h) + _linear(K, cfg.frequency_embedding_size, h) + _linear(K, h, h) \
        + _linear(K, h, 6 * h)
    block = 4 * _linear(K, h, h) + _attention(K, K, heads, head_dim) + 2 * _linear(K, h, cfg.mlp_hidden_size)
    if cfg.cond_dim:
        embed += _linear(S, cfg.cond_dim, h) + _linear(S, h, h)
        block += 2 * _linear(K, h, h) + 2 * _linear(S, h, h) + _attention(K, S, heads, head_dim)
    return embed + cfg.depth * block + _linear(K, h, cfg.register_dim)


def param_count(module):
    """Parameters of a model (each shared tensor once): the paper's unit of cost per call."""
    return sum(p.numel() for p in module.parameters())


def config_param_count(model_class, cfg):
    """Parameters of model_class(cfg) without allocating them (built on the meta device): paper-size models."""
    with torch.device("meta"):
        return param_count(model_class(cfg))


def paper_nfe(demasker_calls, demasker_params, others=()):
    """The paper's NFE: demasker calls + sum over the other models of calls x params / params(demasker).
    others: (calls, params) pairs. Returns (nfe, the others' share in demasker calls)."""
    equivalent = sum(calls * params for calls, params in others) / demasker_params
    return demasker_calls + equivalent, equivalent


def nfe_report(demasker_cfg, gen_length, num_registers, demasker_calls, prior=None, prior_calls=0,
               cond_prior=None, cond_prior_calls=0, encoder_calls=0, demasker_params=None, seconds=None,
               batch_size=None):
    """Raw call counts and the two NFE counts, per example (module docstring).

    "nfe" / "prior_equivalent": the paper's count, by parameters (needs demasker_params; without it "nfe" falls
    back to the FLOP count and says so in "nfe_count"). "nfe_flops" / "prior_equivalent_flops": by forward FLOPs.
    num_registers: k fed to the demasker. The conditional prior's cost per call is its DiT on K registers
    cross-attending to the Kc conditioning registers; each refresh also runs the encoder once on the
    gen_length canvas. seconds, batch_size: the generator's wall clock for the batch -> "seconds_per_sample"."""
    per_call = demasker_flops(demasker_cfg, gen_length, num_registers)
    prior_flops, others, params = 0, [], {"demasker": demasker_params}
    if prior is not None and prior_calls:
        prior_flops += prior_calls * dit_flops(prior.dit.cfg, prior.num_registers)
        params["prior"] = param_count(prior.dit)
        others.append((prior_calls, params["prior"]))
    if cond_prior is not None and (cond_prior_calls or encoder_calls):
        cond_registers = cond_prior.encoder.cfg.num_registers
        prior_flops += cond_prior_calls * dit_flops(cond_prior.dit.cfg, cond_prior.num_registers, cond_registers)
        prior_flops += encoder_calls * encoder_flops(cond_prior.encoder.cfg, gen_length)
        params["cond_prior"], params["encoder"] = param_count(cond_prior.dit), param_count(cond_prior.encoder)
        others += [(cond_prior_calls, params["cond_prior"]), (encoder_calls, params["encoder"])]
    flops_equivalent = prior_flops / per_call
    report = {"demasker_calls": demasker_calls, "prior_calls": prior_calls, "cond_prior_calls": cond_prior_calls,
              "encoder_calls": encoder_calls, "params": params, "demasker_flops_per_call": per_call,
              "prior_flops": prior_flops, "prior_equivalent_flops": flops_equivalent,
              "nfe_flops": demasker_calls + flops_equivalent}
    if demasker_params:
        report["nfe"], report["prior_equivalent"] = paper_nfe(demasker_calls, demasker_params, others)
        report["nfe_count"] = "params"
    else:
        report["nfe"], report["prior_equivalent"] = report["nfe_flops"], flops_equivalent
        report["nfe_count"] = "flops"
    if seconds is not None:
        report["seconds"] = seconds
        report["seconds_per_sample"] = seconds / batch_size if batch_size else seconds
    return report


def _clock(device):
    """Wall-clock seconds, after the device's queued work (CUDA kernels run asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ------------------------------------------------------------------------------------------------
# ConThenDisc (Alg. 2) and ConWithinDisc (Alg. 3)
# ------------------------------------------------------------------------------------------------


def _check_prior(prior, demasker, name, conditional, keep=None):
    cfg = demasker.cfg
    if keep is not None and not 1 <= keep <= prior.num_registers:
        raise ValueError(f"keep={keep}: the demasker reads the first k of the {prior.num_registers} registers {name} "
                         f"models; choose 1 <= keep <= {prior.num_registers}")
    if prior.conditional != conditional:
        kind = "conditional (cond_dim set)" if conditional else "unconditional"
        raise ValueError(f"{name} must be an {kind} prior; got the other kind. Train it with train_prior.py"
                         + (" --conditional" if conditional else " (without --conditional)"))
    if prior.dit.cfg.register_dim != cfg.register_dim:
        raise ValueError(f"{name} samples registers of width {prior.dit.cfg.register_dim} but the demasker reads "
                         f"register_dim={cfg.register_dim}; use the prior trained on this AE run's encoder")
    if (keep or prior.num_registers) > cfg.max_registers:
        raise ValueError(f"{name} feeds {keep or prior.num_registers} registers but the demasker takes at most "
                         f"max_registers={cfg.max_registers}; pass keep <= that, or train the prior with "
                         f"--num-registers <= that")


def _first(registers, keep):
    """The registers the demasker reads: the first k of the bank (B, K, d) -> (B, k, d); all with keep None."""
    return registers if keep is None else registers[:, :keep]


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


def conthendisc(demasker, prior, batch_size, gen_length=256, block_length=None, steps=None, temperature=0.0,
                remasking="low_confidence", mask_id=None, prior_steps=128, generator=None, prior_generator=None,
                decoding=None, stats=None, keep=None):
    """Alg. 2: registers from the unconditional prior, then the guided MDM with them fixed.

    keep: the demasker reads the first k registers of the sampled bank (a prior over all K = 128, the paper's
    1024 x 128 latent, serving any k); None = all the prior models.

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
    registers, prior_calls = sample_registers(prior, batch_size, prior_steps, generator=prior_generator)
    tokens, calls = generate(demasker, batch_size, gen_length, block_length, steps, temperature, remasking,
                             mask_id, registers=_first(registers, keep), generator=generator, decoding=decoding,
                             stats=stats)
    return tokens, nfe_report(demasker.cfg, gen_length, keep or prior.num_registers, calls, prior, prior_calls,
                              demasker_params=param_count(demasker), seconds=_clock(device) - started,
                              batch_size=batch_size)


def conwithindisc(demasker, cond_prior, batch_size, gen_length=256, block_length=None, steps=None,
                  temperature=0.0, remasking="low_confidence", mask_id=None, prior=None, prior_steps=128,
                  refresh_at=(0.5,), refresh_prior_steps=32, generator=None, prior_generator=None,
                  on_refresh=None, decoding=None, stats=None, keep=None):
    """Alg. 3 / App. G: the guided MDM whose registers are redrawn from P(z | h(x_t)) at `refresh_at`.

    prior: the unconditional prior for the initial registers (None: the conditional prior given the
    all-[M] canvas). refresh_prior_steps: DDIM steps of each redraw (paper: 32). on_refresh: optional
    callable(step, x, old_registers, new_registers) for inspection. With an adaptive decoding rule (threshold,
    factor) the number of steps is not known in advance: a fraction a refreshes before the first step at
    which a share a of the canvas is revealed. keep: the demasker reads the first k registers of every bank
    drawn (initial and refreshed; on_refresh sees those). Other arguments as conthendisc.
    Returns (tokens (B, gen_length), nfe_report).
    """
    _check_prior(cond_prior, demasker, "cond_prior", conditional=True, keep=keep)
    view = cond_prior.view
    if not cond_prior.shared_tokenizer and view is None:
        raise ValueError(
            "this conditional prior's encoder has its own tokenizer, and ConWithinDisc needs the cross-tokenizer view "
            "it was trained with (prior.json 'cross_tokenizer': slots_per_token); a prior trained before that view "
            "existed masked the encoder's ids, not the demasker's canvas: retrain it with train_prior.py --conditional "
            "(or set Prior.view to a cross_tokenizer.CrossTokenizerView)")
    if cond_prior.encoder is None:
        raise ValueError("cond_prior has no encoder to embed x_t; load it with generators.load_prior")
    block_length, steps = block_length or gen_length, steps or gen_length
    check_schedule(gen_length, block_length, steps)
    mask_id = _resolve_mask_id(demasker, mask_id)
    eos_id = demasker.cfg.eos_token_id
    device = _model_device(demasker)
    started = _clock(device)
    counts = {"prior": 0, "cond_prior": 0, "encoder": 0}
    if prior is not None:
        _check_prior(prior, demasker, "prior", conditional=False, keep=keep)
        registers, counts["prior"] = sample_registers(prior, batch_size, prior_steps, generator=prior_generator)
    else:
        canvas = torch.full((batch_size, gen_length), mask_id, dtype=torch.long, device=device)
        cond, cond_mask = embed_canvas(cond_prior.encoder, canvas, mask_id, eos_id, view)
        counts["encoder"] += 1
        registers, counts["cond_prior"] = sample_registers(cond_prior, batch_size, prior_steps, cond, cond_mask,
                                                           generator=prior_generator)
    registers = _first(registers, keep)
    adaptive = (decoding or LLADA).rule != "fixed"
    when = refresh_steps(refresh_at, steps)
    pending = sorted(fraction for fraction in set(refresh_at) if fraction > 0)  # adaptive rules: by progress

    def due(step, x):
        if not adaptive:
            return step in when
        revealed = float((x != mask_id).float().mean())  # share of the canvas revealed so far
        if pending and revealed >= pending[0] and revealed < 1:
            while pending and revealed >= pending[0]:
                pending.pop(0)
            return True
        return False

    def refresh(step, x, old, register_mask):
        if not due(step, x):
            return None
        cond, cond_mask = embed_canvas(cond_prior.encoder, x, mask_id, eos_id, view)
        counts["encoder"] += 1
        new, calls = sample_registers(cond_prior, batch_size, refresh_prior_steps, cond, cond_mask,
                                      generator=prior_generator)
        counts["cond_prior"] += calls
        new = _first(new, keep)
        if on_refresh is not None:
            on_refresh(step, x, old, new)
        return new, None

    x = torch.full((batch_size, gen_length), mask_id, dtype=torch.long, device=device)
    tokens, calls = mdm_loop(demasker, x, 0, block_length, steps, temperature, remasking, mask_id,
                             registers=registers, generator=generator,
                             refresh_registers=refresh if (when or (adaptive and pending)) else None,
                             decoding=decoding, stats=stats)
    report = nfe_report(demasker.cfg, gen_length, keep or cond_prior.num_registers, calls, prior, counts["prior"],
                        cond_prior, counts["cond_prior"], counts["encoder"], demasker_params=param_count(demasker),
                        seconds=_clock(device) - started, batch_size=batch_size)
    return tokens, report
