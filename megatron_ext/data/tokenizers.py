"""Tokenizers under Megatron-LM's type names, with batch encoding for preprocessing.

``build_tokenizer(tokenizer_type, tokenizer_model)`` returns one of:

``Llama2Tokenizer``
    The legacy Megatron-LM ``_Llama2Tokenizer`` that MaskLLM is built on: every call to
    ``tokenize`` returns ``[bos] + sp.encode(text)`` (``bos=True, eos=False``); ``eod`` is
    the model's EOS. Current Megatron-LM no longer prepends BOS; this class keeps the
    behaviour the MaskLLM checkpoints were trained with.
``SentencePieceTokenizer``
    What current Megatron-LM's ``tools/preprocess_data.py`` builds (megatron-core's
    ``SentencePieceTokenizer`` library, ``legacy=False``): plain ``sp.encode``, no BOS,
    ``eod`` is the model's EOS, ``vocab_size`` the piece count.
    With ``legacy=True`` it is instead the ``_SentencePieceTokenizer`` of
    ``megatron/training/tokenizer/tokenizer.py`` (Megatron-LM's ``--legacy-tokenizer``):
    ``<CLS> <SEP> <EOD> <MASK>`` and the model's pad/bos/eos pieces (``<PAD>`` when the
    model has none) are special tokens, pieces missing from the model get ids after the
    last piece, literal occurrences of them in the text are encoded as their ids, and
    ``eod`` is the id of ``<EOD>``.
``GPTSentencePieceTokenizer``
    Plain ``sp.encode``, no BOS, ``eod`` is EOS (the same in legacy and current Megatron-LM).
``HuggingFaceTokenizer``
    A ``tokenizer.json`` (for example LLaMA-3's BPE) read by the ``tokenizers`` library from a
    local file or directory, no hub access. ``tokenize`` adds the tokenizer's own special
    tokens (its post-processor, e.g. LLaMA-3's ``<|begin_of_text|>``) as Megatron-LM does
    (``tokenizer(text).input_ids``); bos/eos/pad come from ``tokenizer_config.json`` or
    ``special_tokens_map.json`` next to it, and ``eod`` is EOS.

``tokenizer_model`` is a model file or a directory holding ``tokenizer.model``
(SentencePiece types) or ``tokenizer.json`` (HuggingFace). A missing or unreadable model
raises ``TokenizerError`` naming the path, at construction.

Every tokenizer offers ``tokenize``, ``tokenize_batch`` (lists) and ``tokenize_arrays``
(int32 numpy arrays, the preprocessing fast path). The batch calls run in the tokenizer
library's native code without the GIL, so several Python threads can encode at once.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from megatron_ext.errors import InputError

TOKENIZER_TYPES = (
    "Llama2Tokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
)


class TokenizerError(InputError):
    """A tokenizer model that is missing, unreadable or unsuitable (the message names it)."""


def _resolve_model_file(tokenizer_model, file_name: str, type_name: str) -> Path:
    if tokenizer_model is None or str(tokenizer_model) == "":
        raise TokenizerError(f"{type_name} needs a tokenizer model (--tokenizer-model)")
    path = Path(tokenizer_model)
    if path.is_dir():
        inner = path / file_name
        if not inner.is_file():
            raise TokenizerError(f"tokenizer model directory {path} has no {file_name}")
        return inner
    if not path.exists():
        raise TokenizerError(f"tokenizer model not found: {path}")
    if not path.is_file():
        raise TokenizerError(f"tokenizer model is not a regular file: {path}")
    return path


class Tokenizer:
    """The interface every tokenizer here implements."""

    type_name: str = ""
    path: Path
    vocab_size: int
    bos: Optional[int] = None
    eos: Optional[int] = None
    eod: Optional[int] = None
    pad: Optional[int] = None

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text; the same as ``[tokenize(t) for t in texts]``."""
        return [self.tokenize(t) for t in texts]

    def tokenize_arrays(self, texts: Sequence[str], num_threads: int = 1) -> list[np.ndarray]:
        """Like ``tokenize_batch`` but each result is an int32 numpy array."""
        return [np.asarray(ids, dtype=np.int32) for ids in self.tokenize_batch(texts, num_threads)]

    def detokenize(self, ids) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.type_name}({str(self.path)!r}, vocab_size={self.vocab_size})"


def _check_texts(texts: Sequence[str]) -> list[str]:
    texts = list(texts)
    for i, t in enumerate(texts):
        if type(t) is not str:
            raise TypeError(f"text {i} of the batch is {type(t).__name__}, not str")
    return texts


class _SentencePieceBase(Tokenizer):
    """Loads a SentencePiece model and provides the plain batch encoders."""

    def __init__(self, tokenizer_model):
        import sentencepiece

        self.path = _resolve_model_file(tokenizer_model, "tokenizer.model", self.type_name)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with its own text
            raise TokenizerError(f"cannot load SentencePiece model {self.path}: {e}") from None
        if self.sp.get_piece_size() <= 0:
            raise TokenizerError(f"SentencePiece model {self.path} has no pieces")
        self.piece_count = self.sp.get_piece_size()
        # sentencepiece >= 0.2.3 can return each batch item as a numpy buffer, without
        # creating a Python int per token.
        try:
            probe = self.sp.encode(["a"], out_type="numpy")
            self._numpy_out = isinstance(probe[0], np.ndarray)
        except Exception:
            self._numpy_out = False

    def __getstate__(self):  # the processor itself is not picklable; reload from the file
        state = dict(self.__dict__)
        state["sp"] = None
        return state

    def __setstate__(self, state):
        import sentencepiece

        self.__dict__.update(state)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))

    def _encode_lists(self, texts: list[str], num_threads: int) -> list[list[int]]:
        if not texts:
            return []
        return self.sp.encode(texts, out_type=int, num_threads=max(1, int(num_threads)))

    def _encode_arrays(self, texts: list[str], num_threads: int) -> list[np.ndarray]:
        if not texts:
            return []
        if self._numpy_out:
            return self.sp.encode(texts, out_type="numpy", num_threads=max(1, int(num_threads)))
        return [np.asarray(ids, dtype=np.int32) for ids in self._encode_lists(texts, num_threads)]

    def _piece_id(self, method) -> Optional[int]:
        value = method()
        return value if value >= 0 else None


class GPTSentencePieceTokenizer(_SentencePieceBase):
    type_name = "GPTSentencePieceTokenizer"

    def __init__(self, tokenizer_model):
        super().__init__(tokenizer_model)
        self.vocab_size = self.piece_count
        self.bos = self._piece_id(self.sp.bos_id)
        self.eos = self._piece_id(self.sp.eos_id)
        self.pad = self._piece_id(self.sp.pad_id)
        self.eod = self.eos

    def tokenize(self, text: str) -> list[int]:
        return self.sp.encode_as_ids(text)

    def tokenize_batch(self, texts, num_threads=1):
        return self._encode_lists(_check_texts(texts), num_threads)

    def tokenize_arrays(self, texts, num_threads=1):
        return self._encode_arrays(_check_texts(texts), num_threads)

    def detokenize(self, ids) -> str:
        return self.sp.decode_ids([int(i) for i in ids])


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """Legacy Megatron-LM ``_Llama2Tokenizer``: BOS before every tokenized text."""

    type_name = "Llama2Tokenizer"

    def __init__(self, tokenizer_model):
        super().__init__(tokenizer_model)
        if self.bos is None or self.eos is None:
            raise TokenizerError(
                f"Llama2Tokenizer needs a SentencePiece model with BOS and EOS pieces; "
                f"{self.path} has bos_id={self.sp.bos_id()} eos_id={self.sp.eos_id()}"
            )

    def tokenize(self, text: str) -> list[int]:
        return [self.bos] + self.sp.encode_as_ids(text)

    def tokenize_batch(self, texts, num_threads=1):
        return [[self.bos] + ids for ids in self._encode_lists(_check_texts(texts), num_threads)]

    def tokenize_arrays(self, texts, num_threads=1):
        texts = _check_texts(texts)
        if not texts:
            return []
        if self._numpy_out:  # sentencepiece's own add_bos inserts bos_id in front
            return self.sp.encode(
                texts, out_type="numpy", add_bos=True, num_threads=max(1, int(num_threads))
            )
        return [np.asarray(ids, dtype=np.int32) for ids in self.tokenize_batch(texts, num_threads)]


class SentencePieceTokenizer(GPTSentencePieceTokenizer):
    """Megatron-LM's ``SentencePieceTokenizer`` (current by default, ``legacy=True`` for the
    special-token wrapper of ``megatron/training/tokenizer/tokenizer.py``)."""

    type_name = "SentencePieceTokenizer"

    def __init__(self, tokenizer_model, legacy: bool = False):
        super().__init__(tokenizer_model)
        self.legacy = bool(legacy)
        self.special_tokens: dict[str, int] = {}
        self.cls = self.sep = self.mask = None
        if self.legacy:
            self._init_legacy_specials()

    def _init_legacy_specials(self):
        vocab = {self.sp.id_to_piece(i): i for i in range(self.piece_count)}
        next_id = len(vocab)

        def add(token: str) -> int:
            nonlocal next_id
            if token not in vocab:
                vocab[token] = next_id
                next_id += 1
            self.special_tokens[token] = vocab[token]
            return vocab[token]

        def model_piece(piece_id: int, fallback: str) -> str:
            return self.sp.id_to_piece(piece_id) if 0 <= piece_id < self.piece_count else fallback

        self.cls = add("<CLS>")
        self.sep = add("<SEP>")
        self.eod = add("<EOD>")
        self.mask = add("<MASK>")
        self.pad = add(model_piece(self.sp.pad_id(), "<PAD>"))
        self.bos = add(model_piece(self.sp.bos_id(), "<BOS>"))
        self.eos = add(model_piece(self.sp.eos_id(), "<EOS>"))
        self.vocab_size = len(vocab)
        self._id_to_special = {v: k for k, v in self.special_tokens.items()}

    def tokenize(self, text: str) -> list[int]:
        if not self.legacy:
            return self.sp.encode_as_ids(text)
        # Split at the earliest special token (ties go to the first registered one), as the
        # legacy wrapper does, and encode the pieces in between.
        ids: list[int] = []
        idx = 0
        while True:
            best_token, best_pos = None, -1
            for token in self.special_tokens:
                pos = text.find(token, idx)
                if pos >= 0 and (best_token is None or pos < best_pos):
                    best_token, best_pos = token, pos
            if best_token is None:
                break
            ids.extend(self.sp.encode_as_ids(text[idx:best_pos]))
            ids.append(self.special_tokens[best_token])
            idx = best_pos + len(best_token)
        ids.extend(self.sp.encode_as_ids(text[idx:]))
        return ids

    def _has_special(self, text: str) -> bool:
        return any(token in text for token in self.special_tokens)

    def tokenize_batch(self, texts, num_threads=1):
        texts = _check_texts(texts)
        if not self.legacy:
            return self._encode_lists(texts, num_threads)
        out = self._encode_lists(texts, num_threads)
        for i, t in enumerate(texts):
            if self._has_special(t):
                out[i] = self.tokenize(t)
        return out

    def tokenize_arrays(self, texts, num_threads=1):
        texts = _check_texts(texts)
        if not self.legacy:
            return self._encode_arrays(texts, num_threads)
        out = self._encode_arrays(texts, num_threads)
        for i, t in enumerate(texts):
            if self._has_special(t):
                out[i] = np.asarray(self.tokenize(t), dtype=np.int32)
        return out

    def detokenize(self, ids) -> str:
        ids = [int(i) for i in ids]
        if not self.legacy:
            return self.sp.decode_ids(ids)
        text, last = "", 0
        for i, token_id in enumerate(ids):
            if token_id in self._id_to_special:
                text += self.sp.decode_ids(ids[last:i]) + " " + self._id_to_special[token_id] + " "
                last = i + 1
        return text + self.sp.decode_ids(ids[last:])


def _special_token_text(value) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class HuggingFaceTokenizer(Tokenizer):
    """A local ``tokenizer.json`` through the ``tokenizers`` library."""

    type_name = "HuggingFaceTokenizer"

    def __init__(self, tokenizer_model):
        self.path = _resolve_model_file(tokenizer_model, "tokenizer.json", self.type_name)
        self._load()
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        names = self._special_token_names(self.path.parent)
        self.bos = self._token_id(names.get("bos_token"))
        self.eos = self._token_id(names.get("eos_token"))
        self.pad = self._token_id(names.get("pad_token"))
        self.eod = self.eos

    def _load(self):
        from tokenizers import Tokenizer as _HFTokenizer

        try:
            self.tok = _HFTokenizer.from_file(str(self.path))
        except Exception as e:
            raise TokenizerError(f"cannot load tokenizer.json {self.path}: {e}") from None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["tok"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()

    def _special_token_names(self, directory: Path) -> dict:
        names: dict = {}
        for file_name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = directory / file_name
            if not f.is_file():
                continue
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise TokenizerError(f"cannot read {f}: {e}") from None
            for key in ("bos_token", "eos_token", "pad_token"):
                text = _special_token_text(data.get(key))
                if text is not None:
                    names[key] = text  # tokenizer_config.json (read last) wins
        return names

    def _token_id(self, text: Optional[str]) -> Optional[int]:
        if text is None:
            return None
        token_id = self.tok.token_to_id(text)
        if token_id is None:
            raise TokenizerError(f"special token {text!r} named next to {self.path} is not in its vocabulary")
        return token_id

    def tokenize(self, text: str) -> list[int]:
        if type(text) is not str:
            raise TypeError(f"text is {type(text).__name__}, not str")
        return self.tok.encode(text, add_special_tokens=True).ids

    def tokenize_batch(self, texts, num_threads=1):
        texts = _check_texts(texts)
        if not texts:
            return []
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=True)]

    def detokenize(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def build_tokenizer(tokenizer_type: str, tokenizer_model, *, legacy: bool = False) -> Tokenizer:
    """The tokenizer Megatron-LM builds for ``--tokenizer-type`` / ``--tokenizer-model``.

    ``legacy`` selects the ``megatron/training`` wrapper for ``SentencePieceTokenizer``
    (Megatron-LM's ``--legacy-tokenizer``); the other types ignore it (``Llama2Tokenizer``
    is always the legacy BOS-prepending one).
    """
    if tokenizer_type == "Llama2Tokenizer":
        return Llama2Tokenizer(tokenizer_model)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model, legacy=legacy)
    if tokenizer_type == "GPTSentencePieceTokenizer":
        return GPTSentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    raise TokenizerError(
        f"unsupported tokenizer type {tokenizer_type!r}; supported: {', '.join(TOKENIZER_TYPES)}"
    )
