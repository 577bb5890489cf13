"""A tiny random OPT checkpoint with a real tokenizer (a byte-level BPE trained here, saved as
tokenizer.json), compiled for prompts of any length up to a few hundred tokens: what the text
API, the CLI and JSONL jobs are tested against."""
from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "the cat sat on the mat", "a dog ran in the park", "kv caches live on the cpu",
    "café crème brûlée naïve façade", "日本語のテキストも少し", "emoji 🙂 and ✓ marks",
    "stop here. then more text follows", "numbers 0 1 2 3 4 5 6 7 8 9",
] * 10
TOKENIZER_VOCAB = 300
MAX_POSITIONS = 512
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_tokenizer(folder: Path, chat_template: str | None = CHATML) -> Path:
    """A byte-level BPE (GPT-2's scheme: multi-byte characters span several tokens), and a
    tokenizer_config.json with a ChatML template (None: no template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["[UNK]", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "eos_token": "</s>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tokenizer_vocab() -> int:
    import tempfile

    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as d:
        return Tokenizer.from_file(str(write_tokenizer(Path(d)) / "tokenizer.json")).get_vocab_size()


def text_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A random OPT (2 layers, width 64, the tokenizer's vocabulary: every id it emits has a
    text) that takes 512 positions, with the tokenizer above."""
    import transformers
    from hf_fixtures import random_hf_model, save_checkpoint

    cfg = transformers.OPTConfig(vocab_size=tokenizer_vocab(), hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, ffn_dim=128, do_layer_norm_before=True,
                                 max_position_embeddings=MAX_POSITIONS, init_std=0.15)
    return write_tokenizer(save_checkpoint(random_hf_model(cfg, seed), folder))


def compile_text_artifact(root: Path, batch_size: int = 4, prompt_len: int = 300,
                          gen_len: int = 8, overrides: tuple = ()) -> Path:
    """The checkpoint compiled for rows of up to prompt_len + gen_len tokens (its plan covers
    every context 1..max_context), with a fixed recompute fraction so that every decode step
    recomputes part of its context."""
    import kvc

    ckpt = text_checkpoint(root / "ckpt")
    cfg = {"model": {"checkpoint": str(ckpt), "dtype": "float32"}, "hardware": "cpu",
           "workload": {"batch_size": batch_size, "prompt_len": prompt_len, "gen_len": gen_len,
                        "max_context": prompt_len + gen_len}}
    return kvc.compile(cfg, ["schedule.recompute_fraction=0.5", *overrides], output=root / "t.kvc")
