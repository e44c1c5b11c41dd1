"""Reading public weights and writing our own checkpoints (paper Sec. 5: the encoder
starts from Qwen3-Embedding-0.6B and the demasker from LLaDA-8B-Base).

One path serves both models:
  1. `resolve_model_dir(name_or_path)`: a local folder is used as is; anything else is a
     Hugging Face hub id fetched with `huggingface_hub.snapshot_download`, restricted to
     config.json, *.safetensors, the shard index and tokenizer files.
  2. `read_safetensors(folder)`: one `model.safetensors` or the shards listed in
     `model.safetensors.index.json`.
  3. `rename_keys(state, table)`: every checkpoint key goes through an explicit, readable
     table of (public name, our name) templates (infra/public_weights.py); keys no row
     matches are reported as unexpected, never dropped silently.
  4. `assign_weights(model, state, new_ok)`: the model is built on the meta device and the
     loaded tensors are assigned in place, so an 8B model never sits in memory twice.
     Missing, unexpected or mis-shaped tensors raise one error listing all of them;
     parameters the public checkpoint lacks by design (registers, START/END, the register
     projection) are listed in `new_ok`, initialised by the model and reported.

Our own checkpoints are the same layout: `config.json` (with "crocodil_model": the kind of model) +
`model.safetensors`, written atomically (temporary folder, then rename) by `save_model_dir` and read back
by `load_native` (the latent DiT) or infra/public_weights.py (encoder and demasker, which also read the
public checkpoints).

Crash safety (`swap_folder`, `recover_folder`). A folder is replaced in four steps, each a named
fault point (`FAULT_HOOKS`, or the environment variable CROCODIL_FAULT_AT=<point>, which kills the
process there with exit status 137, as `kill -9` would):
    stray olds of earlier crashes are removed      (the live folder still exists)
    "staged"     the new copy is complete in a hidden staging folder
    "old_moved"  live folder -> .NAME.old-*        (the only instant with no live folder)
    "new_moved"  staging folder -> live folder
    "cleaned"    .NAME.old-* and stray staging folders removed
A live folder missing while exactly one .NAME.old-* exists can only mean a death between the two
renames; `recover_folder` (called by every resume) renames that complete old copy back. So at
every instant either the live folder or its old copy is complete, and resume finds it by itself.
Unreadable weights or configs raise CheckpointError naming the file and what to do.
"""

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from infra.atomic import DIR_MODE, FILE_MODE

HUB_FILE_PATTERNS = [
    "config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "generation_config.json",
]
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint does not match the model it is loaded into, or cannot be read."""


FAULT_HOOKS = []  # callables hook(point, folder), run at each named point of swap_folder (tests)
FAULT_ENV = "CROCODIL_FAULT_AT"  # =<point>: die there with exit status 137 (a kill -9 stand-in)
FAULT_POINTS = ("staged", "old_moved", "new_moved", "cleaned")
STRAY_TAGS = ("old", "tmp", "stage")  # hidden siblings .NAME.<tag>-* that our writers create


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


def read_json(path, what="file"):
    """A JSON file as a dict, or a CheckpointError naming the file and the fix."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({type(error).__name__}: {error}); this {what} is "
                              f"damaged: restore it from a good copy, re-download the model or retrain") from None


def read_config(folder):
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json; is this a model folder?")
    config = read_json(config_path, "model config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} holds a {type(config).__name__}, not a JSON object of model "
                              f"settings; restore it from a good copy, re-download the model or retrain")
    return config


def weight_files(folder):
    """The safetensors files of a folder: the shards of the index, or the single file."""
    folder = Path(folder)
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path, "shard index")
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{index_path} has no 'weight_map'; restore the file or re-download the model")
        weight_map = index["weight_map"]
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
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as reader:
                for key in reader.keys():
                    tensor = reader.get_tensor(key)
                    state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        except Exception as error:  # safetensors raises its own SafetensorError / OSError on bad bytes
            raise CheckpointError(f"{file} is unreadable ({type(error).__name__}: {error}): truncated or not a "
                                  f"safetensors file. Restore it from a good copy, re-download the model, or "
                                  f"retrain; an interrupted save never leaves such a file") from None
    bad = non_finite(state)  # saving refuses NaN / inf; a file edited or damaged since is refused on loading too
    if bad:
        raise CheckpointError(f"{folder} holds NaN or inf in {len(bad)} tensor(s) ({', '.join(bad[:5])}"
                              f"{', ...' if len(bad) > 5 else ''}): it would decode to garbage. Restore the model "
                              f"from a good copy or retrain it")
    return state


def stored_shapes(folder):
    """{key: shape} of every tensor of a folder, read from the safetensors headers only (nothing is allocated)."""
    shapes = {}
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as reader:
                shapes.update({key: tuple(reader.get_slice(key).get_shape()) for key in reader.keys()})
        except Exception as error:  # safetensors raises its own SafetensorError / OSError on bad bytes
            raise CheckpointError(f"{file} is unreadable ({type(error).__name__}: {error}): truncated or not a "
                                  f"safetensors file. Restore it from a good copy or retrain") from None
    return shapes


def config_misfits(model, folder):
    """How `model` (built from folder's config.json, best on the meta device) differs from the weights stored in
    `folder`: ["missing (n): ...", "unexpected (n): ...", "wrong shape (n): ..."], [] when they fit."""
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    stored = stored_shapes(folder)
    groups = (("missing", [k for k in expected if k not in stored]),
              ("unexpected", [k for k in stored if k not in expected]),
              ("wrong shape", [f"{k}: config {expected[k]} vs weights {stored[k]}" for k in stored
                               if k in expected and stored[k] != expected[k]]))
    return [f"{title} ({len(items)}): " + ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")
            for title, items in groups if items]


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


def load_native(model_cls, config_cls, kind, name_or_path, dtype=None, device="cpu", overrides=None, what=None):
    """A model from a folder written by its save_pretrained (config.json with "crocodil_model": kind).

    The stored dtype is kept unless `dtype` is given; overrides replace config fields. Every tensor must be
    there (no new parameters); the model is built on the meta device and the tensors assigned in place.
    """
    folder = resolve_model_dir(name_or_path)
    config = read_config(folder)
    stored_kind = config.get("crocodil_model")
    if stored_kind != kind:
        raise CheckpointError(f"{folder} is not a crocodil {what or kind} checkpoint (crocodil_model="
                              f"{stored_kind!r}); {model_cls.__name__}.from_pretrained only reads folders written "
                              f"by save_pretrained")
    cfg = config_cls.from_dict({**config, **(overrides or {})})
    state = read_safetensors(folder, dtype=dtype, device=device)
    with torch.device("meta"):
        model = model_cls(cfg)
    assign_weights(model, state, source=str(folder))  # raises unless every tensor is there: nothing left on meta
    return model


def save_model_dir(folder, state, config):
    """Write config.json + model.safetensors atomically: a temp folder swapped into place (swap_folder)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        os.chmod(tmp, DIR_MODE)  # mkdtemp's 0700 -> the user's umask: this folder is swapped in as it is
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        os.chmod(tmp / WEIGHTS_FILE, FILE_MODE)  # safetensors writes 0600
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        swap_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ---------------------------------------------------------------------------
# Crash-safe folder swap (see the module docstring)
# ---------------------------------------------------------------------------

def fault_point(point, folder):
    """Named instant of a save: run the test hooks; CROCODIL_FAULT_AT=<point> dies here (status 137)."""
    for hook in FAULT_HOOKS:
        hook(point, Path(folder))
    if os.environ.get(FAULT_ENV) == point:
        os._exit(137)


def strays(folder, tags=STRAY_TAGS):
    """Hidden siblings .NAME.<tag>-* of `folder` (old copies, staging folders) left by interrupted saves."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return []
    return sorted(path for tag in tags for path in folder.parent.glob(f".{folder.name}.{tag}-*"))


def swap_folder(staged, folder):
    """Replace `folder` by the complete folder `staged` so that a complete copy exists at every instant."""
    staged, folder = Path(staged), Path(folder)
    for stray in strays(folder, ("old",)):  # while the live folder exists; afterwards only ours can exist
        if folder.exists():
            shutil.rmtree(stray, ignore_errors=True)
    fault_point("staged", folder)
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.replace(folder, old)  # onto the empty folder mkdtemp made (a rename may replace an empty dir)
        fault_point("old_moved", folder)
    os.replace(staged, folder)
    fault_point("new_moved", folder)
    clean_strays(folder, keep=staged.parent)
    fault_point("cleaned", folder)
    return folder


def clean_strays(folder, keep=None):
    """After a good save: remove every .NAME.{old,tmp,stage}-* sibling (except `keep`, a caller's own)."""
    for stray in strays(folder):
        if keep is None or Path(stray).resolve() != Path(keep).resolve():
            shutil.rmtree(stray, ignore_errors=True) if stray.is_dir() else stray.unlink(missing_ok=True)


def recover_folder(folder):
    """If `folder` is missing because a save died between its two renames, rename the complete old copy back.

    Returns True when it recovered. Only .NAME.old-* copies are used: they were live folders (complete);
    staging folders may be partial and are left for clean_strays.
    """
    folder = Path(folder)
    if folder.exists():
        return False
    olds = [path for path in strays(folder, ("old",)) if path.is_dir() and any(path.iterdir())]
    if not olds:
        return False
    newest = max(olds, key=lambda path: path.stat().st_mtime)
    os.replace(newest, folder)
    print(f"recovered {folder} from {newest.name}, left by a save that was interrupted between its renames")
    return True


def find_folder(folder):
    """`folder`, or (read-only) the complete old copy recover_folder would restore when it is missing."""
    folder = Path(folder)
    if folder.exists():
        return folder
    olds = [path for path in strays(folder, ("old",)) if path.is_dir() and any(path.iterdir())]
    return max(olds, key=lambda path: path.stat().st_mtime) if olds else folder


def non_finite(state, prefix=""):
    """Names of floating tensors in a (nested) state dict that hold NaN or inf."""
    bad = []
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(name)
        elif isinstance(value, (dict, list, tuple)):
            bad.extend(non_finite(value, name + "."))
    return bad


def config_from_dict(cls, fields):
    """A model config dataclass from a config.json dict (our own checkpoints): the "crocodil_model" tag is
    dropped, any other field the dataclass lacks raises an error naming it."""
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known - {"crocodil_model"})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}. Is this "
                         f"config.json from another kind of model?")
    return cls(**{key: value for key, value in fields.items() if key in known})
