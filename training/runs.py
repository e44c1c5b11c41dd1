"""Run-folder plumbing shared by train_ae.py and train_prior.py (and the model loading of sample.py).

- RunLog: OUT/log.jsonl, one JSON record per line ({"type": "train" | "val" | "skipped", "step", ...}),
  written by rank 0 only; `truncate` drops the records after a checkpoint that --resume goes back to (a torn
  last line too; a damaged line elsewhere is refused with its number).
- recover_for_resume: a save killed between its two renames (checkpoint.swap_folder) left a complete old copy;
  it is put back before anything is read, and a run folder without a checkpoint is refused.
- write_args / recorded: OUT/args.json, the flags the run really uses (on --resume only the RESUME_MUTABLE flags
  differ), less the flags of one invocation that say nothing about the run (--overwrite).
- last_good: the "last good checkpoint" phrase of guards.BadStepGuard's error.
- run_folder / load_run / resolve_ae: a train_ae.py run folder read back (demasker, encoder, tokenizer), as
  sample.py, eval.py and the benchmarks load it (a tokenizer whose ids are not the demasker's is refused:
  check_tokenizer_ids), and the folder holding its encoder (train_prior.py --ae).
- heldout_programs / through_first_eos: the first validation programs of a data cache, as the encoder reads them
  (sample.py --method autoencode, Alg. 6).
"""

import json
from pathlib import Path

import numpy as np
import torch

from infra import checkpoint as C
from infra import dist_checkpoint as DC
from infra import distributed as D
from infra.atomic import write_text


class RunLog:
    """OUT/log.jsonl written by rank 0 (`enabled`); calling it appends one record. `create` makes the (empty)
    file at once, so a run that logs nothing still leaves one."""

    def __init__(self, path, enabled=True, create=False):
        self.path = Path(path) if enabled else None
        if self.path is not None and create:
            open(self.path, "a").close()

    def __call__(self, record):
        if self.path is not None:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def truncate(self, step):
        """Drop the records written after `step` (the checkpoint --resume continues from writes them again). A last
        line cut short (a run killed while appending it) is dropped too; any other line that is not a JSON record
        is refused naming the file, the line and the fix, and the log is left as it was."""
        if self.path is None or not self.path.is_file():
            return
        text = self.path.read_text(errors="replace")
        lines, kept = text.splitlines(), []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                at = record.get("step", 0) if isinstance(record, dict) else None
                if isinstance(at, bool) or not isinstance(at, (int, float)):
                    raise ValueError(f"its \"step\" is {at!r}, not a number" if at is not None else "not an object")
            except ValueError as error:
                if number == len(lines) and not text.endswith("\n"):
                    break  # the torn last append of a killed run
                raise ValueError(f"{self.path} line {number} is not a log record ({error}); delete or repair that "
                                 f"line, then --resume again") from None
            if at <= step:
                kept.append(line)
        write_text(self.path, "".join(line + "\n" for line in kept))  # whole or not at all (infra/atomic.py)


INVOCATION_ONLY = ("overwrite",)  # how this invocation treats the folder, not what the run is: not recorded


def recorded(args):
    """vars(args) less INVOCATION_ONLY: what args.json records."""
    return {key: value for key, value in vars(args).items() if key not in INVOCATION_ONLY}


def write_args(folder, args):
    """folder/args.json: recorded(args), indented."""
    (Path(folder) / "args.json").write_text(json.dumps(recorded(args), indent=2) + "\n")


def recover_for_resume(env, state_dir, *others):
    """--resume: rank 0 restores complete old copies of `state_dir` and `others` left by a killed save, then every
    rank checks that `state_dir` holds a training state (distributed.save_checkpoint's)."""
    if env.is_main:
        for folder in (state_dir, *others):
            C.recover_folder(folder)
    D.barrier(env)
    if not (Path(state_dir) / DC.TRAINING_STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume: {state_dir} holds no checkpoint; drop --resume to start a new run")


def last_good(folder, step):
    """The phrase guards.BadStepGuard names the last good checkpoint with (step None: nothing saved yet)."""
    return f"{folder} (step {step}), untouched" if step is not None else "none was written"


def run_folder(ckpt):
    """A train_ae.py run folder -> its latest checkpoint folder (OUT/checkpoint), else the folder itself."""
    folder = Path(ckpt)
    return folder / "checkpoint" if (folder / "checkpoint" / "demasker").is_dir() else folder


def load_run(ckpt, need_encoder, device="cpu", dtype=None):
    """(demasker, encoder | None, tokenizer) from a train_ae.py run (OUT or OUT/checkpoint: demasker/, encoder/,
    tokenizer.json). A folder that is itself a demasker checkpoint (config.json) also works for --method base."""
    from dataprep.data import load_tokenizer
    from demasker import Demasker
    from encoder import Encoder

    folder = run_folder(ckpt)
    demasker_dir = folder / "demasker" if (folder / "demasker").is_dir() else folder
    if not (demasker_dir / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no demasker/ (or config.json); pass --ckpt a train_ae.py output folder")
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        tokenizer_file = demasker_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {folder}; train_ae.py writes one next to demasker/")
    demasker = Demasker.from_pretrained(str(demasker_dir), dtype=dtype, device=device).eval()
    encoder = None
    if need_encoder:
        if not (folder / "encoder").is_dir():
            raise FileNotFoundError(f"{folder} has no encoder/; --method autoencode needs an encoder-demasker "
                                    f"checkpoint (train_ae.py without --no-registers)")
        encoder = Encoder.from_pretrained(str(folder / "encoder"), dtype=dtype, device=device).eval()
    tokenizer = load_tokenizer(str(tokenizer_file))
    check_tokenizer_ids(tokenizer, demasker.cfg, tokenizer_file, demasker_dir)
    return demasker, encoder, tokenizer


def check_tokenizer_ids(tokenizer, cfg, tokenizer_file, demasker_dir):
    """The run's tokenizer.json must be the one its demasker was trained with, as far as the demasker's config
    records it: the same BOS / EOS / [M] ids and a vocabulary the embedding holds. A tokenizer file replaced since
    (another run's, another cache's) is refused naming both files and the fix: it would decode other text."""
    pairs = (("[M]", "mask_id", cfg.mask_token_id), ("EOS", "eos_id", cfg.eos_token_id),
             ("BOS", "bos_id", cfg.bos_token_id), ("vocabulary", "vocab_size", cfg.vocab_size))
    problems = []
    for name, role, theirs in pairs:  # a role the tokenizer does not report (a stand-in) is not compared
        ours = getattr(tokenizer, role, None)
        if ours is not None and theirs is not None and (ours > theirs if role == "vocab_size" else ours != theirs):
            problems.append(f"{name} {ours} vs {theirs}")
    if problems:
        raise ValueError(f"{tokenizer_file} is not the tokenizer the demasker in {demasker_dir} was trained with "
                         f"(tokenizer vs config.json: {', '.join(problems)}); copy back the tokenizer.json of the data "
                         f"cache the run was trained on (its args.json 'data')")


def resolve_ae(path):
    """The folder holding encoder/ (and demasker/): a train_ae.py run's checkpoint/, or that folder itself."""
    path = Path(path)
    for folder in (path, path / "checkpoint"):
        if (folder / "encoder" / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"{path} holds no encoder/ (nor checkpoint/encoder/); pass --ae a train_ae.py run "
                            f"trained with registers (not --no-registers)")


def through_first_eos(ids, eos_id):
    """(B, L) ids BOS..EOS padded with EOS -> (B, L) bool, True up to and including the first EOS (the
    encoder's attention_mask: the program and its EOS are valid, the EOS padding is not)."""
    is_eos = ids == eos_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(ids[:, 0], ids.shape[1] - 1))
    return torch.arange(ids.shape[1], device=ids.device)[None, :] <= first[:, None]


def heldout_programs(data_dir, num, demasker_cfg, encoder_cfg):
    """The first `num` programs of dataprep/data.py's validation split: (ids (n, L) demasker token ids, BOS..EOS
    padded with EOS; enc_ids (n, L_enc), the encoder's own ids when it has its own tokenizer, else ids; enc_mask
    (n, L_enc) bool, valid through the first EOS)."""
    from dataprep.data import load_split

    split = load_split(data_dir, "val")
    ids = torch.as_tensor(np.array(split["ids"][:num]), dtype=torch.long)  # (n, L)
    if ids.shape[0] < num:
        raise ValueError(f"the validation split of {data_dir} has only {ids.shape[0]} programs; lower --num")
    has_own = "encoder_ids" in split and split["encoder_ids"] is not None
    enc_ids = torch.as_tensor(np.array(split["encoder_ids"][:num]), dtype=torch.long) if has_own else ids
    enc_eos = encoder_cfg.eos_token_id if has_own else demasker_cfg.eos_token_id
    return ids, enc_ids, through_first_eos(enc_ids, enc_eos)
