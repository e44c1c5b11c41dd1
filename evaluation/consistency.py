"""Does a conditional prior read its condition? Agreement and copy, the consistency of ConWithinDisc's prior.

Paper map (arXiv 2603.20210): ConWithinDisc (Alg. 3, Sec. 4.3.2) redraws the registers mid-decoding from the
conditional prior, z ~ G_psi(eps, h(x_t)), trained by Alg. 4 on the view h(x^(r)) of a partly masked program
(generators.embed_canvas; h is the frozen h_phi, or h_mu trained with the prior, Sec. 4.3.2 comment (iii)).
App. E validates that prior by the MSE / PSNR of its x0 prediction (Fig. 9), which cannot see whether the
registers it draws agree with the tokens the canvas already shows. Ours, not the paper's: two measurements.

For a held-out program x (demasker ids, BOS .. EOS padded with EOS; S = its positions 0 .. length-1):
- agreement at revealed share r (default 0.25, 0.5, 0.75). Each position of x is revealed independently with
  probability r (one set of uniforms u per program, revealed iff u < r: the revealed sets R_r are nested
  across shares), the others are [M]: the canvas x_r, as the refresh of Alg. 3 sees it. Draw
  z ~ G_psi(eps, h(x_r)) with the refresh's DDIM sampler (generators.sample_registers), decode z alone from
  the all-[M] canvas with the guided MDM (mdm.generate: greedy, low-confidence remasking, one block, `steps`
  steps: what the registers say on their own), and score
      agreement(x, r) = |{i in R_r and S : decoded_i = x_i}| / |R_r and S|,
  the share of revealed tokens the registers reproduce. A program with no revealed position at a share is
  left out of that share (`programs` counts the others).
- copy: the condition is the clean program, h(x) with nothing masked (r = 1). The drawn z against the oracle
  h_phi(x): cosine (mean over the K registers) and MSE per entry (registers have norm sqrt(d): an entry's mean
  square is 1); its decoding against x: the agreement over all of S and the CER (characters with `to_text`,
  else token ids).

Two canvases (`canvas`: "random", "confidence" or "both"):
- random (above): each position revealed independently, the view Alg. 4 trains on (x^(r)).
- confidence: the canvas the refresh of Alg. 3 actually reads. With an unconditional prior: the guided MDM
  decodes from all [M] with ConThenDisc's registers (the unconditional draw below), greedily, `steps` steps,
  and its canvas x_t is taken before step round(r * steps): for refresh_at = (r,) exactly the x_t that
  generators.conwithindisc hands its redraw (same prior noise, temperature 0; tested). The revealed tokens
  are the decoding's own, scored over the positions up to the first revealed EOS (embed_canvas's view), and
  the unconditional row, the registers ConThenDisc keeps, agrees with them fully by construction. Without an
  unconditional prior: the oracle registers h_phi(x) order the canvas instead (the positions their guided
  decoding reveals first, x's tokens shown there), scored against x like the random canvas. The result names
  which in "confidence_order" ("unconditional" or "oracle").

Beside the conditional prior, every row has the same references, decoded the same way from the same noise eps
(one seed per batch of programs, reused by every draw, so the rows differ only by what the prior is given):
- oracle: z = h_phi(x) itself (the autoencoder, Alg. 6), the most the registers carry;
- blank: z ~ G_psi(eps, h(all [M])), the same conditional prior told nothing;
- unconditional (when given): z ~ G_psi'(eps), ConThenDisc's prior (Alg. 2).
A prior that reads its condition lies above blank and unconditional and nears the oracle as r grows; one that
ignores its condition equals blank exactly. `gain` = conditional - blank, paired per program. Intervals:
seeded percentile-bootstrap 95% intervals over programs (evaluation/metrics.py), one set of resamples for every
row and share, so rows compare pairwise.

measure() returns {"agreement": [rows, each with its "canvas"], "copy": [rows], ...}; summary_line() is one line
of it for a log.
"""

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from evaluation import metrics as M
from generators import embed_canvas, sample_registers
from mdm import _model_device, _resolve_mask_id, generate

SHARES = (0.25, 0.5, 0.75)  # revealed shares of the agreement rows (ConWithinDisc refreshes at 0.5 by default)
SOURCES = ("oracle", "conditional", "blank", "unconditional")  # row order
CANVASES = ("random", "confidence")  # how the revealed positions are chosen (module docstring)


@torch.no_grad()
def measure(demasker, cond_prior, ids, lengths, oracle, prior=None, shares=SHARES, steps=32, prior_steps=32,
            refresh_prior_steps=32, seed=0, bootstrap=200, batch_size=16, to_text=None, canvas="random"):
    """Agreement per revealed share and copy, for the conditional prior and its references (module docstring).

    demasker: the guided demasker. cond_prior: generators.Prior, conditional, with the encoder that reads the
    canvas (h_phi or h_mu) and its view. ids (n, L) long: held-out programs in demasker ids; lengths (n,): their
    BOS..EOS counts. oracle (n, K, d): h_phi(x), the first K registers (what the priors model). prior: an
    unconditional generators.Prior, or None. steps: MDM steps of every decoding; prior_steps: DDIM steps of the
    unconditional draw; refresh_prior_steps: of every conditional draw (the refresh's). bootstrap: replicates of
    each interval (0: none). to_text: tokens (B, L) -> B strings for the CER (None: the CER over token ids).
    canvas: "random", "confidence" or "both" (module docstring).
    """
    canvases = canvases_of(canvas)
    steps = min(steps, ids.shape[1])
    shares = check_inputs(demasker, cond_prior, ids, lengths, oracle, prior, shares)
    if "confidence" in canvases:
        check_confidence_steps(shares, steps)
    columns = {}
    for first in range(0, ids.shape[0], batch_size):
        part = slice(first, first + batch_size)
        batch = _measure_batch(demasker, cond_prior, prior, ids[part], lengths[part], oracle[part], shares, steps,
                               prior_steps, refresh_prior_steps, _batch_seed(seed, first), to_text, canvases)
        for key, values in batch.items():
            columns.setdefault(key, []).append(values)
    columns = {key: np.concatenate(parts) for key, parts in columns.items()}
    sources = [s for s in SOURCES if s != "unconditional" or prior is not None]
    order = None if "confidence" not in canvases else ("unconditional" if prior is not None else "oracle")
    return summarise(columns, sources, shares, bootstrap, seed,
                     {"num_programs": int(ids.shape[0]), "steps": steps, "prior_steps": prior_steps,
                      "refresh_prior_steps": refresh_prior_steps, "canvases": list(canvases),
                      "confidence_order": order, "cer_unit": "characters" if to_text is not None else "tokens"})


def canvases_of(canvas):
    """"random" | "confidence" | "both" (or an iterable of the first two) -> a tuple in CANVASES order."""
    names = CANVASES if canvas == "both" else (canvas,) if isinstance(canvas, str) else tuple(canvas)
    unknown = [name for name in names if name not in CANVASES]
    if unknown or not names:
        raise ValueError(f"canvas must be 'random', 'confidence' or 'both', got {canvas!r}")
    return tuple(name for name in CANVASES if name in names)


def share_step(share, steps):
    """The MDM step before which the confidence canvas at `share` is taken: round(share * steps), as
    generators.refresh_steps places ConWithinDisc's refresh at refresh_at = (share,)."""
    return round(share * steps)


def check_confidence_steps(shares, steps):
    """Every share's canvas must be taken strictly inside the decoding (some, not all, positions revealed)."""
    for r in shares:
        if not 0 < share_step(r, steps) < steps:
            raise ValueError(f"the confidence canvas at share {r} is taken before step round({r} x {steps}) = "
                             f"{share_step(r, steps)}, outside 1..{steps - 1}: raise --steps, or drop the share")


def check_inputs(demasker, cond_prior, ids, lengths, oracle, prior, shares):
    """Every mismatch named with its fix before any model runs. Returns the shares as a sorted list of floats."""
    if not cond_prior.conditional or cond_prior.encoder is None:
        raise ValueError("the consistency measurement needs a conditional prior with its encoder: train it with "
                         "train_prior.py --conditional and load it with generators.load_prior")
    if prior is not None and prior.conditional:
        raise ValueError("prior must be the unconditional prior (train_prior.py without --conditional), or None")
    if ids.dim() != 2 or ids.shape[0] < 1 or lengths.shape != ids.shape[:1] or oracle.shape[0] != ids.shape[0]:
        raise ValueError(f"ids (n, L), lengths (n,) and oracle (n, K, d) must hold the same n >= 1 programs; got "
                         f"{tuple(ids.shape)}, {tuple(lengths.shape)}, {tuple(oracle.shape)}")
    K, max_registers = cond_prior.num_registers, demasker.cfg.max_registers
    if oracle.shape[1] != K or (prior is not None and prior.num_registers != K):
        raise ValueError(f"the oracle has {oracle.shape[1]} registers, the conditional prior models {K}"
                         + (f" and the unconditional {prior.num_registers}" if prior is not None else "")
                         + ": pass the first K registers of h_phi(x) and priors trained with the same --num-registers")
    if K > max_registers:
        raise ValueError(f"the priors model K={K} registers but the demasker reads at most {max_registers}; train "
                         f"the priors with --num-registers <= {max_registers}")
    shares = sorted({float(r) for r in shares})
    if not shares or not all(0 < r < 1 for r in shares):
        raise ValueError(f"revealed shares must lie in (0, 1) (the copy row is r = 1), got {shares}")
    return shares


def _batch_seed(seed, first):
    """The prior noise of the batch starting at program `first`: a function of (seed, first) only."""
    return int(np.random.SeedSequence([seed, first]).generate_state(1)[0])


def _measure_batch(demasker, cond_prior, prior, x, lengths, oracle, shares, steps, prior_steps, refresh_steps,
                   noise_seed, to_text, canvases):
    """Per-program columns {name: (B,) float64} of one batch of programs x (B, L)."""
    device = _model_device(demasker)
    mask_id, eos_id = _resolve_mask_id(demasker, None), demasker.cfg.eos_token_id
    x, oracle = x.to(device), oracle.to(device).float()
    B, L = x.shape
    span = torch.arange(L, device=device)[None, :] < lengths.to(device)[:, None]  # (B, L) the program's positions

    def draw(canvas):  # z ~ G_psi(eps, h(canvas)), the same eps for every draw of the batch
        cond, cond_mask = embed_canvas(cond_prior.encoder, canvas, mask_id, eos_id, cond_prior.view)
        noise = torch.Generator().manual_seed(noise_seed + 1)
        return sample_registers(cond_prior, B, refresh_steps, cond, cond_mask, generator=noise)[0]

    def decode(registers):  # the guided MDM from all [M], the registers fixed
        return generate(demasker, B, L, L, steps, 0.0, "low_confidence", mask_id, registers=registers)[0]

    registers = {"oracle": oracle, "blank": draw(torch.full_like(x, mask_id))}
    if prior is not None:
        noise = torch.Generator().manual_seed(noise_seed + 1)
        registers["unconditional"] = sample_registers(prior, B, prior_steps, generator=noise)[0]
    decoded = {name: decode(z) for name, z in registers.items()}
    columns = {}
    if "random" in canvases:
        u = torch.rand(B, L, generator=torch.Generator().manual_seed(noise_seed)).to(device)  # revealed iff u < r
        views = {r: (x.masked_fill(~(u < r), mask_id), span) for r in shares}
        columns.update(_canvas_columns("random", x, views, draw, decode, decoded, mask_id))
    if "confidence" in canvases:
        order = "unconditional" if prior is not None else "oracle"
        taken = confidence_canvases(demasker, registers[order], L, steps, shares, mask_id)
        if prior is not None:  # ConThenDisc's own canvas, scored up to its first revealed EOS
            views = {r: (canvas, first_eos_span(canvas, eos_id)) for r, canvas in taken.items()}
            target = None
        else:  # x shown where the oracle's guided decoding revealed
            views = {r: (x.masked_fill(canvas == mask_id, mask_id), span) for r, canvas in taken.items()}
            target = x
        references = {name: decoded[name] for name in (order, "blank")}
        columns.update(_canvas_columns("confidence", target, views, draw, decode, references, mask_id))
    registers["conditional"] = draw(x)  # the copy: the clean program, nothing masked
    decoded["conditional"] = decode(registers["conditional"])
    for name, z in registers.items():
        columns[f"copy/agreement:{name}"] = agreement(decoded[name], x, span)
        columns[f"copy/cosine:{name}"] = _np(F.cosine_similarity(z.float(), oracle, dim=-1).mean(1))
        columns[f"copy/mse:{name}"] = _np((z.float() - oracle).pow(2).flatten(1).mean(1))
        columns[f"copy/cer:{name}"] = error_rates(x, decoded[name], lengths, eos_id, to_text)
    return columns


def _canvas_columns(kind, target, views, draw, decode, decoded, mask_id):
    """Agreement columns of one kind of canvas. views {r: (shown canvas (B, L), scored span (B, L) bool)}: the
    revealed positions of the span are scored; target (B, L): the tokens to agree with (None: the shown canvas
    itself); decoded {source: (B, L)}: the references' decodings. The conditional prior draws given each shown
    canvas, and its registers are decoded like the references'."""
    columns = {}
    for r, (shown, span) in views.items():
        revealed = (shown != mask_id) & span  # (B, L)
        goal = shown if target is None else target
        columns[f"{kind}/revealed@{r}"] = _np(revealed.sum(1) / span.sum(1).clamp_min(1))
        for name, tokens in decoded.items():
            columns[f"{kind}/agreement:{name}@{r}"] = agreement(tokens, goal, revealed)
        columns[f"{kind}/agreement:conditional@{r}"] = agreement(decode(draw(shown)), goal, revealed)
    return columns


class _Taken(Exception):
    """Raised by confidence_canvases' hook once every canvas is taken: the rest of the decoding is not needed."""


@torch.no_grad()
def confidence_canvases(demasker, registers, length, steps, shares, mask_id):
    """{r: x_t (B, L)}: the canvas of the guided MDM decoding from all [M] with `registers` (B, K, d) fixed
    (greedy, low-confidence remasking, one block of `length`, `steps` steps), taken before step
    share_step(r, steps): what ConWithinDisc's refresh at refresh_at = (r,) reads, given these first
    registers (generators.conwithindisc). The decoding stops once the last canvas is taken."""
    wanted = {}
    for r in shares:
        wanted.setdefault(share_step(r, steps), []).append(r)
    taken = {}

    def hook(step, x, current, register_mask):  # mdm_loop's refresh hook: called before every step
        for r in wanted.get(step, ()):
            taken[r] = x.clone()
        if len(taken) == len(shares):
            raise _Taken
        return None

    try:
        generate(demasker, registers.shape[0], length, length, steps, 0.0, "low_confidence", mask_id,
                 registers=registers, refresh_registers=hook)
    except _Taken:
        pass
    missing = [r for r in shares if r not in taken]
    if missing:
        raise ValueError(f"no canvas taken at shares {missing} within {steps} steps: see check_confidence_steps")
    return taken


def first_eos_span(canvas, eos_id):
    """(B, L) bool: the positions up to and including the first revealed EOS of each canvas (all of them
    without one): the text embed_canvas reads, the rest being padding."""
    is_eos = canvas == eos_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], canvas.shape[1],
                                                                                   dtype=torch.long))
    return torch.arange(canvas.shape[1], device=canvas.device)[None, :] <= first[:, None]


def _np(tensor):
    return tensor.detach().float().cpu().numpy().astype(np.float64)


def agreement(decoded, x, revealed):
    """Per program: the share of revealed positions where decoded == x; nan without a revealed position.
    decoded, x (B, L) long; revealed (B, L) bool. Returns (B,) float64."""
    hits = ((decoded == x) & revealed).sum(1).double()
    count = revealed.sum(1).double()
    return _np(torch.where(count > 0, hits / count.clamp_min(1), torch.full_like(hits, math.nan)))


def error_rates(x, decoded, lengths, eos_id, to_text=None):
    """Per program: the CER of the decoding against x, over characters (to_text) or token ids (the program's
    ids between BOS and EOS against the decoding's up to its first EOS). Returns (B,) float64."""
    if to_text is not None:
        return np.array([M.cer(a, b) for a, b in zip(to_text(x), to_text(decoded))], dtype=np.float64)
    rates = []
    for row, hypothesis, length in zip(x.tolist(), decoded.tolist(), lengths.tolist()):
        hypothesis = hypothesis[1:]  # the BOS slot
        if eos_id in hypothesis:
            hypothesis = hypothesis[:hypothesis.index(eos_id)]
        rates.append(M.cer(np.asarray(row[1:length - 1]), np.asarray(hypothesis)))
    return np.asarray(rates, dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# Rows with their intervals
# ------------------------------------------------------------------------------------------------


def summarise(columns, sources, shares, bootstrap, seed, settings):
    """Per-program columns -> {settings, "shares", "agreement": [rows], "copy": [rows]}; every interval from one
    set of bootstrap resamples over the programs (None with bootstrap = 0). An agreement row per canvas, share and
    source the columns hold (the confidence canvas has the conditional, blank and the source that ordered it)."""
    n = len(next(iter(columns.values())))
    indices = M.bootstrap_indices(n, bootstrap, seed + 7) if bootstrap else None
    stat = lambda key: _mean_ci(columns[key], indices)  # noqa: E731
    agreement_rows = []
    for kind in settings["canvases"]:
        for r in shares:
            for name in sources:
                key = f"{kind}/agreement:{name}@{r}"
                if key not in columns:
                    continue
                row = {"canvas": kind, "source": name, "share": r,
                       "revealed": float(np.mean(columns[f"{kind}/revealed@{r}"])),
                       "programs": int(np.isfinite(columns[key]).sum()), **_named("agreement", stat(key))}
                if name == "conditional":
                    gain = columns[key] - columns[f"{kind}/agreement:blank@{r}"]
                    row.update(_named("gain", _mean_ci(gain, indices)))
                agreement_rows.append(row)
    copy_rows = []
    for name in sources:
        row = {"source": name}
        for metric in ("agreement", "cosine", "mse", "cer"):
            row.update(_named(metric, stat(f"copy/{metric}:{name}")))
        copy_rows.append(row)
    return {**settings, "shares": shares, "bootstrap": int(bootstrap), "agreement": agreement_rows, "copy": copy_rows}


def _mean_ci(values, indices):
    """(mean over the finite values, its 95% interval over the resamples or None); nan when none is finite."""
    values = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample (or a share) without a finite value
        mean = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
        interval = None if indices is None else M.percentile_interval(np.nanmean(values[indices], axis=1))
    return mean, interval


def _named(name, stat):
    mean, interval = stat
    return {name: mean if math.isfinite(mean) else None, f"{name}_ci": interval}


def row_of(result, part, source, share=None, canvas="random"):
    """The row of `source` in result[part] ("agreement" at `share` on `canvas`, or "copy"), or None."""
    for row in result[part]:
        if row["source"] == source and (share is None or (row["share"] == share and row["canvas"] == canvas)):
            return row
    return None


def summary_line(result):
    """One line for a training log: agreement per canvas and share (conditional / blank / the reference: the
    oracle, on the confidence canvas the source that ordered it) and the copy figures."""
    def value(row, key, digits=2):
        return "n/a" if row is None or row.get(key) is None else f"{row[key]:.{digits}f}"
    parts = []
    for kind in result["canvases"]:
        reference = "oracle" if kind == "random" else result["confidence_order"]
        cells = [f"r={r:g} " + "/".join(value(row_of(result, "agreement", s, r, kind), "agreement")
                                        for s in ("conditional", "blank", reference)) for r in result["shares"]]
        name = "agreement" if kind == "random" else "confidence-canvas agreement"
        parts.append(f"{name} (conditional/blank/{reference}) " + ", ".join(cells))
    copy = {s: row_of(result, "copy", s) for s in ("conditional", "oracle")}
    return ("; ".join(parts) + f"; copy: cosine {value(copy['conditional'], 'cosine', 3)}, CER "
            f"{value(copy['conditional'], 'cer')} (oracle {value(copy['oracle'], 'cer')})")
