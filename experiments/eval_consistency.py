"""`eval.py consistency`: does the conditional prior of ConWithinDisc (Alg. 3, Sec. 4.3.2) read its condition?

Ours, not the paper's (App. E validates the prior by MSE / PSNR only, Fig. 9, blind to this). On --num held-out
programs, evaluation/consistency.py measures (a) agreement: registers drawn from the conditional prior given
h(x_t) with a share r of each program's tokens revealed (--revealed-shares), decoded alone by the guided MDM from
all [M] (--steps, default the length; greedy): the share of revealed tokens the decoding reproduces; (b) copy:
given the clean h(x), the cosine / MSE of the drawn registers to h_phi(x) and the CER of their decoding. Beside
it: the oracle z = h_phi(x) (Alg. 6), the same prior given the all-[M] canvas (blank) and, with --prior, the
unconditional prior (Alg. 2), every row from the same noise, with bootstrap 95% intervals over the programs.
--canvas picks the revealed positions: random (the training masks of Alg. 4), confidence (the canvas the
refresh of Alg. 3 reads: ConThenDisc's own decoding with --prior's registers, stopped at share r; without
--prior, the program revealed in the order the oracle registers' decoding reveals it) or both (the default).

    python eval.py consistency --ae runs/ae --cond-prior runs/cprior --prior runs/prior

Writes OUT/consistency.json (the rows and the command), a REPORT.md section (an agreement table per canvas and
the copy table) and OUT/consistency.png (agreement vs revealed share, one curve per canvas and source).
"""

import math

from evaluation.consistency import measure, row_of
from evaluation.report import fmt_ci, md_table, panel
from experiments.eval_generation import clean_registers


def run_consistency(ctx):
    from sample import decode_programs

    demasker, _ = ctx.ae()
    cond_prior = ctx.prior(ctx.args.cond_prior, "--cond-prior")
    prior = ctx.prior(ctx.args.prior) if ctx.args.prior else None
    programs = ctx.held_out(ctx.get("num"))
    oracle = clean_registers(ctx, programs, cond_prior.num_registers)  # h_phi(x): the first K registers
    length = programs["ids"].shape[1]
    result = measure(demasker, cond_prior, programs["ids"], programs["lengths"], oracle, prior=prior,
                     shares=ctx.args.revealed_shares, steps=ctx.args.steps or length,
                     prior_steps=ctx.get("prior_steps"), refresh_prior_steps=ctx.get("refresh_prior_steps"),
                     seed=ctx.args.seed, bootstrap=ctx.get("bootstrap"), batch_size=ctx.get("batch_size"),
                     to_text=lambda tokens: decode_programs(ctx.tokenizer, tokens, ctx.eos_id, ctx.bos_id),
                     canvas=ctx.args.canvas)
    result.update(length=length, cond_prior=str(ctx.args.cond_prior), prior=ctx.args.prior)
    return result, report_text(result), [agreement_panel(result)]


def _sources(result, canvas):
    """The sources with agreement rows on `canvas`, in row order."""
    return list(dict.fromkeys(row["source"] for row in result["agreement"] if row["canvas"] == canvas))


CANVAS_TEXT = {
    "random": "Random canvas: each position revealed independently (the masks the conditional prior trains on).",
    "unconditional": "Confidence canvas: ConThenDisc's own decoding (the unconditional prior's registers, greedy, "
                     "low-confidence remasking) stopped at share r, the x_t ConWithinDisc's refresh reads; scored "
                     "against its revealed tokens up to the first revealed EOS. The unconditional row keeps the "
                     "registers that decoded it (1 by construction).",
    "oracle": "Confidence canvas: the program revealed in the order the oracle registers' guided decoding reveals it "
              "(no --prior given, so not ConThenDisc's canvas), scored against the program.",
}


def agreement_table(result, canvas):
    """Agreement per revealed share and source on one canvas, with the conditional's gain over blank."""
    sources = _sources(result, canvas)
    header = ["revealed share r (mean revealed)"] + sources + ["gain (conditional - blank)"]
    rows = []
    for r in result["shares"]:
        cells = [row_of(result, "agreement", s, r, canvas) for s in sources]
        conditional = row_of(result, "agreement", "conditional", r, canvas)
        rows.append([f"{r:g} ({cells[0]['revealed']:.2f})"] + [fmt_ci(c["agreement"], c["agreement_ci"]) for c in cells]
                    + [fmt_ci(conditional["gain"], conditional["gain_ci"])])
    note = CANVAS_TEXT["random" if canvas == "random" else result["confidence_order"]]
    return note + "\n\n" + md_table(header, rows)


def report_text(result):
    """Markdown: an agreement table per canvas (the conditional's gain over blank), then the copy table."""
    copy = md_table(["source", "cosine to h_phi(x)", "MSE per entry", "agreement", f"CER ({result['cer_unit']})"],
                    [[row["source"], fmt_ci(row["cosine"], row["cosine_ci"]), fmt_ci(row["mse"], row["mse_ci"]),
                      fmt_ci(row["agreement"], row["agreement_ci"]), fmt_ci(row["cer"], row["cer_ci"])]
                     for row in result["copy"]])
    tables = "\n\n".join(agreement_table(result, canvas) for canvas in result["canvases"])
    return (f"{result['num_programs']} held-out programs (L = {result['length']}), decoded with {result['steps']} "
            f"MDM steps from all [M] by the registers alone; conditional draws with {result['refresh_prior_steps']} "
            f"DDIM steps, the same noise for every source; 95% bootstrap intervals over the programs.\n\n"
            f"Agreement: the share of revealed tokens the decoding reproduces.\n\n" + tables
            + "\n\nCopy: the condition is the clean program h(x).\n\n" + copy)


def agreement_panel(result):
    """Agreement vs revealed share, one curve per canvas and source, with its 95% error bars."""
    series = {}
    for canvas in result["canvases"]:
        for source in _sources(result, canvas):
            rows = [row_of(result, "agreement", source, r, canvas) for r in result["shares"]]
            values = [math.nan if row["agreement"] is None else row["agreement"] for row in rows]
            bounds = [row["agreement_ci"] or [math.nan, math.nan] for row in rows]
            label = source if len(result["canvases"]) == 1 else f"{source} ({canvas})"
            series[label] = (result["shares"], values, [b[0] for b in bounds], [b[1] for b in bounds])
    return panel("Consistency: agreement with the revealed tokens", "revealed share r",
                 "agreement (higher: the registers keep the tokens)", series)
