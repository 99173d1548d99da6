"""A fixed-vocabulary tokenizer for SCOPE strings (both variants), no external dependency.

The vocabulary is derived from the grammar, not learned, so every well-formed
SCOPE string tokenizes without unknown tokens. In order, with fixed ids:

* special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4);
* the part separator ``|``;
* generator characters, written ``g:<char>`` (every character of the
  ``cloud_generators`` table and of the corrected generators): a generator ``O``
  (zero translation) and the element ``O`` are different tokens;
* every Wyckoff symbol (multiplicity + letter) of the 230 space groups, from the
  ``cloud_wyckoff_multiplicities`` table;
* element symbols (pymatgen's ``Element`` list in atomic-number order, then ``X``);
* atomic fractions ``0.0, 0.01, ..., 1.0`` as written by the encoder;
* from version ``scope-vocab-2`` on, appended at the end so that no earlier id moves,
  the placeholders of the composition-only form (:mod:`cloud_model.composition`):
  ``[NOSYM]`` (part 1: the space group is unknown) and ``[NOWYCK]`` (part 2: the
  occupied Wyckoff orbits are unknown), e.g. ``[NOSYM] | [NOWYCK] | Na 0.5 Cl 0.5``.

Versions. ``scope-vocab-1`` (443 tokens) is the structure-only vocabulary of the
retired ``cloud-small`` checkpoint (MLM only); ``scope-vocab-2`` is the same 443
tokens, same ids, plus the two placeholders (445), the vocabulary of the shipped
``cloud-small-multitask``. The rule: a checkpoint's tokenizer is the
version written in its ``tokenizer.json`` (:meth:`ScopeTokenizer.load` accepts every
version in :data:`VOCAB_VERSIONS` and checks the tokens), and its embedding table is
sized from its card, so old checkpoints keep loading and encoding exactly as before;
under ``scope-vocab-1`` the placeholders are unknown tokens (a structure-only model
cannot read composition-only rows). :meth:`ScopeTokenizer.default` is
``scope-vocab-2``, the shipped checkpoint's, so from-scratch models and the shipped
one share ids; :meth:`ScopeTokenizer.for_version` builds an older one.

Tokenization: part 1 gives one token per generator character; in part 2 a native
orbit ``4a:Na`` gives the two tokens ``4a`` ``Na`` (the binding is the order: an
element token right after a Wyckoff token in part 2 belongs to that orbit, and
:meth:`ScopeTokenizer.decode` writes the ``:`` back); part 3 gives one token per
word. :meth:`ScopeTokenizer.encode` adds ``[CLS]`` first and ``[SEP]`` last.

Example:
    >>> tok = ScopeTokenizer.default()
    >>> s = "1 6 a O D D a D O D b O O O c O O O d O O O e O O O 0 | 4a 4b | Na 0.5 Cl 0.5"
    >>> tok.decode(tok.encode(s)) == s
    True
    >>> batch = tok.batch_encode([s], max_length=64)   # batch.ids: (1, T) int64
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from cloud_model.errors import TokenizerError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

STRUCTURE_VOCAB_VERSION = "scope-vocab-1"  # structure-only (the retired cloud-small's)
LATEST_VOCAB_VERSION = "scope-vocab-2"  # + the composition-only placeholders
VOCAB_VERSION = LATEST_VOCAB_VERSION  # the default: the shipped checkpoint's
VOCAB_VERSIONS = (STRUCTURE_VOCAB_VERSION, LATEST_VOCAB_VERSION)  # each extends the previous at the end
NO_SYMMETRY = "[NOSYM]"  # part 1 of a composition-only string: space group unknown
NO_WYCKOFF = "[NOWYCK]"  # part 2 of a composition-only string: Wyckoff orbits unknown
PLACEHOLDER_TOKENS = (NO_SYMMETRY, NO_WYCKOFF)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SEPARATOR = "|"
GENERATOR_PREFIX = "g:"
DEFAULT_MAX_LENGTH = 64  # as the published CLOUD model

TokenKind = Literal[
    "special", "separator", "generator", "wyckoff", "element", "fraction", "placeholder"
]


class VocabularyFile(BaseModel):
    """The on-disk form of a vocabulary (saved beside checkpoints)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["cloudlab-scope-vocab"] = "cloudlab-scope-vocab"
    version: str
    tokens: list[str]


@dataclass(frozen=True)
class TokenBatch:
    """A padded batch of token ids.

    Attributes:
        ids: (B, T) int64 token ids, ``[CLS]`` first, ``[SEP]`` last, ``[PAD]`` after.
        mask: (B, T) bool, True on real tokens (including ``[CLS]``/``[SEP]``).
        n_unknown: number of ``[UNK]`` tokens in the batch.
        n_truncated: number of strings cut to ``max_length``.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    n_unknown: int
    n_truncated: int


def _vocabulary(version: str = VOCAB_VERSION) -> tuple[list[str], list[TokenKind]]:
    """Tokens and kinds of ``version`` (one of :data:`VOCAB_VERSIONS`)."""
    if version not in VOCAB_VERSIONS:
        raise TokenizerError(
            f"unknown SCOPE vocabulary version {version!r}; known: {list(VOCAB_VERSIONS)}"
        )
    from pymatgen.core.periodic_table import Element

    from cloud_model.scope import CORRECTED_GENERATORS, format_fraction, letter_rank, scope_tables

    tables = scope_tables()
    tokens: list[str] = list(SPECIAL_TOKENS) + [SEPARATOR]
    kinds: list[TokenKind] = ["special"] * len(SPECIAL_TOKENS)
    kinds.append("separator")
    chars = set("".join(tables.generators.values())) | set("".join(CORRECTED_GENERATORS.values()))
    generator_tokens = [GENERATOR_PREFIX + c for c in sorted(chars)]
    wyckoff = {(m, letter) for table in tables.multiplicities.values() for letter, m in table.items()}
    wyckoff_tokens = [f"{m}{letter}" for m, letter in sorted(wyckoff, key=lambda x: (x[0], letter_rank(x[1])))]
    element_tokens = [e.symbol for e in sorted(Element, key=lambda e: e.Z)] + ["X"]
    fraction_tokens = [format_fraction(k / 100) for k in range(101)]
    groups: list[tuple[list[str], TokenKind]] = [
        (generator_tokens, "generator"), (wyckoff_tokens, "wyckoff"),
        (element_tokens, "element"), (fraction_tokens, "fraction"),
    ]
    if version == LATEST_VOCAB_VERSION:  # appended: every scope-vocab-1 id stays where it was
        groups.append((list(PLACEHOLDER_TOKENS), "placeholder"))
    for group, kind in groups:
        tokens += group
        kinds += [kind] * len(group)
    if len(set(tokens)) != len(tokens):
        raise TokenizerError("internal error: the SCOPE vocabulary has duplicate tokens")
    return tokens, kinds


class ScopeTokenizer:
    """Maps SCOPE strings to token ids and back with a fixed, versioned vocabulary."""

    def __init__(self, tokens: Sequence[str], kinds: Sequence[TokenKind], version: str = VOCAB_VERSION):
        if len(tokens) != len(kinds):
            raise TokenizerError("tokens and kinds differ in length")
        self.version = version
        self.tokens: tuple[str, ...] = tuple(tokens)
        self.kinds: tuple[TokenKind, ...] = tuple(kinds)
        self._ids = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self._ids[t] for t in SPECIAL_TOKENS)

    @classmethod
    def default(cls) -> ScopeTokenizer:
        """The default vocabulary (:data:`VOCAB_VERSION`, the shipped checkpoint's), built once."""
        return _tokenizer(VOCAB_VERSION)

    @classmethod
    def latest(cls) -> ScopeTokenizer:
        """The newest vocabulary (:data:`LATEST_VOCAB_VERSION`): also reads composition-only rows."""
        return _tokenizer(LATEST_VOCAB_VERSION)

    @classmethod
    def for_version(cls, version: str) -> ScopeTokenizer:
        """The vocabulary of ``version`` (one of :data:`VOCAB_VERSIONS`), built once per process.

        Raises:
            TokenizerError: an unknown version.
        """
        return _tokenizer(version)

    @property
    def vocab_size(self) -> int:
        """Number of tokens, specials included."""
        return len(self.tokens)

    def token_to_id(self, token: str) -> int:
        """Id of ``token``, or ``unk_id``."""
        return self._ids.get(token, self.unk_id)

    def tokenize(self, text: str) -> list[str]:
        """Split a SCOPE string into vocabulary-form tokens (no ``[CLS]``/``[SEP]``).

        Tokens not in the vocabulary are returned as they are (``encode`` maps them to
        ``[UNK]``). Generator characters carry the ``g:`` prefix; a placeholder word
        (``[NOSYM]``, ``[NOWYCK]``) is one token in any part, whatever the version.

        Raises:
            TokenizerError: the string does not have exactly three ``|``-separated parts.
        """
        parts = text.split(SEPARATOR)
        if len(parts) != 3:
            raise TokenizerError(f"a SCOPE string has 3 parts separated by '|', got {len(parts)}: {text[:80]!r}")
        out: list[str] = []
        for word in parts[0].split():
            out += [word] if word in PLACEHOLDER_TOKENS else [GENERATOR_PREFIX + c for c in word]
        out.append(SEPARATOR)
        for word in parts[1].split():
            out += word.split(":", 1) if ":" in word and word not in PLACEHOLDER_TOKENS else [word]
        out.append(SEPARATOR)
        out += parts[2].split()
        return out

    def count_unknown(self, text: str) -> int:
        """Number of tokens of ``text`` that are not in the vocabulary."""
        return sum(t not in self._ids for t in self.tokenize(text))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: ``[CLS]``, the tokens (unknown ones as ``[UNK]``), ``[SEP]``."""
        return [self.cls_id, *(self.token_to_id(t) for t in self.tokenize(text)), self.sep_id]

    def decode(self, ids: Sequence[int]) -> str:
        """The SCOPE string of ``ids``; ``[CLS]``, ``[SEP]`` and ``[PAD]`` are dropped.

        ``decode(encode(s)) == s`` for every well-formed string written with single spaces.

        Raises:
            TokenizerError: an id outside the vocabulary.
        """
        parts: list[list[str]] = [[]]
        skip = {self.cls_id, self.sep_id, self.pad_id}
        previous: TokenKind | None = None
        for raw in ids:
            i = int(raw)
            if not 0 <= i < len(self.tokens):
                raise TokenizerError(f"token id {i} outside the vocabulary (size {self.vocab_size})")
            if i in skip:
                continue
            token, kind = self.tokens[i], self.kinds[i]
            if kind == "separator":
                parts.append([])
            elif kind == "generator":
                parts[-1].append(token[len(GENERATOR_PREFIX):])
            elif kind == "element" and previous == "wyckoff" and len(parts) == 2 and parts[-1]:
                parts[-1][-1] += ":" + token
            else:
                parts[-1].append(token)
            previous = kind
        return " | ".join(" ".join(p) for p in parts)

    def batch_encode(self, strings: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH,
                     *, pad_to_max_length: bool = False) -> TokenBatch:
        """Encode and pad a batch.

        Args:
            strings: B SCOPE strings.
            max_length: longest sequence kept, ``[CLS]`` and ``[SEP]`` included; longer
                ones keep their first ``max_length - 1`` tokens and end with ``[SEP]``.
            pad_to_max_length: pad to ``max_length`` instead of the longest string.

        Returns:
            A :class:`TokenBatch` with ids and mask of shape (B, T),
            T = ``max_length`` or the longest encoded string, whichever is smaller
            (``max_length`` with ``pad_to_max_length``).
        """
        import torch

        if max_length < 2:
            raise TokenizerError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        encoded: list[list[int]] = []
        n_unknown = n_truncated = 0
        for text in strings:
            ids = self.encode(text)
            n_unknown += ids.count(self.unk_id)
            if len(ids) > max_length:
                ids = ids[: max_length - 1] + [self.sep_id]
                n_truncated += 1
            encoded.append(ids)
        width = max_length if pad_to_max_length else max((len(e) for e in encoded), default=0)
        out = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(encoded), width), dtype=torch.bool)  # (B, T)
        for row, ids in enumerate(encoded):
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = True
        if n_unknown:
            logger.warning("%d unknown SCOPE tokens in a batch of %d strings", n_unknown, len(encoded))
        if n_truncated:
            logger.info("%d of %d SCOPE strings truncated to %d tokens", n_truncated, len(encoded), max_length)
        return TokenBatch(out, mask, n_unknown, n_truncated)

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON (``format``, ``version``, ``tokens``)."""
        payload = VocabularyFile(version=self.version, tokens=list(self.tokens))
        Path(path).write_text(payload.model_dump_json(indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ScopeTokenizer:
        """Read a vocabulary saved by :meth:`save`: the tokenizer of the version it names.

        Any version of :data:`VOCAB_VERSIONS` loads (an old checkpoint keeps its
        vocabulary); its tokens must be exactly that version's.

        Raises:
            TokenizerError: unreadable file, an unknown version, or tokens that differ
                from that version's vocabulary (a checkpoint made with another tokenizer).
        """
        try:
            saved = VocabularyFile.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, ValidationError) as exc:
            raise TokenizerError(f"cannot read SCOPE vocabulary {path}: {exc}") from exc
        if saved.version not in VOCAB_VERSIONS:
            raise TokenizerError(
                f"vocabulary {path} is version {saved.version!r}; "
                f"this code reads {list(VOCAB_VERSIONS)}"
            )
        current = _tokenizer(saved.version)
        if tuple(saved.tokens) != current.tokens:
            differ = sum(a != b for a, b in zip(saved.tokens, current.tokens, strict=False))
            differ += abs(len(saved.tokens) - current.vocab_size)
            raise TokenizerError(
                f"vocabulary {path} claims version {saved.version!r} but {differ} of its tokens differ "
                f"from that version's ({len(saved.tokens)} vs {current.vocab_size} tokens)"
            )
        return current


@lru_cache(maxsize=len(VOCAB_VERSIONS))
def _tokenizer(version: str) -> ScopeTokenizer:
    tokens, kinds = _vocabulary(version)
    return ScopeTokenizer(tokens, kinds, version)
