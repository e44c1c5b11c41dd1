"""Tokenizers (paper App. C: the encoder is Qwen3-Embedding and the demasker LLaDA, each with its own tokenizer;
in tiny mode one byte-level BPE trained on the corpus serves both). `TextTokenizer` wraps a `tokenizers`
tokenizer and finds its roles (BOS, EOS, PAD, MASK) under the names public tokenizers use; dataprep/data.py and the
cross-tokenizer view (dataprep/cross_tokenizer.py) build on it.
"""

import hashlib
from pathlib import Path


SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>"]  # ids 0, 1, 2, 3 in a BPE we train


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------

class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the special ids the models need (None where it has none).

    Ours (train_tokenizer): <|bos|>=0, <|eos|>=1, <|pad|>=2, <|mask|>=3.
    LLaDA:  BOS <|startoftext|>=126080, EOS = PAD <|endoftext|>=126081, MASK <|mdm_mask|>=126336.
    Qwen3:  no BOS, EOS = PAD <|endoftext|>=151643 (its post-processor appends it; we encode without
            specials and append it ourselves), no mask token (mask_id None: the encoder hides masked
            positions with an attention mask instead of reading a [M] token, see encoder.py).
    Public tokenizers pad with EOS; only ours has a separate <|pad|>.
    """

    ROLE_TOKENS = {"bos": ("<|bos|>", "<|startoftext|>"), "eos": ("<|eos|>", "<|endoftext|>"),
                   "mask": ("<|mask|>", "<|mdm_mask|>")}

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

        def find(names):
            return next((tokenizer.token_to_id(n) for n in names if tokenizer.token_to_id(n) is not None), None)

        self.bos_id, self.eos_id, self.mask_id = (find(self.ROLE_TOKENS[r]) for r in ("bos", "eos", "mask"))
        if self.eos_id is None:
            raise ValueError("tokenizer has no EOS token (<|eos|> or <|endoftext|>); it cannot end programs")
        ours = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
        self.pad_id = 2 if ours else self.eos_id

    @property
    def vocab_size(self):
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def special_ids(self):
        return {"vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "mask_id": self.mask_id}

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        """`tokenizers.Encoding`s (ids and character offsets), no special tokens added."""
        return self.tokenizer.encode_batch(list(texts), add_special_tokens=False)

    def decode(self, ids):
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path):
        self.tokenizer.save(str(path))


def train_tokenizer(texts, vocab_size=4096):
    """Byte-level BPE on `texts`: every byte is a token, so any text encodes and decodes losslessly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tokenizer)


def load_tokenizer(name_or_path):
    """A tokenizer.json file, a folder holding one, or a hub id such as GSAI-ML/LLaDA-8B-Base."""
    from tokenizers import Tokenizer

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        if path.exists() or Path(name_or_path).is_dir() or str(name_or_path).count("/") != 1:
            raise FileNotFoundError(f"no tokenizer.json at {name_or_path}; pass a tokenizer.json, a folder "
                                    f"holding one, or a hub id like Qwen/Qwen3-Embedding-0.6B")
        from huggingface_hub import hf_hub_download
        try:
            path = Path(hf_hub_download(str(name_or_path), "tokenizer.json"))
        except Exception as error:
            raise FileNotFoundError(f"could not download tokenizer.json of {name_or_path!r} ({error}); "
                                    f"offline, pass the path of a local tokenizer.json instead") from error
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the library's own parse error names neither the file nor the fix
        raise ValueError(f"{path} is not a readable tokenizer.json ({error}); rebuild the data cache (dataprep/data.py "
                         f"--force) or copy the tokenizer.json of the run again") from None
    return TextTokenizer(tokenizer)


def tokenizer_key(name_or_path):
    """What identifies a tokenizer in meta.json: its file's hash if local, else the hub id."""
    path = Path(name_or_path).expanduser()
    path = path / "tokenizer.json" if path.is_dir() else path
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else str(name_or_path)


