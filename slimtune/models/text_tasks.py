"""A small real-text classification task, built offline from text every Python installation ships.

The text: the first sentence of the docstring of each public function, class and method in four families of
Python's standard library — written by people, in English, about different subjects. The label: the family.
Nothing is downloaded, and the same Python version gives the same examples, so tests and benchmarks can train a
real pretrained encoder (all-MiniLM-L6-v2) on it and check a held-out accuracy well above chance (1 in 4).

    examples = docstring_task()                    # [{"text": ..., "label": 0..3}, ...], shuffled, deduplicated
    train, test = split(examples, test_fraction=0.25, seed=0)
"""
from __future__ import annotations

import importlib
import inspect
import json
import random
import re
from pathlib import Path
from typing import Iterable

from ..errors import ConfigError

#: label -> (family name, standard-library modules whose docstrings make its examples)
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("text", ("string", "re", "textwrap", "difflib", "unicodedata", "html", "codecs", "csv", "json")),
    ("numbers", ("math", "cmath", "decimal", "fractions", "statistics", "random", "numbers", "operator")),
    ("files", ("os", "shutil", "pathlib", "glob", "tempfile", "zipfile", "tarfile", "io", "filecmp")),
    ("network", ("socket", "ssl", "http.client", "http.server", "urllib.request", "urllib.parse", "smtplib",
                 "ftplib", "email.message", "ipaddress")),
)
#: the same four labels over about twice the modules (~950 balanced examples instead of ~500): a held-out split
#: large enough that one example is ~0.2 accuracy points (``docstring_task(families=WIDE_FAMILIES)``)
WIDE_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("text", FAMILIES[0][1] + ("html.parser", "locale", "gettext", "xml.dom.minidom", "xml.etree.ElementTree",
                               "email.header", "stringprep", "configparser", "shlex", "pprint", "reprlib")),
    ("numbers", FAMILIES[1][1] + ("array", "struct", "colorsys", "secrets", "bisect", "heapq")),
    ("files", FAMILIES[2][1] + ("os.path", "stat", "fileinput", "fnmatch", "gzip", "bz2", "lzma", "mmap",
                                "linecache")),
    ("network", FAMILIES[3][1] + ("socketserver", "http.cookiejar", "http.cookies", "imaplib", "poplib",
                                  "xmlrpc.client", "xmlrpc.server", "urllib.robotparser", "selectors", "email.utils")),
)
LABELS: tuple[str, ...] = tuple(name for name, _ in FAMILIES)
_SENTENCE = re.compile(r"(.+?[.!?])(\s|$)", re.S)


def first_sentence(doc: str, max_chars: int = 240) -> str | None:
    """The first sentence of a docstring, whitespace folded; None when it is too short to say anything."""
    text = " ".join(doc.split())
    match = _SENTENCE.match(text)
    sentence = (match.group(1) if match else text)[:max_chars].strip()
    return sentence if len(sentence.split()) >= 4 else None


def _objects(module_name: str) -> Iterable[object]:
    module = importlib.import_module(module_name)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", module_name) != module.__name__:
            continue
        if inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj):
            yield obj
            if inspect.isclass(obj):
                for attr, member in sorted(vars(obj).items()):
                    if not attr.startswith("_") and (inspect.isfunction(member) or inspect.ismethoddescriptor(member)):
                        yield member


def docstring_task(seed: int = 0, max_per_label: int | None = None,
                   families: tuple[tuple[str, tuple[str, ...]], ...] = FAMILIES) -> list[dict]:
    """``[{"text": sentence, "label": index into LABELS}]``: every distinct first sentence, shuffled with ``seed``;
    a sentence seen in two families is dropped (it would be a contradiction); ``max_per_label`` balances the
    classes (the smallest family's count by default). ``families``: :data:`FAMILIES` or :data:`WIDE_FAMILIES`
    (labels in :data:`LABELS`' order)."""
    if tuple(name for name, _ in families) != LABELS:
        raise ConfigError(f"families must name the labels {LABELS} in that order")
    by_label: dict[int, list[str]] = {}
    owner: dict[str, int] = {}
    for label, (_, modules) in enumerate(families):
        for module_name in modules:
            for obj in _objects(module_name):
                sentence = first_sentence(inspect.getdoc(obj) or "")
                if sentence is None:
                    continue
                if owner.setdefault(sentence, label) != label:
                    owner[sentence] = -1
                by_label.setdefault(label, []).append(sentence)
    rng = random.Random(seed)
    examples = []
    for label, sentences in sorted(by_label.items()):
        unique = sorted({s for s in sentences if owner[s] == label})
        rng.shuffle(unique)
        examples.append((label, unique))
    limit = min(len(s) for _, s in examples) if max_per_label is None else max_per_label
    out = [{"text": text, "label": label} for label, sentences in examples for text in sentences[:limit]]
    rng.shuffle(out)
    return out


def split(examples: list[dict], test_fraction: float = 0.25, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train, test)``, stratified by label, ``test_fraction`` of each label held out."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted({e["label"] for e in examples}):
        group = [e for e in examples if e["label"] == label]
        rng.shuffle(group)
        cut = max(1, round(len(group) * test_fraction))
        test += group[:cut]
        train += group[cut:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_jsonl(examples: Iterable[dict], path: str | Path) -> Path:
    """One JSON object per line (``{"text": ..., "label": ...}``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    return path
