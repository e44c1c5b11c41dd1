"""Train the prompt-conditioned prior of App. H (Eq. 12) and fine-tune the guided demasker on prompted canvases.

Paper map (arXiv 2603.20210, App. H; the recipe is the paper's, the experiment is beyond it):
- Eq. 12: L(phi, psi, kappa) = || g_psi(z_t, t, h_kappa(c)) - z_0 ||^2. z_0 = h_phi(x) from the FROZEN AE encoder
  (the registers the guided demasker reads), with x the answer (--target answer, default) or prompt + answer
  (--target program); c the prompt (signature + docstring, dataprep/prompts.py). h_kappa is a second encoder initialised
  from h_phi, trained jointly with g_psi, or frozen (--freeze-kappa). z_t, t, block offsets and the x0 loss are
  Alg. 5's (train_prior.py: schedules.q_sample, sample_base_times, register_times, mean over every entry).
- ConWithinDisc with a prompt refreshes from G_psi(eps, h(x_t), h_kappa(c)): one DiT serves both generators.
  Its conditioning is [h(x^(r)) ; h_kappa(c)] (prompting.join_cond): x^(r) is the prompted canvas with each
  position after the prompt masked with probability r ~ U[0, 1] (Alg. 4's draw, the prompt always visible)
  read by the frozen h_phi with [M] hidden (generators.embed_canvas, the view of sampling); with probability
  --xt-drop the h(x^(r)) half is withheld (mask False), which is what ConThenDisc with a prompt feeds.
- The guided demasker (App. H: "fine-tuned on prompt + partially masked answer"), with --demasker-steps N:
  LLaDA's masked-diffusion loss (schedules.mask_tokens with the prompt never masked, masked_diffusion_loss)
  on the canvas BOS prompt answer EOS..., guided by the first K registers of h_phi(answer) (--guide answer) or
  of h_phi(prompt + answer) (--guide program), with App. D's latent noise (--latent-cos, as train_ae.py).
  The result is a complete AE run folder OUT/ae (demasker/, the AE's encoder/ and tokenizer.json).

One process, one tokenizer shared by encoder and demasker (the tiny setting; two tokenizers are refused with
the fix). Randomness is a function of (seed, step). No resume: runs are minutes at toy scale. A folder that holds
anything is refused unless --overwrite, which writes the new run beside the old one and swaps it in complete; one
writer at a time (infra/run_folder.py). The models are written to a staging folder first and moved in complete
(checkpoint.swap_folder), prompted.json last, so a killed run never leaves a prompted.json beside half-written
weights.

Run folder (--out-dir): prompted.json (what prompting.load_prompted_prior needs), args.json, dit/ and kappa/
(EMA weights), log.jsonl, and with --demasker-steps ae/.

    python -m dataprep.prompts --out runs/pairs
    python -m experiments.train_prompted --ae runs/ae --pairs runs/pairs --out-dir runs/prompted --steps 1000
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from infra import checkpoint as C
from infra import guards
from infra.atomic import write_json, write_text
from infra.run_folder import OVERWRITE_HELP, claim
from corruption import latent_noise_std
from generators import embed_canvas
from extensions.prompting import PROMPTED_SETTINGS_FILE, join_cond
from dataprep.prompts import encode_pairs, load_pairs
from schedules import mask_tokens, masked_diffusion_loss, q_sample, register_times, sample_base_times


class PromptedTrainee(nn.Module):
    """g_psi and h_kappa as one module: z0_hat = g(z_t, t, [h(x^(r)) ; h_kappa(c)])."""

    def __init__(self, dit, kappa):
        super().__init__()
        self.dit, self.kappa = dit, kappa

    def forward(self, z_t, t, prompt_ids, prompt_mask, xt_cond, xt_shown):
        kappa = self.kappa(prompt_ids, attention_mask=prompt_mask).float()  # (B, Kk, d)
        cond, cond_mask = join_cond(xt_cond, xt_shown, kappa)
        return self.dit(z_t, t, cond, cond_mask)


def step_generator(seed, step, stream=0):
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0]))


@torch.no_grad()
def bank(encoder, ids, mask, num_registers, chunk=64):
    """The first K registers of h_phi for every row: (N, K, d) float32."""
    parts = [encoder(ids[i:i + chunk], attention_mask=mask[i:i + chunk])[:, :num_registers].float()
             for i in range(0, len(ids), chunk)]
    return torch.cat(parts)


def masked_answer_canvas(ids, prompt_len, ratios, uniforms, mask_id):
    """x^(r): every position after the prompt masked where uniforms < r. ids (B, L); prompt_len, ratios (B,)."""
    after = torch.arange(ids.shape[1])[None, :] >= prompt_len[:, None]  # (B, L)
    return ids.masked_fill(after & (uniforms < ratios[:, None]), mask_id)


def prior_step(trainee, encoder, data, rows, args, g, mask_id, eos_id):
    """One Eq. 12 loss on the given rows, every draw from g."""
    z0 = data["z0"][rows]  # (B, K, d)
    B, K, _ = z0.shape
    t = register_times(sample_base_times(B, args.max_offset, not args.no_block_offsets, generator=g), K,
                       args.max_offset, not args.no_block_offsets)
    noise = torch.randn(z0.shape, generator=g)
    ratios, uniforms = torch.rand(B, generator=g), torch.rand(B, data["ids"].shape[1], generator=g)
    x_r = masked_answer_canvas(data["ids"][rows], data["prompt_len"][rows], ratios, uniforms, mask_id)
    shown = torch.rand(B, generator=g) >= args.xt_drop
    if bool(shown.any()):
        xt_cond, _ = embed_canvas(encoder, x_r, mask_id, eos_id)  # (B, Kc, d), frozen h_phi
    else:  # every row withholds h(x^(r)): no encoder call
        xt_cond = torch.zeros(B, encoder.cfg.num_registers, encoder.cfg.hidden_size)
    prompt_ids, prompt_mask = data["prompt"]
    pred = trainee(q_sample(z0, t, noise), t, prompt_ids[rows], prompt_mask[rows], xt_cond, shown)
    return F.mse_loss(pred.float(), z0)


def demasker_step(demasker, data, rows, args, g, mask_id, noise_std):
    """One masked-diffusion loss on prompted canvases, the prompt never masked, guided by data['guide']."""
    x0 = data["ids"][rows]
    maskable = torch.arange(x0.shape[1])[None, :] >= data["prompt_len"][rows][:, None]
    x_t, masked, p_mask = mask_tokens(x0, torch.rand(len(rows), generator=g), mask_id, generator=g, maskable=maskable)
    registers = data["guide"][rows]
    registers = registers + noise_std * torch.randn(registers.shape, generator=g)
    return masked_diffusion_loss(demasker(x_t, registers=registers), x0, masked, p_mask)


def train_loop(model, params, loss_fn, steps, args, lr, label, log, ema=None):
    """AdamW + warm-up/cosine (train_ae.get_lr), gradient clipping, a non-finite step skipped, EMA."""
    from train_ae import get_lr
    from train_prior import ema_decay

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = SimpleNamespace(lr=lr, warmup_steps=min(args.warmup_steps, steps // 10), min_lr_ratio=0.1)
    started = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, schedule, steps)
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not guards.is_finite(loss.detach(), norm):
            log({"type": label, "step": step, "skipped": "non-finite loss or gradient"})
            continue
        optimizer.step()
        if ema is not None:
            ema.update(model, ema_decay(args.ema_decay, step))
        if step % args.log_interval == 0 or step == steps - 1:
            log({"type": label, "step": step, "loss": round(float(loss.detach()), 5),
                 "seconds": round(time.time() - started, 1)})


def load_data(args, tokenizer, encoder, mask_id, split="train"):
    pairs = load_pairs(args.pairs, split)[:args.max_examples]
    data = encode_pairs(pairs, tokenizer, args.seq_len)
    if len(data["pairs"]) == 0:
        raise ValueError(f"no {split} pair of {args.pairs} fits --seq-len {args.seq_len}; raise --seq-len")
    data["z0"] = bank(encoder, *data[args.target], args.num_registers)
    data["guide"] = bank(encoder, *data[args.guide], args.num_registers)
    return data


def load_ae(ae):
    """(AE checkpoint folder, tokenizer, frozen h_phi) of a train_ae.py run; refuses two tokenizers."""
    from encoder import Encoder
    from dataprep.tokenization import load_tokenizer
    from train_prior import resolve_ae

    folder = resolve_ae(ae)
    if (folder / "encoder_tokenizer.json").is_file():
        raise ValueError(f"{folder} reads the encoder with its own tokenizer; experiments/train_prompted.py supports one shared "
                         f"tokenizer (the tiny setting) so far: train the AE on a dataprep/data.py cache without "
                         f"--encoder-tokenizer")
    tokenizer = load_tokenizer(str(folder / "tokenizer.json"))
    encoder = Encoder.from_pretrained(str(folder / "encoder")).eval().requires_grad_(False)
    return folder, tokenizer, encoder


def train_prior_part(args, folder, encoder, data, mask_id, eos_id, log):
    from encoder import Encoder
    from latent_dit import DiTConfig, LatentDiT
    from train_prior import EMA

    d = encoder.cfg.hidden_size
    torch.manual_seed(args.seed)
    dit = LatentDiT(DiTConfig.tiny(register_dim=d, num_registers=args.num_registers, cond_dim=d,
                                   **({"hidden_size": args.hidden_size} if args.hidden_size else {}),
                                   **({"depth": args.depth} if args.depth else {})))
    kappa = Encoder.from_pretrained(str(folder / "encoder"), num_registers=args.kappa_registers).float()
    kappa.requires_grad_(not args.freeze_kappa)
    trainee = PromptedTrainee(dit, kappa)
    ema = EMA(trainee)
    h_xt = Encoder.from_pretrained(str(folder / "encoder"), num_registers=args.cond_registers).eval()
    h_xt.requires_grad_(False)
    params = [p for p in trainee.parameters() if p.requires_grad]
    n = len(data["pairs"])

    def loss_fn(step):
        g = step_generator(args.seed, step)
        rows = torch.randint(n, (min(args.batch_size, n),), generator=g)
        return prior_step(trainee.train(), h_xt, data, rows, args, g, mask_id, eos_id)

    train_loop(trainee, params, loss_fn, args.steps, args, args.lr, "prior", log, ema)
    return ema.module.eval()


def finetune_demasker(args, folder, data, mask_id, log):
    from demasker import Demasker

    demasker = Demasker.from_pretrained(str(folder / "demasker")).float().train()
    noise_std = latent_noise_std(args.latent_cos)
    n = len(data["pairs"])

    def loss_fn(step):
        g = step_generator(args.seed, step, stream=1)
        rows = torch.randint(n, (min(args.batch_size, n),), generator=g)
        return demasker_step(demasker, data, rows, args, g, mask_id, noise_std)

    train_loop(demasker, [p for p in demasker.parameters() if p.requires_grad], loss_fn, args.demasker_steps, args,
               args.demasker_lr, "demasker", log)
    return demasker.eval()


@torch.no_grad()
def register_error(model, encoder, data, args, mask_id, eos_id, shown, seed=12345):
    """Validation on the first 256 rows: MSE of z0_hat against z_0 at t = 0.5 and at t = 1 (pure noise: what the
    prompt alone tells) with the h(x^(r)) half withheld (shown False) or given at r = 0.5."""
    out = {}
    n = min(256, len(data["pairs"]))
    g = torch.Generator().manual_seed(seed)
    z0 = data["z0"][:n]
    noise = torch.randn(z0.shape, generator=g)
    x_r = masked_answer_canvas(data["ids"][:n], data["prompt_len"][:n], torch.full((n,), 0.5),
                               torch.rand(n, data["ids"].shape[1], generator=g), mask_id)
    xt_cond, _ = embed_canvas(encoder, x_r, mask_id, eos_id)
    for t_value in (0.5, 1.0):
        t = torch.full(z0.shape[:2], t_value)
        prompt_ids, prompt_mask = (x[:n] for x in data["prompt"])
        pred = model(q_sample(z0, t, noise), t, prompt_ids, prompt_mask, xt_cond, torch.full((n,), shown)).float()
        out[f"mse_t{t_value}"] = float(F.mse_loss(pred, z0))
    return out


def save(args, out, trainee, demasker, folder):
    """dit/, kappa/ (and ae/) staged, then each swapped in complete; prompted.json (what readers look for) last."""
    stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=out))
    try:
        write_models(args, stage, trainee, demasker, folder)
        for name in ("dit", "kappa", "ae"):
            if (stage / name).exists():
                C.swap_folder(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    settings = {"ae": str(folder.resolve()), "pairs": str(Path(args.pairs).resolve()),
                "num_registers": args.num_registers, "cond_registers": args.cond_registers,
                "kappa_registers": args.kappa_registers, "max_offset": args.max_offset,
                "block_offsets": not args.no_block_offsets, "target": args.target, "guide": args.guide,
                "freeze_kappa": args.freeze_kappa, "xt_drop": args.xt_drop, "seq_len": args.seq_len}
    write_json(out / PROMPTED_SETTINGS_FILE, settings)


def write_models(args, out, trainee, demasker, folder):
    trainee.dit.save_pretrained(out / "dit")
    trainee.kappa.save_pretrained(out / "kappa")
    if demasker is not None:
        ae_out = out / "ae"
        demasker.save_pretrained(ae_out / "demasker")
        shutil.copytree(folder / "encoder", ae_out / "encoder", dirs_exist_ok=True)
        shutil.copy(folder / "tokenizer.json", ae_out / "tokenizer.json")
        recorded = next((json.loads(p.read_text()).get("data") for p in (folder / "args.json", folder.parent / "args.json")
                         if p.is_file()), None)  # the data cache the AE was trained on: eval.py finds it there
        write_json(ae_out / "args.json", {"data": recorded, "fine_tuned_by": "experiments/train_prompted.py", "from_ae": str(folder),
                                          "demasker_steps": args.demasker_steps, "guide": args.guide})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the prompt-conditioned latent prior of App. H (Eq. 12: g_psi "
                                            "conditioned on h_kappa(prompt), and on h(x_t) for ConWithinDisc) and "
                                            "optionally fine-tune the guided demasker on prompt + masked answer.")
    a = p.add_argument
    a("--ae", required=True, help="train_ae.py run (encoder/, demasker/, tokenizer.json): h_phi and f_theta")
    a("--pairs", required=True, help="dataprep/prompts.py --out folder (train.jsonl, val.jsonl)")
    a("--out-dir", required=True, help="run folder to write (prompted.json, dit/, kappa/, log.jsonl, ae/)")
    a("--seq-len", type=int, default=128, help="L: canvas tokens (BOS prompt answer EOS); longer pairs are dropped")
    a("--num-registers", type=int, default=8, help="K: registers of the answer modelled by the prior (first K)")
    a("--cond-registers", type=int, default=None, help="registers of h(x_t) in the conditioning (default K)")
    a("--kappa-registers", type=int, default=None, help="registers of h_kappa(c) in the conditioning (default K)")
    a("--target", choices=["answer", "program"], default="answer",
      help="the prior's z_0: registers of the answer (App. H) or of prompt + answer")
    a("--guide", choices=["answer", "program"], default="answer",
      help="the registers that guide the demasker fine-tuning: of the answer (App. H) or of prompt + answer")
    a("--freeze-kappa", action="store_true", help="keep h_kappa = h_phi frozen (default: trained with the DiT)")
    a("--xt-drop", type=float, default=0.5, help="probability that the h(x^(r)) half is withheld in training "
      "(that is ConThenDisc's conditioning; the rest trains ConWithinDisc's refresh)")
    a("--max-offset", type=float, default=0.2, help="App. E block offset of the last register block")
    a("--no-block-offsets", action="store_true", help="all registers at the same time (App. G ablation)")
    a("--hidden-size", type=int, default=None, help="DiT width (default: the tiny preset's)")
    a("--depth", type=int, default=None, help="DiT blocks (default: the tiny preset's)")
    a("--steps", type=int, default=1000, help="optimizer steps of the prior")
    a("--batch-size", type=int, default=32, help="pairs per step")
    a("--lr", type=float, default=1e-3, help="peak learning rate of the prior (and h_kappa)")
    a("--warmup-steps", type=int, default=50, help="linear warm-up steps (at most a tenth of the run)")
    a("--ema-decay", type=float, default=0.999, help="EMA of the prior's weights (the saved model)")
    a("--demasker-steps", type=int, default=0, help="fine-tuning steps of the guided demasker (0 = none)")
    a("--demasker-lr", type=float, default=3e-4, help="peak learning rate of the demasker fine-tuning")
    a("--latent-cos", type=float, default=0.8, help="App. D latent noise on the guiding registers (1 = none)")
    a("--max-examples", type=int, default=None, help="use only the first N training pairs (tests, overfitting)")
    a("--log-interval", type=int, default=50, help="steps between log lines")
    a("--seed", type=int, default=0, help="seed of the initialisation and of every per-step draw")
    a("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    a("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = p.parse_args(argv)
    for name in ("seq_len", "num_registers", "steps", "batch_size", "log_interval"):
        guards.check_range(p, args, name, low=1, integer=True)
    for name in ("cond_registers", "kappa_registers", "max_examples", "hidden_size", "depth"):
        if getattr(args, name) is not None:
            guards.check_range(p, args, name, low=1, integer=True)
    for name in ("demasker_steps", "warmup_steps", "threads"):
        guards.check_range(p, args, name, low=0, integer=True)
    guards.check_range(p, args, "xt_drop", low=0, high=1)
    guards.check_range(p, args, "max_offset", low=0, high=1, high_open=True)
    guards.check_range(p, args, "ema_decay", low=0, high=1, high_open=True)
    guards.check_range(p, args, "latent_cos", low=0, high=1, low_open=True)
    for name in ("lr", "demasker_lr"):
        guards.check_range(p, args, name, low=0, low_open=True)
    args.cond_registers = args.cond_registers or args.num_registers
    args.kappa_registers = args.kappa_registers or args.num_registers
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with claim(args.out_dir, overwrite=args.overwrite, resumable=False) as out:  # infra/run_folder.py
        return train(args, out)


def train(args, out):
    """One run written into `out` (the folder main() claimed): the prior, the demasker fine-tuning, the record."""
    folder, tokenizer, encoder = load_ae(args.ae)
    K_enc = encoder.cfg.num_registers
    for name in ("num_registers", "cond_registers", "kappa_registers"):
        if getattr(args, name) > K_enc:
            raise SystemExit(f"experiments/train_prompted.py: error: --{name.replace('_', '-')} {getattr(args, name)} but the "
                             f"encoder has K={K_enc} registers; choose at most {K_enc}")
    mask_id, eos_id = tokenizer.mask_id, tokenizer.eos_id
    write_text(out / "args.json", json.dumps(vars(args), indent=2) + "\n")
    lines = []

    def log(record):
        lines.append(json.dumps(record))
        write_text(out / "log.jsonl", "\n".join(lines) + "\n")
        print(json.dumps(record), flush=True)

    data = load_data(args, tokenizer, encoder, mask_id)
    log({"type": "data", "train_pairs": len(data["pairs"]), "dropped_too_long": data["dropped"]})
    trainee = train_prior_part(args, folder, encoder, data, mask_id, eos_id, log)
    demasker = finetune_demasker(args, folder, data, mask_id, log) if args.demasker_steps else None
    h_xt = trainee.kappa.__class__.from_pretrained(str(folder / "encoder"), num_registers=args.cond_registers).eval()
    for split in ("train", "val"):
        try:
            part = data if split == "train" else load_data(args, tokenizer, encoder, mask_id, "val")
        except ValueError:
            continue
        for shown in (False, True):
            record = register_error(trainee, h_xt, part, args, mask_id, eos_id, shown)
            log({"type": "val", "split": split, "xt_shown": shown, **record})
    save(args, out, trainee, demasker, folder)
    return trainee


if __name__ == "__main__":
    main()
