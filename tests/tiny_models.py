"""Tiny random causal LMs for fast tests (2 layers, width 32)."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 97


def tiny_llama(tied: bool = False, seed: int = 0, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    return model.eval()


def tiny_gpt2(seed: int = 0, vocab: int = VOCAB) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def tiny_neox(seed: int = 0, vocab: int = VOCAB) -> GPTNeoXForCausalLM:
    """GPT-NeoX with partial rotary embeddings (a quarter of each head's dimensions rotate)."""
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=128,
                           hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=1, eos_token_id=2)
    return GPTNeoXForCausalLM(config).eval()


def tiny_gptj(seed: int = 0, vocab: int = VOCAB) -> GPTJForCausalLM:
    """GPT-J (the TL;DR recipe's architecture): rotary on the first ``rotary_dim`` dimensions, parallel blocks."""
    torch.manual_seed(seed)
    config = GPTJConfig(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return GPTJForCausalLM(config).eval()


def random_rows(n_rows: int = 4, length: int = 12, vocab: int = VOCAB, seed: int = 0):
    """Right-padded rows with a prompt, a response and padding; returns ids, attention mask, shifted labels, mask.

    Row r has prompt length 2 + r % 3 and response length 3 + r % 4 (at least one row is fully used).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n_rows, length), generator=g)
    attention = torch.zeros(n_rows, length, dtype=torch.long)
    labels = torch.full((n_rows, length), -100)
    for r in range(n_rows):
        prompt, response = 2 + r % 3, 3 + r % 4
        end = min(length, prompt + response)
        attention[r, :end] = 1
        labels[r, prompt:end] = ids[r, prompt:end]
        ids[r, end:] = 0
    shifted = labels[:, 1:]
    response_mask = shifted != -100
    return ids, attention, shifted.masked_fill(~response_mask, 0), response_mask
