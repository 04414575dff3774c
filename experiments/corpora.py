"""Where the experiments' text comes from. Nothing here downloads anything.

* `stdlib_corpus`: an embedded language-modelling corpus, the Python source
  of the running interpreter's standard library.
* `read_text_corpus`: your own text file or directory of text files.
* `read_parallel_corpus`: your own line-aligned translation data.
* `numbers_task`: an embedded, generated translation task (numbers written
  as digits, in English words and in Chinese numerals).

Every split is deterministic: it depends on file contents and relative paths,
never on directory listing order, the clock or the process.

Bad input raises `DataError`, whose message reads `<file>, line <n>: <what is
wrong>. <how to fix it>` so it can be acted on without a debugger.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sysconfig

import numpy as np

__all__ = [
    "DataError",
    "stdlib_corpus",
    "read_text_corpus",
    "read_parallel_corpus",
    "numbers_task",
    "number_to_english",
    "number_to_chinese",
    "NUMBER_DIRECTIONS",
]

Corpus = dict[str, list[str]]
Pairs = list[tuple[str, str]]


class DataError(ValueError):
    """Input data that cannot be used as given; the message says where and how to fix it."""


# ---------------------------------------------------------------------------
# Shared helpers.


def _where(path, line: int | None = None) -> str:
    return f"{path}" if line is None else f"{path}, line {line}"


def _decode_utf8(data: bytes, path) -> str:
    """Decodes UTF-8 (a leading BOM is dropped) or raises with the bad byte's line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - line_start + 1
        raise DataError(
            f"{_where(path, line)}: byte 0x{data[e.start]:02x} at column {column} is not valid UTF-8. "
            "Re-encode the file as UTF-8 (e.g. `iconv -f LATIN1 -t UTF-8 in > out`) or remove the bad bytes."
        ) from None


def _read_utf8(path: pathlib.Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory. Check the path "
                        "(it is resolved from the current directory).")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file. Pass a text file.")
    return _decode_utf8(path.read_bytes(), path)


def _lines(text: str) -> list[str]:
    """Lines split on '\\n' only (not str.splitlines, whose extra separators such as
    U+2028 would make line numbers disagree with editors), '\\r' dropped, no
    phantom line after a final newline."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _hash_fraction(key: str) -> float:
    """A stable pseudo-random number in [0, 1) for a relative path."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _split_by_key(keys: list[str], validation_fraction: float, min_validation: int) -> tuple[list[int], list[int]]:
    """Indices of train and validation items, chosen by hashing each key.

    Hashing (rather than shuffling) keeps a file's split fixed when other files
    are added or removed. At least `min_validation` items (the lowest hashes)
    go to validation when `validation_fraction > 0`, and at least one to train.
    """
    if validation_fraction <= 0 or len(keys) < 2:
        return list(range(len(keys))), []
    scores = [_hash_fraction(k) for k in keys]
    valid = {i for i, s in enumerate(scores) if s < validation_fraction}
    by_score = sorted(range(len(keys)), key=lambda i: (scores[i], keys[i]))
    want = min(max(min_validation, len(valid)), len(keys) - 1)
    valid = set(by_score[:want]) if len(valid) < want else valid
    if len(valid) == len(keys):
        valid.discard(by_score[-1])
    train = [i for i in range(len(keys)) if i not in valid]
    return train, sorted(valid)


def _prefix_within(text: str, budget_bytes: int) -> str:
    """The longest prefix of `text` whose UTF-8 size fits, cut after a newline when possible."""
    data = text.encode("utf-8")
    if len(data) <= budget_bytes:
        return text
    head = data[:budget_bytes]
    cut = head.rfind(b"\n")
    if cut >= 0:
        return head[: cut + 1].decode("utf-8")
    return head.decode("utf-8", errors="ignore")  # drops a split multi-byte char


def _cap_docs(docs: list[str], max_bytes: int) -> list[str]:
    out, used = [], 0
    for doc in docs:
        piece = _prefix_within(doc, max_bytes - used)
        if piece:
            out.append(piece)
            used += len(piece.encode("utf-8"))
        if used >= max_bytes or piece != doc:
            break
    return out


# ---------------------------------------------------------------------------
# The embedded LM corpus: the standard library's source.

_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
_STDLIB_VALIDATION_FRACTION = 0.02
_STDLIB_MIN_VALIDATION_FILES = 8
_MIN_CAPPED_VALIDATION_BYTES = 1024


def _stdlib_files(root: pathlib.Path) -> list[tuple[str, str]]:
    """(relative path, text) of every usable stdlib .py file, sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                found.append(pathlib.Path(dirpath, name))
    files = []
    for path in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a handful of files are deliberately not UTF-8
        if text.strip():
            files.append((path.relative_to(root).as_posix(), text))
    return files


def stdlib_corpus(max_bytes: int | None = None) -> Corpus:
    """The interpreter's standard-library Python source as {'train', 'validation'} documents.

    One document per `.py` file (tests, idlelib, lib2to3, site-packages and
    non-UTF-8 files are left out). About 2% of files, and at least 8, go to
    validation, chosen by a hash of the relative path, so the split is by file
    and independent of listing order. Documents within a split are in a fixed
    hash order, so that a capped corpus is a mix of modules, not just those
    starting with 'a'.

    `max_bytes` caps the UTF-8 size of the train text (the last document is
    cut after a line). Validation is capped in proportion, to its uncapped
    train/validation ratio but at least 1 KiB.
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = _stdlib_files(root)
    if not files:
        raise DataError(f"{root}: no readable standard-library .py files found; "
                        "pass your own text with read_text_corpus.")
    keys = [k for k, _ in files]
    train_idx, valid_idx = _split_by_key(keys, _STDLIB_VALIDATION_FRACTION, _STDLIB_MIN_VALIDATION_FILES)

    def ordered(idx):
        return [files[i][1] for i in sorted(idx, key=lambda i: (_hash_fraction("order:" + keys[i]), keys[i]))]

    corpus = {"train": ordered(train_idx), "validation": ordered(valid_idx)}
    if max_bytes is not None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        sizes = {k: sum(len(d.encode("utf-8")) for d in v) for k, v in corpus.items()}
        valid_cap = max(_MIN_CAPPED_VALIDATION_BYTES, round(max_bytes * sizes["validation"] / sizes["train"]))
        corpus = {"train": _cap_docs(corpus["train"], max_bytes),
                  "validation": _cap_docs(corpus["validation"], valid_cap)}
    return corpus


# ---------------------------------------------------------------------------
# User-supplied corpora.


def _text_files(root: pathlib.Path) -> list[pathlib.Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .git and friends
        files.extend(pathlib.Path(dirpath, n) for n in filenames if not n.startswith("."))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _split_single_file(path, text: str, validation_fraction: float, doc_per_line: bool) -> Corpus:
    lines = _lines(text)
    if validation_fraction <= 0:
        train, valid = lines, []
    else:
        if len(lines) < 2:
            raise DataError(
                f"{_where(path, 1)}: a single-line file cannot be split into train and validation. "
                "Add lines or pass a directory of files (data.validation_fraction is the share of lines held out)."
            )
        n_valid = min(len(lines) - 1, max(1, round(len(lines) * validation_fraction)))
        train, valid = lines[:-n_valid], lines[-n_valid:]
    if doc_per_line:
        return {"train": [s for s in train if s.strip()], "validation": [s for s in valid if s.strip()]}

    def join(ls):
        return ["\n".join(ls) + "\n"] if ls else []
    return {"train": join(train), "validation": join(valid)}


def read_text_corpus(path, validation_fraction: float = 0.02, doc_per_line: bool = False) -> Corpus:
    """Reads a UTF-8 text file, or a directory of them, as {'train', 'validation'} documents.

    A directory is read recursively (hidden files and directories skipped,
    empty files skipped), one document per file, split by a hash of each
    file's relative path (at least one validation file). A single file is
    split by lines: the last `validation_fraction` of its lines are
    validation; each side is one document, or one document per non-blank line
    with `doc_per_line=True`.

    Raises `DataError` for a missing path, an empty file or directory, or
    bytes that are not UTF-8 (naming the file and line).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory. Check the path "
                        "(it is resolved from the current directory).")
    if path.is_file():
        text = _read_utf8(path)
        if not text.strip():
            raise DataError(f"{_where(path, 1)}: the file is empty. Put text in it or point to another file.")
        return _split_single_file(path, text, validation_fraction, doc_per_line)

    files = [(f, _read_utf8(f)) for f in _text_files(path)]
    files = [(f, t) for f, t in files if t.strip()]
    if not files:
        raise DataError(f"{path}: the directory holds no non-empty text files. Add UTF-8 text files to it.")
    if len(files) == 1 and validation_fraction > 0:
        return _split_single_file(files[0][0], files[0][1], validation_fraction, doc_per_line)
    keys = [f.relative_to(path).as_posix() for f, _ in files]
    train_idx, valid_idx = _split_by_key(keys, validation_fraction, min_validation=1)
    if doc_per_line:
        def pick(idx):
            return [line for i in idx for line in _lines(files[i][1]) if line.strip()]
    else:
        def pick(idx):
            return [files[i][1] for i in idx]
    return {"train": pick(train_idx), "validation": pick(valid_idx)}


def read_parallel_corpus(src_path, tgt_path=None) -> Pairs:
    """Reads (source, target) sentence pairs.

    Either two line-aligned UTF-8 files (line i of one translates line i of
    the other), or, with `tgt_path=None`, one TSV file with `source<TAB>target`
    on every line. Both sides are stripped of surrounding whitespace.

    Raises `DataError` (naming the file and line) for a missing or empty
    file, files with different line counts, a TSV line without exactly one
    tab, a line with an empty side, or bytes that are not UTF-8.
    """
    src_path = pathlib.Path(src_path)

    def nonempty_lines(p: pathlib.Path) -> list[str]:
        lines = _lines(_read_utf8(p))
        if not any(line.strip() for line in lines):
            raise DataError(f"{_where(p, 1)}: the file is empty. Put one sentence per line in it.")
        return lines

    def side(text: str, p, line: int, what: str) -> str:
        text = text.strip()
        if not text:
            raise DataError(f"{_where(p, line)}: the {what} is empty. Remove the line or fill it in "
                            "(blank lines are not allowed).")
        return text

    if tgt_path is None:
        pairs = []
        for n, line in enumerate(nonempty_lines(src_path), start=1):
            if line.count("\t") != 1:
                raise DataError(
                    f"{_where(src_path, n)}: expected exactly one tab (source<TAB>target), found {line.count(chr(9))}. "
                    "Separate source and target with a single tab, or pass two line-aligned files."
                )
            s, t = line.split("\t")
            pairs.append((side(s, src_path, n, "source (before the tab)"),
                          side(t, src_path, n, "target (after the tab)")))
        return pairs

    tgt_path = pathlib.Path(tgt_path)
    src_lines, tgt_lines = nonempty_lines(src_path), nonempty_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        shorter = src_path if len(src_lines) < len(tgt_lines) else tgt_path
        n = min(len(src_lines), len(tgt_lines))
        raise DataError(
            f"{src_path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)}; "
            f"{shorter} ends after line {n}. Line i of one file must translate line i of the other: "
            "fix the alignment (look for a missing, extra or wrapped line)."
        )
    return [
        (side(s, src_path, n, "source line"), side(t, tgt_path, n, "target line"))
        for n, (s, t) in enumerate(zip(src_lines, tgt_lines), start=1)
    ]


# ---------------------------------------------------------------------------
# The embedded translation task: numbers.

_EN_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
            "seventeen eighteen nineteen").split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_EN_SCALES = ["", "thousand", "million", "billion"]
_ZH_DIGITS = "零一二三四五六七八九"
_ZH_PLACES = ["", "十", "百", "千"]
_ZH_GROUPS = ["", "万", "亿"]
_MAX_SUPPORTED = 10**12 - 1

NUMBER_DIRECTIONS = ("digits-en", "en-digits", "digits-zh", "zh-digits", "en-zh", "zh-en")


def _check_number(n: int) -> None:
    if not 0 <= n <= _MAX_SUPPORTED:
        raise ValueError(f"numbers must be in [0, {_MAX_SUPPORTED}], got {n}")


def _english_below_1000(n: int) -> list[str]:
    words = []
    if n >= 100:
        words += [_EN_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_EN_TENS[n // 10] + (f"-{_EN_ONES[n % 10]}" if n % 10 else ""))
    elif n:
        words.append(_EN_ONES[n])
    return words


def number_to_english(n: int) -> str:
    """US English words, hyphenated 21-99, no 'and': 40213 -> 'forty thousand two hundred thirteen'."""
    _check_number(n)
    if n == 0:
        return "zero"
    words, scale = [], 0
    while n:
        n, group = divmod(n, 1000)
        if group:
            words = _english_below_1000(group) + ([_EN_SCALES[scale]] if scale else []) + words
        scale += 1
    return " ".join(words)


def _chinese_below_10000(n: int) -> str:
    """0 < n < 10000 with inner zeros as one 零 and no trailing zeros: 1010 -> 一千零一十."""
    out, pending_zero = [], False
    for place in (3, 2, 1, 0):
        d = n // 10**place % 10
        if d == 0:
            pending_zero = bool(out)
            continue
        if pending_zero:
            out.append("零")
            pending_zero = False
        out.append(_ZH_DIGITS[d] + _ZH_PLACES[place])
    return "".join(out)


def number_to_chinese(n: int) -> str:
    """Simplified Chinese numerals (小写), e.g. 40213 -> 四万零二百一十三.

    Conventions: 二 (never 两); groups of four digits with 万 and 亿; one 零
    stands for any run of zeros between two non-zero digits, including zeros
    that straddle a group boundary (100000001 -> 一亿零一, 10010000 -> 一千零一万),
    and trailing zeros are silent. A leading 一十 is written 十 (10 -> 十,
    15 -> 十五, 100000 -> 十万) but 一十 is kept everywhere else (115 -> 一百一十五,
    10010 -> 一万零一十).
    """
    _check_number(n)
    if n == 0:
        return "零"
    groups = []
    while n:
        n, g = divmod(n, 10000)
        groups.append(g)
    out, zero_gap = [], False
    for idx in range(len(groups) - 1, -1, -1):
        g = groups[idx]
        if g == 0:
            zero_gap = bool(out)
            continue
        if out and (zero_gap or g < 1000):
            out.append("零")
        out.append(_chinese_below_10000(g) + _ZH_GROUPS[idx])
        zero_gap = False
    text = "".join(out)
    return text[1:] if text.startswith("一十") else text


def _render(n: int, language: str) -> str:
    if language == "digits":
        return str(n)
    return number_to_english(n) if language == "en" else number_to_chinese(n)


def _sample_numbers(count: int, max_value: int, seed: int) -> list[int]:
    """`count` distinct numbers in [0, max_value], in sampling order.

    The digit count is drawn uniformly first, so short numbers are not
    swamped by six-digit ones, then the value uniformly among numbers of that
    length. Duplicates are redrawn; buckets that fill up are dropped.
    """
    population = max_value + 1
    if count > population:
        raise ValueError(f"cannot draw {count} distinct numbers from [0, {max_value}]")
    rng = np.random.default_rng(seed)
    if 2 * count >= population:  # dense: a permutation is cheaper than redraws
        return [int(x) for x in rng.permutation(population)[:count]]
    buckets = []
    for length in range(1, len(str(max_value)) + 1):
        lo = 0 if length == 1 else 10 ** (length - 1)
        hi = min(10**length - 1, max_value)
        if lo <= hi:
            buckets.append((lo, hi))
    seen, order = set(), []
    used = [0] * len(buckets)
    while len(order) < count:
        b = int(rng.integers(len(buckets)))
        lo, hi = buckets[b]
        if used[b] > hi - lo:
            buckets.pop(b), used.pop(b)
            continue
        n = int(rng.integers(lo, hi + 1))
        if n not in seen:
            seen.add(n)
            order.append(n)
            used[b] += 1
    return order


def numbers_task(
    direction: str = "digits-en",
    num_train: int = 50_000,
    num_valid: int = 1_000,
    seed: int = 0,
    max_value: int = 999_999,
) -> dict[str, Pairs]:
    """A generated translation task: a number in one notation -> the same number in another.

    `direction` is `<source>-<target>` over digits, en (English words, see
    `number_to_english`) and zh (Chinese numerals, see `number_to_chinese`):
    one of NUMBER_DIRECTIONS. Numbers are distinct across the whole task, so
    validation shares no number with train; which numbers are drawn depends
    only on (seed, max_value, num_train + num_valid), not on the direction.
    Validation draws numbers >= 100 while there are enough of them: 0-99 are
    the words every other number is built from, and they stay in training.
    """
    if direction not in NUMBER_DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose one of {', '.join(NUMBER_DIRECTIONS)}")
    _check_number(max_value)
    src_lang, tgt_lang = direction.split("-")
    numbers = _sample_numbers(num_train + num_valid, max_value, seed)
    # 0-99 are the task's vocabulary (every English number word; 零 to 九十九), not
    # compositions of it: no model can render a word it never saw, so those numbers
    # go to training and validation holds out larger numbers (stable: sampling order).
    numbers.sort(key=lambda n: n < 100)
    pairs = [(_render(n, src_lang), _render(n, tgt_lang)) for n in numbers]
    return {"train": pairs[num_valid:], "validation": pairs[:num_valid]}
