"""The guided demasker and the MDM autoencoder (Sec. 5.1-5.2, App. D): masked-token CE / top-1 vs mask ratio
(Fig. 4), robustness to latent noise (Fig. 7), the autoencoder sweeps over block size x NFE (Tables 1-2)
and register interpolation (Fig. 8). Each run_* takes eval_context.Context and returns (result, text, panels).
"""

import math

import numpy as np
import torch

from infra import distributed as D
from evaluation import metrics as M
from evaluation.report import fmt_ci, md_table, panel
from sample import autoencode, batch_seed, check_schedule, generate
from experiments.eval_context import (ALPHAS, MASK_RATIOS, SIGMAS, nfe_grid, real_reference, register_keep,
                                      sampler_decoding, score_texts, sharded_samples, temperature)


# ------------------------------------------------------------------------------------------------
# Masked-token prediction (Fig. 4, Fig. 7)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def masked_token_curves(ctx, programs, models, ratios, noise_std=0.0):
    """{name: {"ce": [...], "top1": [...]}} over `ratios` for models = {name: (demasker, encoder|None, keep)}.

    Program i draws one uniform vector from a generator seeded by (seed, i) and is masked where u < ratio,
    so masks are nested across ratios and identical for every model. Scored: masked positions of the
    program (BOS .. first EOS). noise_std: N(0, sigma^2) added to every register entry (Fig. 7), the same
    draw for every model. Programs are dealt to ranks; sums are all-reduced."""
    env, batch_size = ctx.env, ctx.get("batch_size")
    n = programs["ids"].shape[0]
    mine = D.shard_indices(n, env.rank, env.world_size, seed=None)
    sums = {}
    for first in range(0, len(mine), batch_size):
        rows = mine[first:first + batch_size]
        x0 = programs["ids"][rows].to(ctx.device)
        L = x0.shape[1]
        program = torch.arange(L, device=ctx.device)[None, :] < programs["lengths"][rows].to(ctx.device)[:, None]
        draws = [torch.Generator().manual_seed(batch_seed(ctx.args.seed, int(i))) for i in rows]
        u = torch.stack([torch.rand(L, generator=g) for g in draws]).to(ctx.device)  # (B, L)
        for name, (demasker, encoder, keep) in models.items():
            registers = None
            if encoder is not None:
                registers = encoder(programs["enc_ids"][rows].to(ctx.device),
                                    attention_mask=programs["enc_mask"][rows].to(ctx.device))[:, :keep]
                if noise_std > 0:
                    noise = torch.stack([torch.randn(registers.shape[1:], generator=torch.Generator().manual_seed(
                        batch_seed(ctx.args.seed + 1, int(i)))) for i in rows])
                    registers = registers + noise_std * noise.to(registers.device, registers.dtype)
            for ratio in ratios:
                masked = u < ratio
                x_t = x0.masked_fill(masked, demasker.cfg.mask_token_id)
                ce, correct, count = M.masked_prediction_stats(demasker(x_t, registers=registers), x0,
                                                               masked & program)
                for key, value in (("ce", ce), ("correct", correct), ("count", count)):
                    sums[f"{name}|{ratio}|{key}"] = sums.get(f"{name}|{ratio}|{key}", 0.0) + value
    sums = D.all_reduce_sum(sums, env)
    curves = {}
    for name in models:
        counts = [max(sums.get(f"{name}|{r}|count", 0.0), 1.0) for r in ratios]
        curves[name] = {"ce": [sums.get(f"{name}|{r}|ce", 0.0) / c for r, c in zip(ratios, counts)],
                        "top1": [sums.get(f"{name}|{r}|correct", 0.0) / c for r, c in zip(ratios, counts)],
                        "scored_tokens": [int(c) for c in counts]}
    return curves


def register_counts(ctx, encoder):
    """--registers, else 1, 2, 4, ... up to the encoder's K (Fig. 4: K = 8, 64, 128 of 128)."""
    K = encoder.cfg.num_registers
    if ctx.args.registers:
        bad = [k for k in ctx.args.registers if not 1 <= k <= K]
        if bad:
            raise ValueError(f"--registers {bad} outside [1, {K}] (the encoder's K)")
        return sorted(set(ctx.args.registers))
    counts, k = [], 1
    while k < K:
        counts.append(k)
        k *= 2
    return counts + [K]


def run_fig4(ctx):
    programs = ctx.held_out(ctx.args.num or ctx.get("fig4_num"))  # paper: 1000 validation programs
    demasker, encoder = ctx.ae()
    models = {f"guided_k{k}": (demasker, encoder, k) for k in register_counts(ctx, encoder)}
    if ctx.args.base:
        models = {"base": (ctx.base(), None, None), **models}
    curves = masked_token_curves(ctx, programs, models, MASK_RATIOS)
    result = {"mask_ratios": MASK_RATIOS, "models": curves, "num_programs": programs["ids"].shape[0]}
    rows = [[name] + [f"{c:.3f} / {a:.3f}" for c, a in zip(v["ce"], v["top1"])] for name, v in curves.items()]
    table = md_table(["model"] + [f"r={r}" for r in MASK_RATIOS], rows)
    panels = [panel("Fig. 4: masked-token CE", "mask ratio", "cross-entropy (nats)",
                    {n: (MASK_RATIOS, v["ce"]) for n, v in curves.items()}),
              panel("Fig. 4: top-1 accuracy", "mask ratio", "top-1",
                    {n: (MASK_RATIOS, v["top1"]) for n, v in curves.items()})]
    return result, "CE / top-1 of masked program tokens per mask ratio.\n\n" + table, panels


def run_fig7(ctx):
    if not ctx.args.ae_no_noise:
        raise ValueError("fig7 compares two AEs: --ae (trained with latent noise) and --ae-no-noise (trained with "
                         "--latent-cos 1)")
    programs = ctx.held_out(ctx.get("num"))
    ratio = ctx.args.fig7_ratio
    models = {"latent_noise": (*ctx.ae(), None), "no_latent_noise": (*ctx.ae(ctx.args.ae_no_noise), None)}
    sigmas = ctx.args.sigmas or SIGMAS
    series = {name: {"ce": [], "top1": []} for name in models}
    for sigma in sigmas:
        curves = masked_token_curves(ctx, programs, models, [ratio], noise_std=sigma)
        for name in models:
            series[name]["ce"].append(curves[name]["ce"][0])
            series[name]["top1"].append(curves[name]["top1"][0])
    result = {"mask_ratio": ratio, "sigmas": sigmas, "expected_cos": [1 / math.sqrt(1 + s * s) for s in sigmas],
              "models": series, "num_programs": programs["ids"].shape[0]}
    if ctx.args.base:
        result["base"] = masked_token_curves(ctx, programs, {"base": (ctx.base(), None, None)}, [ratio])["base"]
    rows = [[f"{s:g}", f"{1 / math.sqrt(1 + s * s):.2f}"]
            + [f"{series[n]['top1'][i]:.3f} / {series[n]['ce'][i]:.3f}" for n in models] for i, s in enumerate(sigmas)]
    table = md_table(["sigma", "E[cos]", "with noise: top-1 / CE", "without: top-1 / CE"], rows)
    panels = [panel("Fig. 7: top-1 at 90% masking", "sigma", "top-1", {n: (sigmas, v["top1"]) for n, v in series.items()}),
              panel("Fig. 7: CE at 90% masking", "sigma", "CE", {n: (sigmas, v["ce"]) for n, v in series.items()})]
    return result, f"Registers + N(0, sigma^2) per entry, mask ratio {ratio}.\n\n" + table, panels


# ------------------------------------------------------------------------------------------------
# The autoencoder sweeps (Tables 1-2) and interpolation (Fig. 8)
# ------------------------------------------------------------------------------------------------


def block_grid(ctx, length):
    if ctx.args.blocks:
        return sorted({b for b in ctx.args.blocks if 1 <= b <= length and length % b == 0})
    extra = tuple(b for b in ctx.get("table_blocks") if length % b == 0)  # paper: block 32 always in the grid
    return sorted({b for b in (length // 8, length // 4, length // 2, length) + extra if b >= 1})


def run_table(ctx, index):
    length = ctx.args.length or ctx.get("table_lengths")[index]
    programs = ctx.held_out(ctx.get("num"), length)
    sources = programs["texts"]
    demasker, encoder = ctx.ae()
    temp, decoding = temperature(ctx, 0.0), sampler_decoding(ctx)
    rows = []
    for block in block_grid(ctx, length):
        for nfe in nfe_grid(ctx, length, "table_nfe_min"):
            try:
                check_schedule(length, block, nfe)
            except ValueError:
                continue  # e.g. fewer steps than blocks: not a valid LLaDA schedule

            def make_batch(indices, generator, _):
                tokens, calls = autoencode(encoder, demasker, programs["enc_ids"][indices].to(ctx.device),
                                           programs["enc_mask"][indices].to(ctx.device), length, block, nfe, temp,
                                           ctx.args.remasking, generator=generator, decoding=decoding)
                return tokens, calls
            texts, _ = sharded_samples(ctx, len(sources), make_batch, f"autoencode L={length} block={block} nfe={nfe}")
            if texts is not None:
                rows.append({"block": block, "nfe": nfe, **score_texts(ctx, texts, references=sources),
                             "examples": [{"source": s, "reconstruction": t} for s, t in list(zip(sources, texts))[:2]]})
    if not ctx.env.is_main:
        return None, None, None
    reference = score_texts(ctx, sources)
    result = {"length": length, "temperature": temp, "num_programs": len(sources), "rows": rows,
              "sources": reference}
    table = md_table(["block", "NFE", "Gen-PPL [95% CI]", "semantic sim.", "CER [95% CI]", "parse", "empty",
                      "entropy"],
                     [[r["block"], r["nfe"], fmt_ci(r["gen_ppl"], r.get("gen_ppl_ci"), 2),
                       f"{r['semantic_similarity']:.3f}", fmt_ci(r["cer"], r.get("cer_ci"), 3),
                       f"{r['parse_rate']:.2f}", f"{r['empty_rate']:.2f}", f"{r['unigram_entropy']:.2f}"] for r in rows])
    note = (f"Autoencoder (Alg. 6) at L={length}, {len(sources)} held-out programs, temperature {temp}. Sources: "
            f"Gen-PPL {reference['gen_ppl']:.2f}, parse rate {reference['parse_rate']:.2f}. Semantic similarity = "
            f"cosine of the scorer's mean-pooled features (our stand-in for CodeBERTScore).\n\n")
    panels = [panel(f"Table {index + 1}: CER vs NFE (L={length})", "NFE", "CER",
                    {f"block {b}": ([r["nfe"] for r in rows if r["block"] == b], [r["cer"] for r in rows if r["block"] == b])
                     for b in sorted({r["block"] for r in rows})}, logx=True)]
    return result, note + table, panels


def run_fig8(ctx):
    length = ctx.args.length or ctx.get("fig8_length") or ctx.data_length  # paper: ~256-token programs
    num = ctx.args.num or ctx.get("fig8_pairs")  # pairs (A, B); 3 x num held-out programs must fit
    a, b = ctx.held_out(num, length), ctx.held_out(num, length, skip=num)
    reference_features, ceiling = real_reference(ctx, length, num)
    demasker, encoder = ctx.ae()
    steps = ctx.args.steps or length
    temp, decoding = temperature(ctx, 0.0), sampler_decoding(ctx)
    d, keep = encoder.cfg.hidden_size, register_keep(ctx, length)  # keep: the first k registers (--keep)
    with torch.no_grad():
        z_a = encoder(a["enc_ids"].to(ctx.device), attention_mask=a["enc_mask"].to(ctx.device)).float()
        z_b = encoder(b["enc_ids"].to(ctx.device), attention_mask=b["enc_mask"].to(ctx.device)).float()
    rows = []
    for alpha in ctx.args.alphas or ALPHAS:
        mixed = (1 - alpha) * z_a + alpha * z_b  # (n, K, d), renormalised per register as the encoder does
        mixed = torch.nn.functional.normalize(mixed, dim=-1) * math.sqrt(d)

        def make_batch(indices, generator, _):
            registers = mixed[torch.as_tensor(indices, device=ctx.device)].to(next(demasker.parameters()).dtype)
            registers = registers if keep is None else registers[:, :keep]  # (B, k, d)
            return generate(demasker, len(indices), length, length, steps, temp, ctx.args.remasking,
                            registers=registers, generator=generator, decoding=decoding)
        texts, _ = sharded_samples(ctx, num, make_batch, f"interpolate alpha={alpha}")
        if texts is not None:
            row = {"alpha": alpha, **score_texts(ctx, texts, reference_features)}
            row["cer_to_a"] = float(np.mean([M.cer(s, t) for s, t in zip(a["texts"], texts)]))
            row["cer_to_b"] = float(np.mean([M.cer(s, t) for s, t in zip(b["texts"], texts)]))
            rows.append(row)
    if not ctx.env.is_main:
        return None, None, None
    result = {"length": length, "steps": steps, "temperature": temp, "num_pairs": num, "rows": rows,
              "real": ceiling, "keep": keep}
    table = md_table(["alpha", "MAUVE [95% CI]", "Gen-PPL [95% CI]", "entropy", "CER to A", "CER to B", "parse",
                      "empty"],
                     [[r["alpha"], fmt_ci(r["mauve"], r.get("mauve_ci"), 3),
                       fmt_ci(r["gen_ppl"], r.get("gen_ppl_ci"), 2), f"{r['unigram_entropy']:.2f}",
                       f"{r['cer_to_a']:.3f}", f"{r['cer_to_b']:.3f}", f"{r['parse_rate']:.2f}",
                       f"{r['empty_rate']:.2f}"] for r in rows])
    note = (f"{num} pairs of held-out programs, L={length}, {steps} steps. Real held-out programs: MAUVE "
            f"{ceiling.get('mauve', float('nan')):.3f}, Gen-PPL {ceiling['gen_ppl']:.2f}.\n\n")
    alphas = [r["alpha"] for r in rows]
    panels = [panel("Fig. 8: MAUVE along the interpolation", "alpha", "MAUVE", {"MAUVE": (alphas, [r["mauve"] for r in rows])}),
              panel("Fig. 8: Gen-PPL", "alpha", "Gen-PPL", {"Gen-PPL": (alphas, [r["gen_ppl"] for r in rows])})]
    return result, note + table, panels


