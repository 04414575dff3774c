"""Tokenizers with one interface: text <-> ids, with PAD=0, BOS=1, EOS=2.

* `ByteTokenizer`: UTF-8 bytes, ids 3..258. Needs no training or files.
* `SentencePieceTokenizer`: a unigram or BPE model trained locally on the
  training split and saved in the run's workdir, so a resumed run reads the
  same vocabulary back instead of retraining.
* `HFTokenizer`: a pretrained checkpoint's own `tokenizer.json` (the
  `tokenizers` library), with that checkpoint's special ids; a run started with
  `init_from=hf:<dir>` keeps a copy in `<workdir>/hf_tokenizer/`.

`make_tokenizer` picks one by name.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

__all__ = [
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "Tokenizer",
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "make_tokenizer",
    "TOKENIZER_KINDS",
]

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TOKENIZER_KINDS = ("byte", "sentencepiece", "hf")
HF_TOKENIZER_DIR = "hf_tokenizer"  # in a workdir: the checkpoint's tokenizer files + specials.json
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@runtime_checkable
class Tokenizer(Protocol):
    """What the input pipeline and the trainer need from a tokenizer."""

    pad_id: int
    bos_id: int
    eos_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, stopping at the first EOS and skipping PAD and BOS."""
        ...

    def num_bytes(self, text: str) -> int:
        """UTF-8 size of `text`, the denominator of bits per byte."""
        ...


class _Specials:
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def num_bytes(self, text: str) -> int:
        """UTF-8 size of `text`, the denominator of bits per byte."""
        return len(text.encode("utf-8"))

    def _content_ids(self, ids: Iterable[int]) -> list[int]:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                out.append(i)
        return out


class ByteTokenizer(_Specials):
    """One token per UTF-8 byte: byte b is id b + 3; vocab_size 259."""

    offset = 3

    @property
    def vocab_size(self) -> int:
        return 256 + self.offset

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (its UTF-8 bytes shifted by 3), without BOS/EOS."""
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first EOS; invalid UTF-8 (e.g. a cut sample) becomes U+FFFD."""
        data = bytes(i - self.offset for i in self._content_ids(ids) if self.offset <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")


# sentencepiece skips sentences longer than this many bytes; longer lines are
# cut into chunks so nothing is silently dropped from training.
_SP_MAX_SENTENCE_BYTES = 4096
_SP_MAX_SENTENCES = 2_000_000


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    """Non-blank lines of `texts`, each at most _SP_MAX_SENTENCE_BYTES of UTF-8."""
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            while len(line.encode("utf-8")) > _SP_MAX_SENTENCE_BYTES:
                # Any multi-byte char is <= 4 bytes, so a quarter of the limit in chars always fits.
                cut = _SP_MAX_SENTENCE_BYTES // 4
                yield line[:cut]
                line = line[cut:]
            yield line


@contextlib.contextmanager
def _vocab_size_errors(vocab_size: int):
    """sentencepiece's RuntimeError about the vocabulary size -> a ValueError naming data.vocab_size."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if "ocabulary size" not in text:
            raise
        detail = text.strip().splitlines()[-1].split("] ")[-1].strip()
        raise ValueError(f"config.data.vocab_size={vocab_size} does not fit the text "
                         f"(sentencepiece: {detail}); choose a vocab_size in the range it names") from None


class SentencePieceTokenizer(_Specials):
    """A sentencepiece model set up for exact round trips of any text.

    Identity normalization, no dummy prefix, whitespace kept, '\\n' as its own
    piece and byte fallback mean decode(encode(text)) == text for all text,
    source code included.
    """

    def __init__(self, processor):
        self._sp = processor
        specials = (processor.pad_id(), processor.bos_id(), processor.eos_id())
        if specials != (PAD_ID, BOS_ID, EOS_ID):
            raise ValueError(f"sentencepiece model has pad/bos/eos ids {specials}; expected {(PAD_ID, BOS_ID, EOS_ID)}")

    @classmethod
    def load(cls, path) -> SentencePieceTokenizer:
        """Loads a `.model` file written by `train`."""
        import sentencepiece as spm

        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no sentencepiece model there; "
                                    "train one with SentencePieceTokenizer.train")
        return cls(spm.SentencePieceProcessor(model_file=str(path)))

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        model_prefix_path,
        model_type: str = "unigram",
    ) -> SentencePieceTokenizer:
        """Trains on `texts` (fed line by line) and saves `<model_prefix_path>.model`.

        Deterministic for the same texts: input is not shuffled and at most
        the first 2M lines are used. The model is written under a temporary
        name and renamed, so an interrupted run never leaves a half-written
        model for a resume to pick up.
        """
        import sentencepiece as spm

        prefix = pathlib.Path(model_prefix_path)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        tmp_prefix = prefix.with_name(f"{prefix.name}.tmp{os.getpid()}")
        with open(os.devnull, "w") as quiet, _vocab_size_errors(vocab_size):
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_lines(texts),
                model_prefix=str(tmp_prefix),
                vocab_size=vocab_size,
                model_type=model_type,
                pad_id=PAD_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                unk_id=3,
                byte_fallback=True,
                # Exact round trips: no NFKC, keep runs of spaces (indentation), no dummy '▁'.
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                # Training sees lines, so '\n' must be declared to get a piece of its own.
                user_defined_symbols=["\n"],
                split_digits=True,
                character_coverage=0.9995,
                max_sentence_length=_SP_MAX_SENTENCE_BYTES,
                input_sentence_size=_SP_MAX_SENTENCES,
                shuffle_input_sentence=False,
                hard_vocab_limit=True,
                minloglevel=2,
                logstream=quiet,
            )
        for ext in (".model", ".vocab"):
            os.replace(f"{tmp_prefix}{ext}", f"{prefix}{ext}")
        return cls.load(f"{prefix}.model")

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many texts, multi-threaded inside sentencepiece."""
        return self._sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first EOS, PAD and BOS skipped."""
        return self._sp.decode(self._content_ids(ids))


class HFTokenizer(_Specials):
    """A Hugging Face `tokenizer.json` (BPE, unigram, ...) through the `tokenizers` library.

    The special ids are the checkpoint's (from its config.json), not tformer's
    0/1/2: the data pipeline frames documents with `bos_id` / `eos_id`. GPT-2
    has one id for all three; `decode` stops at the first EOS as always.
    """

    def __init__(self, tokenizer, bos_id: int, eos_id: int, pad_id: int):
        self._tok = tokenizer
        self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)

    @classmethod
    def from_file(cls, path, bos_id: int, eos_id: int, pad_id: int) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tokenizer

        path = pathlib.Path(path)
        if not path.is_file():
            raise ValueError(f"{path.parent} has no tokenizer.json: a run started from a Hugging Face checkpoint "
                             "uses the checkpoint's own tokenizer; save it there (tokenizer.save_pretrained)")
        try:
            return cls(_Tokenizer.from_file(str(path)), bos_id, eos_id, pad_id)
        except Exception as e:  # the tokenizers library raises its own exception type
            raise ValueError(f"{path} is not a readable tokenizers file ({e})") from None

    @classmethod
    def load(cls, directory) -> HFTokenizer:
        """The copy a run keeps: `<directory>/tokenizer.json` with the ids in `<directory>/specials.json`."""
        import json

        directory = pathlib.Path(directory)
        specials = directory / "specials.json"
        if not specials.is_file():
            raise ValueError(f"{specials} is missing: the run's Hugging Face tokenizer was not saved with it; "
                             "start the run again with config.init_from=hf:<dir>")
        ids = json.loads(specials.read_text())
        return cls.from_file(directory / "tokenizer.json", ids["bos_id"], ids["eos_id"], ids["pad_id"])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS (the tokenizer's own post-processing is off)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first EOS, PAD and BOS skipped."""
        return self._tok.decode(self._content_ids(ids), skip_special_tokens=False)


def make_tokenizer(kind: str, workdir=None, train_texts: Iterable[str] = (), vocab_size: int = 8000,
                   name: str = "tokenizer") -> Tokenizer:
    """The tokenizer of kind 'byte' or 'sentencepiece' for a run.

    For 'sentencepiece' the model lives at `<workdir>/<name>.model`: it is
    loaded if present (a resumed run must see the same ids) and otherwise
    trained on `train_texts` with `vocab_size` pieces and saved there. Only
    one process should train it (e.g. process 0, then a barrier).
    """
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        if workdir is None:
            raise ValueError("a Hugging Face tokenizer is read from a run's workdir; none was given")
        return HFTokenizer.load(pathlib.Path(workdir) / HF_TOKENIZER_DIR)
    if kind != "sentencepiece":
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds are {', '.join(map(repr, TOKENIZER_KINDS))}")
    if workdir is None:
        raise ValueError("a sentencepiece tokenizer needs a workdir to save its model in")
    prefix = pathlib.Path(workdir) / name
    model = prefix.with_name(prefix.name + ".model")
    if model.is_file():
        tok = SentencePieceTokenizer.load(model)
        if tok.vocab_size != vocab_size:
            raise ValueError(
                f"{model} has vocab_size {tok.vocab_size} but {vocab_size} was asked for; "
                "use a new workdir, or delete the model to retrain it"
            )
        return tok
    return SentencePieceTokenizer.train(train_texts, vocab_size, prefix)
