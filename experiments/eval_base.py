"""The base MDM decoded at its best setting, chosen fairly: `eval.py base-decoding`.

Paper map (arXiv 2603.20210): Sec. 5's baseline is LLaDA (the base MDM) decoded with LLaDA's sampler; the
paper does not say which of LLaDA's options it used. A fair headline (Fig. 6, the speedups) compares the guided
methods with the base at ITS best setting, so this subcommand decodes the base MDM at NFE = L with each of
LLaDA's options (its reference `generate()`; mdm.py):
- remasking: low-confidence (reveal the most confident predictions) or random;
- semi-autoregressive blocks: --blocks (default 32 and the whole sequence L), steps split evenly over blocks;
- EOS handling (mdm.Decoding): "as trained" (none), "revealed last" (confidence_eos_eot_inf: EOS predictions
  rank below every other candidate, so a canvas cannot fill with EOS first) and "never" (logits_eos_inf: EOS
  is never predicted, so every sample runs to L tokens; LLaDA's option for fixed-length answers, kept in the
  grid so that the rule below, not we, rejects it). Both apply to unconditional generation: they act on the
  generated canvas, not on a prompt (cfg_scale, the other prompt option, needs a prompt and does not apply).
Each setting draws as many samples as a Fig. 6 point (--num, else the preset's gen_num: 256 at tiny) and is
scored like a Fig. 6 row (eval_context.score_texts: MAUVE, Gen-PPL, empty rate, bootstrap intervals) against a
SELECTION set of as many real programs, disjoint from Fig. 6's references:
- fig6 (eval_context.real_reference) takes the first min(2 n, available) held-out programs that fit in L
  (val, then test; n = the fig6 run's samples per point, --fig6-num, default the preset's gen_num);
- the selection set is the next --num held-out programs when they all come from the val split
  (`--selection-split val`, or `auto` when possible), else the last --num training-split programs that fit
  (`train`, and `auto`'s fallback when the held-out programs are used up by fig6, as at the tiny preset).
The choice, per length: among the settings with at most half of their samples empty, the highest MAUVE, ties
broken by the lower Gen-PPL (a degenerate sampler that writes empty programs cannot win on Gen-PPL).

Fast-dLLM's adaptive rules (ours to sweep; Wu et al. run theirs in semi-autoregressive blocks of 32): the base's
threshold rows (tau in --thresholds, default 0.5 0.7 0.9) and factor rows (f in --factors, default 1) are decoded
under every block length (the whole sequence and --blocks) x EOS mode "as trained" / "never", low-confidence
remasking (the rules rank by probability; remasking does not enter them), their NFE measured (mean demasker
calls per sample). In one block a threshold reveals the confident EOS tail first, the collapse the fixed grid
shows at one block too. "revealed last" is left out of the adaptive grid: it gives EOS no confidence, so no EOS
passes a threshold and the tail is revealed one token per step (an NFE near L by construction, a fixed-schedule
option). The adaptive configuration (block length x EOS mode) is chosen by the same rule applied to its means
over its rules (mean empty rate, mean MAUVE, mean Gen-PPL): one configuration per length for every tau and f,
so that `speed` can sweep its own thresholds under it.

Written: OUT/base-decoding.json with every setting tried ("lengths": {L: {"rows", "chosen", "selection",
"adaptive_rows", "adaptive_configurations", "chosen_adaptive"}}), "chosen": {L: setting} (the fixed schedule at
NFE = L) and "chosen_adaptive": {L: setting} (the threshold / factor rows). `eval.py fig6 / speed / cadd
--base-decoding OUT/base-decoding.json` then decode the base rows with the chosen setting of their length and
rule (`base_setting`; a file without "chosen_adaptive", written before it existed, gives its "chosen" to the
adaptive rows too); the guided methods keep --remasking and the whole sequence as one block (the paper's
setting). With the fixed schedule a chosen block is widened to the smallest block that shares the steps evenly
(LLaDA splits them evenly over the blocks: 6 steps over 4 blocks of 32 at L = 128 are 3 over 2 blocks of 64;
`fitting_block`); the rows record the block used.

Padding EOS (ours): dataprep/data.py pads every program with EOS to L and train_ae.py scores every position, as
LLaDA's SFT does (there the padding EOS tokens are part of the answer, masked and scored;
LLaDA's pre-training packs documents to 4096 tokens and has no padding). EOS then dominates the targets at
toy scale, and one-block low-confidence decoding reveals the confident EOS tail first and collapses to empty
programs. By default we keep LLaDA's training objective and handle it at decoding, as LLaDA's options allow:
"revealed last" and semi-autoregressive blocks are in the grid, and the selection rule excludes collapsed
settings. The training-side option is train_ae.py --pad-eos-weight W (ours): the padding after the first EOS
weighs W in Eq. 5 (0: not scored), for a base MDM whose targets the padding should not dominate.
"""

import itertools

import numpy as np

from infra.atomic import read_json
from experiments.eval_context import sampler_decoding, score_texts, sharded_samples, temperature
from evaluation.report import fmt_ci, md_table

EOS_MODES = {"as trained": {}, "revealed last": {"confidence_eos_eot_inf": True}, "never": {"logits_eos_inf": True}}
REMASKINGS = ("low_confidence", "random")
DEFAULT_BLOCK = 32
THRESHOLDS = (0.5, 0.7, 0.9)  # the adaptive rows' tau (--thresholds)
FACTORS = (1.0,)              # and f (--factors; Fast-dLLM's default)
ADAPTIVE_EOS = ("as trained", "never")  # "revealed last" would reveal the EOS tail one token per step
MAX_EMPTY = 0.5  # a setting with more empty samples than this is degenerate and cannot be chosen


# ------------------------------------------------------------------------------------------------
# Settings and the base sampler (used by fig6 / speed through eval_generation.method_sampler)
# ------------------------------------------------------------------------------------------------


def block_options(length, blocks=None):
    """The block lengths tried at L: None (the whole sequence) and each of --blocks (default 32) dividing L."""
    return [None] + sorted({b for b in (blocks or (DEFAULT_BLOCK,)) if b < length and length % b == 0})


def settings_grid(length, blocks=None):
    """Every setting tried at length L: remasking x block length (None = the whole sequence) x EOS mode."""
    return [{"remasking": r, "block_length": b, "eos": e}
            for r, b, e in itertools.product(REMASKINGS, block_options(length, blocks), EOS_MODES)]


def adaptive_grid(length, blocks=None, thresholds=None, factors=None):
    """The adaptive rows tried at length L: (threshold at each tau, factor at each f) x block length x EOS mode
    (ADAPTIVE_EOS), low-confidence remasking. Each setting holds its configuration and its rule."""
    rules = [{"rule": "threshold", "threshold": t} for t in thresholds or THRESHOLDS]
    rules += [{"rule": "factor", "factor": f} for f in (FACTORS if factors is None else factors)]
    return [{"remasking": "low_confidence", "block_length": b, "eos": e, **rule}
            for rule, b, e in itertools.product(rules, block_options(length, blocks), ADAPTIVE_EOS)]


def configuration(setting):
    """The part of a setting that base_setting hands on: remasking, block length, EOS mode (no rule)."""
    return {k: setting[k] for k in ("remasking", "block_length", "eos")}


def rule_decoding(ctx, setting):
    """The mdm.Decoding of an adaptive setting's rule (the fixed schedule for a setting without one)."""
    fields = {k: setting[k] for k in ("rule", "threshold", "factor") if k in setting}
    return sampler_decoding(ctx, **fields)


def label(setting):
    block = "whole" if setting["block_length"] is None else f"block {setting['block_length']}"
    rule = "" if "rule" not in setting else f"{setting['rule']} {setting.get('threshold', setting.get('factor'))}, "
    return f"{rule}{setting['remasking']}, {block}, EOS {setting['eos']}"


def check_setting(setting, source):
    """A setting dict as written by this file; errors name the file and what is wrong."""
    if not isinstance(setting, dict) or setting.get("remasking") not in REMASKINGS or \
            setting.get("eos") not in EOS_MODES or not (setting.get("block_length") is None or
                                                         (isinstance(setting["block_length"], int) and
                                                          setting["block_length"] >= 1)):
        raise ValueError(f"{source}: a base decoding setting needs remasking in {REMASKINGS}, eos in "
                         f"{sorted(EOS_MODES)} and block_length null or an int >= 1; got {setting!r}. Rewrite it "
                         f"with `python eval.py base-decoding --base ...`")
    return setting


def read_base_decoding(path, key="chosen"):
    """{L: setting} from an eval.py base-decoding output (the record, or its "results"): its "chosen" (the fixed
    schedule), or with key "chosen_adaptive" its adaptive rows' choice ({} in a file written before it existed)."""
    record = read_json(path, "write it with `python eval.py base-decoding --base RUN --scorer SCORER --out OUT`")
    chosen = record.get("results", record).get(key)
    if key != "chosen" and chosen is None:
        return {}
    if not isinstance(chosen, dict) or not chosen:
        raise ValueError(f"{path} holds no '{key}' settings; pass the base-decoding.json written by "
                         f"`python eval.py base-decoding`")
    return {int(length): check_setting(setting, path) for length, setting in chosen.items()}


def base_setting(ctx, length, adaptive=False):
    """The setting of the base MDM at this length: --base-decoding's choice (adaptive: its "chosen_adaptive",
    for the threshold / factor rows, else its "chosen"), else LLaDA's default decoding with --remasking and one
    block (the behaviour before base-decoding existed)."""
    path = getattr(ctx.args, "base_decoding", None)
    if not path:
        return {"remasking": ctx.args.remasking, "block_length": None, "eos": "as trained"}
    if adaptive:
        chosen = ctx.cached(("base_decoding_adaptive", path), lambda: read_base_decoding(path, "chosen_adaptive"))
        if length in chosen:
            return chosen[length]
    chosen = ctx.cached(("base_decoding", path), lambda: read_base_decoding(path))
    if length not in chosen:
        raise ValueError(f"--base-decoding {path} chose settings for L = {sorted(chosen)}, not {length}; rerun "
                         f"`python eval.py base-decoding --lengths {length} ...`")
    return chosen[length]


def fitting_block(length, block, steps):
    """The smallest block length >= `block` that divides L and whose number of blocks divides `steps` (LLaDA
    gives every block steps / blocks steps); the whole sequence always fits."""
    for size in range(block, length + 1):
        if length % size == 0 and steps % (length // size) == 0:
            return size
    return length


def decode_options(setting, length, steps, decoding=None):
    """(block_length, remasking, mdm.Decoding) for the base under `setting` at `steps` steps; the EOS mode is
    merged into `decoding` (its rule and random stream kept). With the fixed schedule the block is widened to
    the smallest that shares the steps evenly (`fitting_block`); the adaptive rules take as many steps as
    each block needs and keep the chosen block."""
    import dataclasses

    from mdm import Decoding
    block = setting["block_length"] or length
    if decoding is None or decoding.rule == "fixed":
        block = fitting_block(length, block, steps)
    decoding = dataclasses.replace(decoding or Decoding(), **EOS_MODES[setting["eos"]])
    return block, setting["remasking"], decoding


def base_sampler(ctx, setting, length, steps, temp, decoding=None, folder=None):
    """make_batch for sharded_samples: the base MDM (--base, or the run `folder`) under `setting`. The NFE is the
    demasker calls (the mean per sample with an adaptive rule); there is no other model."""
    from sample import generate
    base = ctx.base(folder)
    block, remasking, decoding = decode_options(setting, length, steps, decoding or sampler_decoding(ctx))
    adaptive = decoding.rule != "fixed"

    def run(idx, g, pg):
        stats = {}
        tokens, calls = generate(base, len(idx), length, block, steps, temp, remasking, generator=g,
                                 decoding=decoding, stats=stats)
        calls = float(np.mean(stats["nfe_per_sample"])) if adaptive else float(calls)
        return tokens, {"nfe": calls, "nfe_flops": calls, "demasker_calls": calls}
    return run


# ------------------------------------------------------------------------------------------------
# The selection set: real programs disjoint from fig6's references
# ------------------------------------------------------------------------------------------------


def selection_set(ctx, length, count):
    """(texts, description) of `count` real programs of <= length tokens that fig6's references do not use."""
    from dataprep.data import load_split
    from sample import decode_programs
    fig6_num = ctx.args.fig6_num or ctx.preset["gen_num"]
    available = ctx.held_out_count(length)
    used = 2 * fig6_num if available >= 2 * fig6_num else available  # eval_context.real_reference's share
    val_fits = int((np.asarray(load_split(ctx.data_dir, "val")["lengths"]) <= length).sum())
    split = ctx.args.selection_split
    if split in ("val", "auto") and used + count <= val_fits:
        texts = ctx.held_out(count, length, skip=used)["texts"]
        return texts, {"split": "val", "programs": count, "skipped": used,
                       "how": f"val programs {used}..{used + count - 1} of those <= {length} tokens; fig6's "
                              f"references (n = {fig6_num}) take the first {used} held-out ones"}
    if split == "val":
        raise ValueError(f"only {val_fits} val programs of <= {length} tokens and fig6 (n = {fig6_num}) uses the "
                         f"first {used} held-out ones: {count} disjoint val programs do not exist. Lower --num or "
                         f"--fig6-num, or pass --selection-split train (or auto)")
    train = load_split(ctx.data_dir, "train")
    fits = np.nonzero(np.asarray(train["lengths"]) <= length)[0]
    if len(fits) < count:
        raise ValueError(f"only {len(fits)} training programs of <= {length} tokens for the selection set; lower --num")
    rows = fits[len(fits) - count:]
    ids = np.stack([np.asarray(train["ids"][r], dtype=np.int64) for r in rows])
    texts = decode_programs(ctx.tokenizer, ids, ctx.eos_id, ctx.bos_id)
    return texts, {"split": "train", "programs": count, "skipped": 0,
                   "how": f"the last {count} training programs of <= {length} tokens (fig6, n = {fig6_num}, uses "
                          f"{used} of the {available} held-out ones, so no disjoint val set of {count} exists)"}


# ------------------------------------------------------------------------------------------------
# The subcommand
# ------------------------------------------------------------------------------------------------


def choose(rows):
    """The rule: among rows with empty_rate <= MAX_EMPTY (all rows when none qualifies), the highest MAUVE, then
    the lowest Gen-PPL. Returns the chosen row."""
    fine = [r for r in rows if r.get("empty_rate", 0.0) <= MAX_EMPTY] or rows
    ppl = lambda r: r["gen_ppl"] if np.isfinite(r.get("gen_ppl", np.nan)) else np.inf  # noqa: E731
    return max(fine, key=lambda r: (round(r["mauve"], 3), -ppl(r)))


def choose_configuration(rows):
    """The adaptive rows' choice: each configuration (remasking, block length, EOS mode) summarised by its means
    over its rules (empty rate, MAUVE, Gen-PPL over the finite ones, NFE), then `choose` on the summaries.
    Returns (the chosen summary, every summary)."""
    groups = {}
    for row in rows:
        groups.setdefault(label(configuration(row["setting"])), []).append(row)
    summaries = []
    for name, group in groups.items():
        ppl = [r["gen_ppl"] for r in group if np.isfinite(r.get("gen_ppl", np.nan))]
        summaries.append({"label": name, "setting": configuration(group[0]["setting"]), "rules": len(group),
                          "mauve": float(np.mean([r["mauve"] for r in group])),
                          "gen_ppl": float(np.mean(ppl)) if ppl else float("nan"),
                          "empty_rate": float(np.mean([r.get("empty_rate", 0.0) for r in group])),
                          "nfe": float(np.mean([r["nfe"] for r in group]))})
    return choose(summaries), summaries


def sweep_settings(ctx, settings, length, temp, num, features):
    """One scored row per setting (fixed schedule at NFE = L, or its adaptive rule), rank 0 (empty elsewhere)."""
    rows = []
    for setting in settings:
        sampler = base_sampler(ctx, configuration(setting), length, length, temp, rule_decoding(ctx, setting))
        samples, nfe, stats = sharded_samples(ctx, num, sampler, f"base {label(setting)} L={length}", with_stats=True)
        if samples is not None:
            rows.append({"label": label(setting), "setting": setting, "nfe": nfe, **stats,
                         **score_texts(ctx, samples, features), "examples": samples[:2]})
    return rows


def run_base_decoding(ctx):
    temp = temperature(ctx, 1.0)
    num = ctx.gen_num  # as many samples per setting as fig6 takes per point (--num; tiny 256)
    result = {"temperature": temp, "num_samples": num, "nfe": "L (one token per step); adaptive rows: measured",
              "rule": f"empty rate <= {MAX_EMPTY}, then highest MAUVE (3 decimals), then lowest Gen-PPL",
              "adaptive_rule": "the same rule on each configuration's means over its thresholds and factors",
              "lengths": {}, "chosen": {}, "chosen_adaptive": {}}
    sections = []
    for length in ctx.args.lengths or ctx.get("lengths"):
        texts, selection = selection_set(ctx, length, num)
        features = ctx.scorer().features(texts, ctx.get("batch_size"), pool=ctx.args.features)
        rows = sweep_settings(ctx, settings_grid(length, ctx.args.blocks), length, temp, num, features)
        adaptive = sweep_settings(ctx, adaptive_grid(length, ctx.args.blocks, ctx.args.thresholds, ctx.args.factors),
                                  length, temp, num, features)
        if not ctx.env.is_main:
            continue
        best = choose(rows)
        best_adaptive, configurations = choose_configuration(adaptive)
        result["lengths"][str(length)] = {"rows": rows, "chosen": best["setting"], "selection": selection,
                                          "adaptive_rows": adaptive, "adaptive_configurations": configurations,
                                          "chosen_adaptive": best_adaptive["setting"]}
        result["chosen"][str(length)] = best["setting"]
        result["chosen_adaptive"][str(length)] = best_adaptive["setting"]
        sections.append(f"### L = {length}\n\nSelection set: {selection['how']}.\n\n" + table(rows, best)
                        + f"\n\nChosen: **{best['label']}**.\n\nFast-dLLM's adaptive rules (NFE measured):\n\n"
                        + table(adaptive, None) + "\n\nTheir configurations, means over the rules:\n\n"
                        + table(configurations, best_adaptive)
                        + f"\n\nChosen for the threshold / factor rows: **{best_adaptive['label']}**.")
    if not ctx.env.is_main:
        return None, None, None
    head = (f"The base MDM at NFE = L with each of LLaDA's options, and with Fast-dLLM's adaptive rules under each "
            f"block length and EOS mode, {num} samples per setting, temperature {temp}; rule: {result['rule']} "
            f"(adaptive rows: {result['adaptive_rule']}). Use it with `eval.py fig6 / speed --base-decoding "
            f"OUT/base-decoding.json`.")
    return result, head + "\n\n" + "\n\n".join(sections), []


def table(rows, best):
    """Settings (or configuration summaries) with their NFE, quality, empty share and time; `best` in bold."""
    def cell(r, key, fmt):
        return fmt.format(r[key]) if key in r else "-"
    return md_table(["setting", "NFE", "MAUVE", "Gen-PPL", "empty", "entropy", "s/sample"],
                    [[("**" + r["label"] + "**") if r is best else r["label"], f"{r['nfe']:.1f}",
                      fmt_ci(r["mauve"], r.get("mauve_ci")), fmt_ci(r["gen_ppl"], r.get("gen_ppl_ci"), 2),
                      f"{r['empty_rate']:.2f}", cell(r, "unigram_entropy", "{:.2f}"),
                      cell(r, "seconds_per_sample", "{:.3f}")] for r in rows])
