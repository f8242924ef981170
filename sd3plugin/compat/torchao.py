"""torchao internals sd3plugin relies on (written against torchao 0.13 - 0.18): the e4m3 data and per-row
scales inside a weight quantized by ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class RowwiseFp8Weight(NamedTuple):
    qdata: torch.Tensor      # (N, K) float8_e4m3fn, row-major
    scale: torch.Tensor      # (N, 1) float32: weight ~= qdata * scale
    fast_accum: bool         # what torchao passes to torch._scaled_mm as use_fast_accum


def rowwise_fp8_weight(weight) -> Optional[RowwiseFp8Weight]:
    """The parts of a per-row dynamic fp8 weight (``Float8Tensor`` whose activations torchao quantizes per
    row to e4m3); None for anything else (plain, per-tensor, weight-only, int8, another library's)."""
    if type(weight).__name__ != "Float8Tensor":
        return None
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    act = getattr(weight, "act_quant_kwargs", None)
    if not (isinstance(qdata, torch.Tensor) and isinstance(scale, torch.Tensor) and act is not None):
        return None
    if qdata.dtype != torch.float8_e4m3fn or qdata.dim() != 2 or getattr(act, "float8_dtype", None) != qdata.dtype:
        return None
    if type(getattr(act, "granularity", None)).__name__ != "PerRow" or getattr(act, "hp_value_lb", None) is not None \
            or getattr(act, "hp_value_ub", None) is not None:
        return None
    if tuple(scale.shape) != (qdata.shape[0], 1) or scale.dtype != torch.float32:
        return None
    mm = getattr(weight, "mm_config", None)
    return RowwiseFp8Weight(qdata, scale, bool(getattr(mm, "use_fast_accum", False)))
