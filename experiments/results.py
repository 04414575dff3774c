r"""Measurement records under docs/results/, and the tags that tie the docs' quoted figures to them.

A script that measures writes its figures with `write(path, record)`: a JSON object whose "conditions"
(`conditions()`: machine, CPU, load, jax version, date, command) travel with the numbers.

In README.md and docs/**/*.md a quoted figure is tagged right after it with an HTML comment naming its record:

    1.883<!-- lm_tiny.json:final.bits_per_byte|.3f -->

(file under docs/results/, dotted path into the JSON with list indices as numbers, optional Python format
spec after `|`). The quoted text must equal `format(value, spec)` exactly (`format(value, "")` without a
spec), so "1,234" needs a spec with `,`. `check()` lists every tag that disagrees; tests/test_docs_drift.py
fails on any. `python experiments/results.py` prints the disagreements and, with --untagged, the numbers
in the docs that carry no tag (a reading aid: not every number is a measurement); --rewrite first re-quotes
every tagged figure from its record, for after a re-measure.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("docs") / "results"
REQUIRED_CONDITIONS = ("machine", "load", "jax", "date", "command")

# The number (digits, optional thousands commas, decimals, exponent, percent sign) right before the tag.
_NUMBER = r"[-+\u2212]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?%?"
TAG = re.compile(r"(?P<quoted>" + _NUMBER + r")?<!--\s*(?P<file>[\w./-]+\.json):(?P<path>[^|\s>]+)"
                 r"(?:\|(?P<spec>[^\s>]*))?\s*-->")
# Anything that looks like a tag (a comment naming a .json file), to catch a malformed one.
_TAG_LIKE = re.compile(r"<!--[^>]*?\.json\b[^>]*?-->")


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def conditions(command: str | None = None, **extra) -> dict:
    """What a record's numbers were measured under: machine, CPU, load, versions, date, command."""
    import jax

    d = jax.devices()[0]
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    cores = f"{os.cpu_count()} CPU cores"
    machine = f"{cpu_name()}, {cores}" if d.platform == "cpu" else f"{jax.device_count()} x {d.device_kind}, {cores}"
    return {"machine": machine, "devices": f"{jax.device_count()} x {d.device_kind} ({d.platform})",
            "cpu": cpu_name(), "load": load, "load_note": "1/5/15-minute load averages when the record was written",
            "jax": jax.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command or " ".join(["python", *sys.argv]), **extra}


def write(path: str | os.PathLike, record: dict) -> Path:
    """Write `record` as JSON; it must carry a "conditions" object (see `conditions()`)."""
    if not isinstance(record.get("conditions"), dict):
        raise ValueError(f"{path}: a record needs a 'conditions' object (experiments.results.conditions())")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def lookup(record, dotted: str):
    """record["a"][0]["b"] for "a.0.b"; KeyError names the first step that is missing."""
    x = record
    for i, key in enumerate(dotted.split(".")):
        if isinstance(x, list) and key.lstrip("-").isdigit() and -len(x) <= int(key) < len(x):
            x = x[int(key)]
        elif isinstance(x, dict) and key in x:
            x = x[key]
        else:
            where = ".".join(dotted.split(".")[:i]) or "the top level"
            keys = list(x)[:12] if isinstance(x, dict) else f"a list of {len(x)}" if isinstance(x, list) else x
            raise KeyError(f"no '{key}' under {where} (there: {keys})")
    return x


@dataclasses.dataclass(frozen=True)
class Problem:
    doc: str
    line: int
    text: str
    message: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text!r}: {self.message}"


def check_text(doc: str, text: str, results_dir: Path, cache: dict | None = None) -> list[Problem]:
    """Every tag in `text` (the Markdown of `doc`) whose quoted figure is not its record's value, formatted."""
    cache = {} if cache is None else cache
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        good = [m.span("file") for m in TAG.finditer(line)]
        for m in _TAG_LIKE.finditer(line):
            if not any(m.start() <= s < m.end() for s, _ in good):
                problems.append(Problem(doc, n, m.group(0), "malformed tag: write <number><!-- file.json:path|fmt -->"))
        for m in TAG.finditer(line):
            problem = _check_tag(m, results_dir, cache)
            if problem:
                problems.append(Problem(doc, n, m.group(0), problem))
    return problems


def _check_tag(m: re.Match, results_dir: Path, cache: dict) -> str | None:
    name, path, spec, quoted = m.group("file"), m.group("path"), m.group("spec") or "", m.group("quoted")
    file = results_dir / name
    if name not in cache:
        try:
            cache[name] = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            cache[name] = e
    record = cache[name]
    if isinstance(record, Exception):
        return f"record {file} cannot be read ({record}): write it with the script that measures it, or fix the name"
    try:
        value = lookup(record, path)
    except KeyError as e:
        return f"{name} has no {path}: {e.args[0]}"
    try:
        expected = format(value, spec)
    except (ValueError, TypeError) as e:
        return f"format({value!r}, {spec!r}) fails ({e}): fix the format spec"
    if quoted is None:
        return f"no number right before the tag (record value {expected!r}): put the tag right after the figure"
    if quoted.replace("\u2212", "-") != expected:
        return f"quotes {quoted!r} but {name}:{path} is {value!r}, formatted {expected!r}"
    return None


def docs_files(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [p for p in [root / "README.md", *sorted((root / "docs").rglob("*.md"))] if p.exists()]


def check(root: Path = ROOT) -> list[Problem]:
    """Every disagreeing or broken tag in README.md and docs/**/*.md."""
    cache: dict = {}
    return [p for doc in docs_files(root)
            for p in check_text(str(doc.relative_to(root)), doc.read_text(), root / RESULTS, cache)]


def record_problems(root: Path = ROOT) -> list[str]:
    """Records under docs/results that do not parse or lack a "conditions" object with the required keys."""
    out = []
    for f in sorted((root / RESULTS).rglob("*.json")):
        try:
            c = json.loads(f.read_text()).get("conditions")
        except (ValueError, AttributeError) as e:
            out.append(f"{f.relative_to(root)}: not a JSON object ({e})")
            continue
        if not isinstance(c, dict):
            out.append(f"{f.relative_to(root)}: no 'conditions' object (write it with experiments.results.write)")
        elif missing := [k for k in REQUIRED_CONDITIONS if k not in c]:
            out.append(f"{f.relative_to(root)}: conditions lack {missing}")
    return out


_UNTAGGED = re.compile(r"(?<![\w.#/-])" + _NUMBER + r"(?!<!--|[\w/])")


def untagged(root: Path = ROOT) -> list[str]:
    """Lines of the docs with numbers (3+ significant characters) outside code and tags: candidates to tag."""
    out = []
    for doc in docs_files(root):
        fenced = False
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
            if fenced:
                continue
            bare = re.sub(r"`[^`]*`|\[[^\]]*\]\([^)]*\)|<!--.*?-->", " ", TAG.sub(" ", line))
            nums = [x for x in _UNTAGGED.findall(bare) if len(x.strip("%")) >= 3]
            if nums:
                out.append(f"{doc.relative_to(root)}:{n}: {', '.join(nums)}")
    return out


def rewrite(root: Path = ROOT) -> list[str]:
    """Re-quote every tagged figure from its record (after a re-measure); returns the docs changed.

    Only the numbers change: reread the prose around them, which may no longer hold."""
    cache: dict = {}
    changed = []

    def requote(m: re.Match) -> str:
        if m.group("quoted") is None or _check_tag(m, root / RESULTS, cache) is None:
            return m.group(0)
        record = cache.get(m.group("file"))
        try:
            value = format(lookup(record, m.group("path")), m.group("spec") or "")
        except (KeyError, ValueError, TypeError):
            return m.group(0)  # broken tags stay for check() to report
        return value + m.group(0)[len(m.group("quoted")):]

    for doc in docs_files(root):
        text = doc.read_text()
        new = TAG.sub(requote, text)
        if new != text:
            doc.write_text(new)
            changed.append(str(doc.relative_to(root)))
    return changed


def main(argv: list[str]) -> int:
    if "--rewrite" in argv:
        print("re-quoted:", ", ".join(rewrite()) or "nothing")
    problems = [str(p) for p in check()] + record_problems()
    print("\n".join(problems) or "every tag agrees with its record")
    if "--untagged" in argv:
        print("\n".join(untagged()))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
