"""What train_ae.py builds before its first step: the data cache, h_phi and f_theta, the CADD inputs.

- prepare_data: dataprep/data.py's memmapped cache (built by rank 0 when missing), its meta and tokenizer files.
- build_models: the encoder h_phi and the demasker f_theta (paper Sec. 4.1): from scratch with the tiny configs,
  from public or own weights (--encoder-init / --demasker-init; App. C: Qwen3-Embedding-0.6B and LLaDA-8B-Base or
  the base MDM run), or from the checkpoint configs on --resume (the weights are loaded afterwards, strictly; a
  config.json edited since the save is refused first, by its shapes on the meta device: resumed_part).
  New conditioning parameters (register projection, START, END) are scaled so that a projected register has the
  token embeddings' RMS (match_conditioning_rms_; our choice).
- cadd_settings / cadd_batch: the demasker's CADD fields and the per-example latent noise of --cadd
  (extensions/cadd.py; beyond the paper).
"""

import math
from pathlib import Path

import torch

from demasker import Demasker, DemaskerConfig
from encoder import Encoder, EncoderConfig
from extensions import cadd
from infra import checkpoint as C
from infra import distributed as D


# ------------------------------------------------------------------------------------------------
# Data cache
# ------------------------------------------------------------------------------------------------

def prepare_data(args, env):
    """dataprep/data.py's cache: an existing --data folder is used as is (unless --corpus is given); otherwise rank 0
    builds it (a settings match makes that a no-op). Returns (train TokenData, val TokenData, meta,
    encoder vocabulary ids, {tokenizer files copied into every checkpoint})."""
    from dataprep import data

    vocab = Path(args.tokenizer).name if args.tokenizer else args.vocab_size
    folder = Path(args.data or f"data_cache/{Path(args.corpus or 'stdlib').stem}-L{args.seq_len}-V{vocab}")
    if args.data and not args.corpus and not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"--data {folder} is not a finished dataprep/data.py cache (no meta.json). Build it first "
                                f"(python -m dataprep.data --out {folder} ...), pass --corpus to build it here, or drop --data "
                                f"to use the default cache of the standard library")
    args.data = str(folder)
    if env.is_main and (args.corpus or not (folder / "meta.json").is_file()):
        data.build_dataset(folder, args.corpus, args.seq_len, args.vocab_size or 4096, args.tokenizer,
                           args.encoder_tokenizer, overlong=args.overlong)
    D.barrier(env)
    meta = data.load_meta(folder)
    if meta["seq_len"] != args.seq_len:
        raise ValueError(f"{folder} holds programs of L={meta['seq_len']} tokens, not --seq-len {args.seq_len}; "
                         f"pass the matching --seq-len or another --data folder")
    files = {"tokenizer.json": folder / "tokenizer.json"}
    encoder_vocab = {"vocab_size": meta["vocab_size"], "pad_id": meta["eos_id"], "eos_id": meta["eos_id"],
                     "mask_id": meta["mask_id"]}
    if not meta["shared_tokenizer"]:
        files["encoder_tokenizer.json"] = folder / "encoder_tokenizer.json"
        encoder_vocab = meta["encoder"]
    return data.TokenData(folder, "train"), data.TokenData(folder, "val"), meta, encoder_vocab, files


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def model_configs(args, meta, encoder_vocab):
    """Tiny-preset configs with vocabulary and special ids from the tokenizer (data meta.json)."""
    K = args.num_registers
    enc_over, dem_over = {}, {}
    if args.encoder_width:
        heads = max(1, args.encoder_width // 32)
        enc_over = dict(hidden_size=args.encoder_width, num_heads=heads, num_kv_heads=max(1, heads // 2),
                        head_dim=args.encoder_width // heads, intermediate_size=8 * args.encoder_width // 3 // 16 * 16)
    if args.encoder_layers:
        enc_over["num_layers"] = args.encoder_layers
    enc = EncoderConfig.tiny(vocab_size=encoder_vocab["vocab_size"], pad_token_id=encoder_vocab["pad_id"],
                             eos_token_id=encoder_vocab["eos_id"], mask_token_id=encoder_vocab["mask_id"],
                             num_registers=K, max_position_embeddings=args.seq_len + K, **enc_over)
    if args.demasker_width:
        heads = max(1, args.demasker_width // 32)
        dem_over = dict(d_model=args.demasker_width, n_heads=heads, n_kv_heads=heads,
                        mlp_hidden_size=8 * args.demasker_width // 3 // 16 * 16)
    if args.demasker_layers:
        dem_over["n_layers"] = args.demasker_layers
    dem = DemaskerConfig.tiny(vocab_size=meta["vocab_size"], mask_token_id=meta["mask_id"],
                              eos_token_id=meta["eos_id"], bos_token_id=meta["bos_id"], pad_token_id=meta["eos_id"],
                              register_dim=0 if args.no_registers else enc.hidden_size, max_registers=K,
                              max_sequence_length=args.seq_len, **cadd_settings(args), **dem_over)
    return enc, dem


def build_models(args, meta, encoder_vocab, resume_dir=None):
    """(encoder | None, demasker): from the checkpoint configs on --resume, public/own weights with
    --encoder-init/--demasker-init, else from scratch with the tiny configs."""
    enc_cfg, dem_cfg = model_configs(args, meta, encoder_vocab)
    encoder = None
    if resume_dir is not None:  # weights are loaded afterwards by distributed.load_checkpoint
        if not args.no_registers:
            encoder = resumed_part(resume_dir / "encoder", "encoder", Encoder, EncoderConfig)
        demasker = resumed_part(resume_dir / "demasker", "demasker", Demasker, DemaskerConfig)
        try:
            check_vocab(demasker.cfg, meta, encoder, encoder_vocab)
        except ValueError as error:
            raise ValueError(f"--resume: {error} (the run's {resume_dir / 'demasker' / 'config.json'} against the data "
                             f"cache {args.data}: the config.json was edited, or --data is not the run's cache)") from None
        return encoder, demasker
    if not args.no_registers:
        encoder = (Encoder.from_pretrained(part_folder(args.encoder_init, "encoder"), num_registers=args.num_registers)
                   if args.encoder_init else Encoder(enc_cfg))
    register_dim = 0 if encoder is None else encoder.cfg.hidden_size
    if args.demasker_init:
        demasker = Demasker.from_pretrained(part_folder(args.demasker_init, "demasker"), register_dim=register_dim,
                                            max_registers=args.num_registers, **cadd_settings(args))
    else:
        demasker = Demasker(dem_cfg)
    if register_dim and conditioning_is_new(args.demasker_init):
        match_conditioning_rms_(demasker)
    check_vocab(demasker.cfg, meta, encoder, encoder_vocab)
    return (encoder.float() if encoder is not None else None), demasker.float()  # fp32 master weights


def resumed_part(folder, kind, model_cls, config_cls):
    """--resume: one model of the checkpoint built from its config.json, which must describe the weights beside it:
    a config.json edited since the save (not JSON, another kind, a bad field, sizes that do not fit the weights)
    is refused naming the file and the fix, before anything of its size is allocated."""
    path = folder / "config.json"
    fix = (f"restore it from a good copy of the run (its values fit {folder}/model.safetensors) or start a new run "
           f"with another --out-dir")
    fields = C.read_config(folder)  # not JSON / not an object: CheckpointError naming the file
    if fields.get("crocodil_model") != kind:
        raise C.CheckpointError(f"{path} names crocodil_model={fields.get('crocodil_model')!r}, not {kind!r}: it was "
                                f"edited or copied from another model; {fix}")
    try:
        cfg = config_cls.from_dict(fields)
        with torch.device("meta"):  # shapes only: a config edited to a huge size allocates nothing
            misfits = C.config_misfits(model_cls(cfg), folder)
    except (TypeError, ValueError, ArithmeticError) as error:
        raise C.CheckpointError(f"{path} does not make a {kind} ({type(error).__name__}: {error}); {fix}") from None
    if misfits:
        raise C.CheckpointError(f"{path} does not describe the weights beside it ({'; '.join(misfits)}): it was "
                                f"edited after the save; {fix}")
    return model_cls(cfg)


def part_folder(name_or_path, part):
    """A run's checkpoint folder (holding encoder/ and demasker/) stands for its `part`; else unchanged."""
    return str(Path(name_or_path) / part) if (Path(name_or_path) / part / "config.json").is_file() else name_or_path


def check_vocab(dem_cfg, meta, encoder, encoder_vocab):
    """The tokenizer's ids must be the ones the models were built / trained with."""
    problems = []
    for name, ours in (("mask_id", dem_cfg.mask_token_id), ("eos_id", dem_cfg.eos_token_id)):
        if meta[name] != ours:
            problems.append(f"demasker {name} {ours} != tokenizer {meta[name]}")
    if meta["vocab_size"] > dem_cfg.vocab_size:
        problems.append(f"tokenizer vocabulary {meta['vocab_size']} > demasker vocab_size {dem_cfg.vocab_size}")
    if encoder is not None and encoder_vocab["vocab_size"] > encoder.cfg.vocab_size:
        problems.append(f"encoder tokenizer vocabulary {encoder_vocab['vocab_size']} > encoder vocab_size "
                        f"{encoder.cfg.vocab_size}")
    if problems:
        raise ValueError("tokenizer and model disagree: " + "; ".join(problems) + ". Use the tokenizer the "
                         "model was trained with (--tokenizer / --encoder-tokenizer) or train from scratch.")


@torch.no_grad()
def match_conditioning_rms_(demasker):
    """Scale the new register projection W so that a register (norm sqrt(d): entries of RMS 1) projects to the
    token embeddings' RMS: E|W z|^2 = ||W||_F^2 for z of unit-RMS i.i.d. entries, so RMS(W z) = ||W||_F /
    sqrt(d_model); START and END are scaled to the same RMS. Called only when these parameters are new (fresh
    init, or a base MDM / public LLaDA gaining them), never on a trained guided demasker or on --resume."""
    if not demasker.cfg.register_dim:
        return
    target = demasker.wte.weight.float().pow(2).mean().sqrt()
    weight = demasker.register_proj.weight
    weight.mul_(target / (weight.float().norm() / math.sqrt(demasker.cfg.d_model)).clamp_min(1e-12))
    for vector in (demasker.start_embedding, demasker.end_embedding):
        vector.mul_(target / vector.float().pow(2).mean().sqrt().clamp_min(1e-12))


def conditioning_is_new(init):
    """True when Demasker.from_pretrained(init) creates the conditioning parameters (a public LLaDA, or our base
    MDM with register_dim 0); False for our own guided demasker (they are trained weights)."""
    if not init:
        return True
    folder = Path(part_folder(init, "demasker"))
    try:
        if folder.is_dir():
            config = C.read_config(folder)
        else:  # a hub id: its config.json only (from_pretrained has fetched the weights already)
            from huggingface_hub import hf_hub_download
            config = C.read_json(hf_hub_download(repo_id=str(init), filename="config.json"), "config")
    except Exception:  # noqa: BLE001 (unreachable config: treat it as a public model)
        return True
    return "crocodil_model" not in config or not config.get("register_dim")


# ------------------------------------------------------------------------------------------------
# CADD (--cadd, extensions/cadd.py)
# ------------------------------------------------------------------------------------------------

def cadd_settings(args):
    """The demasker config's CADD fields from --cadd / --cadd-schedule / --cadd-table (none without --cadd; an
    args.json recorded without the flag reads as no CADD)."""
    if not getattr(args, "cadd", False):
        return {"cadd_schedule": "none", "cadd_table": "own"}
    return {"cadd_schedule": args.cadd_schedule, "cadd_table": args.cadd_table}


def cadd_batch(args, demasker, x0, t, counters, seed):
    """cadd_inputs for EncoderDemasker (x_0, t, N(0, I) noise per example from its stream position), or None."""
    if demasker.cfg.cadd_schedule == "none":
        return None
    return x0, t, cadd.training_noise(counters, seed, x0.shape[1], demasker.cfg.d_model)
