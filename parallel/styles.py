"""A request's style LoRAs in the sequence-parallel runner: references, never tensors.

Rank 0 broadcasts the request's styles as `StyleRef`s (name, user scale, the file's sha256) plus
a digest of the list in the request header. Every rank turns them into the adapters the DiT
forward takes (`standin.styles.StyleSet`) with its own `StyleResolver` (in the server: a
bounded cache of loaded LoRAs per rank, serve_app/loras.py), so a style file is read by each
rank from shared storage and no LoRA tensor ever crosses a collective. Each rank checks that
the file it loaded is the one the request was accepted with (its sha256), so all ranks apply
the same bytes even if the file was replaced meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from standin.errors import InvalidRequestError
from standin.experts import HIGH, LOW, ExpertAdapters, expert_adapters
from standin.forward_plan import LinearAdapters

__all__ = [
    "STYLE_EXPERTS",
    "StyleRef",
    "StyleResolver",
    "resolve_styles",
    "style_refs_from_header",
    "styles_digest",
]


# Which experts of a two-expert model (Wan2.2 A14B) a style applies to; one-DiT models: "both".
STYLE_EXPERTS = ("both", HIGH, LOW)


@dataclass(frozen=True)
class StyleRef:
    """One style of a request: the LoRA's name, the user's scale, (when known) the sha256 of the
    file it was accepted with ("" = not checked), and the experts it applies to (a style's
    high/low pair on Wan2.2 A14B is two refs, one "high" and one "low")."""

    name: str
    scale: float = 1.0
    sha256: str = ""
    expert: str = "both"

    def as_tuple(self) -> tuple[str, float, str, str]:
        return (self.name, float(self.scale), self.sha256, self.expert)


class StyleResolver(Protocol):
    """Turns a request's style references into the forward's adapters (None: no styles).

    Returns a `standin.styles.StyleSet`-like object whose `styles` are (style, scale) pairs with
    each style's `name` and `sha256`; raises (any exception) when a style cannot be loaded."""

    def __call__(self, refs: Sequence[StyleRef]) -> LinearAdapters | None: ...


def styles_digest(refs: Iterable[StyleRef]) -> str:
    """A stable hash of the style list (order kept: stacking order is the forward's)."""
    payload = json.dumps([r.as_tuple() for r in refs], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def check_refs(refs: Any) -> tuple[StyleRef, ...]:
    """Validate a DenoiseRequest's `styles` (rank 0, before anything is sent)."""
    if not isinstance(refs, tuple | list):
        raise InvalidRequestError(f"styles must be a sequence of StyleRef, got {type(refs).__name__}")
    out = []
    for r in refs:
        if not isinstance(r, StyleRef) or not isinstance(r.name, str) or not r.name:
            raise InvalidRequestError(f"styles must hold StyleRef(name, scale, sha256), got {r!r}")
        if isinstance(r.scale, bool) or not isinstance(r.scale, int | float) or not math.isfinite(r.scale):
            raise InvalidRequestError(f"style {r.name}: scale must be a finite number, got {r.scale!r}")
        if r.expert not in STYLE_EXPERTS:
            raise InvalidRequestError(
                f"style {r.name}: expert must be one of {STYLE_EXPERTS}, got {r.expert!r}"
            )
        out.append(r)
    return tuple(out)


def style_refs_from_header(header: dict[str, Any]) -> tuple[StyleRef, ...]:
    """The styles a rank received (checked against the header's digest)."""
    refs = tuple(StyleRef(n, s, h, e) for n, s, h, e in header.get("styles") or ())
    if refs and styles_digest(refs) != header.get("styles_hash"):
        raise InvalidRequestError("the request's styles do not match their digest")
    return refs


def resolve_styles(resolver: StyleResolver | None, refs: Sequence[StyleRef]) -> ExpertAdapters:
    """This rank's adapters for `refs` (None without styles); each loaded file must have the
    sha256 the request names. Refs aimed at one expert give each expert its own adapters."""
    if any(r.expert != "both" for r in refs):
        high = [r for r in refs if r.expert in ("both", HIGH)]
        low = [r for r in refs if r.expert in ("both", LOW)]
        return expert_adapters(_resolve(resolver, high), _resolve(resolver, low))
    return _resolve(resolver, refs)


def _resolve(resolver: StyleResolver | None, refs: Sequence[StyleRef]) -> LinearAdapters | None:
    if not refs:
        return None
    if resolver is None:
        raise InvalidRequestError("this DiT has no style LoRA library: the request's styles cannot run")
    try:
        adapters = resolver(refs)
    except InvalidRequestError:
        raise
    except Exception as exc:  # a missing or refused file: the request's fault, said plainly
        raise InvalidRequestError(f"style LoRA: {exc}") from exc
    loaded = getattr(adapters, "styles", ())
    for ref, (style, _) in zip(refs, loaded, strict=False):
        digest = getattr(style, "sha256", "")
        if ref.sha256 and digest and digest != ref.sha256:
            raise InvalidRequestError(
                f"style {ref.name} changed since the request was accepted (sha256 {digest[:12]}…, "
                f"expected {ref.sha256[:12]}…)"
            )
    return adapters
