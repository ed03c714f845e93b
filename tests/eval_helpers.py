"""Builders for the eval/scoring/demo tests: a byte-level tokenizer with ChatML specials and a tiny random
Llama built from a config (no weights loaded, no hub), plus a tiny hypernetwork and a hash encoder."""
from __future__ import annotations

import hashlib

import torch

EMB = 16


def tiny_tokenizer():
    """Byte-level tokenizer (256 byte symbols, no merges) + <|im_start|>, <|im_end|>; ChatML template unset,
    so ``hyperlora.modeling.prompts`` uses its plain ChatML rendering."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    tok.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                            "additional_special_tokens": ["<|im_start|>"]})
    return tok


def tiny_llama(tok, seed: int = 0, layers: int = 2):
    """A random 2-layer Llama sized for the tokenizer (hidden 32), eval mode, frozen."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.requires_grad_(False)
    return model.eval()


def tiny_hypernet(model, seed: int = 1, rank: int = 4, b_std: float = 0.3):
    """A small q/v HyperNetwork whose B head is random (a fresh one writes zero adapters)."""
    from hyperlora.hypernets.t2l.hypernet import HyperNetwork

    torch.manual_seed(seed)
    hn = HyperNetwork.for_model(model, rank=rank, target_modules=("q_proj", "v_proj"), latent_dim=6,
                                task_emb_dim=EMB, task_proj_dim=8, layer_emb_dim=4, module_emb_dim=4, hidden_dim=16)
    with torch.no_grad():
        for p in hn.head_b.values():
            p.normal_(0, b_std)
    return hn.eval()


def hash_encoder(texts) -> torch.Tensor:
    """Deterministic text -> [EMB] vector (a stand-in for MiniLM)."""
    rows = []
    for t in texts:
        g = torch.Generator().manual_seed(int(hashlib.sha256(t.encode()).hexdigest()[:12], 16))
        rows.append(torch.randn(EMB, generator=g))
    return torch.stack(rows)
