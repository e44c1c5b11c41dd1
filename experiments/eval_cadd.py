"""CADD beside CRoCoDiL (docs/beyond.md): `eval.py cadd`, the comparison on the same data and demasker budget.

Methods (each optional but the CADD run): the base MDM (--base), CADD (--cadd-run: train_ae.py --no-registers
--cadd) decoded with hard and soft z0_hat (--cadd-softness), CRoCoDiL's guided demasker / ConThenDisc /
ConWithinDisc (--ae, --prior, --cond-prior), and CADD + registers (--cadd-ae: train_ae.py --cadd; generation
needs a prior over its own encoder, --cadd-prior). Three parts:

1. Fig. 4-style masked-token CE / top-1 per mask ratio r on held-out programs, the masks of eval_autoencoder's
   masked_token_curves (one uniform vector per program, nested across r). CADD is scored twice: `q` with the
   latents of training, z_t ~ N(sqrt(gb_r) w(x_0), (1 - gb_r) I), which carry x_0 (at r = 0.1, gb = 0.9: this CE
   is not comparable to the base MDM's, it is the CE CADD's loss minimises), and `blind` with pure-noise latents
   (gb ~ 0, what the sampler's first step sees). At r = 1 the two coincide and compare directly with the base
   MDM; below r = 1 `blind` is an input CADD never saw in training (there the latents carried x_0), a pessimistic
   number. The guided rows use h_phi(x_0), also x_0's information, as Fig. 4 does.
2. Fig. 6-style quality vs NFE (only with --scorer): MAUVE (with the scorer's intervals when eval_context
   gives them), Gen-PPL, entropy per method over the NFE grid; CADD's NFE counts K forward passes per step.
   The base MDM and CADD (a plain MDM with latents: the base's options apply to it) are decoded with
   --base-decoding's choice for the length when given (remasking, block length, EOS handling;
   experiments/eval_base.py), else --remasking in one block; each row records its setting. With --cadd-select,
   CADD's own best setting is chosen like the base's (eval_base's rule on its selection set, at NFE = L, over
   z0_hat softness x remasking x block length x EOS handling) and decoded as the extra rows "cadd_best".
   The CADD + registers rows (ConThenDisc over CADD) keep one block, as the guided methods, and read the first
   --keep registers.
3. The marginal trap (App. B, Theorem B.1) with a CADD demasker trained on marginal_trap's corpus next to the
   base MDM and the optimal factorised bound (a demasker factorised given x_t alone). CADD's reveal is
   factorised given (x_t, z), not given x_t: at one step every latent is pure noise, but every position reads
   all of them (attention), so the two tokens of a pair can both follow the same random z_i, and the joint is a
   mixture of products over z that may exceed the bound. Whether it does is what this part measures; with more
   steps the latents also move toward the model's own (hard or soft) estimate.
"""

import dataclasses
import math

import numpy as np
import torch

from extensions import cadd
from evaluation import metrics as M
from experiments import marginal_trap as MT
from demasker import Demasker
from evaluation.report import md_table, panel
from sample import batch_seed
from schedules import mask_tokens, masked_diffusion_loss


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def load_demasker(ctx, folder, flag, need_encoder, want_cadd):
    """(demasker, encoder | None) of a train_ae.py run, checked to be (or not be) a CADD demasker."""
    from dataprep.data import check_tokenizer_matches
    from experiments.eval_context import resolve_run
    from sample import load_run
    run = resolve_run(folder)
    check_tokenizer_matches(ctx.data_dir, run, f"the {flag} run")
    demasker, encoder, _ = ctx.cached(("cadd-eval", str(run)), lambda: load_run(str(run), need_encoder, ctx.device,
                                                                                 ctx.dtype))
    try:
        cadd.check_cadd(demasker, want_cadd)
    except ValueError as error:
        raise ValueError(f"{flag} {folder}: {error}") from None
    return demasker, encoder


def methods_for_curves(ctx):
    """{name: (demasker, encoder | None, latents mode None | 'q' | 'blind')} for part 1."""
    args, models = ctx.args, {}
    if args.base:
        models["base"] = (load_demasker(ctx, args.base, "--base", False, False)[0], None, None)
    demasker, _ = load_demasker(ctx, args.cadd_run, "--cadd-run", False, True)
    models["cadd_q"], models["cadd_blind"] = (demasker, None, "q"), (demasker, None, "blind")
    if args.ae:
        models["guided"] = (*load_demasker(ctx, args.ae, "--ae", True, False), None)
    if args.cadd_ae:
        both, encoder = load_demasker(ctx, args.cadd_ae, "--cadd-ae", True, True)
        models["cadd_guided_q"], models["cadd_guided_blind"] = (both, encoder, "q"), (both, encoder, "blind")
    return models


# ------------------------------------------------------------------------------------------------
# Part 1: masked-token CE / top-1 per mask ratio
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def curves(ctx, programs, models, ratios):
    """{name: {"ce", "top1", "scored_tokens"}} per ratio; the same masks and latent noise for every model."""
    sums, batch_size = {}, ctx.get("batch_size")
    for first in range(0, programs["ids"].shape[0], batch_size):
        rows = range(first, min(first + batch_size, programs["ids"].shape[0]))
        x0 = programs["ids"][list(rows)].to(ctx.device)
        B, L = x0.shape
        program = torch.arange(L, device=ctx.device)[None, :] < programs["lengths"][list(rows)].to(ctx.device)[:, None]
        u = torch.stack([torch.rand(L, generator=torch.Generator().manual_seed(batch_seed(ctx.args.seed, i)))
                         for i in rows]).to(ctx.device)  # (B, L)
        for name, (demasker, encoder, mode) in models.items():
            registers = None
            if encoder is not None:
                registers = encoder(programs["enc_ids"][list(rows)].to(ctx.device),
                                    attention_mask=programs["enc_mask"][list(rows)].to(ctx.device))
            noise = cadd.training_noise(list(rows), ctx.args.seed + 7, L, demasker.cfg.d_model).to(ctx.device)
            for ratio in ratios:
                masked = u < ratio
                x_t = x0.masked_fill(masked, demasker.cfg.mask_token_id)
                extra = {}
                if mode is not None:
                    t = torch.full((B,), ratio if mode == "q" else 1.0, device=ctx.device)
                    extra["latents"] = cadd.training_latents(demasker, x0, t, noise).to(demasker.wte.weight.dtype)
                logits = demasker(x_t, registers=registers, **extra)
                for key, value in zip(("ce", "correct", "count"), M.masked_prediction_stats(logits, x0, masked & program)):
                    sums[(name, ratio, key)] = sums.get((name, ratio, key), 0.0) + value
    out = {}
    for name in models:
        counts = [max(sums.get((name, r, "count"), 0.0), 1.0) for r in ratios]
        out[name] = {"ce": [sums.get((name, r, "ce"), 0.0) / c for r, c in zip(ratios, counts)],
                     "top1": [sums.get((name, r, "correct"), 0.0) / c for r, c in zip(ratios, counts)],
                     "scored_tokens": [int(c) for c in counts]}
    return out


# ------------------------------------------------------------------------------------------------
# Part 2: quality vs NFE
# ------------------------------------------------------------------------------------------------


def cadd_sampler(ctx, demasker, length, steps, temp, softness, prior=None, setting=None):
    """make_batch for sharded_samples: CADD (prior None) decoded under `setting` (eval_base's remasking, block
    length, EOS handling; None: --remasking in one block), or CADD + registers from `prior` (ConThenDisc, one
    block, the first --keep registers)."""
    from experiments.eval_base import decode_options
    from experiments.eval_context import register_keep, sampler_decoding
    from generators import conthendisc
    K, noise = ctx.args.cadd_latents, ctx.args.cadd_posterior_noise
    setting = setting or {"remasking": ctx.args.remasking, "block_length": None, "eos": "as trained"}
    block, remasking, decoding = decode_options(setting, length, steps, sampler_decoding(ctx))

    def run(idx, g, pg):
        latent_generator = torch.Generator(device=ctx.device).manual_seed(batch_seed(ctx.args.seed + 3, int(idx[0])))
        if prior is None:
            tokens, nfe = cadd.cadd_generate(demasker, len(idx), length, block, steps, temp, remasking,
                                             softness=softness, num_latents=K, posterior_noise=noise, generator=g,
                                             latent_generator=latent_generator, decoding=decoding)
            return tokens, {"nfe": nfe, "demasker_calls": nfe}
        decoder = cadd.CaddDecoder(demasker, softness, K, noise, 0, latent_generator)
        tokens, report = conthendisc(decoder, prior, len(idx), length, length, steps, temp, ctx.args.remasking,
                                     prior_steps=ctx.get("prior_steps"), generator=g, prior_generator=pg,
                                     decoding=sampler_decoding(ctx), keep=register_keep(ctx, length))
        calls = report["demasker_calls"] * K
        return tokens, {"nfe": report["nfe"] - report["demasker_calls"] + calls, "demasker_calls": calls}
    return run


def select_cadd(ctx, demasker, length, temp):
    """CADD's own best setting at this length: every z0_hat softness (--cadd-softness) x eval_base's settings grid
    (remasking x block length x EOS handling) at NFE = L, scored on base-decoding's selection set (disjoint from
    the references) and chosen by its rule (eval_base.choose). Returns {"rows", "chosen", "selection"} (the
    choice broadcast to every rank; rows and selection on rank 0)."""
    from experiments.eval_base import choose, label, selection_set, settings_grid
    from experiments.eval_context import score_texts, sharded_samples
    from infra import distributed as D
    texts, selection = selection_set(ctx, length, ctx.gen_num)
    features = ctx.scorer().features(texts, ctx.get("batch_size"), pool=ctx.args.features)
    rows = []
    for softness in ctx.args.cadd_softness:
        for setting in settings_grid(length, ctx.args.blocks):
            name = f"s{softness:g}, {label(setting)}"
            sampler = cadd_sampler(ctx, demasker, length, length, temp, softness, setting=setting)
            samples, nfe, stats = sharded_samples(ctx, ctx.gen_num, sampler, f"cadd {name} L={length}",
                                                  with_stats=True)
            if samples is not None:
                rows.append({"label": name, "setting": {**setting, "softness": softness}, "nfe": nfe, **stats,
                             **score_texts(ctx, samples, features), "examples": samples[:2]})
    chosen = D.broadcast_object(choose(rows)["setting"] if ctx.env.is_main else None, ctx.env)
    return {"rows": rows, "chosen": chosen, "selection": selection}


def generation_rows(ctx, length):
    """The quality-vs-NFE rows of every method at this length, the real-vs-real ceiling, and with --cadd-select
    CADD's selection ({} without)."""
    from experiments.eval_base import base_setting, configuration
    from experiments.eval_context import nfe_grid, real_reference, temperature
    from experiments.eval_generation import method_sampler, sweep
    temp, args = temperature(ctx, 1.0), ctx.args
    reference_features, ceiling = real_reference(ctx, length, ctx.get("num"))
    steps_list = nfe_grid(ctx, length)
    setting = base_setting(ctx, length)  # --base-decoding's choice, else --remasking in one block
    rows = []
    if args.base:
        rows += sweep(ctx, "base", length, lambda s: method_sampler(ctx, "base", length, s, temp), steps_list,
                      reference_features)
    demasker, _ = load_demasker(ctx, args.cadd_run, "--cadd-run", False, True)
    for softness in args.cadd_softness:
        rows += sweep(ctx, f"cadd_s{softness:g}", length, lambda s, w=softness: cadd_sampler(
            ctx, demasker, length, s, temp, w, setting=setting), steps_list, reference_features)
    for row in rows:
        row["setting"] = setting
    selection = select_cadd(ctx, demasker, length, temp) if args.cadd_select else {}
    if selection:
        best = selection["chosen"]
        rows += [{**row, "setting": best} for row in sweep(ctx, "cadd_best", length, lambda s: cadd_sampler(
            ctx, demasker, length, s, temp, best["softness"], setting=configuration(best)), steps_list,
            reference_features)]
    if args.ae and args.prior:
        prior = ctx.prior(args.prior)
        rows += sweep(ctx, "conthendisc", length, lambda s: method_sampler(ctx, "conthendisc", length, s, temp,
                                                                           prior=prior), steps_list, reference_features)
        if args.cond_prior:
            cond = ctx.prior(args.cond_prior, "--cond-prior")
            rows += sweep(ctx, "conwithindisc", length, lambda s: method_sampler(
                ctx, "conwithindisc", length, s, temp, prior=prior, cond_prior=cond), steps_list, reference_features)
    if args.cadd_ae and args.cadd_prior:
        both, _ = load_demasker(ctx, args.cadd_ae, "--cadd-ae", True, True)
        from generators import load_prior
        prior = ctx.cached(("cadd-prior", args.cadd_prior), lambda: load_prior(args.cadd_prior, ae=args.cadd_ae,
                                                                               device=ctx.device, dtype=ctx.dtype))
        rows += sweep(ctx, "cadd_conthendisc", length, lambda s: cadd_sampler(
            ctx, both, length, s, temp, args.cadd_softness[0], prior), steps_list, reference_features)
    return rows, ceiling, selection


def quality_table(rows):
    def mauve(r):
        ci = r.get("mauve_ci")
        return f"{r['mauve']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else
                                      f" ± {r['mauve_sd']:.3f}" if r.get("mauve_sd") else "")
    return md_table(["method", "steps", "NFE", "MAUVE", "Gen-PPL", "entropy", "parse"],
                    [[r["method"], r["steps"], f"{r['nfe']:.0f}", mauve(r), f"{r['gen_ppl']:.2f}",
                      f"{r['unigram_entropy']:.2f}", f"{r['parse_rate']:.2f}"] for r in rows])


# ------------------------------------------------------------------------------------------------
# Part 3: the marginal trap with a CADD demasker
# ------------------------------------------------------------------------------------------------


def train_trap_cadd(task, demasker, steps, batch_size=128, lr=3e-3, seed=0):
    """marginal_trap.train_mdm's recipe (same t, masks, loss, LR) with CADD latents at [M]. Returns losses."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(demasker.parameters(), lr=lr, weight_decay=0.0)
    demasker.train()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        x0 = task.sample(batch_size, generator)  # (B, 1 + L)
        t = torch.rand(batch_size, generator=generator)
        maskable = torch.ones_like(x0, dtype=torch.bool)
        maskable[:, 0] = False
        x_t, masked, p_mask = mask_tokens(x0, t, task.mask_id, generator=generator, maskable=maskable)
        noise = torch.randn(*x0.shape, demasker.cfg.d_model, generator=generator)
        latents = cadd.training_latents(demasker, x0, p_mask[:, 0], noise)
        loss = masked_diffusion_loss(demasker(x_t, latents=latents), x0, masked, p_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(demasker.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    demasker.eval()
    return losses


@torch.no_grad()
def trap_cadd_validity(task, demasker, steps, num, softness, remasking, seed):
    """Fraction of valid CADD samples at `steps` steps (temperature 1, BOS prompt)."""
    generator, latent_generator = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    prompt = torch.full((num, 1), task.bos_id, dtype=torch.long)
    x, _ = cadd.cadd_generate(demasker, prompt, task.length, task.length, steps, 1.0, remasking, softness=softness,
                              generator=generator, latent_generator=latent_generator)
    return float(task.is_valid(x).float().mean())


def run_trap(ctx, log=print):
    """Valid-sample fraction vs tokens per step: base MDM, CADD hard / soft, the optimal factorised bound."""
    args = ctx.args
    task, seed = MT.TrapTask(args.trap_pairs, args.trap_choices), args.seed
    steps, num = ctx.get("trap_steps"), ctx.get("trap_samples")
    torch.manual_seed(seed)
    base = Demasker(MT.demasker_config(task))
    torch.manual_seed(seed)
    model = Demasker(dataclasses.replace(MT.demasker_config(task), cadd_schedule=args.cadd_trap_schedule))
    base_losses = MT.train_mdm(task, base, None, steps, seed=seed)
    cadd_losses = train_trap_cadd(task, model, steps, seed=seed)
    log(f"cadd trap: base loss {np.mean(base_losses[-20:]):.3f}, cadd loss {np.mean(cadd_losses[-20:]):.3f}")
    rows = []
    for T in [T for T in range(task.length, 0, -1) if task.length % T == 0]:
        row = {"steps": T, "tokens_per_step": task.length / T,
               "optimal_factorized_random": MT.optimal_factorized_validity(task, T, ctx.get("trap_trials"), seed),
               "base_random": MT.sample_validity(task, base, T, num, None, 1.0, "random", seed=seed + T)["valid"]}
        for softness in args.cadd_softness:
            row[f"cadd_s{softness:g}_random"] = trap_cadd_validity(task, model, T, num, softness, "random", seed + T)
        rows.append(row)
    return {"task": {"pairs": task.pairs, "choices": task.choices, "length": task.length,
                     "chance_at_one_step": (1.0 / task.choices) ** task.pairs},
            "training": {"steps": steps, "base_final_loss": float(np.mean(base_losses[-20:])),
                         "cadd_final_loss": float(np.mean(cadd_losses[-20:])), "schedule": args.cadd_trap_schedule},
            "num_samples": num, "rows": rows}


# ------------------------------------------------------------------------------------------------
# The subcommand
# ------------------------------------------------------------------------------------------------


def run_cadd(ctx):
    from experiments.eval_context import MASK_RATIOS
    args = ctx.args
    if not args.cadd_run:
        raise ValueError("eval.py cadd needs --cadd-run, a `train_ae.py --no-registers --cadd` run folder")
    programs = ctx.held_out(args.num or ctx.get("fig4_num"))
    result = {"mask_ratios": MASK_RATIOS, "cadd_latents": args.cadd_latents, "cadd_softness": args.cadd_softness,
              "curves": curves(ctx, programs, methods_for_curves(ctx), MASK_RATIOS),
              "num_programs": int(programs["ids"].shape[0])}
    table = md_table(["model"] + [f"r={r}" for r in MASK_RATIOS],
                     [[n] + [f"{c:.3f} / {a:.3f}" for c, a in zip(v["ce"], v["top1"])]
                      for n, v in result["curves"].items()])
    sections = ["CE / top-1 of masked program tokens per mask ratio. *_q: latents from q(z_t | x_0) (they carry x_0: "
                "not comparable to base); *_blind: pure-noise latents (off CADD's training inputs below r = 1); at "
                "r = 1 both equal the sampler's first step and compare with base.\n\n" + table]
    panels = [panel("CADD vs base: masked-token CE", "mask ratio", "cross-entropy (nats)",
                    {n: (MASK_RATIOS, v["ce"]) for n, v in result["curves"].items()})]
    if args.scorer:
        result["generation"] = {}
        from experiments.eval_base import base_setting, label
        from experiments.eval_context import register_keep
        for length in args.lengths or [ctx.data_length]:
            rows, ceiling, selection = generation_rows(ctx, length)
            result["generation"][str(length)] = {"rows": rows, "real": ceiling, "keep": register_keep(ctx, length),
                                                 "base_setting": base_setting(ctx, length), "cadd_selection": selection}
            text = (f"### Quality vs NFE, L = {length}\n\nThe base MDM and CADD decoded with "
                    f"{'--base-decoding' if args.base_decoding else 'the default'} setting: "
                    f"{label(base_setting(ctx, length))}.")
            if selection:
                text += (f" CADD's own best setting on the selection set ({selection['selection']['how']}), NFE = L: "
                         f"**softness {selection['chosen']['softness']:g}, {label(selection['chosen'])}** "
                         f"('cadd_best'; {len(selection['rows'])} settings tried).")
            sections.append(text + "\n\n" + quality_table(rows))
            methods = list(dict.fromkeys(r["method"] for r in rows))
            panels.append(panel(f"MAUVE vs NFE (L={length})", "NFE", "MAUVE", {m: (
                [r["nfe"] for r in rows if r["method"] == m], [r["mauve"] for r in rows if r["method"] == m])
                for m in methods}, logx=True))
    if args.cadd_trap:
        trap = result["marginal_trap"] = run_trap(ctx)
        keys = [k for k in trap["rows"][0] if k not in ("steps", "tokens_per_step")]
        sections.append("### Marginal trap (fraction valid, random remasking)\n\n" + md_table(
            ["tokens/step"] + keys, [[f"{r['tokens_per_step']:g}"] + [f"{r[k]:.3f}" for k in keys]
                                     for r in trap["rows"]]))
    return result, "\n\n".join(sections), panels
