"""Runs ready for the Hugging Face Hub: a model card in every trained model folder, and an upload.

Every model this repo trains is saved as `config.json` + `model.safetensors` (checkpoint.save_model_dir),
which is already the layout the hub serves. What a hub folder still needs is its card, `README.md`: a YAML
header the hub reads (library, tags, license) and a text that says what the model is (its place in the
paper), its config, the data, the training budget, the last measured metrics and how to load it with this
repo. This file writes that card from what the run folder records (args.json, progress.json, log.jsonl,
prior.json, the data cache's meta.json), checks a folder before upload, and uploads a run with
`huggingface_hub` (one repo per model folder, or one repo with a subfolder each).

    python -m infra.hub cards runs/demo/ae                       # write README.md into each model folder of the run
    python -m infra.hub upload runs/demo/ae --repo me/crocodil-tiny-ae --dry-run   # what would be uploaded
    python -m infra.hub upload runs/demo/ae --repo me/crocodil-tiny-ae             # needs `huggingface-cli login`

Model folders are found by their config.json "crocodil_model" tag (encoder, demasker, latent_dit) or by
scorer.json (the Gen-PPL / MAUVE scorer). Hidden folders (staging copies) and training_state/ are skipped.
"""

import argparse
import json
import sys
from pathlib import Path

from infra import atomic

CARD_FILE = "README.md"
TOKENIZER_FILES = ("tokenizer.json", "encoder_tokenizer.json")  # what sample.py needs beside the models

# What each kind of model is, in the paper's terms.
ROLES = {
    "encoder": ("h_phi, the register encoder", "Qwen3 encoder that maps a program to K continuous registers "
                "(last-token summary + K-1 suffix registers, each of norm sqrt(d)); trained jointly with the "
                "guided demasker by robust autoencoding (Alg. 1, App. C)", "Sec. 4.1, App. C"),
    "demasker": ("f_theta, the guided demasker", "LLaDA-style masked diffusion transformer that reads the "
                 "prefix [START, z_1..z_k, END] before the canvas E(x_t) (two-axis RoPE); without registers "
                 "it is the base MDM", "Sec. 4.1, App. C"),
    "latent_dit": ("g_psi, the latent prior", "1-D DiT (PixArt-style adaLN-single, x0-prediction) over the "
                   "register bank; sampled by DDIM for ConThenDisc / ConWithinDisc", "Sec. 4.3, App. E"),
    "scorer": ("the scorer", "small causal Qwen3 LM trained on the corpus; stands in for GPT-2 in Gen-PPL "
               "and featurises MAUVE offline", "Sec. 5"),
}
LOADERS = {
    "encoder": "from encoder import Encoder\nmodel = Encoder.from_pretrained({where})",
    "demasker": "from demasker import Demasker\nmodel = Demasker.from_pretrained({where})",
    "latent_dit": "from latent_dit import LatentDiT\nmodel = LatentDiT.from_pretrained({where})",
    "scorer": "from experiments.train_scorer import Scorer\nscorer = Scorer.load({where})",
}


def loading_snippet(kind, repo, sub):
    """Python that loads the model from the hub: the repo id itself, or a subfolder of its snapshot."""
    if sub in ("", "."):
        return LOADERS[kind].format(where=json.dumps(repo))
    return ("from huggingface_hub import snapshot_download\n"
            + LOADERS[kind].format(where=f'snapshot_download("{repo}") + "/{sub}"'))


def read_json(path):
    """A JSON file, or None when it is absent; an unreadable one is named with the fix."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return atomic.read_json(path, "restore it from the run or delete it")
    except ValueError as error:  # a card is optional: the CLI stops with the message, trainers warn
        raise SystemExit(str(error)) from None


def model_kind(folder):
    """'encoder' | 'demasker' | 'latent_dit' | 'scorer', or None when folder is not one of our models."""
    folder = Path(folder)
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        return None
    if (folder / "scorer.json").is_file():
        return "scorer"
    return (read_json(folder / "config.json") or {}).get("crocodil_model")


def model_folders(run):
    """Every model folder inside run (run itself included), skipping hidden staging copies and raw train state."""
    run = Path(run)
    found = [run] if model_kind(run) else []
    for path in sorted(run.rglob("config.json")):
        folder = path.parent
        rel = folder.relative_to(run).parts
        if folder == run or any(p.startswith(".") or p in ("train_state", "training_state") for p in rel):
            continue
        if model_kind(folder):
            found.append(folder)
    return found


def run_records(folder):
    """What the run around a model folder recorded: args.json, progress.json, prior.json, log.jsonl."""
    records = {"args": None, "progress": None, "prior": None, "val": None, "train": None}
    for where in [Path(folder), *Path(folder).parents][:4]:
        for key, name in (("args", "args.json"), ("progress", "progress.json"), ("prior", "prior.json")):
            if records[key] is None:
                records[key] = read_json(where / name)
        log = where / "log.jsonl"
        if records["val"] is None and log.is_file():
            for line in log.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if row.get("type") == "val" or "val_mse" in row:
                    records["val"] = row
                elif "loss" in row:
                    records["train"] = row
    return records


def _data_meta(args):
    data = (args or {}).get("data")
    return read_json(Path(data) / "meta.json") if data else None


def _public(value):
    """A recorded value as a card may publish it: local absolute paths reduced to their last component (a
    card tells what the run was, not where it sat on the machine that trained it)."""
    if isinstance(value, dict):
        return {key: _public(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_public(v) for v in value]
    if isinstance(value, str) and (value.startswith("/") or value.startswith("~")) and len(value) > 1:
        return f"<local>/{Path(value).name}"
    return value


def _table(rows):
    lines = ["| field | value |", "|---|---|"]
    lines += [f"| `{key}` | `{json.dumps(_public(value))}` |" for key, value in rows]
    return "\n".join(lines)


def model_card(folder, repo="<owner>/<name>", sub=".", license="other"):
    """The README.md text for one model folder."""
    folder = Path(folder)
    kind = model_kind(folder)
    if kind is None:
        raise SystemExit(f"{folder} is not a crocodil model folder (config.json + model.safetensors)")
    title, what, paper = ROLES[kind]
    config = read_json(folder / "config.json")
    records = run_records(folder)
    args, meta = records["args"] or {}, _data_meta(records["args"])
    budget = [(key, args[key]) for key in ("preset", "max_steps", "batch_size", "micro_batch_size", "lr",
                                           "seq_len", "num_registers", "no_registers", "seed") if key in args]
    step = (records["progress"] or {}).get("step") or (records["train"] or {}).get("step")
    if step is not None:
        budget.append(("steps done", step))
    data_rows = [(key, meta[key]) for key in ("seq_len", "shared_tokenizer", "settings", "splits")
                 if meta and key in meta]
    if args.get("data"):
        data_rows.insert(0, ("data folder (dataprep/data.py cache)", args["data"]))
    metrics = records["val"]
    header = ["---", "library_name: crocodil", f"license: {license}", "tags:", "- crocodil",
              "- masked-diffusion", "- text-diffusion", f"- {kind.replace('_', '-')}", "---", ""]
    body = [
        f"# crocodil {kind}: {title}", "",
        f"{what} ({paper} of CRoCoDiL, arXiv 2603.20210). Trained with the crocodil reference implementation.",
        "", "## Config", "", _table(sorted((k, v) for k, v in config.items())), "",
        "## Data", "", _table(data_rows) if data_rows else "Not recorded in the run folder.", "",
        "## Training budget", "", _table(budget) if budget else "Not recorded in the run folder.", "",
        "## Measured", "",
        ("Last validation record of the run's log.jsonl:\n\n```json\n" + json.dumps(_public(metrics), indent=1)[:4000]
         + "\n```") if metrics else "No validation record in the run's log.jsonl.", "",
        "## Load it", "", "With the crocodil repository on the Python path:", "",
        "```python\n" + loading_snippet(kind, repo, sub) + "\n```", "",
    ]
    if records["prior"]:
        body += ["Sampling settings (prior.json):", "", "```json\n" + json.dumps(_public(records["prior"]), indent=1)
                 + "\n```", ""]
    return "\n".join(header + body)


def write_cards(run, repo="<owner>/<name>", license="other"):
    """Write README.md into every model folder of run; returns the folders. license: the hub's license
    tag (models fine-tuned from Qwen3-Embedding inherit Apache-2.0, from LLaDA-8B-Base MIT; toy models
    trained from scratch on the standard library: the PSF license of the corpus applies to the data)."""
    folders = model_folders(run)
    if not folders:
        raise SystemExit(f"no model folders under {run} (looked for config.json + model.safetensors)")
    for folder in folders:
        sub = folder.relative_to(run).as_posix()
        (folder / CARD_FILE).write_text(model_card(folder, repo, sub, license))
    return folders


def check_hub_folder(folder):
    """Raise SystemExit naming what is wrong with folder as a hub model folder; return its files."""
    folder = Path(folder)
    problems = []
    if model_kind(folder) is None:
        problems.append("config.json with a crocodil_model tag (or scorer.json) and model.safetensors")
    card = folder / CARD_FILE
    if not card.is_file() or not card.read_text().startswith("---\n"):
        problems.append(f"{CARD_FILE} with a YAML header (run `python -m infra.hub cards RUN`)")
    try:
        from safetensors import safe_open
        with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
            list(weights.keys())
    except Exception as error:  # truncated, random bytes, missing
        problems.append(f"a readable model.safetensors ({type(error).__name__}: {error})")
    if problems:
        raise SystemExit(f"{folder} is not ready for the hub; it needs: " + "; ".join(problems))
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def tokenizer_files(run):
    """[(file, path in the repo)]: the tokenizers a downloaded run needs to be sampled (sample.py reads
    tokenizer.json, and encoder_tokenizer.json with two tokenizers, from the run or its checkpoint/)."""
    run = Path(run)
    found = []
    for folder in (run, run / "checkpoint"):
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                found.append((folder / name, (folder / name).relative_to(run).as_posix()))
    return found


def upload(run, repo, private=False, dry_run=False, api=None, license="other"):
    """Upload each model folder of run to repo (subfolders keep their path) and the run's tokenizers, so
    that the downloaded repository has the run's layout. Returns the upload plan: (source, path in the repo,
    files) per model folder, then one entry per tokenizer file."""
    folders = write_cards(run, repo, license)
    plan = [(folder, folder.relative_to(run).as_posix(), check_hub_folder(folder)) for folder in folders]
    tokenizers = tokenizer_files(run)
    plan += [(path, rel, [path.name]) for path, rel in tokenizers]
    if dry_run:
        return plan
    if api is None:
        from huggingface_hub import HfApi
        api = HfApi()
    api.create_repo(repo_id=repo, private=private, exist_ok=True)
    for folder, sub, _ in plan[:len(folders)]:
        api.upload_folder(repo_id=repo, folder_path=str(folder), path_in_repo=None if sub == "." else sub,
                          commit_message=f"crocodil: upload {sub}")
    for path, rel in tokenizers:
        api.upload_file(repo_id=repo, path_or_fileobj=str(path), path_in_repo=rel,
                        commit_message=f"crocodil: upload {rel}")
    return plan


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cards = sub.add_parser("cards", help="write README.md (model card) into every model folder of a run")
    cards.add_argument("run", help="run folder (train_ae.py / train_prior.py / experiments/train_scorer.py --out-dir) or one model")
    cards.add_argument("--repo", default="<owner>/<name>", help="hub id shown in the cards' loading snippet")
    cards.add_argument("--license", default="other", help="license tag of the cards (default: other)")
    up = sub.add_parser("upload", help="write the cards, check every folder, upload with huggingface_hub")
    up.add_argument("run", help="run folder or one model folder")
    up.add_argument("--repo", required=True, help="hub repo id, owner/name (created if absent)")
    up.add_argument("--private", action="store_true", help="create the repo as private")
    up.add_argument("--dry-run", action="store_true", help="write cards and list what would be uploaded; no network")
    up.add_argument("--license", default="other", help="license tag of the cards (default: other)")
    args = parser.parse_args(argv)
    if not Path(args.run).is_dir():
        parser.error(f"run folder {args.run} does not exist")
    if args.command == "cards":
        for folder in write_cards(Path(args.run), args.repo, args.license):
            print(f"wrote {folder / CARD_FILE}")
        return
    if args.repo.count("/") != 1:
        parser.error(f"--repo {args.repo!r} must be owner/name")
    for folder, sub_path, files in upload(Path(args.run), args.repo, args.private, args.dry_run,
                                             license=args.license):
        target = args.repo if sub_path == "." else f"{args.repo}/{sub_path}"
        print(f"{'would upload' if args.dry_run else 'uploaded'} {folder} -> {target}: {', '.join(files)}")


if __name__ == "__main__":
    sys.exit(main())
