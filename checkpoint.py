"""Reading public weights and writing our own checkpoints (paper Sec. 5: the encoder
starts from Qwen3-Embedding-0.6B and the demasker from LLaDA-8B-Base).

One path serves both models:
  1. `resolve_model_dir(name_or_path)`: a local folder is used as is; anything else is a
     Hugging Face hub id fetched with `huggingface_hub.snapshot_download`, restricted to
     config.json, *.safetensors, the shard index and tokenizer files.
  2. `read_safetensors(folder)`: one `model.safetensors` or the shards listed in
     `model.safetensors.index.json`.
  3. `rename_keys(state, table)`: every checkpoint key goes through an explicit, readable
     table of (public name, our name) templates kept next to each model; keys no row
     matches are reported as unexpected, never dropped silently.
  4. `assign_weights(model, state, new_ok)`: the model is built on the meta device and the
     loaded tensors are assigned in place, so an 8B model never sits in memory twice.
     Missing, unexpected or mis-shaped tensors raise one error listing all of them;
     parameters the public checkpoint lacks by design (registers, START/END, the register
     projection) are listed in `new_ok`, initialised by the model and reported.

Our own checkpoints are the same layout: `config.json` + `model.safetensors`, written
atomically (temporary folder, then rename) by `save_model_dir`.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HUB_FILE_PATTERNS = [
    "config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "generation_config.json",
]
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint does not match the model it is loaded into."""


def resolve_model_dir(name_or_path):
    """Local folder -> Path; otherwise download the hub repo's weights, config and tokenizer."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{name_or_path} is a file; pass the folder that holds config.json")
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise CheckpointError(
            f"{name_or_path!r} is neither an existing folder nor a hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id=str(name_or_path), allow_patterns=HUB_FILE_PATTERNS))
    except Exception as error:  # network, auth, missing repo: say what to do
        raise CheckpointError(
            f"could not download {name_or_path!r} from the Hugging Face hub ({type(error).__name__}: "
            f"{error}). Without network access, download it elsewhere and pass the local folder.") from error


def read_config(folder):
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json; is this a model folder?")
    return json.loads(config_path.read_text())


def weight_files(folder):
    """The safetensors files of a folder: the shards of the index, or the single file."""
    folder = Path(folder)
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{INDEX_FILE} in {folder} names shards that are absent: {missing}")
        return [folder / name for name in files]
    single = folder / WEIGHTS_FILE
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise CheckpointError(f"{folder} holds neither {WEIGHTS_FILE} nor {INDEX_FILE} "
                          f"(found {len(found)} .safetensors files)")


def read_safetensors(folder, dtype=None, device="cpu"):
    """All tensors of a folder as {key: tensor}; cast to `dtype` if given (else keep the file's)."""
    state = {}
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt", device=str(device)) as reader:
            for key in reader.keys():
                tensor = reader.get_tensor(key)
                state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return state


def _template_regex(template):
    """'layers.{}.mlp.up_proj.weight' -> a regex whose groups capture each '{}' (a layer index)."""
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)"))


def rename_keys(state, table, ignore=()):
    """Rename keys from one naming to another through a table of (from, to) templates.

    Each template may hold '{}' placeholders for layer indices, e.g.
    ("layers.{}.mlp.up_proj.weight", "blocks.{}.mlp.up_proj.weight"). Keys that match a
    regex in `ignore` are skipped; keys that no row matches are returned as unexpected.
    Returns (renamed_state, unexpected_keys). Swap the columns to rename the other way.
    """
    compiled = [(_template_regex(source), target) for source, target in table]
    ignored = [re.compile(pattern) for pattern in ignore]
    renamed, unexpected = {}, []
    for key, tensor in state.items():
        if any(pattern.fullmatch(key) for pattern in ignored):
            continue
        for pattern, target in compiled:
            match = pattern.fullmatch(key)
            if match:
                renamed[target.format(*match.groups())] = tensor
                break
        else:
            unexpected.append(key)
    return renamed, unexpected


def swap_columns(table):
    """The same table read the other way: (to, from) rows."""
    return [(target, source) for source, target in table]


def assign_weights(model, state, new_ok=(), unexpected=(), source="checkpoint"):
    """Assign `state` into `model` (usually built on the meta device) by name.

    Raises CheckpointError listing every missing, unexpected and mis-shaped tensor.
    Parameters whose names start with a prefix in `new_ok` may be absent: they are
    returned (so the caller can initialise and report them).
    """
    expected = dict(model.state_dict())
    missing = [k for k in expected if k not in state and not k.startswith(tuple(new_ok))]
    unexpected = list(unexpected) + [k for k in state if k not in expected]
    mis_shaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or mis_shaped:
        lines = [f"{source} does not match {type(model).__name__}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20])
                             + (" ..." if len(items) > 20 else ""))
        lines.append("Check that config.json matches the weights and that the folder is the right model.")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=False, assign=True)
    return [k for k in expected if k not in state]


def materialize_(model, device, dtype):
    """Give every parameter still on the meta device real (uninitialised) storage."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                fresh = torch.empty(param.shape, device=device, dtype=dtype)
                setattr(module, name, torch.nn.Parameter(fresh, requires_grad=param.requires_grad))


def save_model_dir(folder, state, config):
    """Write config.json + model.safetensors atomically: a temp folder renamed into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def config_from_dict(cls, fields):
    """A model config dataclass from a config.json dict (our own checkpoints): the "crocodil_model" tag is
    dropped, any other field the dataclass lacks raises an error naming it."""
    import dataclasses
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known - {"crocodil_model"})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}. Is this "
                         f"config.json from another kind of model?")
    return cls(**{key: value for key, value in fields.items() if key in known})
