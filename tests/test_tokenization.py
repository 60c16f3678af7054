"""OnePeaceTokenizer against the reference token ids and an independent plain-Python GPT-2 BPE + fairseq dictionary."""

import json
from pathlib import Path

import pytest
import regex
from safetensors.torch import load_file

from onepeace_hf.tokenization_onepeace import ORIGINAL_BPE_DIR, OnePeaceTokenizer


REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"
REFERENCE_TEXTS = ["cow", "dog", "elephant", "a photo of a dog playing in the snow"]
TRICKY_TEXTS = [
    " dog",
    "  two leading spaces",
    "trailing space ",
    "Hello World!",
    "don't STOP, it's fine",
    "naïve café crème brûlée",
    "日本語のテキスト",
    "emoji 🐶🐘 and ☃",
    "tabs\tand\nnew lines\r\n",
    "ΟΔΟΣ ΣΟΦΟΣ Σ",
    "ΟΔΥΣΣΕ\u0301Σ ΚΑΙ",  # final sigma after a combining accent (decomposed Greek)
    "A:Σ, Α\u200bΣ and Α'Σ",  # ... after a colon, a zero-width space, an apostrophe
    "İstanbul ẞtraße",
    "numbers 12345 and 3.14, 1,000,000",
    "literal </s> and <pad> text",
    "<|endoftext|>",
]


class PlainGPT2BPE:
    """Independent oracle: the GPT-2 byte-level BPE algorithm, then the fairseq dictionary, in plain Python."""

    PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, bpe_dir: Path):
        self.encoder = json.loads((bpe_dir / "encoder.json").read_text(encoding="utf-8"))
        merge_lines = (bpe_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
        self.ranks = {tuple(line.split()): rank for rank, line in enumerate(line for line in merge_lines if line)}
        symbols = [line.split()[0] for line in (bpe_dir / "dict.txt").read_text(encoding="utf-8").splitlines()]
        self.fairseq_ids = {symbol: 4 + index for index, symbol in enumerate(symbols)}
        # GPT-2's reversible byte -> printable character table.
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
        printable += range(ord("®"), ord("ÿ") + 1)
        others = [b for b in range(256) if b not in printable]
        self.byte_to_char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}

    def merge(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = list(zip(parts, parts[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str, max_tokens: int = 70) -> list[int]:
        ids = []
        for piece in self.PATTERN.findall(" " + text.lower()):
            word = "".join(self.byte_to_char[b] for b in piece.encode("utf-8"))
            ids += [self.fairseq_ids.get(str(self.encoder[token]), 3) for token in self.merge(word)]
        return ids[:max_tokens] + [2]


@pytest.fixture(scope="module")
def tokenizer():
    return OnePeaceTokenizer()


@pytest.fixture(scope="module")
def oracle():
    return PlainGPT2BPE(REFERENCE / "bpe")


@pytest.fixture(scope="module")
def reference_ids():
    return load_file(REFERENCE / "expected_tiny_pretrain.safetensors")["inputs.src_tokens"]


def test_reference_token_ids(tokenizer, reference_ids):
    batch = tokenizer(REFERENCE_TEXTS, padding=True, return_tensors="pt")
    assert batch["input_ids"].dtype == reference_ids.dtype
    assert batch["input_ids"].tolist() == reference_ids.tolist()
    assert batch["attention_mask"].tolist() == (reference_ids != 1).long().tolist()


def test_oracle_reproduces_reference(oracle, reference_ids):
    for text, row in zip(REFERENCE_TEXTS, reference_ids.tolist()):
        assert oracle.encode(text) == [i for i in row if i != 1]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_matches_independent_bpe(tokenizer, oracle, text):
    assert tokenizer(text)["input_ids"] == oracle.encode(text)


def test_exactly_one_extra_leading_space(tokenizer):
    assert tokenizer.tokenize("dog") == ["Ġdog"]
    assert tokenizer.tokenize(" dog") == ["Ġ", "Ġdog"]
    assert tokenizer(" dog")["input_ids"] != tokenizer("dog")["input_ids"]


def test_truncation_on_by_default(tokenizer, oracle):
    text = " ".join(f"word{i}" for i in range(60))  # well over 70 BPE tokens
    full = oracle.encode(text, max_tokens=10_000)
    assert len(full) > 100
    assert tokenizer.model_max_length == 71
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == 71 and ids == full[:70] + [2]
    assert tokenizer.encode(text) == ids
    assert tokenizer(text, truncation=False)["input_ids"] == full


def test_pad_to_multiple_of_pads_after_the_default_truncation(tokenizer, oracle):
    """71 is no multiple of anything: the texts are cut to it, then padded up to the multiple."""
    long_text = " ".join(["long"] * 100)
    batch = tokenizer(["a cow", long_text], padding=True, pad_to_multiple_of=8)["input_ids"]
    assert batch == [oracle.encode("a cow") + [1] * (72 - len(oracle.encode("a cow"))), oracle.encode(long_text) + [1]]
    assert len(tokenizer(["a cow"], padding=True, pad_to_multiple_of=8)["input_ids"][0]) == 8
    with pytest.raises(ValueError, match="not a multiple of pad_to_multiple_of"):  # asked for 71 and for 8s
        tokenizer(["a cow"], padding="max_length", pad_to_multiple_of=8)


@pytest.mark.parametrize("text", ["Naïve Café, 日本語 🐶!", " leading space", "ΟΔΟΣ", "tabs\tand\nlines"])
def test_decode_round_trip(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.lower()


def test_vocabulary_and_special_tokens(tokenizer):
    assert len(tokenizer) == 50264
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0, 1, 2, 3,
    )
    assert tokenizer.convert_ids_to_tokens([50261, 50262, 50263]) == [f"madeupword000{i}" for i in range(3)]
    assert tokenizer.padding_side == "right"


def test_packaged_files_are_the_original_ones(tokenizer):
    for name in ("encoder.json", "vocab.bpe", "dict.txt"):
        assert (ORIGINAL_BPE_DIR / name).read_bytes() == (REFERENCE / "bpe" / name).read_bytes()
    from_reference = OnePeaceTokenizer.from_original_bpe(REFERENCE / "bpe")
    assert from_reference(TRICKY_TEXTS)["input_ids"] == tokenizer(TRICKY_TEXTS)["input_ids"]


def test_save_vocabulary_writes_a_loadable_bpe(tokenizer, tmp_path):
    vocab_file, merges_file = tokenizer.save_vocabulary(str(tmp_path), "onepeace")
    assert Path(vocab_file).name == "onepeace-vocab.json" and Path(merges_file).name == "onepeace-merges.txt"
    vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    assert vocab == tokenizer.get_vocab()
    merges = [tuple(line.split(" ")) for line in Path(merges_file).read_text(encoding="utf-8").splitlines()[1:]]
    rebuilt = OnePeaceTokenizer(vocab=vocab, merges=merges)
    assert rebuilt(TRICKY_TEXTS)["input_ids"] == tokenizer(TRICKY_TEXTS)["input_ids"]


def test_save_and_load(tokenizer, tmp_path, reference_ids):
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    reloaded = OnePeaceTokenizer.from_pretrained(tmp_path)
    assert reloaded.model_max_length == 71
    texts = TRICKY_TEXTS + [" ".join(["long"] * 100)]
    assert reloaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert reloaded(REFERENCE_TEXTS, padding=True, return_tensors="pt")["input_ids"].tolist() == reference_ids.tolist()
