"""Tokenizer for ONE-PEACE.

ONE-PEACE encodes text with the GPT-2 byte-level BPE and then maps every BPE id through a fairseq dictionary
(`dict.txt`) to the id the model was trained on. Here both steps are folded into one `tokenizers` BPE model whose
vocabulary maps each GPT-2 token string straight to its fairseq id, so the whole pipeline runs in Rust.
"""

import json
import os
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from .remote_code import SavesWithoutDanglingAutoMap


# The three files of the original repository (`one_peace/utils/BPE`), shipped unmodified with the package.
ORIGINAL_BPE_DIR = Path(__file__).resolve().parent / "tokenizer_files"

# fairseq's Dictionary reserves the first four ids; the lines of dict.txt follow from id 4 on.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")

# The original keeps the first 70 BPE tokens and then appends </s>.
MAX_TEXT_TOKENS = 70

# A capital sigma that Python's str.lower() makes final ("ς"): after a cased letter and before none, with
# case-ignorable characters (accents, ':', "'") skipped on both sides.
FINAL_SIGMA = r"(?<=\p{Cased}\p{Case_Ignorable}*)Σ(?!\p{Case_Ignorable}*\p{Cased})"

# One call's truncation and padding, which the Rust tokenizer keeps and `save_pretrained` writes out; read back, they
# would become fixed defaults of every later call (a processor would ignore `model_max_length`).
CALL_STATE_KWARGS = (
    "_json_truncation", "_json_padding", "tokenizer_truncation", "tokenizer_padding",
    "max_length", "stride", "truncation_strategy", "pad_to_multiple_of",
)


def load_original_bpe(directory: str | os.PathLike | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """
    Read `encoder.json`, `vocab.bpe` and `dict.txt` and return `(vocab, merges)` with vocab ids in fairseq numbering.

    fairseq id = 4 + line index in dict.txt of the decimal GPT-2 id; lines that are not GPT-2 ids (the
    `madeupword000N` fillers) keep their own text as token.
    """
    directory = Path(directory) if directory is not None else ORIGINAL_BPE_DIR
    with open(directory / "encoder.json", encoding="utf-8") as f:
        gpt2_id_to_token = {str(gpt2_id): token for token, gpt2_id in json.load(f).items()}

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    with open(directory / "dict.txt", encoding="utf-8") as f:
        for line_index, line in enumerate(f):
            symbol = line.rsplit(" ", 1)[0]
            vocab[gpt2_id_to_token.get(symbol, symbol)] = len(SPECIAL_TOKENS) + line_index
    missing = set(gpt2_id_to_token.values()) - vocab.keys()
    if missing:
        # tokenizers' BPE needs every merge result in the vocabulary; fairseq would map these to <unk>.
        raise ValueError(f"{len(missing)} GPT-2 tokens of encoder.json are missing from dict.txt in {directory}")

    with open(directory / "vocab.bpe", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return vocab, merges


class OnePeaceTokenizer(SavesWithoutDanglingAutoMap, TokenizersBackend):
    """
    Fast (Rust-backed) ONE-PEACE tokenizer: `" " + text.lower()`, GPT-2 byte-level BPE, ids in fairseq numbering,
    `</s>` appended (no BOS: the model prepends a learned CLS embedding itself), `<pad>` = 1, right padding.
    `do_lower_case=False` keeps the case: the original lowercased every task's text except audio question answering.

    With no arguments it is built from the original BPE files shipped in the package; `save_pretrained` writes a
    `tokenizer.json` that `from_pretrained` reads back.

    Truncation is on by default: `model_max_length` is 71 (70 BPE tokens + `</s>`, the original's limit) and a call
    without `truncation=` truncates to it. Pass `truncation=False` to get the full sequence. With `pad_to_multiple_of`
    the batch is cut to `model_max_length` first and then padded up to the multiple (72 for 8).

    Known difference: the empty string encodes to `[</s>]`, while the original encodes `" "` to `[Ġ, </s>]`
    (`tokenizers` never runs a normalizer on an empty input).
    """

    vocab_files_names = {"tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]
    model = BPE

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: list[tuple[str, str]] | None = None,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: str = "<pad>",
        do_lower_case: bool = True,
        **kwargs,
    ):
        for key in CALL_STATE_KWARGS:
            kwargs.pop(key, None)
        if vocab is None and merges is None:
            vocab, merges = load_original_bpe()
        elif vocab is None or merges is None:
            raise ValueError("Pass both `vocab` and `merges`, or neither to use the packaged ONE-PEACE BPE files.")

        self._tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=str(unk_token), fuse_unk=False))
        # Python's str.lower() turns a word-final capital sigma into "ς"; the Rust Lowercase is per character.
        lowercase = [normalizers.Replace(Regex(FINAL_SIGMA), "ς"), normalizers.Lowercase()] if do_lower_case else []
        # Always one extra space, even before a leading space (ByteLevel's add_prefix_space would skip it).
        self._tokenizer.normalizer = normalizers.Sequence([*lowercase, normalizers.Prepend(" ")])
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        # Drop the space the normalizer added, so decoding gives back the lowercased text.
        self._tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])

        kwargs.setdefault("model_max_length", MAX_TEXT_TOKENS + 1)
        kwargs.setdefault("padding_side", "right")
        kwargs.setdefault("add_bos_token", False)
        kwargs.setdefault("add_eos_token", True)  # post-processor "$A </s>"
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        # The original BPE-encodes "</s>" typed in a text as ordinary characters.
        kwargs.setdefault("split_special_tokens", True)
        super().__init__(
            bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
            do_lower_case=do_lower_case, **kwargs,
        )
        self.do_lower_case = do_lower_case

    @classmethod
    def from_original_bpe(cls, directory: str | os.PathLike | None = None, **kwargs) -> "OnePeaceTokenizer":
        """Build the tokenizer from a directory holding the original `encoder.json`, `vocab.bpe` and `dict.txt`."""
        vocab, merges = load_original_bpe(directory)
        return cls(vocab=vocab, merges=merges, **kwargs)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """The BPE's `vocab.json` (token -> fairseq id) and `merges.txt`, as GPT-2's fast tokenizer writes them."""
        return tuple(self._tokenizer.model.save(str(save_directory), filename_prefix))

    def _get_padding_truncation_strategies(
        self, padding=False, truncation=None, max_length=None, pad_to_multiple_of=None, **kwargs
    ):
        """Treat an unspecified `truncation` as `True`, so texts are cut to `model_max_length` like the original."""
        pads_to_longest = padding is True or padding == PaddingStrategy.LONGEST
        if truncation in (None, True) and pad_to_multiple_of and max_length is None and pads_to_longest:
            # Cut to model_max_length (71, no multiple of anything), then pad the longest text up to the multiple:
            # transformers refuses truncation to a length that is not a multiple, which only padding to it needs.
            padding, _, _, kwargs = super()._get_padding_truncation_strategies(
                padding=padding, truncation=False, pad_to_multiple_of=pad_to_multiple_of, **kwargs
            )
            return padding, TruncationStrategy.LONGEST_FIRST, self.model_max_length, kwargs
        if truncation is None:
            truncation = True
        return super()._get_padding_truncation_strategies(
            padding=padding, truncation=truncation, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of,
            **kwargs,
        )


__all__ = ["OnePeaceTokenizer", "load_original_bpe"]
