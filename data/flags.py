"""Command-line flags made from dataclasses: the one flag dialect of every entry point.

    @dataclass
    class ChatArgs(Flags):
        model: str = flag("", "HF folder or .gguf")
        max_new_tokens: int = flag(256, "answer budget", rule=at_least(1))
        tcot: bool = flag(False, "answer by translation chain-of-thought")

    args = parse(ChatArgs, argv, prog="chat.py")    # a ChatArgs, or one line per problem and exit 2

Spelling: the field `max_new_tokens` is the flag `--max-new-tokens`, and `--max_new_tokens` is
accepted too (hidden from --help). A bool is `--tcot` / `--no-tcot`. A list takes several values
and may be repeated (`--data a.txt b.txt --data c.txt` gives three). A field whose value is itself
a dataclass gives dotted flags: `stage3: StageConfig` -> `--stage3.lr`, `--stage3.seq-len`. A
negative number is a value, not a flag (`--lr -1e-3` parses, then the rule refuses it).

What a field means is written once, in its flag(...): the help text, the allowed values
(choices=...) and the check (rule=...: value -> None, or what is allowed). A bad value is reported
as `--flag value: what is allowed`. A `Flags` dataclass checks every field, and its own
cross-field `problems()`, whenever it is built (in Python as from the command line), and a
subclass changes inherited defaults with a `defaults = {...}` mapping instead of redeclaring
fields. Abbreviated flags are not accepted: `--stage` never silently means `--stage1.steps`.

Here, in data/, because data.prepare is the lowest layer with a command line (layers import
downward: eval/, train/ and scripts/ use it too).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
import types
import typing
from typing import Any, Callable

Rule = Callable[[Any], "str | None"]


# ---- fields -----------------------------------------------------------------------------------------
def flag(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
         choices: typing.Iterable | None = None, rule: Rule | None = None, hash: bool = True) -> Any:
    """A dataclass field that is a command-line flag.

    default: its value (a list, dict or dataclass value is copied for every instance); factory:
    a function that computes the default when an instance is made (e.g. a path found at run
    time); neither: the flag is required. choices: the allowed values (checked; shown in --help).
    rule(value) -> None or what is allowed. hash=False: the field changes how a run is observed,
    not the numbers it computes (train.config.config_hash leaves it out)."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "rule": rule,
                "hash": hash}
    if factory is None and _mutable(default):
        factory = lambda: copy.deepcopy(default)  # noqa: E731
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _mutable(value) -> bool:
    return isinstance(value, (list, dict, set)) or (dataclasses.is_dataclass(value) and not isinstance(value, type))


def flag_name(name: str) -> str:
    """Field name -> its flag: 'max_new_tokens' -> '--max-new-tokens', 'stage3.seq_len' -> '--stage3.seq-len'."""
    return "--" + name.replace("_", "-")


def problem_line(name: str, value, problem: str) -> str:
    """'--flag value: what is allowed', the form of every refused value."""
    return f"{flag_name(name)} {value!r}: {problem}"


def default_of(f: dataclasses.Field):
    """A field's default value (its factory called); MISSING when it has none (a required flag)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


# ---- rules: value -> None (fine) or what is allowed ---------------------------------------------------
def at_least(lo: int, note: str = "") -> Rule:
    return lambda v: None if v >= lo else f"must be >= {lo}{note}"


def positive(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be a finite number > 0"


def non_negative(note: str = "") -> Rule:
    return lambda v: None if math.isfinite(v) and v >= 0 else f"must be a finite number >= 0{note}"


def fraction(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def factor(v: float) -> str | None:
    return None if v == 0 or (math.isfinite(v) and v > 1) else "must be 0 (off) or a finite number > 1"


def zero_or_at_least(lo: int, note: str = "") -> Rule:
    return lambda v: None if v == 0 or v >= lo else f"must be 0{note} or >= {lo}"


def optional(rule: Rule) -> Rule:
    """rule, with None (not given: automatic) always allowed."""
    return lambda v: None if v is None else rule(v)


def _choices_text(options) -> str:
    return ", ".join(str(o) if o != "" else "''" for o in options)


def field_problems(obj, prefix: str = "") -> list[str]:
    """'--flag value: what is allowed' for every field of the dataclass `obj` that its choices or
    rule refuse; the fields of a nested dataclass value are checked under their dotted flags. A
    None value of a field whose default is None (automatic) is not checked."""
    out = []
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            out += field_problems(value, name + ".")
            continue
        if value is None and f.default is None:
            continue
        choices, rule = f.metadata.get("choices"), f.metadata.get("rule")
        problem = f"choose one of {_choices_text(choices)}" if choices is not None and value not in choices else None
        problem = problem or (rule(value) if rule else None)
        if problem:
            out.append(problem_line(name, value, problem))
    return out


class FlagError(ValueError):
    """Bad flag values, one line each ('--flag value: what is allowed')."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class Flags:
    """Base of a dataclass whose fields are flags: every field's choices/rule and the class's
    problems() are checked when an instance is built (FlagError lists them all).

    A subclass changes the defaults of inherited fields with a mapping, keeping their help and
    checks:   defaults = {"out_dir": "runs/inscp", "max_steps": 24}
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "defaults" in cls.__dict__:  # before @dataclass collects the fields
            _redeclare_with_defaults(cls, cls.__dict__["defaults"])

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise FlagError(problems)

    def problems(self) -> list[str]:
        """Every bad value, one line each; [] = valid. Subclasses add cross-field checks."""
        return field_problems(self)


def _redeclare_with_defaults(cls, defaults: dict) -> None:
    """Give cls an annotated field for each inherited name in `defaults`, with the new default
    and the inherited metadata (help, choices, rule, hash). dataclasses keeps a redeclared field
    at its inherited position, so the flags keep their order."""
    annotations = cls.__dict__.get("__annotations__")
    if annotations is None:
        annotations = {}
        cls.__annotations__ = annotations
    for name, value in defaults.items():
        owner = next((b for b in cls.__mro__[1:] if name in getattr(b, "__dataclass_fields__", {})), None)
        if owner is None:
            raise TypeError(f"{cls.__name__}.defaults: {name!r} is not a field of its base classes")
        if name in annotations:
            raise TypeError(f"{cls.__name__}.defaults: {name!r} is declared in the class itself; give its "
                            "default there")
        inherited = owner.__dataclass_fields__[name]
        annotations[name] = typing.get_type_hints(owner)[name]
        setattr(cls, name, flag(value, **{k: inherited.metadata.get(k) for k in ("help", "choices", "rule")},
                                hash=inherited.metadata.get("hash", True)))


# ---- the command line ---------------------------------------------------------------------------------
def fail(problems: list[str], prog: str | None = None, code: int = 2):
    """Print each problem as one 'error: ...' line ('prog: error: ...' with prog) and exit with
    `code` (2: argparse's code for usage errors). Under torchrun only rank 0 prints."""
    if os.environ.get("RANK", "0") == "0":
        for problem in problems:
            print(f"{prog + ': ' if prog else ''}error: {problem}", file=sys.stderr, flush=True)
    sys.exit(code)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block), printed by rank 0 only."""

    def __init__(self, *args, error_prog: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.error_prog = error_prog

    def error(self, message: str):
        fail([message], self.error_prog)


def _base_type(tp):
    """int | None -> int; other annotations unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "none"
    return "''" if value == "" else str(value)


def _help(f: dataclasses.Field, default) -> str:
    parts = []
    if f.metadata.get("choices") is not None:
        parts.append(" | ".join(_shown(c) for c in f.metadata["choices"]))
    if default is dataclasses.MISSING:
        parts.append("required")
    elif isinstance(default, bool):
        parts.append(f"default: {'on' if default else 'off'}")
    elif default not in (None, "", []):  # None / empty: the help says what "not given" means
        parts.append(f"default: {_shown(default)}")
    text = f.metadata.get("help", "")
    return (text + (f" ({'; '.join(parts)})" if parts else "")).replace("%", "%%")


def _add_fields(parser, cls, prefix: str = "", defaults=None) -> None:
    """One flag per field of cls; defaults: the instance whose values --help shows as the defaults
    (a nested field's default, e.g. stage3's own lr), else the fields' own."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, dest = _base_type(hints[f.name]), prefix + f.name
        default = getattr(defaults, f.name) if defaults is not None else default_of(f)
        if dataclasses.is_dataclass(tp):
            group = parser.add_argument_group(f"{flag_name(dest)}.*", f.metadata.get("help") or tp.__doc__)
            _add_fields(group, tp, dest + ".", default)
            continue
        kwargs: dict = {"dest": dest, "default": argparse.SUPPRESS}  # only given flags reach the namespace
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp) or (str,)
            kwargs.update(nargs="*", type=item, action="extend", metavar=f.name.upper())
        else:
            kwargs.update(type=tp, metavar=f.name.upper())
        spellings = [flag_name(dest)] + (["--" + dest] if "_" in dest else [])
        parser.add_argument(spellings[0], help=_help(f, default), **kwargs)
        for alias in spellings[1:]:  # the underscore spelling: same flag, not listed twice in --help
            parser.add_argument(alias, help=argparse.SUPPRESS, **kwargs)


def build_parser(cls, prog: str | None = None, description: str | None = None,
                 presets: dict[str, list[str]] | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the dataclass cls (see the module doc).
    presets: {name: flags} for `--preset NAME` (default: cls.presets, when the class has them)."""
    presets = presets if presets is not None else getattr(cls, "presets", None)
    parser = OneLineParser(prog=prog, description=description or cls.__doc__, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter, error_prog=prog)
    if presets:
        shown = "; ".join(f"{name} = {' '.join(flags)}" for name, flags in presets.items())
        parser.add_argument("--preset", choices=list(presets), default=argparse.SUPPRESS,
                            help=f"named flags, given before the command line's own (which win): {shown}"
                            .replace("%", "%%"))
    _add_fields(parser, cls)
    return parser


def join_negative_numbers(argv: list[str]) -> list[str]:
    """['--lr', '-1e-3'] -> ['--lr=-1e-3']: argparse takes '-1e-3' for an option (its negative
    number pattern has no exponent), so a negative value would be unparseable as written."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-") and _is_number(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _expand_presets(argv: list[str], presets: dict[str, list[str]] | None, prog: str | None) -> list[str]:
    """'--preset NAME' -> that preset's flags, put first, so the command line's own flags win
    (argparse keeps the last value of a flag; a list flag adds to the preset's items)."""
    if not presets:
        return argv
    out, chosen, args = [], [], iter(argv)
    for arg in args:
        if arg == "--preset" or arg.startswith("--preset="):
            name = arg.partition("=")[2] if "=" in arg else next(args, "")
            if name not in presets:
                fail([f"--preset {name!r}: choose one of {_choices_text(presets)}"], prog)
            chosen += presets[name]
        else:
            out.append(arg)
    return chosen + out


def read_flags(cls, argv: list[str] | None = None, prog: str | None = None, description: str | None = None,
               presets: dict[str, list[str]] | None = None) -> dict:
    """The flags given on the command line -> {field: value} (a nested dataclass field: {field:
    {its field: value}}), defaults left out. A usage error: one line, exit 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    presets = presets if presets is not None else getattr(cls, "presets", None)
    parser = build_parser(cls, prog, description, presets)
    given = vars(parser.parse_args(join_negative_numbers(_expand_presets(argv, presets, prog))))
    values: dict = {}
    for dest, value in given.items():
        *parents, name = dest.split(".")
        node = values
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    return values


def _merged(default, given: dict):
    """A nested dataclass default with the given part of its fields replaced."""
    return dataclasses.replace(default, **{k: _merged(getattr(default, k), v) if isinstance(v, dict) else v
                                           for k, v in given.items()})


def make(cls, values: dict, prog: str | None = None):
    """cls(**values), nested dataclass fields merged into their defaults. A missing required flag
    or a bad value (FlagError / ValueError): one line each, exit 2."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [flag_name(n) for n, f in fields.items() if n not in values and default_of(f) is dataclasses.MISSING]
    if missing:
        fail([f"{name} is required" for name in missing], prog)
    kwargs = {k: _merged(default_of(fields[k]), v) if isinstance(v, dict) else v for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:  # FlagError (and train's ConfigError) carry one line per problem
        fail(getattr(err, "problems", None) or [str(err)], prog)


def parse(cls, argv: list[str] | None = None, prog: str | None = None, description: str | None = None,
          presets: dict[str, list[str]] | None = None):
    """Command line -> an instance of the dataclass cls; every problem one line, exit 2, nothing
    else done. presets: {name: flags} for `--preset NAME`, shorthand for those flags (default:
    cls.presets, a class attribute, when it has one)."""
    return make(cls, read_flags(cls, argv, prog, description, presets), prog)
