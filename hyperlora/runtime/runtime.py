"""The drop-in runtime: attach hyperlora to a Hugging Face causal LM and serve a different policy per row.

    rt = hyperlora.attach(model, hypernet, max_adapters=64, max_rank=64)
    with rt.policies(["policy text", None, peft_name]):      # one entry per batch row
        logits = model(input_ids=..., attention_mask=...).logits
    out = rt.generate(input_ids=..., attention_mask=..., policies=[...], max_new_tokens=16)
    name = rt.load_peft("path/to/peft_dir");  rt.export_peft("policy text", "out_dir");  rt.detach()

`attach` replaces the targeted Linear / Conv1D modules in place (`hyperlora.runtime.layers`); their parameters keep
their `state_dict` names. Every adapter lives in one `AdapterPool`: generated ones keyed by a content hash
of (hypernetwork weights, policy text, rank, scale), PEFT ones by a hash of their validated tensors. A
`policies()` context resolves each row to a pool slot (generating each miss in a call of its own, so its
adapter does not depend on the rest of the batch), then holds those slots in flight until it exits, so
adapters loaded or evicted meanwhile (from this thread or another) never change the batch (the failure class
of vLLM #47724). What is served is an `AdapterSource` (`hyperlora.hypernets.source`); the pool owns each
slot's reserve -> write -> commit / free (`AdapterPool.put`, `reserve`), `hyperlora.runtime.writing` decides
what is written.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from hyperlora.runtime.layers import (APPLY_MODES, ActiveBatch, LoraLayerMixin, LoraState, PoolViews, is_supported,
                              set_submodule, unwrap_module, wrap_module)
from hyperlora.adapters import peft_io
from hyperlora.adapters.pool import AdapterPool, PoolFullError, StaleSlotError
from hyperlora.hypernets.source import check_source
from hyperlora.hypernets.t2l.minilm import PolicyEncoder
from hyperlora.modeling.decoding import decode
from hyperlora.runtime.writing import adapter_rank, write_adapters, write_generated
from hyperlora.modeling.targets import find_targets, matches_type, module_type_of

log = logging.getLogger(__name__)

__all__ = ["attach", "Runtime", "DEFAULT_TARGET_TYPES"]

# Served when neither target_modules nor a hypernetwork says what to (those present in the model). GPT-2's
# c_proj covers attn.c_proj and mlp.c_proj, two shapes: the pool keeps them apart as two module types.
DEFAULT_TARGET_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                        "c_attn", "c_proj", "c_fc")

def _find_targets(model: nn.Module, types: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Full name -> (d_in, d_out) of the modules matching `types`: exactly `find_targets` (the hypernetwork's
    target set), refused where this runtime cannot serve one (already attached, or not the stock forward)."""
    wanted = list(dict.fromkeys(types))
    for name, module in model.named_modules():
        if name and isinstance(module, LoraLayerMixin) and any(matches_type(name, t) for t in wanted):
            raise ValueError(f"{name!r} is already served by a hyperlora runtime: detach() it before attaching again")
    targets = find_targets(model, wanted)
    for name in targets:
        module = model.get_submodule(name)
        if not is_supported(module):
            raise ValueError(f"target module {name!r} is a {type(module).__name__} with its own forward, not an "
                             f"nn.Linear or a transformers Conv1D: leave it out of target_modules")
    return targets


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


@dataclass
class _PeftAdapter:
    """A validated PEFT adapter kept on the host so it can be re-written after an eviction."""

    key: str
    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]  # full name -> (A [r, d_in], B [d_out, r] scaled)
    source: str


class Runtime:
    """hyperlora attached to one model. Build it with `hyperlora.attach`; see the module docstring."""

    def __init__(self, model: nn.Module, hypernet: Any, targets: dict[str, tuple[int, int]], *,
                 max_adapters: int, max_rank: int, apply_mode: str, encoder: Any, dtype: torch.dtype | None):
        m_dtype, device = _model_dtype_device(model)
        self.model = model
        self.hypernet = hypernet
        self.apply_mode = apply_mode
        self._encoder = encoder
        self.pool = AdapterPool(targets, max_adapters=max_adapters, max_rank=max_rank,
                                dtype=dtype or m_dtype, device=device)
        self.state = LoraState()
        self._lock = threading.RLock()
        self._originals: dict[str, nn.Module] = {}
        self._peft: dict[str, _PeftAdapter] = {}
        self._peft_keys: set[str] = set()
        self._unloaded: set[str] = set()  # names given to unload_peft (refused as policy texts)
        self._serving = 0  # policies() contexts open in any thread (detach waits for none)
        self._latents: dict[str, torch.Tensor] = {}  # module type -> z [L, S, K] (latent path only)
        self._latent_where: dict[str, tuple[str, int]] = {}
        self._latent_key: dict[int, str] = {}  # slot -> the content key its stored latents belong to
        self._attached = False
        self._install(targets)
        for name in targets:
            self.model.get_submodule(name).hl_views = PoolViews((self.pool.lora_a(name), self.pool.lora_b(name)))
        log.info("hyperlora: serving %d modules of %s; adapter pool %d slots x rank %d = %.1f MB (%s)",
                 len(targets), type(model).__name__, max_adapters, max_rank, self.pool.nbytes() / 1e6, self.pool.dtype)

    # ---- attach / detach ---------------------------------------------------------------------

    def _install(self, targets: dict[str, tuple[int, int]]) -> None:
        replaced: list[str] = []
        try:
            for name in targets:
                original = self.model.get_submodule(name)
                layer = wrap_module(original, name, self.state)
                set_submodule(self.model, name, layer)
                self._originals[name] = original
                replaced.append(name)
        except Exception:
            for name in replaced:
                set_submodule(self.model, name, unwrap_module(self.model.get_submodule(name), self._originals.pop(name)))
            raise
        self._attached = True

    @property
    def attached(self) -> bool:
        return self._attached

    def detach(self) -> nn.Module:
        """Put the original modules back (with the current parameters) and return the model.

        Refused (RuntimeError, nothing changed) while any `policies()` / `generate` context of this runtime is
        open, in this thread or another: detaching under a running batch would silently serve it base-model
        outputs. Exit those contexts (join the threads) first."""
        with self._lock:
            if not self._attached:
                return self.model
            if self.state.batch is not None:
                raise RuntimeError("detach() inside an active policies() context: exit the context first")
            if self._serving:
                raise RuntimeError(f"detach() while {self._serving} policies() context(s) of this runtime are open "
                                   f"in other threads: exit the context first (let those batches finish)")
            for name, original in self._originals.items():
                layer = self.model.get_submodule(name)
                set_submodule(self.model, name, unwrap_module(layer, original))
            self._originals.clear()
            self._attached = False
            return self.model

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("this runtime was detached; call hyperlora.attach(model, ...) again")

    @property
    def target_names(self) -> list[str]:
        """Full names of the modules this runtime serves."""
        return list(self.pool.targets())

    # ---- adapters: generated ----------------------------------------------------------------

    def _encode(self, texts: list[str]) -> torch.Tensor:
        if self._encoder is None:
            self._encoder = PolicyEncoder()
        enc = self._encoder
        fn = enc.encode if hasattr(enc, "encode") else enc
        emb = fn(texts)
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != len(texts):
            raise ValueError(f"the policy encoder must return a tensor [P, E] for P={len(texts)} texts, got "
                             f"{getattr(emb, 'shape', type(emb).__name__)}")
        return emb

    def _policy_key(self, text: str) -> str:
        hn = self.hypernet
        return self.pool.content_key(hn.weights_id(), text, int(hn.config.rank), float(hn.config.scale))

    def _latent_enabled(self) -> bool:
        return self.hypernet is not None and self.apply_mode != "materialized" and self.hypernet.supports_latent

    def _store_latents(self, emb: torch.Tensor, slots: list[int], keys: list[str]) -> None:
        """Keep z [L, S, K] per module type for the latent path (the pool holds only materialized A/B)."""
        hn = self.hypernet
        with torch.no_grad():
            z = hn.latents(emb)
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.pool.device)
        for t, zt in z.items():
            buf = self._latents.get(t)
            if buf is None:
                L, K = zt.shape[1], zt.shape[2]
                buf = self._latents[t] = torch.zeros(L, self.pool.max_adapters, K, dtype=zt.dtype,
                                                     device=self.pool.device)
                for li, n in enumerate(hn.module_names(t)):
                    self._latent_where[n] = (t, li)
            buf.index_copy_(1, idx, zt.transpose(0, 1).to(buf.device, buf.dtype))
        self._latent_key.update(zip(slots, keys))

    def _latent_of(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(w_a [R*K, d_in], w_b [d_out, R*K], z [S, K]) of module `name` for the latent path, or None where the
        hypernetwork does not generate that module (its generated slots hold zeros there)."""
        where = self._latent_where.get(name)
        if where is None:
            return None
        t, li = where
        w_a, w_b = self.hypernet.head(t)
        return w_a, w_b, self._latents[t][li]

    # ---- adapters: PEFT ---------------------------------------------------------------------

    def load_peft(self, path: str | Path, name: str | None = None, *, replace: bool = False) -> str:
        """Load a PEFT LoRA directory and return the name to use in `policies()` (default: the directory name).

        A name already given to a different adapter is refused (ValueError) unless `replace=True`; loading the
        same adapter under its name again is a no-op. A load that fails registers nothing and holds no slot.

        Everything is validated by `hyperlora.adapters.peft_io.read_peft` before the pool is touched (safetensors only,
        sane config, r <= max_rank, targets served by this runtime, shapes, finite values, no DoRA / bias), so a
        rejected adapter leaves the pool and every in-flight batch as they were. The adapter is kept on the host
        too, so it comes back after an eviction.
        """
        self._check_attached()
        p = Path(path)
        adapter = peft_io.read_peft(p, targets=self.pool.targets(), max_rank=self.pool.max_rank)
        modules = {n: (a.to(torch.float32), b.to(torch.float32)) for n, (a, b) in adapter.modules.items()}
        rank, key = int(adapter.rank), str(adapter.key)
        label = name if name is not None else p.resolve().name
        return self._register(label, _PeftAdapter(key=key, rank=rank, modules=modules, source=str(p)), replace)

    def add_adapter(self, name: str, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
                    scale: float = 1.0, replace: bool = False) -> str:
        """Serve a LoRA adapter given as tensors, like a PEFT one: {full module name: (A [r, d_in], B [d_out, r])},
        applied as `y += scale * B A x`. Validated (names, shapes, rank <= max_rank, finite) before the pool is
        touched; returns `name` for `policies()`."""
        self._check_attached()
        if not isinstance(modules, dict) or not modules:
            raise ValueError("modules must be a non-empty dict {module name: (A [r, d_in], B [d_out, r])}")
        targets = self.pool.targets()
        checked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        h = hashlib.sha256(f"tensors:{float(scale).hex()}".encode())
        for mname, pair in modules.items():
            if mname not in targets:
                raise ValueError(f"modules[{mname!r}] is not served by this runtime (e.g. {next(iter(targets))!r}); "
                                 f"attach with target_modules covering it")
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
                raise TypeError(f"modules[{mname!r}] must be a pair of tensors (A, B)")
            a, b = (t.detach().to("cpu", torch.float32) for t in pair)
            d_in, d_out = targets[mname]
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
                raise ValueError(f"modules[{mname!r}]: need A [r, {d_in}] and B [{d_out}, r], got {tuple(a.shape)} and "
                                 f"{tuple(b.shape)}")
            if a.shape[0] > self.pool.max_rank:
                raise ValueError(f"modules[{mname!r}]: rank {a.shape[0]} exceeds max_rank={self.pool.max_rank}")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"modules[{mname!r}] holds NaN or Inf values")
            b = b * float(scale)
            checked[mname] = (a.contiguous(), b.contiguous())
            for t in checked[mname]:
                h.update(mname.encode())
                h.update(t.numpy().tobytes())
        rank = max(int(a.shape[0]) for a, _ in checked.values())
        return self._register(name, _PeftAdapter(key="tensors:" + h.hexdigest(), rank=rank, modules=checked,
                                                 source="tensors"), replace)

    def _register(self, label: str, ad: _PeftAdapter, replace: bool = False) -> str:
        """Validate `ad` against the pool, place it, then register `label`; nothing is registered or held if
        it fails. A pool with every slot pinned or in flight registers it and places it at first use."""
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"name must be a non-empty str, got {label!r}")
        with self._lock:
            old = self._peft.get(label)
            if old is not None and old.key != ad.key and not replace:
                raise ValueError(f"an adapter named {label!r} is already loaded (from {old.source}) and differs from "
                                 f"this one ({ad.source}): pass name= to load it under another name, or replace=True")
            self.pool.validate(ad.modules, ad.rank, 1.0)  # e.g. B overflowing the pool's dtype: nothing touched
            try:
                self._place_peft(ad)
            except PoolFullError as exc:  # pool full of in-flight / pinned slots: placed at first use instead
                log.warning("hyperlora: %s loaded but not placed in the pool yet (%s)", label, exc)
            self._peft[label] = ad
            self._peft_keys.add(ad.key)
            self._unloaded.discard(label)
            if old is not None and old.key != ad.key:
                self._forget_key(old.key)
        return label

    def _place_peft(self, ad: _PeftAdapter) -> int:
        slot = self.pool.slot_of(ad.key)
        if slot is not None and ad.key in self.pool:
            return slot
        return self.pool.put(ad.key, ad.rank, 1.0, ad.modules)  # per-module scales are already folded into B

    @property
    def peft_names(self) -> list[str]:
        return list(self._peft)

    def unload_peft(self, name: str) -> None:
        """Forget a loaded PEFT adapter: its slot is freed now unless a batch holds it or another name shares it
        (then it is evicted like any other). The name is then refused as a policy text (KeyError)."""
        with self._lock:
            if name not in self._peft:
                raise KeyError(f"no PEFT adapter named {name!r} is loaded; loaded: {sorted(self._peft)}")
            ad = self._peft.pop(name)
            self._unloaded.add(name)
            self._forget_key(ad.key)

    def _forget_key(self, key: str) -> None:
        if not any(a.key == key for a in self._peft.values()):
            self._peft_keys.discard(key)
            with contextlib.suppress(KeyError, ValueError):
                self.pool.remove(key)

    # ---- resolving a batch ------------------------------------------------------------------

    def _entry_kind(self, i: int | None, e: Any) -> str:
        """"none", "peft" or "text" for one entry (i: its index in policies(), None for export_peft); every
        problem raises here, before anything is generated, naming the entry."""
        what = f"policies[{i}]" if i is not None else "policy"
        if e is None:
            return "none"
        if not isinstance(e, str):
            raise TypeError(f"{what} must be a policy text, a name returned by load_peft, or None; got "
                            f"{type(e).__name__}")
        if e in self._peft:
            return "peft"
        bad = next((j for j, c in enumerate(e) if 0xD800 <= ord(c) <= 0xDFFF), None)
        if bad is not None:
            raise ValueError(f"{what} holds a lone surrogate {e[bad]!r} at character {bad}: not valid Unicode text "
                             f"(JSON \\u escapes can produce these); fix or drop that character")
        if not e.strip():
            raise ValueError(f"{what} is empty or whitespace only; use None for the base model")
        loaded = sorted(self._peft)
        if e in self._unloaded:
            raise KeyError(f"{what} = {e!r} is the name of a PEFT adapter that was unloaded (unload_peft), not a "
                           f"policy text; load it again, or pass a policy text. Loaded adapters: {loaded}")
        close = difflib.get_close_matches(e, loaded + sorted(self._unloaded), n=3, cutoff=0.75)
        if close:
            raise KeyError(f"{what} = {e!r} is not a loaded adapter name but is close to {close}: a mistyped name? "
                           f"(a policy text is never close to a name; loaded adapters: {loaded})")
        if len(e.split()) == 1 and e.isascii():  # scripts written without spaces (CJK) are not single words
            raise KeyError(f"{what} = {e!r} is a single word: not a loaded adapter name (loaded: {loaded}) and too "
                           f"short for a policy text (a policy text has at least two words)")
        if self.hypernet is None:
            raise ValueError(f"{what} = {e[:60]!r} is neither a loaded PEFT adapter name ({loaded}) nor servable as "
                             f"a policy text: this runtime has no hypernetwork (attach(model, hypernet=...))")
        try:
            self.hypernet.check_policy(e)
        except ValueError as err:  # e.g. PolicyTooLongError: re-raised as itself, naming the entry
            raise type(err)(f"{what}: {err}") from None
        return "text"

    def _resolve(self, entries: Sequence[Any], stack: contextlib.ExitStack) -> tuple[list[int], list[bool]]:
        """Row slots for `entries`, every used slot held in flight on `stack`. Generates missing policies."""
        keys: dict[Any, int] = {}
        row_slots = [-1] * len(entries)
        latent_flags = [False] * len(entries)
        uniq: dict[str, list[int]] = {}
        kinds: dict[str, str] = {}
        for i, e in enumerate(entries):
            kind = self._entry_kind(i, e)
            if kind != "none":
                uniq.setdefault(e, []).append(i)
                kinds[e] = kind

        def hold(slot: int, key: str) -> bool:
            """Hold `slot` in flight for this batch if it still holds `key` (False if evicted meanwhile)."""
            try:
                stack.enter_context(self.pool.in_flight([slot], keys=[key]))
            except StaleSlotError:
                return False
            return True

        texts: list[str] = []
        for e in uniq:
            if kinds[e] == "peft":
                ad = self._peft[e]
                slot = self.pool.get(ad.key)
                while slot is None or not hold(slot, ad.key):
                    slot = self._place_peft(ad)
                keys[e] = slot
            else:
                key = self._policy_key(e)
                slot = self.pool.get(key)
                if slot is None or not hold(slot, key):
                    texts.append(e)
                    continue
                keys[e] = slot
                if self._latent_enabled() and self._latent_key.get(slot) != key:
                    self._store_latents(self._encode([e]), [slot], [key])
        for t in texts:
            keys[t] = self._generate_one(t, hold)
        for e, rows in uniq.items():
            for i in rows:
                row_slots[i] = keys[e]
                latent_flags[i] = kinds[e] == "text" and self._latent_key.get(keys[e]) == self.pool.key_of(keys[e])
        return row_slots, latent_flags

    def _generate_one(self, text: str, hold: Callable[[int, str], bool]) -> int:
        """Generate `text`'s adapter into a fresh slot (one call of its own: the same adapter bits whatever
        else the batch holds) and hold it in flight; returns the slot. The pool frees the slot on any error."""
        src = self.hypernet
        key = self._policy_key(text)
        t0 = time.perf_counter()
        emb = self._encode([text]) if src.needs_encoder else None
        if src.supports_latent:  # a linear latent head: one fused generate_lora launch per module type
            slot = write_generated(src, emb, self.pool, [key])[0]
            if self._latent_enabled():
                self._store_latents(emb, [slot], [key])
        else:  # adapters built on the host first (a policy reader: its own rank per policy), then put
            mods = src.adapters_for([text], emb)[0]
            slot = write_adapters(self.pool, [key], [mods], float(src.config.scale))[0]
            self.pool.record_generation(1, time.perf_counter() - t0)
        log.debug("hyperlora: generated %r into slot %d in %.1f ms", text[:40], slot, 1e3 * (time.perf_counter() - t0))
        if not hold(slot, key):  # only if someone outside this runtime evicted it within microseconds
            raise RuntimeError(f"the adapter generated for {text[:40]!r} was evicted before its batch started")
        return slot

    def prepare(self, policies: Sequence[Any]) -> list[int]:
        """Make sure every entry has an adapter in the pool (generating misses); returns their slots."""
        self._check_attached()
        with self._lock, contextlib.ExitStack() as stack:
            slots, _ = self._resolve(list(policies), stack)
        return slots

    def policies(self, policies: Sequence[Any]) -> contextlib.AbstractContextManager[ActiveBatch]:
        """Serve one batch: entry i (policy text, `load_peft` name or None) applies to batch row i.

        The adapters' slots are held in flight until the context exits, so nothing loaded or evicted
        meanwhile can change this batch. Contexts nest (the innermost one is active) and are per thread.
        The model must then be called with exactly len(policies) rows (ValueError otherwise, even when
        every entry is None). A string that is not a loaded name but equals an unloaded one, is close to a
        loaded or unloaded name (difflib), or is a single ASCII word raises KeyError: names and texts cannot
        be confused.
        """
        self._check_attached()
        if isinstance(policies, (str, bytes)) or not isinstance(policies, Sequence):
            raise TypeError("policies must be a list with one entry (policy text, load_peft name or None) per row")
        return self._serve(list(policies))

    @contextlib.contextmanager
    def _serve(self, entries: list[Any]) -> Iterator[ActiveBatch]:
        with contextlib.ExitStack() as stack:
            with self._lock:
                self._check_attached()  # detach() from another thread may have run since policies()
                row_slots, latent_flags = self._resolve(entries, stack)
                self._serving += 1
            try:
                dev = self.pool.device
                batch = ActiveBatch(
                    row_slots=torch.tensor(row_slots, dtype=torch.int64, device=dev),
                    num_slots=self.pool.max_adapters, pool=self.pool, apply_mode=self.apply_mode,
                    latent_rows=torch.tensor(latent_flags, dtype=torch.bool, device=dev) if any(latent_flags) else None,
                    latents=self._latent_of if any(latent_flags) else None,
                    hypernet=self.hypernet)
                self.state.push(batch)
                try:
                    yield batch
                finally:
                    self.state.pop(batch)
            finally:
                with self._lock:
                    self._serving -= 1

    # ---- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 policies: Sequence[Any] | None = None, max_new_tokens: int = 32, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | Sequence[int] | None = None, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None) -> torch.Tensor:
        """Greedy or sampled decoding with a KV cache; returns [B, T + new] (prompt, then new tokens).

        Prompts must be left padded (`attention_mask` zeros only on the left). Each row gets the tokens it would
        get alone with its policy: positions come from its own mask, and sampling draws from a generator per
        row seeded with `seed` (one int for every row, or one per row). Rows that reached EOS are padded.
        """
        self._check_attached()
        ids = input_ids
        rows = int(ids.shape[0]) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else -1
        pol = list(policies) if policies is not None else [None] * max(rows, 0)
        if rows >= 0 and len(pol) != rows:
            raise ValueError(f"policies has {len(pol)} entries but input_ids has {rows} rows: give one policy "
                             f"(text, load_peft name or None) per row")
        with self.policies(pol):
            return decode(self.model, ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    # ---- export ------------------------------------------------------------------------------

    def export_peft(self, policy: str, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the adapter of `policy` (a text, or a `load_peft` name) as a PEFT LoRA directory, all-or-nothing
        (`peft_io.export_peft`: a directory holding another adapter is replaced only with overwrite=True).

        `policy` is checked like a `policies()` entry (None, "" or whitespace, a non-str, a lone surrogate, a
        mistyped or unloaded name: an error, nothing written)."""
        self._check_attached()
        kind = self._entry_kind(None, policy)
        if kind == "none":
            raise ValueError("export_peft needs a policy text or a load_peft name, not None (the base model has "
                             "no adapter to export)")
        d = Path(directory)
        if kind == "peft":
            ad = self._peft[policy]
            return peft_io.write_peft(d, ad.modules, rank=ad.rank, lora_alpha=float(ad.rank),
                                      base_model=self.model, overwrite=overwrite)
        src = self.hypernet
        if not src.needs_encoder:  # a source reading texts: its own rank per policy, padded to one PEFT rank
            mods = src.adapters_for([policy])[0]
            rank = adapter_rank(mods)
            pad = {n: (torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])]),
                       torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1)) for n, (a, b) in mods.items()}
            return peft_io.write_peft(d, pad, rank=rank, lora_alpha=float(rank), base_model=self.model,
                                      overwrite=overwrite)
        return peft_io.export_policy(src, self._encode([policy]), d, base_model=self.model, overwrite=overwrite)

    # ---- introspection ----------------------------------------------------------------------

    def stats(self) -> dict:
        """The pool's counters plus this runtime's PEFT adapters and served modules."""
        s = self.pool.stats()
        s.update(peft_adapters=len(self._peft), target_modules=len(self._originals), apply_mode=self.apply_mode)
        return s

    def __repr__(self) -> str:
        return (f"Runtime({type(self.model).__name__}, {len(self._originals)} modules, hypernet="
                f"{'yes' if self.hypernet is not None else 'no'}, apply_mode={self.apply_mode!r}, {self.pool!r})")


def attach(model: nn.Module, hypernet: Any = None, *, target_modules: Sequence[str] | None = None,
           max_adapters: int = 64, max_rank: int = 64, apply_mode: str = "auto", encoder: Any = None,
           dtype: torch.dtype | None = None) -> Runtime:
    """Serve many adapters per batch on `model` (a transformers causal LM, Llama family or GPT-2).

    hypernet: an `AdapterSource` built for this model (a T2L `HyperNetwork` or a policy reader's `ReaderHypernet`;
    policy texts need one); target_modules: module types
    (last name components) to serve in every layer: default exactly the modules the hypernetwork generates
    (its types, in its layers), else every Linear of Llama-style attention and MLP blocks (GPT-2: c_attn,
    c_fc). Pass target_modules to also serve PEFT adapters on modules the hypernetwork does not cover; max_adapters / max_rank: the pool's slots; apply_mode: "auto",
    "materialized" or "latent"; encoder: a `PolicyEncoder` or any callable list[str] -> Tensor [P, E] (default
    MiniLM, loaded on first use); dtype: the pool's dtype (default the model's).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    if apply_mode not in APPLY_MODES:
        raise ValueError(f"apply_mode must be one of {APPLY_MODES}, got {apply_mode!r}")
    if hypernet is not None:
        check_source(hypernet)  # a HyperNetwork or a ReaderHypernet (hyperlora.hypernets.source.AdapterSource)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    hn_types = list(hypernet.types) if hypernet is not None else []
    if target_modules is not None:
        types = list(dict.fromkeys(target_modules))
    elif hn_types:
        types = hn_types
    else:
        present = {module_type_of(n) for n, m in model.named_modules() if n and is_supported(m)}
        types = [t for t in DEFAULT_TARGET_TYPES if t in present]
        if not types:
            raise ValueError(f"no default target module found in {type(model).__name__}; pass target_modules= "
                             f"from its Linear module types {sorted(present)}")
    targets = _find_targets(model, types)
    if hypernet is not None and target_modules is None:
        # Serve exactly the modules the hypernetwork writes (e.g. only its layers): wrapping the other layers
        # of those types would cost a zero update per layer per step and pool memory for nothing.
        targets = {n: shp for n, shp in targets.items() if n in hypernet.targets()}
    if hypernet is not None:
        hn_targets = hypernet.targets()
        left_out = sorted({t for t in hn_types for n in hypernet.module_names(t) if n not in targets})
        if left_out:
            raise ValueError(f"target_modules {types} leave out {left_out}, which the hypernetwork generates; "
                             f"include them (or pass target_modules=None)")
        wrong = [n for n, shp in hn_targets.items() if tuple(targets[n]) != tuple(shp)]
        if wrong:
            raise ValueError(f"the hypernetwork was built for another model: {wrong[0]!r} is "
                             f"{hn_targets[wrong[0]]} there and {targets[wrong[0]]} here")
        if int(hypernet.config.rank) > max_rank:
            raise ValueError(f"the hypernetwork's rank {hypernet.config.rank} exceeds max_rank={max_rank}; "
                             f"attach with max_rank >= {hypernet.config.rank}")
    return Runtime(model, hypernet, targets, max_adapters=max_adapters, max_rank=max_rank, apply_mode=apply_mode,
                   encoder=encoder, dtype=dtype)
