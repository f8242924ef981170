"""The VAE's memory format (``memory_format=``); undone by converting back to the format it had."""
from __future__ import annotations

import torch

from .base import Handle, Run

NAME = "memory_format"
FORMATS = {"channels_last": torch.channels_last, "contiguous_format": torch.contiguous_format}


def _format_of(module) -> torch.memory_format:
    for p in module.parameters():
        if p.dim() == 4:
            return torch.channels_last if p.is_contiguous(memory_format=torch.channels_last) and \
                not p.is_contiguous() else torch.contiguous_format
    return torch.contiguous_format


def apply(run: Run) -> Handle | None:
    vae, fmt = run.vae, FORMATS.get(run.plan.memory_format)
    if vae is None or fmt is None:
        return None
    before = _format_of(vae)
    if before == fmt:
        return None
    vae.to(memory_format=fmt)
    return Handle(NAME, lambda: vae.to(memory_format=before), {})
