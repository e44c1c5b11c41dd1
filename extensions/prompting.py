"""Generation with a prompt, and infilling, through the registers (paper App. H; beyond the paper's experiments).

Paper map (arXiv 2603.20210, App. H "Extending the proposed algorithms to conditional text synthesis"):
- The prompt c is the fixed prefix of the MDM's canvas x_t: its tokens are never candidates of the loop
  (mdm.mdm_loop only predicts [M] positions), so they never change (tested). The canvas is one block over
  the whole length L; rows may hold prompts of different lengths (gen_start = 0: every non-[M] position is
  fixed). Classifier-free guidance on the prompt (Decoding.cfg_scale) needs one prompt length per batch
  (gen_start = P, LLaDA's layout).
- Base MDM with a prompt (the baseline): `base_prompted`, the plain loop on that canvas.
- ConThenDisc with a prompt (Eq. 12): z_0 ~ G_psi(eps, h_kappa(c)) from the prompted prior, then the guided MDM
  with z_0 fixed and the prompt as prefix: `conthendisc_prompted`.
- ConWithinDisc with a prompt: the same, and at the refresh fractions z_0 ~ G_psi(eps, h(x_t), h_kappa(c)),
  h(x_t) = the frozen encoder's registers of the current canvas (prompt + partly decoded answer, [M] hidden,
  generators.embed_canvas): `conwithindisc_prompted`.
- The prompted prior's conditioning is one sequence of cond tokens: [h(x_t) (Kc registers) ; h_kappa(c) (Kk
  registers)] with a mask; ConThenDisc withholds the h(x_t) half (mask False), which experiments/train_prompted.py trains
  for with probability --xt-drop. h_kappa is a second encoder initialised from h_phi (experiments/train_prompted.py).
- Infilling: the registers drawn from the conditional prior of ConWithinDisc (Alg. 4, train_prior.py
  --conditional) given the visible context, z_0 ~ G_psi(eps, h(x_ctx)), then the span decoded by the guided MDM
  with every context token fixed: `infill`; `base_infill` is the plain MDM on the same canvas.

NFE is the paper's count (generators.nfe_report: demasker calls + other models' calls x params / params of the
demasker); the h_kappa call is added to it like the encoder call of a refresh.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from infra.atomic import read_json
from generators import (Prior, _clock, _first, embed_canvas, nfe_report, param_count, refresh_steps,
                        sample_registers)
from mdm import _model_device, _resolve_mask_id, mdm_loop

PROMPTED_SETTINGS_FILE = "prompted.json"  # written by experiments/train_prompted.py next to dit/ and kappa/


@dataclass
class PromptedPrior:
    """g_psi(z_t, t, [h(x_t) ; h_kappa(c)]) and its two encoders (module docstring)."""
    prior: Prior                   # dit (conditional), K, offsets; prior.encoder = h_phi (frozen) for h(x_t)
    kappa: torch.nn.Module         # h_kappa: the prompt's encoder
    target: str = "answer"         # the registers it models: of the answer, or of prompt + answer ("program")

    @property
    def num_registers(self):
        return self.prior.num_registers


def load_prompted_prior(folder, ae=None, device="cpu", dtype=None):
    """A experiments/train_prompted.py run folder (prompted.json, dit/, kappa/) -> PromptedPrior; h(x_t) is read by the AE
    run's encoder (`ae` overrides the folder recorded in prompted.json)."""
    from encoder import Encoder
    from latent_dit import LatentDiT

    folder = Path(folder)
    if not (folder / PROMPTED_SETTINGS_FILE).is_file() or not (folder / "dit").is_dir():
        raise FileNotFoundError(f"{folder} is not a experiments/train_prompted.py run folder (needs {PROMPTED_SETTINGS_FILE}, dit/ "
                                f"and kappa/); pass --prompted-prior the --out-dir of experiments/train_prompted.py")
    s = read_json(folder / PROMPTED_SETTINGS_FILE, f"retrain with experiments/train_prompted.py --out-dir {folder}")
    ae_dir = Path(ae or s["ae"])
    if (ae_dir / "checkpoint" / "encoder").is_dir():
        ae_dir = ae_dir / "checkpoint"
    dit = LatentDiT.from_pretrained(str(folder / "dit"), dtype=dtype, device=device).eval()
    kappa = Encoder.from_pretrained(str(folder / "kappa"), dtype=dtype, device=device).eval()
    encoder = Encoder.from_pretrained(str(ae_dir / "encoder"), num_registers=s["cond_registers"], dtype=dtype,
                                      device=device).eval()
    prior = Prior(dit=dit, num_registers=s["num_registers"], max_offset=s["max_offset"],
                  block_offsets=s["block_offsets"], encoder=encoder)
    return PromptedPrior(prior=prior, kappa=kappa, target=s.get("target", "answer"))


# ------------------------------------------------------------------------------------------------
# The conditioning of the prompted prior
# ------------------------------------------------------------------------------------------------


def join_cond(xt_cond, xt_shown, kappa):
    """The prompted prior's conditioning: cond (B, Kc + Kk, d) = [h(x_t) ; h_kappa(c)] and its mask (B, Kc + Kk).
    xt_cond (B, Kc, d); xt_shown (B,) bool: False withholds a row's h(x_t) half; kappa (B, Kk, d)."""
    B, Kc, Kk = kappa.shape[0], xt_cond.shape[1], kappa.shape[1]
    device = kappa.device
    mask = torch.cat([xt_shown.to(device)[:, None].expand(B, Kc),
                      torch.ones(B, Kk, dtype=torch.bool, device=device)], dim=1)
    return torch.cat([xt_cond.to(device).float(), kappa], dim=1), mask


def encode_prompt(pprior, prompt_ids, prompt_mask):
    """h_kappa(c) (B, Kk, d) float32: the prompt (prompt_ids / prompt_mask (B, Lc), the encoder layout of
    prompts.encoder_rows) through the prompt's encoder. The prompt never changes during decoding: one call."""
    device = _model_device(pprior.prior.dit)
    return pprior.kappa(prompt_ids.to(device), attention_mask=prompt_mask.to(device)).float()


def prompted_cond(pprior, prompt_ids, prompt_mask, xt_cond=None, kappa=None):
    """join_cond for sampling: h_kappa of the prompt (`kappa` when already computed, else encode_prompt) and
    xt_cond (B, Kc, d), or None to withhold the h(x_t) half (ConThenDisc)."""
    device = _model_device(pprior.prior.dit)
    kappa = encode_prompt(pprior, prompt_ids, prompt_mask) if kappa is None else kappa  # (B, Kk, d)
    B, Kc = kappa.shape[0], pprior.prior.encoder.cfg.num_registers
    shown = torch.full((B,), xt_cond is not None, dtype=torch.bool)
    if xt_cond is None:
        xt_cond = torch.zeros(B, Kc, kappa.shape[-1], device=device)
    return join_cond(xt_cond, shown, kappa)


def prompt_registers(pprior, prompt_ids, prompt_mask, steps=128, generator=None, xt_cond=None, kappa=None):
    """z_0 ~ G_psi(eps, [h(x_t) ;] h_kappa(c)) (Eq. 12): (registers (B, K, d), denoiser calls)."""
    cond, cond_mask = prompted_cond(pprior, prompt_ids, prompt_mask, xt_cond, kappa)
    return sample_registers(pprior.prior, prompt_ids.shape[0], steps, cond, cond_mask, generator=generator)


def _check_canvas(canvas, mask_id):
    if canvas.dim() != 2:
        raise ValueError(f"the canvas must be (B, L) token ids, got shape {tuple(canvas.shape)}")
    if not bool((canvas == mask_id).any(dim=1).all()):
        raise ValueError("every canvas row needs at least one [M] position to generate; the prompt or context fills "
                         "the whole length: raise the length or shorten the prompt")


def masked_count(canvas, mask_id):
    """The default number of steps: the most [M] of any row (one token per step)."""
    return int((canvas == mask_id).sum(dim=1).max())


def _gen_start(canvas, mask_id, decoding):
    """0 (every fixed token is kept by the loop), or the common prompt length when cfg_scale needs one."""
    if decoding is None or decoding.cfg_scale == 0:
        return 0
    first = (canvas == mask_id).float().argmax(dim=1)  # (B,) first [M]
    if not bool((first == first[0]).all()) or bool((canvas[:, int(first[0]):] != mask_id).any()):
        raise ValueError("cfg_scale > 0 needs one prompt length per batch followed only by [M] (not infilling); batch "
                         "prompts of equal length (e.g. --batch-size 1)")
    return int(first[0])


def _loop(model, canvas, steps, temperature, remasking, mask_id, registers=None, generator=None, decoding=None,
          stats=None, refresh=None):
    """The MDM loop on a canvas with fixed tokens: one block over whatever follows gen_start."""
    gen_start = _gen_start(canvas, mask_id, decoding)
    return mdm_loop(model, canvas.clone(), gen_start, canvas.shape[1] - gen_start, steps, temperature, remasking,
                    mask_id, registers=registers, generator=generator, refresh_registers=refresh,
                    decoding=decoding, stats=stats)


# ------------------------------------------------------------------------------------------------
# Prompted generation: base, ConThenDisc (Eq. 12), ConWithinDisc
# ------------------------------------------------------------------------------------------------


def base_prompted(model, canvas, steps=None, temperature=0.0, remasking="low_confidence", mask_id=None,
                  generator=None, decoding=None, stats=None):
    """The base MDM with the prompt as fixed prefix. canvas (B, L): prompt then [M]. Returns (tokens (B, L),
    nfe report {"nfe", "demasker_calls"})."""
    mask_id = _resolve_mask_id(model, mask_id)
    _check_canvas(canvas, mask_id)
    started = _clock(_model_device(model))
    tokens, calls = _loop(model, canvas, steps or masked_count(canvas, mask_id), temperature, remasking, mask_id,
                          generator=generator, decoding=decoding, stats=stats)
    seconds = _clock(_model_device(model)) - started
    return tokens, {"nfe": float(calls), "demasker_calls": calls, "seconds_per_sample": seconds / canvas.shape[0]}


def _kappa_share(report, pprior, demasker):
    """Add the one h_kappa call to the paper's NFE (its params / the demasker's)."""
    share = param_count(pprior.kappa) / param_count(demasker)
    report["kappa_calls"], report["nfe"] = 1, report["nfe"] + share
    report["params"]["kappa"] = param_count(pprior.kappa)
    return report


def conthendisc_prompted(demasker, pprior, canvas, prompt_ids, prompt_mask, steps=None, temperature=0.0,
                         remasking="low_confidence", mask_id=None, prior_steps=128, generator=None,
                         prior_generator=None, decoding=None, stats=None, keep=None):
    """App. H ConThenDisc: z_0 ~ G_psi(eps, h_kappa(c)), then the guided MDM on the prompted canvas with z_0
    fixed. canvas (B, L) prompt then [M]; prompt_ids / prompt_mask (B, Lc) the prompt for h_kappa. keep: the
    demasker reads the first k registers. Returns (tokens (B, L), nfe report)."""
    mask_id = _resolve_mask_id(demasker, mask_id)
    _check_canvas(canvas, mask_id)
    device = _model_device(demasker)
    started = _clock(device)
    registers, prior_calls = prompt_registers(pprior, prompt_ids, prompt_mask, prior_steps, prior_generator)
    tokens, calls = _loop(demasker, canvas, steps or masked_count(canvas, mask_id), temperature, remasking, mask_id,
                          _first(registers, keep).to(device), generator, decoding, stats)
    report = nfe_report(demasker.cfg, canvas.shape[1], keep or pprior.num_registers, calls, pprior.prior, prior_calls,
                        demasker_params=param_count(demasker), seconds=_clock(device) - started,
                        batch_size=canvas.shape[0])
    return tokens, _kappa_share(report, pprior, demasker)


def conwithindisc_prompted(demasker, pprior, canvas, prompt_ids, prompt_mask, steps=None, temperature=0.0,
                           remasking="low_confidence", mask_id=None, prior_steps=128, refresh_at=(0.5,),
                           refresh_prior_steps=32, generator=None, prior_generator=None, decoding=None, stats=None,
                           keep=None, on_refresh=None):
    """App. H ConWithinDisc: the initial z_0 as conthendisc_prompted; before the steps at fractions refresh_at
    (fixed rule) z_0 ~ G_psi(eps, h(x_t), h_kappa(c)). refresh_at = () is conthendisc_prompted exactly."""
    mask_id = _resolve_mask_id(demasker, mask_id)
    _check_canvas(canvas, mask_id)
    if decoding is not None and decoding.rule != "fixed" and refresh_at:
        raise ValueError("prompted ConWithinDisc refreshes at fractions of a fixed schedule; use --decoding fixed")
    steps = steps or masked_count(canvas, mask_id)
    device = _model_device(demasker)
    started = _clock(device)
    eos_id = demasker.cfg.eos_token_id
    kappa = encode_prompt(pprior, prompt_ids, prompt_mask)  # (B, Kk, d): the one h_kappa call of the run
    registers, calls0 = prompt_registers(pprior, prompt_ids, prompt_mask, prior_steps, prior_generator, kappa=kappa)
    counts = {"cond_prior": calls0, "encoder": 0}
    when = refresh_steps(refresh_at, steps)

    def refresh(step, x, old, register_mask):
        if step not in when:
            return None
        xt_cond, _ = embed_canvas(pprior.prior.encoder, x, mask_id, eos_id)  # (B, Kc, d), [M] hidden
        counts["encoder"] += 1
        new, calls = prompt_registers(pprior, prompt_ids, prompt_mask, refresh_prior_steps, prior_generator, xt_cond,
                                      kappa)
        counts["cond_prior"] += calls
        new = _first(new, keep).to(device)
        if on_refresh is not None:
            on_refresh(step, x, old, new)
        return new, None

    tokens, calls = _loop(demasker, canvas, steps, temperature, remasking, mask_id, _first(registers, keep).to(device),
                          generator, decoding, stats, refresh if when else None)
    report = nfe_report(demasker.cfg, canvas.shape[1], keep or pprior.num_registers, calls, None, 0, pprior.prior,
                        counts["cond_prior"], counts["encoder"], demasker_params=param_count(demasker),
                        seconds=_clock(device) - started, batch_size=canvas.shape[0])
    return tokens, _kappa_share(report, pprior, demasker)


# ------------------------------------------------------------------------------------------------
# Infilling
# ------------------------------------------------------------------------------------------------


def infill(demasker, cond_prior, canvas, steps=None, temperature=0.0, remasking="low_confidence", mask_id=None,
           prior_steps=32, generator=None, prior_generator=None, decoding=None, stats=None, keep=None):
    """Registers z_0 ~ G_psi(eps, h(x_ctx)) from the conditional prior (Alg. 4) given the visible context, then
    the guided MDM fills every [M] of canvas (B, L) with each context token fixed. Returns (tokens, nfe report)."""
    if cond_prior.encoder is None or not cond_prior.conditional:
        raise ValueError("infilling needs a conditional prior (train_prior.py --conditional) loaded with "
                         "generators.load_prior")
    if cond_prior.view is not None or not cond_prior.shared_tokenizer:
        raise ValueError("infilling reads the context with one shared tokenizer; a two-tokenizer conditional prior "
                         "is not supported here yet")
    mask_id = _resolve_mask_id(demasker, mask_id)
    _check_canvas(canvas, mask_id)
    device = _model_device(demasker)
    started = _clock(device)
    cond, cond_mask = embed_canvas(cond_prior.encoder, canvas, mask_id, demasker.cfg.eos_token_id)
    registers, prior_calls = sample_registers(cond_prior, canvas.shape[0], prior_steps, cond, cond_mask,
                                              generator=prior_generator)
    tokens, calls = _loop(demasker, canvas, steps or masked_count(canvas, mask_id), temperature,
                          remasking, mask_id, _first(registers, keep).to(device), generator, decoding, stats)
    report = nfe_report(demasker.cfg, canvas.shape[1], keep or cond_prior.num_registers, calls, None, 0, cond_prior,
                        prior_calls, 1, demasker_params=param_count(demasker), seconds=_clock(device) - started,
                        batch_size=canvas.shape[0])
    return tokens, report


def base_infill(model, canvas, steps=None, temperature=0.0, remasking="low_confidence", mask_id=None,
                generator=None, decoding=None, stats=None):
    """The base MDM on an infilling canvas (the baseline of `infill`)."""
    mask_id = _resolve_mask_id(model, mask_id)
    _check_canvas(canvas, mask_id)
    return base_prompted(model, canvas, steps or masked_count(canvas, mask_id), temperature, remasking,
                         mask_id, generator, decoding, stats)
