"""Shared builders for the runtime tests: tiny models from configs (no hub), a tiny hypernetwork with a
non-zero B head, a deterministic hash encoder, and PEFT adapters with random non-zero weights."""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2", "gpt2")
VOCAB = 101
EMB = 16


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer causal LM of `arch` with random weights (larger than HF's default init, so adapters and
    base both move the logits visibly)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=None)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model.to(dtype).eval()


def default_types(arch: str) -> list[str]:
    if arch == "gpt2":
        return ["c_attn", "c_proj", "c_fc"]  # c_proj: attn.c_proj 48->48 and mlp.c_proj 192->48, two pool types
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_hypernet(model, types, seed: int = 1, rank: int = 4, b_std: float = 0.1):
    """A small HyperNetwork for `model` whose B head is re-initialised randomly (a fresh one is a no-op)."""
    from hyperlora import HyperNetwork

    torch.manual_seed(seed)
    hn = HyperNetwork.for_model(model, rank=rank, target_modules=types, latent_dim=6, task_emb_dim=EMB,
                                task_proj_dim=8, layer_emb_dim=4, module_emb_dim=4, hidden_dim=16)
    with torch.no_grad():
        for t in hn.types:
            hn.head(t)[1].normal_(0, b_std)
    return hn.eval()


def hash_encoder(texts: list[str]) -> torch.Tensor:
    """Deterministic text -> [EMB] embedding (a stand-in for MiniLM in fast tests)."""
    rows = []
    for t in texts:
        g = torch.Generator().manual_seed(int(hashlib.sha256(t.encode()).hexdigest()[:12], 16))
        rows.append(torch.randn(EMB, generator=g))
    return torch.stack(rows)


def make_peft_dir(model, path: Path, *, r: int = 4, alpha: float = 8.0, targets=("q_proj", "v_proj"), seed: int = 3,
                  safe: bool = True, std: float = 0.2, **extra) -> Path:
    """Save a PEFT LoRA adapter for `model` (a deep copy is wrapped) with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, init_lora_weights=False,
                     **extra)
    pm = get_peft_model(copy.deepcopy(model), cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.normal_(0, std)
    pm.save_pretrained(str(path), safe_serialization=safe)
    return Path(path)


def padded_batch(lengths: list[int], seed: int = 5):
    """Left-padded input_ids / attention_mask for rows of the given lengths, and the unpadded rows."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    rows = []
    for i, n in enumerate(lengths):
        r = torch.randint(1, VOCAB, (n,), generator=g)
        rows.append(r)
        ids[i, T - n:] = r
        mask[i, T - n:] = 1
    return ids, mask, rows


def forward_logits(model, ids, mask):
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
