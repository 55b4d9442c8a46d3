"""Corpora, byte-level tokenization and batches. Nothing is downloaded.

The built-in corpus is the source of a fixed list of standard-library modules, which every Python ships. Its text differs
slightly between Python versions, so `TextCorpus.fingerprint` (a SHA-256 of the bytes) is recorded with results: runs compare
when fingerprints match. Tokens are bytes (vocabulary 256), so any text file works and nothing needs training; stored as uint8
and widened to int64 per batch, a corpus takes about its file's size in memory. The train/validation split is deterministic
(the first 90% of each document trains); batches are drawn with an explicit torch.Generator, so a seed fixes the data order."""

import codecs
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

BYTE_VOCAB_SIZE = 256

STDLIB_MODULES = (
    "argparse", "calendar", "contextlib", "csv", "dataclasses", "difflib", "enum", "fractions",
    "functools", "heapq", "json/decoder", "json/encoder", "pprint", "random", "shlex", "statistics",
    "string", "textwrap",
)
# Modules of distinct style: the classification task is "which module is this snippet from?". A model
# with N classes gets the first N; the first four are the default set.
CLASSIFICATION_MODULES = ("argparse", "calendar", "fractions", "textwrap", "difflib", "csv", "statistics", "shlex")
BYTE_MASK_ID = 255  # masked-LM mask for byte tokens: 0xFF never occurs in UTF-8 text
CHUNK_BYTES = 1 << 20


def encode(text: str, tokenizer=None) -> torch.Tensor:
    """Byte tokens (uint8), or a Hugging Face tokenizer's ids (int32) when one is given."""
    if tokenizer is None:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.int32)


def _stdlib_text(module: str) -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py").read_text(encoding="utf-8")


@dataclass
class TextCorpus:
    """Token streams for training and validation, and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    fingerprint: str
    vocab_size: int = BYTE_VOCAB_SIZE  # the tokenizer's, when the text was tokenized with one

    train_tokens = property(lambda self: len(self.train))

    top_id = property(lambda self: int(max(self.train.max(), self.val.max())))  # the largest id: an LM's logits must cover it

    def check_fits(self, seq_len: int, model_vocab_size=None):
        """Raise a clear error when a split is too short for seq_len or tokens exceed the model's vocabulary."""
        for name, split in (("train", self.train), ("validation", self.val)):
            if len(split) < seq_len + 2:
                raise ValueError(f"{name} split of corpus {self.source!r} has {len(split)} tokens; "
                                 f"expected at least seq_len + 2 = {seq_len + 2}. Use a longer text or a shorter seq_len")
        if model_vocab_size is not None and (top := self.top_id) >= model_vocab_size:
            raise ValueError(f"corpus {self.source!r} has token id {top} but the model's vocabulary is "
                             f"{model_vocab_size}; expected a model with vocab_size >= {self.vocab_size} "
                             "(or a tokenizer= whose ids fit the model)")

    def get_batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator):
        """Random next-token windows: x = tokens[i:i+T], y = tokens[i+1:i+T+1]."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(seq_len)
        return data[idx].long(), data[idx + 1].long()

    def eval_batches(self, n_batches: int, batch_size: int, seq_len: int):
        """Fixed, evenly spaced validation windows: the same batches at every evaluation."""
        starts = torch.linspace(0, len(self.val) - seq_len - 1, n_batches * batch_size).long()
        idx = starts[:, None] + torch.arange(seq_len)
        for b in range(n_batches):
            rows = idx[b * batch_size:(b + 1) * batch_size]
            yield self.val[rows].long(), self.val[rows + 1].long()


def _split(documents, source: str, val_fraction: float, vocab_size: int = BYTE_VOCAB_SIZE) -> TextCorpus:
    """documents: uint8 token tensors. The first (1 - val_fraction) of each trains, the rest validates."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1; got {val_fraction}")
    train, val, digest = [], [], hashlib.sha256()
    for tokens in documents:
        digest.update(memoryview(tokens.numpy()))
        cut = int(len(tokens) * (1 - val_fraction))
        train.append(tokens[:cut])
        val.append(tokens[cut:])
    # One document (a user's file) stays as views of its single buffer: no copy, so memory stays ~1x the file.
    train, val = (parts[0] if len(parts) == 1 else torch.cat(parts) for parts in (train, val))
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"corpus {source!r} is empty or too short to split ({len(train)} train, {len(val)} validation tokens)")
    return TextCorpus(train, val, source, digest.hexdigest()[:16], vocab_size)


def _read_utf8_bytes(path: Path) -> torch.Tensor:
    """The file's bytes as a uint8 tensor, read in chunks and checked to be UTF-8 on the way."""
    tokens = torch.empty(path.stat().st_size, dtype=torch.uint8)
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0

    def check(chunk, final=False):
        start = offset - len(decoder.getstate()[0])  # the decoder may hold the first bytes of a character
        try:
            decoder.decode(chunk, final=final)
        except UnicodeDecodeError as e:
            raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text: {e.reason} at byte offset {start + e.start}; "
                             "expected a UTF-8 text file") from None

    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            check(chunk)
            tokens[offset:offset + len(chunk)] = torch.frombuffer(bytearray(chunk), dtype=torch.uint8)
            offset += len(chunk)
    check(b"", final=True)  # a multi-byte character cut off at the end
    return tokens[:offset]


def load_corpus(path=None, val_fraction: float = 0.1, tokenizer=None) -> TextCorpus:
    """The built-in standard-library corpus, or the UTF-8 text file at `path`; byte tokens, or the ids
    of `tokenizer` (a Hugging Face tokenizer) when one is given."""
    vocab = BYTE_VOCAB_SIZE if tokenizer is None else len(tokenizer)
    named = "" if tokenizer is None else f" [{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)} tokens]"
    if path is None:
        return _split([encode(_stdlib_text(m), tokenizer) for m in STDLIB_MODULES], "python-stdlib" + named, val_fraction, vocab)
    path = Path(os.fspath(path))
    expected = "expected a UTF-8 text file, or None for the built-in corpus"
    if path.is_dir():
        raise IsADirectoryError(f"corpus path {str(path)!r} is a directory; {expected}")
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {str(path)!r} does not exist; {expected}")
    tokens = _read_utf8_bytes(path)
    if not any(bool((chunk > 32).any()) for chunk in tokens.split(CHUNK_BYTES)):  # any byte above a space, a chunk at a time
        raise ValueError(f"corpus file {str(path)!r} is empty; expected a UTF-8 text file with some text")
    if tokenizer is not None:
        tokens = encode(bytes(tokens.numpy()).decode("utf-8"), tokenizer)
    return _split([tokens], str(path) + named, val_fraction, vocab)


@dataclass
class MaskedLMData:
    """Masked-token windows of a corpus: 15% of positions (at least one a row) become `mask_id`; the
    labels hold the original token there and -100 (ignored by the loss) everywhere else."""

    corpus: TextCorpus
    mask_id: int
    mask_prob: float = 0.15

    fingerprint = property(lambda self: self.corpus.fingerprint)
    train_tokens = property(lambda self: self.corpus.train_tokens)
    top_id = property(lambda self: self.corpus.top_id)
    source = property(lambda self: f"{self.corpus.source} (masked, mask id {self.mask_id})")

    def _mask(self, x: torch.Tensor, generator: torch.Generator):
        masked = torch.rand(x.shape, generator=generator) < self.mask_prob
        masked[torch.arange(len(x)), torch.randint(x.shape[1], (len(x),), generator=generator)] = True
        return x.masked_fill(masked, self.mask_id), torch.where(masked, x, torch.full_like(x, -100))

    def get_batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator):
        x, _ = self.corpus.get_batch(split, batch_size, seq_len, generator)
        return self._mask(x, generator)

    def eval_batches(self, n_batches: int, batch_size: int, seq_len: int):
        generator = torch.Generator().manual_seed(0)  # the same masks at every evaluation
        for x, _ in self.corpus.eval_batches(n_batches, batch_size, seq_len):
            yield self._mask(x, generator)

    def check_fits(self, seq_len: int, model_vocab_size=None):
        self.corpus.check_fits(seq_len, model_vocab_size)
        if model_vocab_size is not None and self.mask_id >= model_vocab_size:
            raise ValueError(f"mask id {self.mask_id} is outside the model's vocabulary {model_vocab_size}")


@dataclass
class ClassificationSet:
    """Labelled byte windows: the label is the index of the document a window came from."""

    documents: list  # (train tokens, val tokens) per class
    class_names: tuple
    vocab_size: int = BYTE_VOCAB_SIZE

    num_classes = property(lambda self: len(self.class_names))
    train_tokens = property(lambda self: sum(len(train) for train, _ in self.documents))

    def get_batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator):
        labels = torch.randint(self.num_classes, (batch_size,), generator=generator)
        xs = []
        for label in labels:
            data = self.documents[label][0 if split == "train" else 1]
            i = int(torch.randint(len(data) - seq_len, (1,), generator=generator))
            xs.append(data[i:i + seq_len])
        return torch.stack(xs).long(), labels

    def eval_batches(self, n_batches: int, batch_size: int, seq_len: int):
        """Fixed validation batches, classes in turn, windows evenly spaced in each document."""
        n = n_batches * batch_size
        labels = torch.arange(n) % self.num_classes
        xs = []
        for j, label in enumerate(labels):
            data = self.documents[label][1]
            i = (j // self.num_classes) * 97 % (len(data) - seq_len)  # 97: a stride that spreads windows
            xs.append(data[i:i + seq_len])
        x = torch.stack(xs).long()
        for b in range(n_batches):
            yield x[b * batch_size:(b + 1) * batch_size], labels[b * batch_size:(b + 1) * batch_size]

    def check_fits(self, seq_len: int, model_vocab_size=None):
        for name, (train, val) in zip(self.class_names, self.documents):
            if min(len(train), len(val)) <= seq_len:
                raise ValueError(f"class {name!r} has {len(train)} train / {len(val)} validation tokens; "
                                 f"expected more than seq_len={seq_len} in each")
        if model_vocab_size is not None and model_vocab_size < self.vocab_size:
            raise ValueError(f"model vocabulary {model_vocab_size} is smaller than the data's {self.vocab_size}")


def load_classification_set(num_classes: int = 4, val_fraction: float = 0.2, tokenizer=None) -> ClassificationSet:
    """Snippets of the first `num_classes` modules of CLASSIFICATION_MODULES, labelled by module."""
    if not 2 <= num_classes <= len(CLASSIFICATION_MODULES):
        raise ValueError(f"the built-in classification set has 2 to {len(CLASSIFICATION_MODULES)} classes; the model has "
                         f"{num_classes}. Bring labelled data of your own (data=) for this model")
    modules = CLASSIFICATION_MODULES[:num_classes]
    split = [_split([encode(_stdlib_text(m), tokenizer)], m, val_fraction) for m in modules]  # views: no copy
    return ClassificationSet([(s.train, s.val) for s in split], modules, BYTE_VOCAB_SIZE if tokenizer is None else len(tokenizer))
