"""Which computation gives an engine's CAMs: typed for the cache, printed as text in the reports.

Its own small module so that the CAM store (imported with the pipeline) need not import pytorch-grad-cam.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal


@dataclass(frozen=True)
class CamPath:
    """Which computation gives an engine's CAMs; str() is the text the reports print.

    kind "fast": the exact Grad-CAM from one forward pass (GAP -> Linear head), `verified` once it matched
    pytorch-grad-cam on a real batch. kind "tail": exact Grad-CAM with a backward pass through the part of the
    model after the target layer only (helpers.model.tail: the torch.fx split), from values kept in the
    inference pass where it could keep them; `reason` says why the fast path was not used. kind "library":
    pytorch-grad-cam's `library_class`, batched, with `reason` saying why neither shortcut was used ("" where
    they do not apply to the method).
    `from_cache`: the CAMs so far were read from the run's cache, computed by this path in an earlier run."""
    kind: Literal["fast", "tail", "library"]
    library_class: str = ""
    reason: str = ""
    verified: bool = False
    from_cache: bool = False

    def __str__(self) -> str:
        if self.kind == "fast":
            text = ("fast exact Grad-CAM (GAP→Linear head, verified against pytorch-grad-cam)" if self.verified else
                    "fast exact Grad-CAM (GAP→Linear head; checked against pytorch-grad-cam on the first batch)")
        elif self.kind == "tail":
            text = ("exact Grad-CAM from the target layer onward (torch.fx tail, "
                    + ("verified against pytorch-grad-cam" if self.verified else
                       "checked against pytorch-grad-cam on the first batch")
                    + (f"; fast path not used: {self.reason})" if self.reason else ")"))
        else:
            text = (f"pytorch-grad-cam {self.library_class}, batched"
                    + (f" (fast path not used: {self.reason})" if self.reason else ""))
        return text + (" [CAMs from the cache]" if self.from_cache else "")

    def to_json(self) -> dict:
        """The fields for a JSON cache entry (from_cache is about this run, so it is not stored)."""
        fields = asdict(self)
        del fields["from_cache"]
        return fields

    @classmethod
    def from_json(cls, fields: dict) -> "CamPath":
        kind = fields["kind"]
        if kind not in ("fast", "tail", "library"):
            raise ValueError(f"unknown CAM path kind {kind!r}")
        return cls(kind=kind, library_class=str(fields.get("library_class", "")), reason=str(fields.get("reason", "")),
                   verified=bool(fields.get("verified", False)))
