"""`AdapterSource`: what `hyperlora.attach` serves, whichever hypernetwork makes the adapters.

Both the T2L `HyperNetwork` (`hypernets/t2l/hypernet.py`: a policy embedding in, a latent linear head) and the
policy reader's `ReaderHypernet` (`hypernets/reader/reader.py`: policy texts in, per-policy ranks) implement it,
so the runtime asks the source what it needs instead of probing attributes:

    needs_encoder     True: `adapters_for` needs the policies' embeddings ([P, E] from the runtime's encoder);
                      False: the source reads the texts itself (no encoder is loaded).
    supports_latent   True: the source has a linear latent head (`latents(emb)` / `head(type)`), so its rows may
                      take the latent path and its adapters may be written by the fused `generate_lora` launch.
    config.rank / config.scale   the rank in content keys (the largest rank it makes) and the LoRA scale the
                      pool folds into B (1.0 when the source folds it in itself).
    adapters_for(texts, task_emb=None)   per policy {full module name: (A [r, d_in], B [d_out, r])}, scale NOT
                      applied, r <= config.rank (may differ per policy).
    weights_id()      a stable hash of everything that changes the adapters (the source's part of a content key).
    check_policy(text)   raise a named ValueError for a text the source cannot read whole (the policy reader:
                      ``limits.PolicyTooLongError`` above ``MAX_POLICY_TOKENS``), before anything is generated.
    types / targets() / module_names(type)   the modules it writes.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch

__all__ = ["AdapterSource", "check_source"]


@runtime_checkable
class AdapterSource(Protocol):
    """Policy texts -> one LoRA adapter per policy (see the module docstring)."""

    types: list[str]
    config: Any

    @property
    def needs_encoder(self) -> bool: ...

    @property
    def supports_latent(self) -> bool: ...

    def weights_id(self) -> str: ...

    def check_policy(self, text: str) -> None: ...

    def targets(self) -> dict[str, tuple[int, int]]: ...

    def module_names(self, module_type: str) -> list[str]: ...

    def adapters_for(self, texts: Sequence[str], task_emb: torch.Tensor | None = None
                     ) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]: ...


def check_source(source: Any) -> AdapterSource:
    """`source` if it implements `AdapterSource`, else a TypeError naming what it lacks."""
    missing = [n for n in ("types", "config", "needs_encoder", "supports_latent", "weights_id", "check_policy", "targets",
                           "module_names", "adapters_for") if not hasattr(source, n)]
    if missing:
        raise TypeError(f"{type(source).__name__} is not an AdapterSource (hyperlora.hypernets.source): it lacks "
                        f"{missing}; pass a HyperNetwork or a ReaderHypernet")
    return source
