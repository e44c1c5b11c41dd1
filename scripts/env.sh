# Sourced by demo.sh, test.sh and scripts/reproduce.sh: make sure the Python that runs crocodil has its
# packages, creating or reusing a local virtual environment only when they are missing.
#
#   CROCODIL_PYTHON   the interpreter to check first (default: python3)
#   CROCODIL_VENV     the virtual environment to create or reuse (default: .venv in the repo)
#   CROCODIL_FRESH=1  always use CROCODIL_VENV, even when CROCODIL_PYTHON already has everything
#                     (CI sets it, so that a green run proves the install step)
#   TORCH_SPEC        what pip installs for torch (default: torch==2.13.0). A GPU user installs
#                     their own CUDA build of torch first; it is kept, never replaced.
#   WITH_DEV=1        also install requirements-dev.txt (pytest, reference libraries; test.sh sets it)
#
# After sourcing, `python` is the interpreter to use.
_croc_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"  # the repository root
_croc_imports="import torch, numpy, tqdm, tokenizers, safetensors, huggingface_hub"
[[ "${WITH_DEV:-0}" == 1 ]] && _croc_imports="$_croc_imports, pytest"

_croc_has_packages() { "$1" -c "$_croc_imports" >/dev/null 2>&1; }

_croc_python="${CROCODIL_PYTHON:-python3}"
if [[ "${CROCODIL_FRESH:-0}" != 1 ]] && _croc_has_packages "$_croc_python"; then
  # Everything is importable already (your own environment, or a CUDA torch you installed).
  python() { command "$_croc_python" "$@"; }
  export -f python 2>/dev/null || true
else
  _croc_venv="${CROCODIL_VENV:-$_croc_root/.venv}"
  if [[ ! -x "$_croc_venv/bin/python" ]]; then
    echo "env.sh: creating the virtual environment $_croc_venv" >&2
    "$_croc_python" -m venv "$_croc_venv" || {
      echo "env.sh: could not create $_croc_venv (is the python3 venv module installed?)" >&2
      return 1 2>/dev/null || exit 1; }
  fi
  # shellcheck disable=SC1091
  source "$_croc_venv/bin/activate"
  if ! _croc_has_packages python; then
    echo "env.sh: installing the requirements into $_croc_venv (one time; a few minutes)" >&2
    python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    # torch first and pinned, so that no other requirement pulls a multi-GB build of a newer torch.
    python -c "import torch" >/dev/null 2>&1 || python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
    _croc_reqs=(-r "$_croc_root/requirements.txt")
    [[ "${WITH_DEV:-0}" == 1 ]] && _croc_reqs+=(-r "$_croc_root/requirements-dev.txt")
    python -m pip install --quiet "${_croc_reqs[@]}" || {
      echo "env.sh: pip install failed; see the messages above" >&2; return 1 2>/dev/null || exit 1; }
    _croc_has_packages python || {
      echo "env.sh: packages still missing after install: $_croc_imports" >&2; return 1 2>/dev/null || exit 1; }
  fi
fi
python -c "import torch; print('env.sh: python', __import__('sys').executable, '| torch', torch.__version__)" >&2
