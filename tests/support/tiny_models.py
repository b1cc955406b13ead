"""Tiny random-initialised models with real tokenizers, built offline in a few seconds.

Four kinds cover both code paths: masked (BERT with WordPiece, RoBERTa with byte-level BPE) and causal
(Llama and GPT-2 with byte-level BPE). Weights are random but seeded, so logits are reproducible.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForMaskedLM,
)

from lmaas_client.tasks import TASKS

KINDS = ("bert", "roberta", "llama", "gpt2")
MASKED_KINDS = ("bert", "roberta")
CAUSAL_KINDS = ("llama", "gpt2")
HIDDEN = 32
LAYERS = 2
BPE_VOCAB = 1000  # room for every shipped label word as one token

CORPUS = [
    "the movie was great and fun to watch",
    "a bad film , boring and dull .",
    "it was terrible and the plot is thin",
    "Review: an excellent story\nSentiment: positive",
    "Review: a waste of time\nSentiment: negative",
    "It was great . It was bad . It was fine",
    "nothing happens , and it happens to flat characters .",
    "as lively an account as seinfeld is deadpan .",
] * 4
# every shipped task's label words, often enough that each is one token: the verbalizer needs distinct first tokens
LABEL_WORDS = sorted({w.strip() for t in TASKS.values() for words in t.label_words.values() for w in words})
CORPUS += [" " + " ".join(LABEL_WORDS)] * 8


def _bpe(special: list[str], roberta_frame: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    if roberta_frame:  # <s> text </s>, like RoBERTa
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tokenizer


def build_tokenizer(kind: str):
    if kind == "bert":
        words = sorted({w for line in CORPUS for w in line.lower().replace(":", " : ").split()})
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
        return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = _bpe(special, roberta_frame=kind == "roberta")
    extra = {"mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"} if kind == "roberta" else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", **extra
    )


def build_model(kind: str, vocab_size: int, pad_id: int, llama_positions: int = 128) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2)
    if kind == "bert":
        return BertForMaskedLM(
            BertConfig(intermediate_size=64, max_position_embeddings=128, pad_token_id=pad_id, **common)
        )
    if kind == "roberta":
        config = RobertaConfig(intermediate_size=64, max_position_embeddings=130, pad_token_id=pad_id, **common)
        return RobertaForMaskedLM(config)
    if kind == "llama":
        config = LlamaConfig(
            intermediate_size=64,
            max_position_embeddings=llama_positions,
            num_key_value_heads=1,
            pad_token_id=pad_id,
            **common,
        )
        return LlamaForCausalLM(config)
    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_positions=128, pad_token_id=pad_id
        )
        return GPT2LMHeadModel(config)
    raise ValueError(kind)


def save_tiny_model(kind: str, folder: Path, llama_positions: int = 128) -> Path:
    tokenizer = build_tokenizer(kind)
    model = build_model(kind, len(tokenizer), tokenizer.pad_token_id, llama_positions)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
