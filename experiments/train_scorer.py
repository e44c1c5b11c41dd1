"""The reference scorer for Gen-PPL and MAUVE features: a small causal LM trained on the train split.

Paper map (arXiv 2603.20210): Sec. 5 (Fig. 6, 8, 11, 12, Tables 1-2) reports Gen-PPL and MAUVE without
naming the scorer or the featuriser. Offline there is no GPT-2, so we train one: the Qwen3 block of encoder.py
run causally (`Encoder.backbone` with no registers) with its tied LM head (`Encoder.lm_logits`), on the TRAIN split of the same data cache the models use, never on
generated text, and never the CRoCoDiL encoder under test (that would score its own outputs).

`Scorer` is the one interface eval.py uses:
    scorer = Scorer.load(path)               # this script's output folder, or any Qwen3 causal LM folder /
                                             # hub id with a tokenizer.json (e.g. Qwen/Qwen3-0.6B-Base on a GPU)
    nll_sums, counts, tokens = scorer.score(texts)   # teacher-forced NLL per text (nats), tokens scored
    features = scorer.features(texts)                # (N, D) final hidden state at the last valid token (MAUVE);
                                                     # pool="mean": mean-pooled over the tokens
Every text is re-encoded with the scorer's own tokenizer and wrapped BOS .. EOS (EOS doubles as BOS
when the tokenizer has none, as for Qwen3), truncated to max_length tokens; every token after BOS is
scored, EOS included (MDLM's Gen-PPL; metrics.generative_perplexity pools them).

Output folder: config.json + model.safetensors (the Encoder with num_registers=1, i.e. no suffix
registers), tokenizer.json, scorer.json ({bos_id, eos_id, max_length, val_ppl, ...}); written atomically. A --out
that holds anything is refused unless --overwrite, and one writer at a time (infra/run_folder.py).

    python -m experiments.train_scorer --data DATA --out runs/scorer --preset tiny     # minutes on 2 CPU cores
"""

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from infra import guards
from infra.checkpoint import non_finite, read_config, resolve_model_dir, swap_folder
from infra.run_folder import OVERWRITE_HELP, claim
from encoder import Encoder, EncoderConfig

SCORER_FILE = "scorer.json"
TOKENIZER_FILE = "tokenizer.json"

# Model widths and training budgets per preset (the budget is a default; --steps overrides it).
PRESETS = {
    "tiny": dict(model=dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                            intermediate_size=384),
                 steps=600, batch_size=16, lr=2e-3, warmup=50),
    "small": dict(model=dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32,
                             intermediate_size=768),
                  steps=4000, batch_size=32, lr=1e-3, warmup=200),
}


def scorer_config(preset, vocab_size, eos_id, max_length):
    """EncoderConfig of a causal-LM scorer: the preset's widths, tied head, no suffix registers."""
    return EncoderConfig(vocab_size=vocab_size, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         max_position_embeddings=max_length, num_registers=1, pad_token_id=eos_id,
                         eos_token_id=eos_id, mask_token_id=None, **PRESETS[preset]["model"])


# ------------------------------------------------------------------------------------------------
# The scorer
# ------------------------------------------------------------------------------------------------


class Scorer:
    """A causal LM (encoder.Encoder run without registers) plus its tokenizer, for Gen-PPL and features."""

    def __init__(self, model, tokenizer, bos_id, eos_id, max_length=1024, device="cpu"):
        self.model = model.eval()
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer (encode(...).ids, decode)
        self.bos_id, self.eos_id = int(bos_id), int(eos_id)
        self.max_length = int(max_length)
        self.device = torch.device(device)

    @classmethod
    def load(cls, name_or_path, device="cpu", dtype=None, max_length=None):
        """This script's output folder, or a public Qwen3 causal LM (folder or hub id) with tokenizer.json.

        For a public model bos = eos = its eos_token_id (Qwen3 has no BOS) and max_length = 1024 unless
        given. dtype: e.g. torch.bfloat16 for a large public model on a GPU (scores are accumulated in fp32).
        """
        from tokenizers import Tokenizer

        folder = resolve_model_dir(name_or_path)
        if not (folder / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"{folder} has no {TOKENIZER_FILE}; a scorer needs its tokenizer (train one "
                                    f"with experiments/train_scorer.py, or pass a Qwen3 causal LM folder / hub id)")
        info = json.loads((folder / SCORER_FILE).read_text()) if (folder / SCORER_FILE).is_file() else {}
        native = "crocodil_model" in read_config(folder)
        model = Encoder.from_pretrained(str(folder), dtype=dtype, device=device,
                                        **({} if native else {"num_registers": 1}))
        eos = info.get("eos_id", model.cfg.eos_token_id)
        return cls(model, Tokenizer.from_file(str(folder / TOKENIZER_FILE)), info.get("bos_id", eos), eos,
                   max_length or info.get("max_length", min(1024, model.cfg.max_position_embeddings)), device)

    # ------------------------------------------------------------- tokens
    def encode(self, texts):
        """texts -> lists of ids BOS, text tokens..., EOS; longer ones keep their first max_length tokens
        (then without EOS: a cut text is not scored on an end it does not have)."""
        encoded = []
        for text in texts:
            ids = [self.bos_id] + self.tokenizer.encode(text, add_special_tokens=False).ids + [self.eos_id]
            encoded.append(ids[:self.max_length])
        return encoded

    def _batches(self, encoded, batch_size):
        """Length-sorted right-padded batches: yields (indices, ids (B, T) long, valid (B, T) bool)."""
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for first in range(0, len(order), batch_size):
            chosen = order[first:first + batch_size]
            T = max(len(encoded[i]) for i in chosen)
            ids = torch.full((len(chosen), T), self.eos_id, dtype=torch.long)
            valid = torch.zeros(len(chosen), T, dtype=torch.bool)
            for row, i in enumerate(chosen):
                ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
                valid[row, :len(encoded[i])] = True
            yield chosen, ids.to(self.device), valid.to(self.device)

    # ------------------------------------------------------------- scores
    @torch.no_grad()
    def score(self, texts, batch_size=16):
        """Teacher-forced NLL of each text: (nll_sums (N,) float64 nats, counts (N,) int64 tokens scored,
        token_lists [the text's own tokens, BOS/EOS excluded]). Position t predicts token t+1; every token
        after BOS is scored."""
        encoded = self.encode(texts)
        nll_sums = np.zeros(len(encoded), dtype=np.float64)
        counts = np.zeros(len(encoded), dtype=np.int64)
        for chosen, ids, valid in self._batches(encoded, batch_size):
            hidden = self.model.backbone(ids, attention_mask=valid)  # (B, T, D)
            scored = valid[:, 1:]  # (B, T-1): targets that exist
            logits = self.model.lm_logits(hidden[:, :-1][scored]).float()  # (N, V)
            token_nll = F.cross_entropy(logits, ids[:, 1:][scored], reduction="none")  # (N,)
            per_row = torch.zeros(len(chosen), dtype=torch.float64, device=ids.device)
            rows = scored.nonzero(as_tuple=True)[0]
            per_row.index_add_(0, rows, token_nll.double())
            nll_sums[chosen] = per_row.cpu().numpy()
            counts[chosen] = scored.sum(dim=1).cpu().numpy()
        token_lists = [[t for t in ids[1:] if t != self.eos_id] for ids in encoded]
        return nll_sums, counts, token_lists

    def nll(self, texts, batch_size=16):
        """(nll_sums, counts) of `score`."""
        nll_sums, counts, _ = self.score(texts, batch_size)
        return nll_sums, counts

    @torch.no_grad()
    def features(self, texts, batch_size=16, pool="last"):
        """(N, D) float32 text features from the final (normed) hidden states: pool='last' (default) takes the
        last valid token's state (EOS, or the last kept token of a cut text: the GPT-2 terminal-state convention
        of MAUVE); pool='mean' averages the states of every token after BOS (EOS included)."""
        if pool not in ("mean", "last"):
            raise ValueError(f"pool must be 'mean' or 'last', got {pool!r}")
        encoded = self.encode(texts)
        out = np.zeros((len(encoded), self.model.cfg.hidden_size), dtype=np.float32)
        for chosen, ids, valid in self._batches(encoded, batch_size):
            hidden = self.model.backbone(ids, attention_mask=valid).float()  # (B, T, D)
            if pool == "mean":
                weights = valid.clone()
                weights[:, 0] = valid.sum(dim=1) == 1  # drop BOS unless it is all there is
                pooled = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
            else:
                pooled = hidden[torch.arange(len(chosen), device=ids.device), valid.sum(dim=1) - 1]
            out[chosen] = pooled.cpu().numpy()
        return out


# ------------------------------------------------------------------------------------------------
# Training on the data cache
# ------------------------------------------------------------------------------------------------


def valid_targets(ids, eos_id):
    """(B, L) ids -> (B, L-1) bool: targets ids[:, 1:] up to and including the first EOS after BOS."""
    targets = ids[:, 1:]
    is_eos = (targets == eos_id).long()
    seen_before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS tokens strictly before each target
    return seen_before == 0


def lm_loss(model, ids, eos_id):
    """Mean next-token CE over the valid targets of a (B, L) batch of BOS .. EOS rows."""
    hidden = model.backbone(ids[:, :-1])  # (B, L-1, D), causal
    scored = valid_targets(ids, eos_id)
    logits = model.lm_logits(hidden[scored]).float()  # (N, V)
    return F.cross_entropy(logits, ids[:, 1:][scored])


@torch.no_grad()
def evaluate_ppl(model, ids, eos_id, batch_size, device, max_rows=512):
    """Teacher-forced perplexity on the first max_rows rows of a split (pooled over tokens)."""
    model.eval()
    total, count = 0.0, 0
    for first in range(0, min(len(ids), max_rows), batch_size):
        rows = np.asarray(ids[first:min(first + batch_size, max_rows)], dtype=np.int64)  # a copy
        batch = torch.from_numpy(rows).to(device)
        scored = valid_targets(batch, eos_id)
        hidden = model.backbone(batch[:, :-1])
        logits = model.lm_logits(hidden[scored]).float()
        total += float(F.cross_entropy(logits, batch[:, 1:][scored], reduction="sum"))
        count += int(scored.sum())
    model.train()
    return math.exp(total / max(count, 1))


def learning_rate(step, total, peak, warmup):
    """Linear warmup then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def save_scorer(folder, model, tokenizer_file, info):
    """Atomically write folder = config.json + model.safetensors + tokenizer.json + scorer.json."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stage-", dir=folder.parent))
    try:
        model.save_pretrained(staging / "scorer")
        shutil.copyfile(tokenizer_file, staging / "scorer" / TOKENIZER_FILE)
        (staging / "scorer" / SCORER_FILE).write_text(json.dumps(info, indent=2) + "\n")
        guards.write_cards_or_warn(staging / "scorer")  # the hub model card; a card problem never fails a save
        swap_folder(staging / "scorer", folder)  # a complete scorer at every instant (infra/checkpoint.py)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def data_tokenizer_file(data_dir, tokenizer):
    """The tokenizer.json to ship with the scorer: --tokenizer, else DATA/tokenizer.json."""
    path = Path(tokenizer) if tokenizer else Path(data_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}; pass --tokenizer (e.g. RUN/tokenizer.json of train_ae.py)")
    return path


def train(args, out=None):
    """Train and save the scorer to `out` (default --out; main() passes the folder infra/run_folder.claim holds)."""
    from tokenizers import Tokenizer
    from tqdm import tqdm

    from dataprep.data import load_meta, load_split

    preset = PRESETS[args.preset]
    steps = args.steps or preset["steps"]
    batch_size = args.batch_size or preset["batch_size"]
    lr = args.lr or preset["lr"]
    torch.manual_seed(args.seed)
    train_ids = load_split(args.data, "train")["ids"]  # (N, L) memmap
    val_ids = load_split(args.data, "val")["ids"]
    meta = load_meta(args.data)
    bos_id, eos_id = meta["bos_id"], meta["eos_id"]
    if bos_id is None:
        raise ValueError(f"the data cache {args.data} has no BOS id; the scorer needs rows BOS .. EOS")
    tokenizer_file = data_tokenizer_file(args.data, args.tokenizer)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    vocab_size = max(tokenizer.get_vocab_size(), int(meta["vocab_size"]))
    max_length = max(int(train_ids.shape[1]), 1024)  # longer texts are scored past the training length
    model = Encoder(scorer_config(args.preset, vocab_size, eos_id, max_length)).to(args.device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    generator = np.random.default_rng(args.seed)
    use_bf16 = args.device.startswith("cuda")
    bar = tqdm(range(steps), desc=f"scorer {args.preset}")
    start, tokens_seen = time.time(), 0
    guard = guards.BadStepGuard(args.max_bad_steps, last_good=lambda: f"{args.out} (not written by this run)",
                                log=lambda record: bar.write(f"skipped step {record['step']}: loss {record['loss']}, "
                                                             f"gradient norm {record['grad_norm']}"))
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, preset["warmup"])
        rows = np.sort(generator.choice(len(train_ids), size=min(batch_size, len(train_ids)), replace=False))
        batch = torch.from_numpy(np.asarray(train_ids[rows], dtype=np.int64)).to(args.device)  # (B, L)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            loss = lm_loss(model, batch, eos_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        if not guard.check(step + 1, loss.item(), grad_norm):
            continue  # a NaN/inf step never reaches the weights or the AdamW moments
        optimizer.step()
        tokens_seen += int(valid_targets(batch, eos_id).sum())
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_seen / (time.time() - start):.0f}")
    val_ppl = evaluate_ppl(model, val_ids, eos_id, batch_size, args.device)
    bad = non_finite(model.state_dict())
    if bad or not math.isfinite(val_ppl):
        raise guards.NonFiniteError(f"the trained scorer is not finite (validation perplexity {val_ppl}, NaN/inf in "
                                    f"{bad[:5]}); {args.out} was not written. Lower --lr and train again")
    info = {"bos_id": bos_id, "eos_id": eos_id, "max_length": max_length, "train_length": int(train_ids.shape[1]),
            "val_ppl": val_ppl, "steps": steps,
            "batch_size": batch_size, "lr": lr, "preset": args.preset, "seed": args.seed,
            "data": str(Path(args.data).resolve()), "train_rows": int(len(train_ids)),
            "tokens_seen": tokens_seen, "seconds": time.time() - start}
    save_scorer(out or args.out, model, tokenizer_file, info)
    print(f"scorer saved to {args.out}: validation perplexity {val_ppl:.2f} after {steps} steps")
    return info


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train the small causal LM that scores Gen-PPL and featurises MAUVE (eval.py --scorer). "
                    "It trains on the TRAIN split of a dataprep/data.py cache, next-token CE over BOS .. first EOS.")
    parser.add_argument("--data", required=True, help="data cache folder written by dataprep/data.py (train and val splits)")
    parser.add_argument("--out", required=True, help="output folder (model, tokenizer.json, scorer.json)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="model width and default budget: tiny (2 layers, d=128, minutes on CPU) or small "
                             "(4 layers, d=256, ~30-60 min on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default: the preset's)")
    parser.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default: the preset's)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json of the cache (default: DATA/tokenizer.json, written by dataprep/data.py)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init and the batch order")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default); 1 when "
                        "other jobs share the cores")
    parser.add_argument("--max-bad-steps", type=int, default=guards.DEFAULT_MAX_BAD_STEPS,
                        help="stop with an error after this many consecutive steps with a NaN/inf loss or gradient "
                             "norm (each is skipped; nothing is written)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "max_bad_steps"):
        guards.check_range(parser, args, name, low=1, integer=True)
    guards.check_range(parser, args, "lr", low=0, low_open=True)
    guards.check_range(parser, args, "threads", low=0, integer=True)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with claim(args.out, overwrite=args.overwrite, resumable=False, flag="--out") as out:  # infra/run_folder.py
        return train(args, out)


if __name__ == "__main__":
    main()
