"""Generation (Sec. 5.3, App. B, E, G): the headline quality vs NFE and speedup (Fig. 6 / 12), the ablations
(Fig. 11), the priors' PSNR vs t (Fig. 9) and PRDC (App. E), and the marginal trap (App. B, Theorem B.1).
Each run_* takes eval_context.Context and returns (result, text, panels).
"""

import dataclasses

import numpy as np
import torch

import metrics as M
from report import md_table, panel
from sample import generate
from eval_context import REFRESH_FRACTIONS, nfe_grid, real_reference, score_texts, sharded_samples, temperature


# ------------------------------------------------------------------------------------------------
# Generation: Fig. 6 (headline) and the ablations of Fig. 11
# ------------------------------------------------------------------------------------------------


def method_sampler(ctx, method, length, steps, temp, prior=None, cond_prior=None, refresh_at=(0.5,), decoding=None):
    """make_batch for sharded_samples: 'base' (plain MDM), 'conthendisc' (Alg. 2), 'conwithindisc' (Alg. 3).
    decoding: mdm.Decoding (None: LLaDA's fixed schedule). With an adaptive rule the NFE is per sample: the mean
    demasker calls of the batch's rows (mdm stats) plus the priors' cost."""
    from generators import conthendisc, conwithindisc
    remasking, prior_steps = ctx.args.remasking, ctx.get("prior_steps")

    def nfe_of(report, stats):
        adaptive = decoding is not None and decoding.rule != "fixed"
        calls = float(np.mean(stats["nfe_per_sample"])) if adaptive else report["demasker_calls"]
        extra = report["nfe"] - report["demasker_calls"]
        extra_flops = report.get("nfe_flops", report["nfe"]) - report["demasker_calls"]
        return {"nfe": calls + extra, "nfe_flops": calls + extra_flops, "demasker_calls": calls}

    if method == "base":
        base = ctx.base()

        def run(idx, g, pg):
            stats = {}
            tokens, calls = generate(base, len(idx), length, length, steps, temp, remasking, generator=g,
                                     decoding=decoding, stats=stats)
            return tokens, nfe_of({"nfe": calls, "demasker_calls": calls}, stats)
        return run
    demasker, _ = ctx.ae()
    if method == "conthendisc":
        def run(idx, g, pg):
            stats = {}
            tokens, report = conthendisc(demasker, prior, len(idx), length, length, steps, temp, remasking,
                                         prior_steps=prior_steps, generator=g, prior_generator=pg,
                                         decoding=decoding, stats=stats)
            return tokens, nfe_of(report, stats)
        return run

    def run(idx, g, pg):
        stats = {}
        tokens, report = conwithindisc(demasker, cond_prior, len(idx), length, length, steps, temp, remasking,
                                       prior=prior, prior_steps=prior_steps, refresh_at=refresh_at,
                                       refresh_prior_steps=ctx.get("refresh_prior_steps"), generator=g,
                                       prior_generator=pg, decoding=decoding, stats=stats)
        return tokens, nfe_of(report, stats)
    return run


def sweep(ctx, label, length, make_sampler, steps_list, reference_features):
    """Rows {"method", "steps", "nfe", metrics...} of one method over the NFE grid (rank 0; None elsewhere)."""
    rows = []
    for steps in steps_list:
        texts, nfe, stats = sharded_samples(ctx, ctx.get("num"), make_sampler(steps),
                                            f"{label} L={length} steps={steps}", with_stats=True)
        if texts is not None:  # nfe: the paper's count (parameter ratio); nfe_flops: ours; wall-clock beside
            rows.append({"method": label, "steps": steps, "nfe": nfe, **stats,
                         **score_texts(ctx, texts, reference_features), "examples": texts[:2]})
    return rows


def speedups(rows, length):
    """For each guided method: the smallest NFE at which it matches the base MDM at NFE = length (or the
    base's largest NFE if length was not swept): MAUVE >=, Gen-PPL <=, and both. speedup = base NFE / it."""
    base = [r for r in rows if r["method"] == "base"]
    if not base:
        return {}
    reference = max(base, key=lambda r: (r["steps"] == length, r["steps"]))
    tests = {"mauve": lambda r: r["mauve"] >= reference["mauve"],
             "gen_ppl": lambda r: r["gen_ppl"] <= reference["gen_ppl"]}
    tests["both"] = lambda r: tests["mauve"](r) and tests["gen_ppl"](r)
    out = {"base_reference": {k: reference[k] for k in ("steps", "nfe", "mauve", "gen_ppl")}}
    empty = reference.get("empty_rate", 0.0)
    if empty > 0.5:  # e.g. an undertrained MDM whose one-block low-confidence decoding fills all EOS first
        out["base_reference"]["degenerate"] = f"{100 * empty:.0f}% of the base MDM's samples are empty"
    for method in sorted({r["method"] for r in rows} - {"base"}):
        out[method] = {}
        for name, test in tests.items():
            matching = sorted((r for r in rows if r["method"] == method and test(r)), key=lambda r: r["nfe"])
            first = matching[0] if matching else None
            out[method][name] = {"nfe": first["nfe"] if first else None, "steps": first["steps"] if first else None,
                                 "speedup": reference["nfe"] / first["nfe"] if first else None}
    return out


def generation_table(rows):
    return md_table(["method", "steps", "NFE (paper)", "NFE (FLOPs)", "s/sample", "MAUVE", "Gen-PPL", "entropy",
                     "parse", "dup"],
                    [[r["method"], r["steps"], f"{r['nfe']:.1f}", f"{r.get('nfe_flops', r['nfe']):.1f}",
                      f"{r.get('seconds_per_sample', float('nan')):.3f}", f"{r['mauve']:.3f}" + (
                        f" ± {r['mauve_sd']:.3f}" if len(r["mauve_seeds"]) > 1 else ""), f"{r['gen_ppl']:.2f}",
                      f"{r['unigram_entropy']:.2f}", f"{r['parse_rate']:.2f}", f"{r['duplicate_rate']:.2f}"]
                     for r in rows])


def generation_panels(title, rows):
    methods = sorted({r["method"] for r in rows}, key=lambda m: [r["method"] for r in rows].index(m))
    series = lambda key: {m: ([r["nfe"] for r in rows if r["method"] == m], [r[key] for r in rows if r["method"] == m])
                          for m in methods}
    return [panel(f"{title}: MAUVE", "NFE", "MAUVE", series("mauve"), logx=True),
            panel(f"{title}: Gen-PPL", "NFE", "Gen-PPL", series("gen_ppl"), logx=True)]


def length_priors(pairs, flag):
    """{L: folder} from --length-priors / --length-cond-priors values "L=DIR" (the paper: one prior per length,
    K = 8 at L = 512 and K = 16 at L = 1024)."""
    out = {}
    for pair in pairs or []:
        length, sep, folder = pair.partition("=")
        if not sep or not length.isdigit():
            raise ValueError(f"{flag} takes L=DIR pairs (e.g. 512=runs/prior-k8), got {pair!r}")
        out[int(length)] = folder
    return out


def run_fig6(ctx):
    per_length = length_priors(ctx.args.length_priors, "--length-priors")
    per_length_cond = length_priors(ctx.args.length_cond_priors, "--length-cond-priors")
    temp = temperature(ctx, 1.0)
    result, sections, panels = {"temperature": temp, "lengths": {}, "priors": {}}, [], []
    for length in ctx.args.lengths or ctx.get("lengths"):
        prior = ctx.prior(per_length.get(length, ctx.args.prior))
        cond_folder = per_length_cond.get(length, ctx.args.cond_prior)
        cond_prior = ctx.prior(cond_folder, "--cond-prior") if cond_folder else None
        result["priors"][str(length)] = {"prior": per_length.get(length, ctx.args.prior), "cond_prior": cond_folder}
        reference_features, ceiling = real_reference(ctx, length, ctx.get("num"))
        steps_list = nfe_grid(ctx, length)
        methods = [("base", {}), ("conthendisc", {"prior": prior})]
        if cond_prior is not None:
            methods.append(("conwithindisc", {"prior": prior, "cond_prior": cond_prior}))
        rows = []
        for method, kwargs in methods:
            rows += sweep(ctx, method, length, lambda s, m=method, k=kwargs: method_sampler(ctx, m, length, s, temp, **k),
                          steps_list, reference_features)
        if ctx.env.is_main:
            result["lengths"][str(length)] = {"rows": rows, "real": ceiling, "speedup": speedups(rows, length)}
            sections.append(f"### L = {length}\n\nReal held-out programs: MAUVE {ceiling.get('mauve', float('nan')):.3f}, "
                            f"Gen-PPL {ceiling['gen_ppl']:.2f}, entropy {ceiling['unigram_entropy']:.2f}.\n\n"
                            + generation_table(rows) + "\n\n" + speedup_text(result["lengths"][str(length)]["speedup"], length))
            panels += generation_panels(f"Fig. 6 (L={length})", rows)
    if not ctx.env.is_main:
        return None, None, None
    result.update(num_samples=ctx.get("num"), prior_steps=ctx.get("prior_steps"),
                  refresh_prior_steps=ctx.get("refresh_prior_steps"), refresh_at=[0.5])
    return result, "\n\n".join(sections), panels


def speedup_text(info, length):
    if not info:
        return "No base MDM rows: no speedup."
    ref = info["base_reference"]
    lines = [f"Speedup vs the base MDM at NFE {ref['nfe']:.0f} (MAUVE {ref['mauve']:.3f}, Gen-PPL {ref['gen_ppl']:.2f}):"]
    if ref.get("degenerate"):
        lines.append(f"- WARNING: the reference is degenerate ({ref['degenerate']}); a speedup against it means "
                     "nothing. Try --remasking random or a better-trained base MDM.")
    for method, tests in info.items():
        if method == "base_reference":
            continue
        parts = [f"{name}: " + (f"x{t['speedup']:.1f} at NFE {t['nfe']:.1f}" if t["speedup"] else "not matched in the sweep")
                 for name, t in tests.items()]
        lines.append(f"- {method}: " + "; ".join(parts))
    return "\n".join(lines)


def run_fig11(ctx):
    length = ctx.args.length or ctx.get("lengths")[0]
    temp = temperature(ctx, 1.0)
    steps_list = ctx.args.nfe or [s for s in nfe_grid(ctx, length) if s < length][-3:] or [length]
    reference_features, ceiling = real_reference(ctx, length, ctx.get("num"))
    prior = ctx.prior(ctx.args.prior)
    rows = {"registers": [], "refresh": [], "offsets": []}
    for folder in ctx.args.k_priors or [ctx.args.prior]:
        k_prior = ctx.prior(folder, "--k-priors")
        rows["registers"] += sweep(ctx, f"K={k_prior.num_registers}", length,
                                   lambda s, p=k_prior: method_sampler(ctx, "conthendisc", length, s, temp, prior=p),
                                   steps_list, reference_features)
    if ctx.args.cond_prior:
        cond_prior = ctx.prior(ctx.args.cond_prior, "--cond-prior")
        for fraction in REFRESH_FRACTIONS:
            rows["refresh"] += sweep(ctx, f"@{fraction:g}", length, lambda s, f=fraction: method_sampler(
                ctx, "conwithindisc", length, s, temp, prior=prior, cond_prior=cond_prior, refresh_at=(f,)),
                steps_list, reference_features)
    offsets = [("offsets on", prior)]
    if prior.block_offsets:
        offsets.append(("trained on, sampled off", dataclasses.replace(prior, block_offsets=False)))
    if ctx.args.prior_no_offsets:
        offsets.append(("trained off", ctx.prior(ctx.args.prior_no_offsets, "--prior-no-offsets")))
    for label, p in offsets:
        rows["offsets"] += sweep(ctx, label, length, lambda s, p=p: method_sampler(ctx, "conthendisc", length, s,
                                                                                   temp, prior=p),
                                 steps_list, reference_features)
    if not ctx.env.is_main:
        return None, None, None
    result = {"length": length, "temperature": temp, "steps": steps_list, "real": ceiling, **rows}
    missing = [flag for flag, given in (("--k-priors", ctx.args.k_priors), ("--cond-prior", ctx.args.cond_prior),
                                        ("--prior-no-offsets", ctx.args.prior_no_offsets)) if not given]
    text = "\n\n".join(f"### {name}\n\n" + generation_table(r) for name, r in rows.items() if r)
    if missing:
        text += "\n\nNot run (flags not given): " + ", ".join(missing)
    panels = [p for name, r in rows.items() if r for p in generation_panels(f"Fig. 11 {name}", r)]
    return result, f"Ablations at L={length} ({ctx.get('num')} samples per point).\n\n" + text, panels


# ------------------------------------------------------------------------------------------------
# The priors: PSNR vs t (Fig. 9) and PRDC (App. E)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def clean_registers(ctx, programs, num_registers):
    """z_0 = h_phi(x_0), the first num_registers registers (what the priors model), float32 on the device."""
    _, encoder = ctx.ae()
    z = encoder(programs["enc_ids"].to(ctx.device), attention_mask=programs["enc_mask"].to(ctx.device))
    return z[:, :num_registers].float()


@torch.no_grad()
def partial_condition(ctx, cond_prior, programs, ratio, seed):
    """h(x^(r)) for a conditional prior: each DEMASKER position masked with probability r, then the encoder's
    view of that canvas (generators.embed_canvas with the prior's cross-tokenizer view): what conditional
    training builds (train_prior.conditioning_inputs) and what ConWithinDisc presents."""
    from generators import embed_canvas
    from latent_data import mask_positions
    ids = programs["ids"].to(ctx.device)
    u = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)).to(ctx.device)
    masked = mask_positions(u, torch.full((ids.shape[0],), ratio, device=ctx.device))
    return embed_canvas(cond_prior.encoder, ids.masked_fill(masked, -1), -1, ctx.eos_id,
                        view=getattr(cond_prior, "view", None))


def run_fig9(ctx):
    from schedules import q_sample, register_times
    priors = {"unconditional": ctx.prior(ctx.args.prior)}
    if ctx.args.cond_prior:
        priors["conditional"] = ctx.prior(ctx.args.cond_prior, "--cond-prior")
    programs = ctx.held_out(ctx.get("num"))
    points = ctx.get("psnr_points")
    times = [i / (points - 1) for i in range(points)]
    curves = {}
    for name, prior in priors.items():
        z0 = clean_registers(ctx, programs, prior.num_registers)  # (n, K, d)
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(ctx.args.seed)).to(ctx.device)
        cond, cond_mask = (None, None) if not prior.conditional else \
            partial_condition(ctx, prior, programs, ctx.args.cond_ratio, ctx.args.seed + 1)
        dtype = next(prior.dit.parameters()).dtype
        values = []
        for t_value in times:
            t = register_times(torch.full((z0.shape[0],), t_value), prior.num_registers, prior.max_offset,
                               prior.block_offsets).to(ctx.device)
            with torch.no_grad():
                pred = prior.dit(q_sample(z0, t, noise).to(dtype), t, None if cond is None else cond.to(dtype),
                                 cond_mask).float()
            values.append(float(M.psnr(pred, z0).mean()))
        curves[name] = values
    result = {"t": times, "psnr_db": curves, "num_programs": programs["ids"].shape[0], "cond_ratio": ctx.args.cond_ratio,
              "psnr_convention": "10 log10(1 / MSE per entry): registers have entry mean square 1 (norm sqrt(d))"}
    table = md_table(["t"] + list(curves), [[f"{t:.2f}"] + [f"{curves[n][i]:.2f}" for n in curves]
                                           for i, t in enumerate(times)])
    panels = [panel("Fig. 9: PSNR of g(z_t, t) vs z_0", "t", "PSNR (dB)", {n: (times, v) for n, v in curves.items()})]
    return result, "PSNR in dB with peak = 1 (the RMS of a register entry).\n\n" + table, panels


def run_prdc(ctx):
    from generators import sample_registers
    num, k = ctx.get("num"), ctx.args.prdc_k
    prior = ctx.prior(ctx.args.prior)
    real_programs = ctx.held_out(num)
    real = clean_registers(ctx, real_programs, prior.num_registers).cpu().numpy()
    results = {}
    try:
        other = clean_registers(ctx, ctx.held_out(num, skip=num), prior.num_registers).cpu().numpy()
        results["real_vs_real"] = M.prdc_per_register(real, other, k)
    except ValueError as error:
        print(f"prdc: no second held-out set for the real-vs-real reference ({error})")
    generator = torch.Generator().manual_seed(ctx.args.seed)
    fake, _ = sample_registers(prior, num, ctx.get("prior_steps"), generator=generator)
    results["unconditional"] = M.prdc_per_register(real, fake.cpu().numpy(), k)
    if ctx.args.cond_prior:
        cond_prior = ctx.prior(ctx.args.cond_prior, "--cond-prior")
        given = ctx.held_out(num, skip=num) if "real_vs_real" in results else real_programs
        cond, cond_mask = partial_condition(ctx, cond_prior, given, ctx.args.cond_ratio, ctx.args.seed + 1)
        fake, _ = sample_registers(cond_prior, num, ctx.get("prior_steps"), cond, cond_mask, generator=generator)
        results["conditional"] = M.prdc_per_register(real, fake.cpu().numpy(), k)
    names = ("precision", "recall", "density", "coverage")
    table = md_table(["samples"] + list(names), [[n] + [f"{r[m]:.3f} ± {r[m + '_std']:.3f}" for m in names]
                                                 for n, r in results.items()])
    result = {"k": k, "num": num, "prior_steps": ctx.get("prior_steps"), "cond_ratio": ctx.args.cond_ratio,
              **results}
    return result, f"PRDC (k={k}) per register index, mean ± sd over the {prior.num_registers} registers.\n\n" + table, []


# ------------------------------------------------------------------------------------------------
# App. B: the marginal trap
# ------------------------------------------------------------------------------------------------


def run_marginal_trap(ctx):
    import marginal_trap
    if not ctx.env.is_main:
        return None, None, None
    result = marginal_trap.run(pairs=ctx.args.trap_pairs, choices=ctx.args.trap_choices,
                               train_steps=ctx.get("trap_steps"), num_samples=ctx.get("trap_samples"),
                               seed=ctx.args.seed, trials=ctx.get("trap_trials"))
    keys = [k for k in result["rows"][0] if k not in ("steps", "tokens_per_step") and not k.endswith("_distinct")]
    table = md_table(["tokens/step"] + keys, [[f"{r['tokens_per_step']:g}"] + [f"{r[k]:.3f}" for k in keys]
                                               for r in result["rows"]])
    x = [r["tokens_per_step"] for r in result["rows"]]
    panels = [panel("App. B: valid samples vs tokens per step", "tokens revealed per step", "fraction valid",
                    {k: (x, [r[k] for r in result["rows"]]) for k in keys}, logx=True)]
    task = result["task"]
    note = (f"{task['pairs']} pairs over {task['choices']} choices ({task['num_valid']} valid sequences of "
            f"{task['length']} tokens); fraction of valid samples. optimal_factorized_random = the best any "
            f"factorised demasker can do with random remasking (App. B, eq. 8).\n\n")
    return result, note + table, panels


