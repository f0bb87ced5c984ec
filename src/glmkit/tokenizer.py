"""Tokenizers for every GLM generation, chosen from the checkpoint's files (never from its name).

- ChatGLM-6B v1: SentencePiece `ice_text.model` with its text pre-processing (newline, tab, blank runs);
- ChatGLM2/3: SentencePiece `tokenizer.model` with the special ids appended after its vocabulary;
- GLM-4: the tiktoken-format `tokenizer.model` (base64 token and rank per line) plus specials from 151329;
- anything with a `tokenizer.json`, through the `tokenizers` library.
`encode(text)` never turns text into special tokens unless `allow_special=True`. No torch, no model.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from glmkit.errors import CheckpointError, GlmkitError, read_utf8


class Tokenizer(ABC):
    """`special` maps each special token's text to its id."""

    special: dict[str, int]
    kind: str

    @abstractmethod
    def encode(self, text: str, allow_special: bool = False) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int], skip_special: bool = False) -> str: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    def encode_prompt(self, text: str) -> list[int]:
        """Plain text as a prompt: the tokenizer's own special tokens around it (e.g. a Llama BOS), if any."""
        return self.encode(text)

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes as it appears in decoded text, for constrained decoding; special tokens get a b"\\xff"
        prefix (no UTF-8 text starts with that byte, so no grammar can produce them: llguidance's convention)."""
        raise NotImplementedError

    def token_id(self, text: str) -> int:
        """Id of a special token by its text, e.g. '<|user|>'."""
        if text not in self.special:
            raise GlmkitError(f"this tokenizer has no special token {text!r}.")
        return self.special[text]

    def _split_special(self, text: str) -> list[str]:
        """Split text around special-token texts (longest first), keeping them as separate items.

        Specials spelled as plain words (ChatGLM2/3's 'sop', 'eop') are never matched inside text."""
        marked = sorted((s for s in self.special if not s.isalnum()), key=len, reverse=True)
        if not marked:
            return [text]
        return [part for part in re.split("(" + "|".join(map(re.escape, marked)) + ")", text) if part]


class SentencePieceTokenizer(Tokenizer):
    """ChatGLM2/3 (and plain SentencePiece models): specials are ids appended after the SP vocabulary."""

    kind = "sentencepiece"
    CHATGLM_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                        "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]

    def __init__(self, path: Path | None, appended: list[str], *, model_proto: bytes | None = None):
        import sentencepiece

        self.sp = (sentencepiece.SentencePieceProcessor(model_proto=model_proto) if model_proto is not None
                   else sentencepiece.SentencePieceProcessor(model_file=str(path)))
        n = self.sp.vocab_size()
        self.special = {text: n + i for i, text in enumerate(appended)}
        self._by_id = {i: t for t, i in self.special.items()}
        self.eos_id, self.bos_id = self.sp.eos_id(), self.sp.bos_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size() + len(self.special)

    def token_bytes(self) -> list[bytes]:
        return [_sp_piece_bytes(self.sp, i) for i in range(self.sp.vocab_size())] + \
            [SPECIAL_MARK + t.encode() for t in self.special]

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return self.sp.encode(text)
        return [i for part in self._split_special(text)
                for i in ([self.special[part]] if part in self.special else self.sp.encode(part))]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        text, run = [], []
        for i in ids:
            if i in self._by_id:
                text.append(self.sp.decode(run))
                run = []
                if not skip_special:
                    text.append(self._by_id[i])
            else:
                run.append(i)
        text.append(self.sp.decode(run))
        return "".join(text)


class ChatGLM1Tokenizer(Tokenizer):
    """ChatGLM-6B's `ice_text.model`: specials live inside the SentencePiece vocabulary, and text is
    pre-processed (newline -> <n>, tab -> <|tab|>, runs of 2-80 spaces -> <|blank_N|>)."""

    kind = "chatglm1"
    SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]

    def __init__(self, path: Path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.special = {t: self.sp.piece_to_id(t) for t in self.SPECIALS if self.sp.piece_to_id(t) != self.sp.unk_id()}
        self._newline = self.sp.piece_to_id("<n>")

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def token_bytes(self) -> list[bytes]:
        special = set(self.special.values())
        return [SPECIAL_MARK + self.sp.id_to_piece(i).encode() if i in special
                else self.postprocess(_sp_piece_bytes(self.sp, i).decode("utf-8", "surrogateescape")).encode(
                    "utf-8", "surrogateescape") for i in range(self.sp.vocab_size())]

    @staticmethod
    def preprocess(text: str) -> str:
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        return re.sub(r" {2,80}", lambda m: f"<|blank_{len(m.group())}|>", text)

    @staticmethod
    def postprocess(text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        return re.sub(r"<\|blank_(\d+)\|>", lambda m: " " * int(m.group(1)), text)

    def _encode_piece(self, text: str, first: bool) -> list[int]:
        if first:
            return self.sp.encode(self.preprocess(text))
        # no dummy-prefix space mid-text: the official trick encodes "<n>" + text and drops ["▁", "<n>"]
        ids = self.sp.encode("<n>" + self.preprocess(text))
        return ids[ids.index(self._newline) + 1:]

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        ids: list[int] = []
        for part in self._split_special(text):
            if part in self.special and allow_special:
                ids.append(self.special[part])
            elif part in self.special:  # keep it plain text: encode "[" and "gMASK]" apart so no piece matches
                ids += self._encode_piece(part[:1], not ids) + self._encode_piece(part[1:], False)
            else:
                ids += self._encode_piece(part, not ids)
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        if skip_special:
            ids = [i for i in ids if i not in self.special.values()]
        return self.postprocess(self.sp.decode(ids))


# GLM-4's pre-tokenizer pattern and special tokens (appended in this order after the ranks)
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>"]


class TiktokenTokenizer(Tokenizer):
    """GLM-4-9B: byte-level BPE from a tiktoken rank file."""

    kind = "tiktoken"

    def __init__(self, path: Path):
        import tiktoken

        ranks = {}
        for n, line in enumerate(read_utf8(path, "tokenizer").splitlines(), 1):
            if line.strip():
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
                except ValueError:
                    raise CheckpointError(f"{path}:{n} is not a 'base64 rank' line; the file is corrupt.") from None
        self.special = {t: len(ranks) + i for i, t in enumerate(GLM4_SPECIALS)}
        self.enc = tiktoken.Encoding("glm4", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens=self.special)

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def token_bytes(self) -> list[bytes]:
        n = self.enc.n_vocab - len(self.special)
        return [self.enc.decode_single_token_bytes(i) for i in range(n)] + \
            [SPECIAL_MARK + t.encode() for t in self.special]

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        if skip_special:
            ids = [i for i in ids if i < self.enc.n_vocab - len(self.special)]
        return self.enc.decode(ids, errors="replace")


class HFTokenizer(Tokenizer):
    """Any `tokenizer.json` (transformers-native GLM-4, GLM-4-0414, Llama, SmolLM2) via `tokenizers`."""

    kind = "tokenizers"

    def __init__(self, path: Path | None = None, *, built=None):
        """From a tokenizer.json, or from a `tokenizers.Tokenizer` already built (GGUF vocabularies)."""
        from tokenizers import Tokenizer as _Tok

        try:
            self.tok = built if built is not None else _Tok.from_str(Path(path).read_text(encoding="utf-8"))
        except Exception as e:  # the Rust side raises a plain Exception
            raise CheckpointError(f"{path} cannot be read as a tokenizer.json ({e}); re-download it.") from None
        self._mode = threading.Lock()  # encode_special_tokens is per tokenizer: set and encode under one lock
        self.special = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_bytes(self) -> list[bytes]:
        """Byte-level vocabularies (GPT-2's byte-to-character table) or SentencePiece-style ones (▁ for a space,
        <0xNN> byte pieces), as the tokenizer's decoder says."""
        byte_level = "ByteLevel" in json.dumps(json.loads(self.tok.to_str()).get("decoder"))
        table = {c: b for b, c in _gpt2_bytes().items()}
        out = [b""] * self.vocab_size
        special = set(self.special.values())
        for piece, i in self.tok.get_vocab(with_added_tokens=True).items():
            if i in special:
                out[i] = SPECIAL_MARK + piece.encode()
            elif byte_level:
                out[i] = bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode()
            else:
                out[i] = _byte_piece(piece) or piece.replace("\u2581", " ").encode()
        return out

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return self._encode(text, allow_special, add_special_tokens=False)

    def encode_prompt(self, text: str) -> list[int]:
        return self._encode(text, False, add_special_tokens=True)  # the post-processor's BOS, if any

    def _encode(self, text: str, allow_special: bool, add_special_tokens: bool) -> list[int]:
        """One Rust tokenizer for both modes (a second copy costs ~20 MB for a 150k vocabulary): without
        allow_special, special-token text is encoded as plain text."""
        with self._mode:
            self.tok.encode_special_tokens = not allow_special
            return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)


SPECIAL_MARK = b"\xff"


def _byte_piece(piece: str) -> bytes | None:
    """SentencePiece's byte-fallback pieces, '<0x0A>' -> b'\\n'."""
    return bytes([int(piece[3:5], 16)]) if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece) else None


def _sp_piece_bytes(sp, i: int) -> bytes:
    piece = sp.id_to_piece(i)
    if sp.is_control(i) or sp.is_unknown(i):
        return SPECIAL_MARK + piece.encode()
    return (sp.is_byte(i) and _byte_piece(piece)) or piece.replace("\u2581", " ").encode()


def _gpt2_bytes() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return chars


def load_tokenizer(directory: str | Path, thudm: bool | None = None) -> Tokenizer | None:
    """Pick the tokenizer from the files present; None if the directory ships no tokenizer. thudm: the
    checkpoint is in THUDM's layout (ChatGLM2/3's SentencePiece model then gets its specials appended);
    None reads that from the directory's config.json."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer(directory / "tokenizer.json")
    if (directory / "ice_text.model").is_file():
        return ChatGLM1Tokenizer(directory / "ice_text.model")
    model = directory / "tokenizer.model"
    if model.is_file():
        head = model.read_bytes()[:256]
        if re.match(rb"^[A-Za-z0-9+/=]+ \d+\r?\n", head):
            return TiktokenTokenizer(model)
        thudm = _is_thudm(directory) if thudm is None else thudm
        return SentencePieceTokenizer(model, SentencePieceTokenizer.CHATGLM_SPECIALS if thudm else [])
    return None


def _is_thudm(directory: Path) -> bool:
    """ChatGLM2/3 configs come from THUDM's remote code (config.hf_spelling, the one rule for it)."""
    from glmkit.config import hf_spelling

    try:
        raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and (hf_spelling(raw) or "").startswith("thudm")


def gguf_tokenizer(reader) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata: BPE with merges ('gpt2', via `tokenizers`) or a
    SentencePiece vocabulary ('llama'; ChatGLM3's with its specials appended), rebuilt as a SentencePiece model."""
    from tokenizers import AddedToken, Regex, Tokenizer as _Tok, decoders, models, pre_tokenizers, processors

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    kind = field("tokenizer.ggml.model")
    if kind == "llama":
        return _gguf_sentencepiece(field)
    if kind != "gpt2":
        raise CheckpointError(f"this GGUF's tokenizer is of type {kind!r}; glmkit reads 'gpt2' (BPE with merges) "
                              "and 'llama' (SentencePiece) GGUF tokenizers.")
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type", [])
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
    tok = _Tok(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(field("tokenizer.ggml.add_space_prefix", False)),
                                          use_regex=True)
    pre = field("tokenizer.ggml.pre")  # llama.cpp's name for the pre-tokenizer
    if pre in ("smollm", "deepseek-coder", "starcoder"):  # digits one by one, then the GPT-2 regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("chatglm-bpe", "glm4"):  # GLM-4's own split pattern
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    bos = field("tokenizer.ggml.bos_token_id")
    if field("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                          special_tokens=[(tokens[bos], int(bos))])
    return HFTokenizer(built=tok)


def _gguf_sentencepiece(field) -> SentencePieceTokenizer:
    """Rebuild a SentencePiece BPE model from GGUF pieces, scores and types (llama.cpp's 'llama' vocabulary).

    ChatGLM3 files (pre-tokenizer 'chatglm-spm') list the SentencePiece pieces, then [MASK] ... <|observation|>,
    then padding: the pieces become the model and the rest the appended specials, as in ChatGLM's tokenizer."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens, scores = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores")
    types = field("tokenizer.ggml.token_type")
    chatglm = field("tokenizer.ggml.pre") == "chatglm-spm" and "[MASK]" in tokens
    n = tokens.index("[MASK]") if chatglm else len(tokens)
    kinds = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
             3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
             5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = n
    proto.trainer_spec.byte_fallback = 6 in types[:n]
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(field("tokenizer.ggml.add_space_prefix", True))
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for i in range(n):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = tokens[i], float(scores[i]), kinds.get(int(types[i]), kinds[1])
    for key, name in (("unknown", "unk_id"), ("bos", "bos_id"), ("eos", "eos_id")):
        value = field(f"tokenizer.ggml.{key}_token_id")
        setattr(proto.trainer_spec, name, -1 if value is None or value >= n else int(value))
    appended = list(tokens[n: n + len(SentencePieceTokenizer.CHATGLM_SPECIALS)]) if chatglm else []
    return SentencePieceTokenizer(None, appended, model_proto=proto.SerializeToString())
