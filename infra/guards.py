"""Guards shared by the trainers (train_ae.py, train_prior.py, experiments/train_scorer.py): no silent wrong results.

Three concepts, each refusing to go on rather than guessing:
  - number checks at the command line: every count, rate and range is checked before any work, with
    argparse's own message (`parser.error`: usage, the flag, the valid range, exit status 2);
  - the non-finite step guard: a step whose loss or gradient norm is NaN/inf is skipped before it can
    reach the weights, the EMA, the AdamW moments or a checkpoint; after --max-bad-steps consecutive
    skipped steps the run stops with NonFiniteError naming the step and the last good checkpoint;
  - resume consistency: on --resume, a flag that would change the model, the data or the objective
    (the trajectory) is refused with the list of differences; only the flags named mutable may change;
    the run's record (args.json) is read back checked: a file that is not JSON, not an object, or holds a
    value its flag could never take (a hand edit) is refused naming the file, the entry and the fix;
  - extras never fail a save: the hub model cards written after each checkpoint (write_cards_or_warn).
Under DDP/FSDP every rank must take the same decision: the finite flag rides in the all-reduce the
trainers already make for their logged loss (no extra collective).
"""

import argparse
import math
import numbers

from infra.atomic import read_json

DEFAULT_MAX_BAD_STEPS = 20  # consecutive skipped steps before a run gives up (a divergence, not a blip)


# ------------------------------------------------------------------------------------------------
# Command-line numbers
# ------------------------------------------------------------------------------------------------

def check_range(parser, args, name, low=None, high=None, low_open=False, high_open=False, integer=False):
    """parser.error unless args.<name> (None = unset, not checked) lies in the range; name uses '_'.

    low/high None = unbounded on that side; *_open excludes the bound. The message reads e.g.
    "--max-steps must be an integer >= 1, got 0".
    """
    value = getattr(args, name)
    if value is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for item in values:
        ok = isinstance(item, (int, float)) and not (isinstance(item, float) and math.isnan(item))
        if integer and (isinstance(item, bool) or not isinstance(item, numbers.Integral)):
            ok = False  # argparse's type=int gives integers; a value read back from a record may be 4.5 or "4"
        if ok and low is not None:
            ok = item > low if low_open else item >= low
        if ok and high is not None:
            ok = item < high if high_open else item <= high
        if not ok:
            parser.error(f"--{name.replace('_', '-')} must be {describe_range(low, high, low_open, high_open, integer)}"
                         f", got {item}")


def describe_range(low=None, high=None, low_open=False, high_open=False, integer=False):
    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high}"
    return kind


# ------------------------------------------------------------------------------------------------
# Non-finite steps
# ------------------------------------------------------------------------------------------------

class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient norm (a diverged run)."""


def is_finite(*values):
    return all(math.isfinite(float(value)) for value in values)


class BadStepGuard:
    """Counts skipped steps; `check(step, loss, grad_norm)` -> True if the step may update the model.

    step is 1-based (the optimizer step that would be taken). `last_good` is a callable returning a
    description of the last good checkpoint (e.g. "runs/ae/checkpoint (step 400)") for the error.
    `loss` and `grad_norm` must already be the same on every rank (all-reduced / global norms).
    """

    def __init__(self, max_bad_steps, last_good=lambda: "none written yet", log=None, hint=""):
        self.max_bad_steps, self.last_good, self.log, self.hint = max_bad_steps, last_good, log, hint
        self.streak = 0  # consecutive skipped steps
        self.total = 0   # skipped steps of this process

    def check(self, step, loss, grad_norm):
        if is_finite(loss, grad_norm):
            self.streak = 0
            return True
        self.streak += 1
        self.total += 1
        if self.log is not None:
            self.log({"type": "skipped", "step": step, "loss": _number(loss), "grad_norm": _number(grad_norm),
                      "consecutive": self.streak, "skipped_total": self.total})
        if self.streak >= self.max_bad_steps:
            raise NonFiniteError(
                f"step {step}: loss {loss}, gradient norm {grad_norm}: {self.streak} consecutive non-finite steps "
                f"(--max-bad-steps {self.max_bad_steps}), the run has diverged. None of these steps reached the "
                f"weights, the EMA, the optimizer state or a checkpoint. Last good checkpoint: {self.last_good()}. "
                f"{self.hint or 'Lower --lr (or raise --warmup-steps) and start a new run, or --resume from it.'}")
        return False


def _number(value):
    """JSON-safe: NaN/inf as strings (json.dumps would write invalid JSON tokens)."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


# ------------------------------------------------------------------------------------------------
# Resume consistency
# ------------------------------------------------------------------------------------------------

def resume_differences(saved, current, mutable):
    """[(flag, saved value, new value)] for every recorded flag not in `mutable` whose value changed.

    saved: the args.json of the run; current: vars(args). Keys one of them lacks (flags added or
    removed since the run started) are not compared.
    """
    return [(key, saved[key], current[key]) for key in sorted(saved)
            if key in current and key not in mutable and _normal(saved[key]) != _normal(current[key])]


def _normal(value):
    """A value as its JSON record reads back: tuples (at any depth) as lists."""
    return [_normal(v) for v in value] if isinstance(value, (tuple, list)) else value


SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)
RECORD_FIX = ("restore it (every checkpoint holds a copy: OUT/checkpoint/args.json, OUT/args.json), or start a new "
              "run with another --out-dir")


def read_run_record(parser, path):
    """--resume: the flags a run recorded (its args.json) as a dict, each value checked against the flag it belongs
    to (parser.error naming the file, the entry and the fix: never a raw traceback, and nothing is touched)."""
    try:
        saved = read_json(path, RECORD_FIX)
    except ValueError as error:
        parser.error(str(error))
    if not isinstance(saved, dict):
        parser.error(f"{path} holds a JSON {type(saved).__name__}, not the object of flags a run records; {RECORD_FIX}")
    actions = {}  # dest -> the flag that takes its value (--parallel, not its shorthand --fsdp = store_const)
    for action in parser._actions:
        if action.option_strings and (action.nargs != 0 or isinstance(action, SWITCHES)):
            actions.setdefault(action.dest, action)
    for key, value in saved.items():
        problem = record_problem(actions[key], value) if key in actions else None
        if problem:
            parser.error(f"{path}: \"{key}\" is {value!r}, but {actions[key].option_strings[0]} {problem}; the file "
                         f"was edited: {RECORD_FIX}")
    return saved


def record_problem(action, value):
    """Why `value`, read back from a record, cannot be what argparse gave the flag of `action` (None when it can)."""
    if value is None:
        return None  # an unset flag; one the run must have set is caught by the checks that follow
    if isinstance(action, SWITCHES):
        return None if isinstance(value, bool) else "is a switch (true or false)"
    many = action.nargs not in (None, "?")
    if many and not isinstance(value, list):
        return "takes a list"
    for item in value if many else [value]:
        if isinstance(item, str) and action.type not in (None, str):
            try:  # argparse converts a string default with the flag's type, as if typed on the command line
                item = action.type(item)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                return f"does not take {item!r}"
        elif action.type is int and (isinstance(item, bool) or not isinstance(item, int)):
            return "takes an integer"
        elif action.type is float and (isinstance(item, bool) or not isinstance(item, (int, float))):
            return "takes a number"
        elif action.type in (None, str) and not isinstance(item, str):
            return "takes a text"
        if action.choices is not None and item not in action.choices:
            return f"takes one of {', '.join(map(str, action.choices))}"
    return None


def refuse_changed_flags(differences, where, mutable):
    """ValueError listing old vs new values and the fix, if there are differences."""
    if not differences:
        return
    lines = [f"--resume: these flags differ from the run in {where}, and changing them mid-run would change the "
             f"model, the data or the objective (the run would no longer be the one its checkpoint records):"]
    lines += [f"  --{key.replace('_', '-')}: run {old!r}, now {new!r}" for key, old, new in differences]
    lines.append(f"Drop these flags (the run's values are used) or start a new run with another --out-dir. Flags "
                 f"that may change on --resume: {', '.join('--' + m.replace('_', '-') for m in sorted(mutable))}.")
    raise ValueError("\n".join(lines))


def refuse_changed_resume_flags(parser, saved, args, mutable, where, listed):
    """A CLI's --resume check: parser.error with refuse_changed_flags' message when a flag outside `mutable`
    differs from the saved run's args (resume_differences); `listed`: the mutable flags the message names."""
    try:
        refuse_changed_flags(resume_differences(saved, vars(args), mutable), where, listed)
    except ValueError as error:
        parser.error(str(error))


# ------------------------------------------------------------------------------------------------
# Extras that must never fail a save
# ------------------------------------------------------------------------------------------------

def write_cards_or_warn(folder):
    """hub.write_cards(folder) (README.md model cards in every model folder under it); any problem, including
    hub's SystemExit on unreadable records, becomes a warning: a card is never worth a failed save."""
    import warnings

    try:
        from infra import hub

        return hub.write_cards(folder)
    except (Exception, SystemExit) as error:  # noqa: BLE001
        warnings.warn(f"model cards not written into {folder}: {type(error).__name__}: {error}", stacklevel=2)
        return []
