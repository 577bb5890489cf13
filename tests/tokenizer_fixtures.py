"""Small real tokenizers built in code (no hub): trained with the `tokenizers` library on a
multilingual corpus with a vocabulary small enough that CJK, emoji and accented letters span
several tokens, in the three shapes real checkpoints use:

- "gpt2":   byte-level BPE, GPT-2's pre-tokenizer, BOS `</s>` prepended (OPT)
- "llama3": byte-level BPE behind Llama 3's split regex (Qwen2 uses the same scheme)
- "llama2": SentencePiece-style BPE with byte fallback (<0x00>..<0xFF> tokens), `▁` for
            spaces, a leading space stripped on decode, BOS `<s>` prepended

`save_tokenizer(kind, folder, chat_template=...)` writes tokenizer.json and
tokenizer_config.json (what `kvc.tokenizer.load_tokenizer` and transformers' AutoTokenizer
read).
"""
from __future__ import annotations

import functools
import json
import random
from pathlib import Path

WORDS = [
    "the", "cat", "sat", "on", "mat", "hello", "world", "café", "naïve", "résumé", "über",
    "straße", "Ελληνικά", "русский", "язык", "中文", "汉字", "测试", "日本語", "テキスト", "한국어",
    "😀", "🎉", "👍🏽", "👨‍👩‍👧", "€", "—", "…", "ñandú", "Zürich", "São", "Paulo", "🙂", "数据",
    "模型", "生成", "の", "は", "です", "ça", "va", "ü", "ø", "ß", "𝔘𝔫𝔦", "🚀", "✓",
]
# characters the corpus never shows, so every tokenizer splits them into bytes
RARE = "龘鑫쀍𠜎𝄞🦙🧬ꙮ௵ཀ྄ᚠ"

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

SPECIAL = {"gpt2": ["</s>", "<pad>"], "llama3": ["<|begin_of_text|>", "<|eot_id|>"],
           "llama2": ["<unk>", "<s>", "</s>"]}
CHAT_SPECIAL = ["<|im_start|>", "<|im_end|>"]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def random_prompt(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 12)):
        r = rng.random()
        if r < 0.7:
            parts.append(rng.choice(WORDS))
        elif r < 0.85:
            parts.append(rng.choice(RARE))
        elif r < 0.95:
            parts.append(chr(rng.choice([rng.randint(0x4E00, 0x9FFF), rng.randint(0x1F300, 0x1F6FF),
                                         rng.randint(0xC0, 0x17F)])))
        else:
            parts.append(rng.choice([".", ",", "!", "?", "\n", "  ", "'s", "123"]))
    return rng.choice(["", " "]) + rng.choice([" ", "", "\n"]).join(parts)


@functools.cache
def tokenizer_json(kind: str) -> str:
    """tokenizer.json's text for one of the three kinds (trained once per process)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.trainers import BpeTrainer

    special = SPECIAL[kind] + CHAT_SPECIAL
    if kind in ("gpt2", "llama3"):
        tok = Tokenizer(models.BPE())
        if kind == "gpt2":
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = BpeTrainer(vocab_size=420, special_tokens=special,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(corpus(), trainer)
        bos = special[0]
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        trainer = BpeTrainer(vocab_size=300, special_tokens=special, limit_alphabet=40,
                             show_progress=False)
        tok.train_from_iterator(corpus(), trainer)
        # byte fallback: <0x00>..<0xFF> as ordinary vocabulary entries, as Llama 2's has them
        data = json.loads(tok.to_str())
        vocab = data["model"]["vocab"]
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
        data["model"]["byte_fallback"] = True
        tok = Tokenizer.from_str(json.dumps(data))
        bos = "<s>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok.to_str()


def build(kind: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json(kind))


def save_tokenizer(kind: str, folder: Path, chat_template: str | None = None,
                   template_file: bool = False) -> Path:
    """tokenizer.json + tokenizer_config.json in `folder`; the chat template in the config, or
    in chat_template.jinja when `template_file`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tokenizer_json(kind))
    special = SPECIAL[kind]
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special[0] if kind != "llama2" else "<s>",
           "eos_token": special[-1] if kind != "gpt2" else "</s>", "model_max_length": 4096,
           "clean_up_tokenization_spaces": False}
    if chat_template is not None and not template_file:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    if chat_template is not None and template_file:
        (folder / "chat_template.jinja").write_text(chat_template)
    return folder
