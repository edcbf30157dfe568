"""
The one parser of lrc's nanoGPT-style command lines: train.py, bench.py and the experiments.

    python train.py config/lrc_1.7b.py --data=DIR --max_steps=1000 --resume

A script declares its keys once, as a dict of defaults (`Keys(DEFAULTS, ...)`); then, in order, each
config/NAME.py given (plain Python, executed; its top-level names override) and each --key=value (a
Python literal, or a bare word for a text key) are applied. Unknown keys (with close matches) and
values of the wrong type are refused with one line. run_main() turns such an LRCError into
"error: ..." on stderr and exit status 2, for every script alike.
"""
import argparse
import ast
import difflib
import os
import sys

from lrc import LRCError

_BAD = object()  # "no valid conversion", distinct from a legitimate None


def _type_name(t):
    return " or ".join(x.__name__ for x in t) if isinstance(t, tuple) else t.__name__


class Keys:
    """The keys of one script. defaults: {key: default}; optional: {key: type} for keys whose value may
    also be None (or several types); choices: {key: allowed values}; exclusive: {key: other key} that
    setting the first clears (max_steps / max_tokens); flags: bare --words that set a key to True."""

    def __init__(self, defaults, optional=None, choices=None, exclusive=None, flags=(), where_listed=""):
        self.defaults, self.optional = dict(defaults), dict(optional or {})
        self.choices, self.exclusive, self.flags = dict(choices or {}), dict(exclusive or {}), tuple(flags)
        self.where_listed = where_listed or "the script's defaults"

    def check(self, key, value, where="config"):
        """value converted to key's type (int -> float, integral float -> int, 0/1 -> bool), or a one-line
        LRCError naming the key, where it was set and an example."""
        if key not in self.defaults:
            close = difflib.get_close_matches(key, self.defaults, n=3)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            raise LRCError(f"unknown config key {key!r} in {where}{hint}: the keys are listed in {self.where_listed}")
        expected = self.optional.get(key, type(self.defaults[key]))
        types = expected if isinstance(expected, tuple) else (expected,)
        optional = key in self.optional
        converted = _BAD
        if value is None:
            converted = None if optional else _BAD
        elif isinstance(value, bool):                            # bool is an int to Python, not to us
            converted = value if bool in types else _BAD
        elif isinstance(value, types):
            converted = value
        elif float in types and isinstance(value, int):
            converted = float(value)
        elif int in types and isinstance(value, float) and value.is_integer():
            converted = int(value)                               # --max_steps=1e4
        elif bool in types and isinstance(value, int) and value in (0, 1):
            converted = bool(value)
        if converted is _BAD:
            raise LRCError(f"{key}={value!r} in {where} is not {_type_name(expected)}{' or None' if optional else ''}: "
                           f"e.g. --{key}={self.defaults[key]!r}")
        if key in self.choices and converted not in self.choices[key]:
            raise LRCError(f"{key}={converted!r} in {where} is not one of {', '.join(map(repr, self.choices[key]))}")
        return converted

    def set(self, cfg, key, value, where):
        value = self.check(key, value, where)
        if value is not None and key in self.exclusive:
            cfg[self.exclusive[key]] = None  # the later of two exclusive keys wins
        cfg[key] = value

    def parse_value(self, key, text, where="the command line"):
        """--key=text: a Python literal (1e-4, True, None, [1, 2], {'a': 1}) or, failing that, the bare
        word; text keys always keep the text (--out_dir=123 is a name, not a number)."""
        if key not in self.defaults:
            self.check(key, None, where)  # raises, with close matches
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if self.optional.get(key, type(self.defaults[key])) is str and value is not None:
            value = text
        return self.check(key, value, where)

    def load_file(self, path, cfg):
        """Execute a config file (plain Python) and apply its top-level names to cfg."""
        if not os.path.isfile(path):
            raise LRCError(f"config file {path!r} does not exist" + (" (it is a directory)" if os.path.isdir(path)
                                                                     else "") + ": see config/ for the presets")
        namespace = {"__file__": path}
        try:
            with open(path, encoding="utf-8") as f:
                exec(compile(f.read(), path, "exec"), namespace)
        except SyntaxError as e:
            raise LRCError(f"config file {path}, line {e.lineno}: {e.msg}") from None
        except Exception as e:
            raise LRCError(f"config file {path} failed ({type(e).__name__}: {e})") from None
        for key, value in namespace.items():
            if key.startswith("_") or callable(value) or type(value).__name__ == "module":
                continue
            self.set(cfg, key, value, path)

    def parse(self, argv, doc=""):
        """argv -> full config dict: the defaults, then config files and --key=value in order.
        -h / --help prints doc and every key with its default, then exits."""
        cfg = dict(self.defaults)
        for arg in argv:
            if arg in ("-h", "--help"):
                print(doc + "\nkeys and defaults:\n" + "\n".join(f"  --{k}={v!r}" for k, v in self.defaults.items()))
                sys.exit(0)
            if arg.startswith("--") and arg[2:] in self.flags:
                cfg[arg[2:]] = True
            elif arg.startswith("--"):
                key, eq, text = arg[2:].partition("=")
                if not eq:
                    flags = f"; {', '.join('--' + f for f in self.flags)} alone is a flag" if self.flags else ""
                    raise LRCError(f"{arg!r}: write options as --key=value (e.g. --{next(iter(self.defaults))}="
                                   f"{self.defaults[next(iter(self.defaults))]!r}){flags}")
                value = self.parse_value(key, text)
                self.set(cfg, key, value, "the command line")
            elif arg.endswith(".py"):
                self.load_file(arg, cfg)
            else:
                raise LRCError(f"unexpected argument {arg!r}: pass config/NAME.py files and --key=value options")
        return cfg

    def from_dict(self, overrides=None, where="the config dict"):
        """The defaults updated with a dict (the Python API), each key checked."""
        cfg = dict(self.defaults)
        for key, value in (overrides or {}).items():
            cfg[key] = self.check(key, value, where)
        for key, other in self.exclusive.items():
            if cfg[key] is not None and cfg[other] is not None:
                raise LRCError(f"both {key}={cfg[key]} and {other}={cfg[other]} are set: set one, the other to None")
        return cfg


def run_main(main, argv=None):
    """Run main(argv) as a script: an LRCError (bad input) is one line on stderr and exit status 2, never a
    traceback; the rank is named when torchrun started several processes. Returns main's exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(argv) or 0
    except LRCError as e:
        rank = int(os.environ.get("RANK", "0"))
        print(f"error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr, flush=True)
        return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts with named options (convert.py, eval_tiny.py): a usage error is an LRCError,
    so it reaches the user as the same one line as every other bad input."""

    def error(self, message):
        raise LRCError(f"{message} (see {self.prog} --help)")
