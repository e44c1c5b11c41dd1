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
- Loading (`load_prompted_prior`): a prompted prior belongs to one autoencoder and one kind of demasker. Its
  prompted.json carries the AE encoder's fingerprint (checked against the encoder of the run that decodes; a
  record without one is refused) and its target, the registers it samples: of the program (prompt + answer, what
  the AE's own demasker reads, h_phi of whole programs) or of the answer. The demasker that decodes must be guided
  by the same kind (`demasker_guide`: a train_ae.py run reads programs; OUT/ae of experiments/train_prompted.py
  records its --guide); a mismatch is refused with the fix (`check_pairing`).
- Two tokenizers (App. C): h_kappa and h(x_t) read the encoder's tokens: the prompt through the encoder's own
  tokenizer (`prompt_rows`), the canvas through the cross-tokenizer view the prior was trained with
  (dataprep/cross_tokenizer.py, prompted.json "cross_tokenizer").

NFE is the paper's count (generators.nfe_report: demasker calls + other models' calls x params / params of the
demasker); the h_kappa call is added to it like the encoder call of a refresh.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from infra.atomic import read_json
from generators import (Prior, _ae_checkpoint, _clock, _first, embed_canvas, nfe_report, param_count, refresh_steps,
                        sample_registers)
from mdm import _model_device, _resolve_mask_id, mdm_loop

PROMPTED_SETTINGS_FILE = "prompted.json"  # written by experiments/train_prompted.py next to dit/ and kappa/
FINE_TUNED_BY = "experiments/train_prompted.py"  # the "fine_tuned_by" of a demasker it fine-tuned (OUT/ae/args.json)


@dataclass
class PromptedPrior:
    """g_psi(z_t, t, [h(x_t) ; h_kappa(c)]) and its two encoders (module docstring)."""
    prior: Prior                   # dit (conditional), K, offsets; h(x_t) by prior.encoder (h_phi) and prior.view
    kappa: torch.nn.Module         # h_kappa: the prompt's encoder
    target: str = "program"        # the registers it models: of prompt + answer ("program"), or of the answer
    encoder_tokenizer: Optional[object] = None  # the encoder's own tokenizer (two tokenizers), None: shared
    encoder_seq_len: Optional[int] = None       # cap of the encoder rows of a prompt (prompt_rows)

    @property
    def num_registers(self):
        return self.prior.num_registers


def load_prompted_prior(folder, ae=None, device="cpu", dtype=None, encoder_prompts=False):
    """A experiments/train_prompted.py run folder (prompted.json, dit/, kappa/) -> PromptedPrior.

    ae: the run whose demasker will decode (a train_ae.py run, or the OUT/ae train_prompted.py fine-tuned); None:
    the demasker the prior was trained for (prompted.json "demasker"). Refused, naming the fix: a record without
    the autoencoder's fingerprint, an `ae` whose encoder is not the one the prior was trained on, and a demasker
    guided by other registers than the prior samples (check_pairing). h(x_t) is read by `ae`'s encoder.
    encoder_prompts: the caller builds h_kappa's inputs with prompt_rows (the encoder's tokenizer); a prior whose
    encoder has its own tokenizer is refused without it (demasker-token prompts would be silently wrong)."""
    from encoder import Encoder
    from latent_dit import LatentDiT

    folder = Path(folder)
    settings_file = folder / PROMPTED_SETTINGS_FILE
    if not settings_file.is_file() or not (folder / "dit").is_dir():
        stopped = (folder / "train_state").is_dir()
        raise FileNotFoundError(
            f"{folder} is not a finished experiments/train_prompted.py run (needs {PROMPTED_SETTINGS_FILE}, dit/ and "
            f"kappa/); " + ("its training stopped before the end: continue it with experiments/train_prompted.py "
                            "--resume --out-dir " + str(folder) if stopped else
                            "pass --prompted-prior the --out-dir of experiments/train_prompted.py"))
    s = read_json(settings_file, _retrain(folder))
    decoder = Path(ae) if ae is not None else folder / s.get("demasker", s["ae"])
    ae_dir = check_pairing(folder, s, decoder)
    shared = s.get("shared_tokenizer", True)
    if not shared and not encoder_prompts:
        raise ValueError(f"the prompted prior {folder} reads prompts with the encoder's own tokenizer (two "
                         f"tokenizers); build h_kappa's inputs with extensions.prompting.prompt_rows and load it with "
                         f"load_prompted_prior(..., encoder_prompts=True)")
    dit = LatentDiT.from_pretrained(str(folder / "dit"), dtype=dtype, device=device).eval()
    kappa = Encoder.from_pretrained(str(folder / "kappa"), dtype=dtype, device=device).eval()
    encoder = Encoder.from_pretrained(str(ae_dir / "encoder"), num_registers=s["cond_registers"], dtype=dtype,
                                      device=device).eval()
    view, encoder_tokenizer = (None, None) if shared else _cross_view(folder, s, ae_dir)
    prior = Prior(dit=dit, num_registers=s["num_registers"], max_offset=s["max_offset"],
                  block_offsets=s["block_offsets"], encoder=encoder, shared_tokenizer=shared, view=view)
    return PromptedPrior(prior=prior, kappa=kappa, target=s["target"], encoder_tokenizer=encoder_tokenizer,
                         encoder_seq_len=s.get("encoder_seq_len") or s.get("seq_len"))


def _retrain(folder, settings=None):
    """The fix for a record that cannot be trusted: the command that writes it again."""
    settings = settings or {}
    return (f"retrain it: python -m experiments.train_prompted --ae {settings.get('ae', 'AE')} --pairs "
            f"{settings.get('pairs', 'PAIRS')} --out-dir {folder} --overwrite")


def demasker_guide(run):
    """Which registers guide the demasker of `run`: "answer" or "program" (h_phi of prompt + answer). A demasker
    experiments/train_prompted.py fine-tuned records its --guide (args.json); any other, a train_ae.py run, read
    h_phi of whole programs in training, which on a prompted canvas is the program."""
    run = Path(run)
    for record in (run / "args.json", run / "checkpoint" / "args.json"):
        if record.is_file():
            saved = read_json(record, f"restore {run} from a good copy")
            if saved.get("fine_tuned_by") == FINE_TUNED_BY:
                return saved["guide"]
            return "program"
    return "program"


def check_pairing(folder, settings, decoder):
    """The prompted prior of `folder` (its prompted.json `settings`) may drive the demasker of run `decoder` only if
    its record carries the autoencoder's encoder fingerprint, `decoder`'s encoder has that fingerprint, and the
    demasker is guided by the registers the prior samples. Returns the folder holding `decoder`'s encoder/."""
    from dataprep.latent_data import encoder_fingerprint

    recorded = settings.get("encoder_fingerprint")
    if not recorded:
        raise ValueError(f"{folder / PROMPTED_SETTINGS_FILE} records no encoder fingerprint, so nothing shows which "
                         f"autoencoder its registers belong to; " + _retrain(folder, settings))
    ae_dir = _ae_checkpoint(decoder)
    if not (ae_dir / "encoder").is_dir():
        raise FileNotFoundError(f"{decoder} holds no encoder/ (nor checkpoint/encoder/); pass the train_ae.py run the "
                                f"prompted prior {folder} was trained on ({settings.get('ae')}), or its fine-tuned "
                                f"{folder / 'ae'}")
    actual = encoder_fingerprint(ae_dir / "encoder")
    if actual != recorded:
        raise ValueError(f"the prompted prior {folder} was trained on the registers of {settings.get('ae')} (encoder "
                         f"fingerprint {recorded[:12]}), but {decoder} has another encoder ({actual[:12]}); pass that "
                         f"AE run (or the prior's fine-tuned {folder / 'ae'}), or train a prompted prior on this one "
                         f"(experiments/train_prompted.py --ae {decoder})")
    target, guide = settings["target"], demasker_guide(decoder)
    if target != guide:
        paired = folder / settings.get("demasker", settings.get("ae", ""))
        raise ValueError(f"the prompted prior {folder} samples the registers of the {target} (--target {target}), but "
                         f"the demasker of {decoder} is guided by the registers of the {guide}: it would decode from "
                         f"registers it was never trained on. Decode with the demasker the prior was trained for "
                         f"({paired}), or retrain the prior with --target {guide}")
    return ae_dir


def _cross_view(folder, settings, ae_dir):
    """(the cross-tokenizer view of a demasker canvas, the encoder's tokenizer) of a two-tokenizer prompted prior:
    the tokenizer files of `ae_dir` and the slots per token recorded in prompted.json."""
    from dataprep.cross_tokenizer import view_from_files

    recorded = settings.get("cross_tokenizer") or {}
    if "slots_per_token" not in recorded or not (ae_dir / "encoder_tokenizer.json").is_file():
        raise FileNotFoundError(f"the prompted prior {folder} reads demasker canvases through two tokenizers, but "
                                f"{PROMPTED_SETTINGS_FILE} records no slots_per_token or {ae_dir} holds no "
                                f"encoder_tokenizer.json; pass the AE run it was trained on, or "
                                + _retrain(folder, settings))
    view = view_from_files(ae_dir, recorded["slots_per_token"], recorded.get("max_length"))
    return view, view.encoder_tok


def prompt_rows(pprior, prompts, tokenizer, seq_len=None):
    """h_kappa's inputs for prompt texts, as experiments/train_prompted.py built them (prompts.encoder_rows): with
    one tokenizer the demasker layout BOS prompt EOS, with two the encoder's own tokens. tokenizer: the demasker's.
    Returns (prompt_ids, prompt_mask), each (B, Lc)."""
    from dataprep.prompts import encoder_rows

    shared = pprior.encoder_tokenizer is None
    length = seq_len or pprior.encoder_seq_len
    if length is None:
        raise ValueError("prompt_rows needs seq_len: the prompted prior records no encoder_seq_len")
    return encoder_rows(prompts, tokenizer if shared else pprior.encoder_tokenizer, length, shared)


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
        xt_cond, _ = embed_canvas(pprior.prior.encoder, x, mask_id, eos_id, pprior.prior.view)  # (B, Kc, d)
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
