"""`eval.py prompt`: prompted generation and infilling through the registers (paper App. H; beyond the paper's
experiments, docs/beyond.md).

Task (dataprep/prompts.py): the prompt is a held-out function's signature + docstring (the test split, split by file), the
answer its body. Every method decodes the same canvases (BOS prompt [M] ... [M], L tokens) with the same seeds
and the same number of MDM steps (the NFE grid):
  base           the base MDM (--base) with the prompt as fixed prefix
  conthendisc    App. H: z_0 ~ G_psi(eps, h_kappa(c)) (Eq. 12, --prompted-prior), the guided MDM (--ae) with the
                 prompt as prefix
  conwithindisc  the same, the registers redrawn from G_psi(eps, h(x_t), h_kappa(c)) at --refresh-at
Scores per row: CER and token F1 (metrics.token_f1, demasker tokens) of the generated answer against the true body,
the share of empty answers, the parse rate of prompt + answer (a bare signature + docstring parses), Gen-PPL of prompt + answer under --scorer (optional), each with a bootstrap
95% interval (--bootstrap; evaluation/metrics.py helpers), and NFE as the paper counts it (mean per sample).
Infilling rows (with --cond-prior): a centred middle span of --span-fraction of each held-out program masked,
the context visible: `infill base` (base MDM) and `infill guided` (registers from the conditional prior given the
context, prompting.infill); CER and token F1 of the span, parse rate of the filled program.
Under torchrun the batches are dealt over the ranks (the same numbers as one process). The guided demasker may
be experiments/train_prompted.py's fine-tuned OUT/ae (pass it as --ae); the prompted prior must belong to --ae's
encoder and sample the registers its demasker is guided by (prompting.check_pairing refuses any other pairing).
"""

import numpy as np
import torch

from evaluation import metrics as M
from experiments.eval_context import interval_of, nfe_grid, register_keep, score_texts, temperature
from evaluation.report import fmt_ci, md_table, panel


def _pairs(ctx, length, pprior=None):
    """The test pairs that fit `length`; h_kappa's prompt rows in the tokens the prompted prior was trained on (the
    encoder's own with two tokenizers, prompting.prompt_rows' layout)."""
    from dataprep.prompts import encode_pairs, load_pairs
    if not ctx.args.pairs:
        raise ValueError("eval.py prompt needs --pairs, the folder written by `python -m dataprep.prompts --out DIR`")
    own = pprior.encoder_tokenizer if pprior is not None else None
    batch = encode_pairs(load_pairs(ctx.args.pairs, "test"), ctx.tokenizer, length, own,
                         pprior.encoder_seq_len if own is not None else None)
    n = min(ctx.gen_num, len(batch["pairs"]))
    if n == 0:
        raise ValueError(f"no test pair of {ctx.args.pairs} fits --length {length}; raise --length")
    return batch, n


def _answer_ids(row, start, eos_id):
    row = [int(t) for t in row[start:]]
    return row[:row.index(eos_id)] if eos_id in row else row


def _prompted_sampler(ctx, method, steps, temp, pprior):
    """(canvas, prompt_ids, prompt_mask, seed) -> (tokens, paper NFE per sample) for one method."""
    from extensions import prompting as PR
    a = ctx.args
    prior_steps, refresh_steps = ctx.get("prior_steps"), ctx.get("refresh_prior_steps")

    def run(canvas, prompt_ids, prompt_mask, seed):
        torch.manual_seed(seed)
        prior_generator = torch.Generator().manual_seed(seed + 1)
        common = dict(steps=steps, temperature=temp, remasking=a.remasking)
        if method == "base":
            return PR.base_prompted(ctx.base(), canvas, **common)
        demasker, common["keep"] = ctx.ae()[0], register_keep(ctx, canvas.shape[1])  # --keep: the first k registers
        if method == "conthendisc":
            return PR.conthendisc_prompted(demasker, pprior, canvas, prompt_ids, prompt_mask, prior_steps=prior_steps,
                                           prior_generator=prior_generator, **common)
        return PR.conwithindisc_prompted(demasker, pprior, canvas, prompt_ids, prompt_mask, prior_steps=prior_steps,
                                         refresh_at=(0.5,), refresh_prior_steps=refresh_steps,
                                         prior_generator=prior_generator, **common)
    return run


def _decode_rows(ctx, run, canvases, starts, extra, n):
    """Batches of --batch-size through run(canvas, *extra rows, seed), dealt round-robin over the ranks (torchrun)
    and gathered in order on every rank: the seed is a function of the batch's first row, so any number of ranks
    gives the one-process result. Returns (tokens (n, L), mean NFE)."""
    from infra import distributed as D
    size, env = ctx.get("batch_size"), ctx.env
    mine = list(range(0, n, size))[env.rank::env.world_size]
    done = []
    for first in mine:
        rows = slice(first, min(n, first + size))
        tokens, report = run(canvases[rows].to(ctx.device), *(e[rows] for e in extra), ctx.args.seed + first)
        done.append((first, tokens.cpu(), report["nfe"] * (rows.stop - rows.start)))
    done = sorted(D.broadcast_object(D.gather_objects(done, env), env), key=lambda item: item[0])
    return torch.cat([tokens for _, tokens, _ in done]), float(sum(nfe for _, _, nfe in done) / n)


def _score(ctx, references, hypotheses, ref_ids, hyp_ids, programs):
    """CER, token F1 (intervals), parse rate and Gen-PPL of the full programs (intervals via score_texts)."""
    cers = np.array([M.cer(r, h) for r, h in zip(references, hypotheses)])
    f1s = np.array([M.token_f1(r, h) for r, h in zip(ref_ids, hyp_ids)])
    replicates = ctx.get("bootstrap")
    indices = M.bootstrap_indices(len(cers), replicates, ctx.args.seed + 7) if replicates else None
    empty = np.array([not h.strip() for h in hypotheses], dtype=np.float64)  # a bare docstring body parses
    row = {"cer": float(cers.mean()), "cer_ci": interval_of(cers, indices), "cer_sd": float(cers.std()),
           "empty_rate": float(empty.mean()), "empty_rate_ci": interval_of(empty, indices),
           "token_f1": float(f1s.mean()), "token_f1_ci": interval_of(f1s, indices), "token_f1_sd": float(f1s.std())}
    if ctx.args.scorer:
        scored = score_texts(ctx, programs)
        row.update({k: scored.get(k) for k in ("gen_ppl", "gen_ppl_ci", "parse_rate", "parse_rate_ci")})
    else:
        parsed = np.array([M.parses(t) for t in programs], dtype=np.float64)
        row.update(parse_rate=float(parsed.mean()), parse_rate_ci=interval_of(parsed, indices), gen_ppl=None)
    return row


def prompted_rows(ctx, length, temp):
    from extensions.prompting import load_prompted_prior
    a = ctx.args
    methods = (["base"] if a.base else []) + (["conthendisc", "conwithindisc"] if a.prompted_prior else [])
    if not methods:
        raise ValueError("eval.py prompt needs --base and/or --prompted-prior (experiments/train_prompted.py) to compare")
    # the prior must belong to --ae's encoder and sample the registers its demasker is guided by (refused otherwise)
    pprior = load_prompted_prior(a.prompted_prior, ae=a.ae, device=ctx.device, dtype=ctx.dtype,
                                 encoder_prompts=True) if a.prompted_prior else None
    batch, n = _pairs(ctx, length, pprior)
    tok, eos = ctx.tokenizer, ctx.eos_id
    mask_id = ctx.ae()[0].cfg.mask_token_id
    starts = batch["prompt_len"][:n]
    canvas = batch["ids"][:n].clone()
    canvas[torch.arange(length)[None, :] >= starts[:, None]] = mask_id  # (n, L) BOS prompt [M]...
    prompt_ids, prompt_mask = (t[:n] for t in batch["prompt"])
    truth = [p.answer for p in batch["pairs"][:n]]
    truth_ids = [_answer_ids(batch["ids"][i], int(starts[i]), eos) for i in range(n)]
    prompts = [p.prompt for p in batch["pairs"][:n]]
    rows = []
    for steps in nfe_grid(ctx, length):
        for method in methods:
            run = _prompted_sampler(ctx, method, steps, temp, pprior)
            tokens, nfe = _decode_rows(ctx, run, canvas, starts, (prompt_ids, prompt_mask), n)
            assert torch.equal(tokens[canvas != mask_id], canvas[canvas != mask_id])  # the prompt never changes
            ids = [_answer_ids(tokens[i], int(starts[i]), eos) for i in range(n)]
            answers = [tok.decode(i) for i in ids]
            row = {"task": "prompt", "method": method, "steps": steps, "nfe": nfe,
                   **_score(ctx, truth, answers, truth_ids, ids, [p + "\n" + t for p, t in zip(prompts, answers)]),
                   "examples": [prompts[0] + "\n" + answers[0]]}
            rows.append(row)
    return rows, n


def infill_rows(ctx, length, temp):
    from extensions import prompting as PR
    from dataprep.prompts import middle_span
    a = ctx.args
    batch, n = _pairs(ctx, length)
    ids, lengths = batch["ids"][:n], batch["lengths"][:n]
    demasker = ctx.ae()[0]
    mask_id, eos, tok = demasker.cfg.mask_token_id, ctx.eos_id, ctx.tokenizer
    canvas, span = middle_span(ids, lengths, a.span_fraction, mask_id)
    truth_ids = [ids[i][span[i]].tolist() for i in range(n)]
    cond_prior = ctx.prior(a.cond_prior, "--cond-prior")
    methods = (["infill base"] if a.base else []) + ["infill guided"]
    rows = []
    for steps in sorted({min(s, int(span.sum(1).max())) for s in nfe_grid(ctx, length)}):
        for method in methods:
            def run(c, seed, method=method):
                torch.manual_seed(seed)
                common = dict(steps=steps, temperature=temp, remasking=a.remasking)
                if method == "infill base":
                    return PR.base_infill(ctx.base(), c, **common)
                return PR.infill(demasker, cond_prior, c, prior_steps=ctx.get("refresh_prior_steps"),
                                 prior_generator=torch.Generator().manual_seed(seed + 1),
                                 keep=register_keep(ctx, c.shape[1]), **common)
            tokens, nfe = _decode_rows(ctx, run, canvas, None, (), n)
            assert torch.equal(tokens[~span], ids[~span])  # every context token kept
            hyp_ids = [tokens[i][span[i]].tolist() for i in range(n)]
            programs = [tok.decode(_answer_ids(tokens[i], 1, eos)) for i in range(n)]
            rows.append({"task": "infill", "method": method, "steps": steps, "nfe": nfe,
                         **_score(ctx, [tok.decode(t) for t in truth_ids], [tok.decode(h) for h in hyp_ids], truth_ids,
                                  hyp_ids, programs), "examples": programs[:1]})
    return rows


def run_prompt(ctx):
    length = ctx.args.length or ctx.data_length
    temp = temperature(ctx, 1.0)
    rows, n = prompted_rows(ctx, length, temp)
    if ctx.args.cond_prior:
        rows += infill_rows(ctx, length, temp)
    if not ctx.env.is_main:
        return None, None, None
    result = {"length": length, "temperature": temp, "num_samples": n, "bootstrap": ctx.get("bootstrap"),
              "span_fraction": ctx.args.span_fraction, "rows": rows, "keep": register_keep(ctx, length)}
    table = md_table(["task", "method", "steps", "NFE", "CER [95% CI]", "token F1 [95% CI]", "parse [95% CI]",
                      "Gen-PPL [95% CI]", "empty"],
                     [[r["task"], r["method"], r["steps"], f"{r['nfe']:.1f}", fmt_ci(r["cer"], r["cer_ci"], 3),
                       fmt_ci(r["token_f1"], r["token_f1_ci"], 3), fmt_ci(r["parse_rate"], r.get("parse_rate_ci"), 2),
                       fmt_ci(r.get("gen_ppl"), r.get("gen_ppl_ci"), 1), f"{r['empty_rate']:.2f}"] for r in rows])
    text = (f"{n} held-out prompts (signature + docstring -> body), L = {length}, temperature {temp}; CER / token F1 "
            f"of the generated body against the true one, parse rate and Gen-PPL of prompt + body; empty = share of empty "
            f"bodies (signature + docstring alone parses, so read the parse rate beside it).\n\n" + table)
    def series(task, key):  # one curve per method: (NFE, value, 95% low, high)
        curves = {}
        for method in dict.fromkeys(r["method"] for r in rows if r["task"] == task):
            mine = [r for r in rows if r["task"] == task and r["method"] == method]
            bounds = [r.get(f"{key}_ci") or [float("nan")] * 2 for r in mine]
            curves[method] = ([r["nfe"] for r in mine], [r[key] for r in mine], [b[0] for b in bounds],
                              [b[1] for b in bounds])
        return curves
    panels = [panel(f"Prompted generation (L={length}): CER of the body vs NFE", "NFE (log scale)",
                    "CER (lower is better)", series("prompt", "cer"), logx=True),
              panel(f"Prompted generation (L={length}): token F1 vs NFE", "NFE (log scale)",
                    "token F1 (higher is better)", series("prompt", "token_f1"), logx=True)]
    if any(r["task"] == "infill" for r in rows):
        panels.append(panel(f"Infilling (span {ctx.args.span_fraction:g}): CER of the span vs NFE", "NFE (log scale)",
                            "CER (lower is better)", series("infill", "cer"), logx=True))
    return result, text, panels
