"""What each architecture accepts (no torch here: the params are validated without importing it)."""

from __future__ import annotations

from collections.abc import Sequence

# ASPP rates of DeepLab v3 / v3+ per output stride (the papers): the 3x3 branches see the same context at either.
RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
ARCHS = ("deeplabv2", "deeplabv3", "deeplabv3plus")


def atrous_rates_for(arch: str, output_stride: int, atrous_rates: Sequence[int] | None = None) -> tuple[int, ...]:
    """The ASPP rates of ``arch`` (``atrous_rates`` if given, else the paper's for the output stride); raises
    ValueError for an arch, output stride or rate count the model cannot take."""
    if arch not in ARCHS:
        raise ValueError(f"model.arch: {arch!r} is not one of {', '.join(ARCHS)}")
    if arch == "deeplabv2":
        if output_stride != 8:
            raise ValueError(f"model.output_stride: deeplabv2 runs at output stride 8 only (res4 and res5 dilated "
                             f"2 and 4, as its caffemodels), got {output_stride}; use 8, or model.arch deeplabv3")
        return tuple(int(r) for r in ((6, 12, 18, 24) if atrous_rates is None else atrous_rates))
    if output_stride not in RATES:
        raise ValueError(f"model.output_stride: {arch} runs at 8 or 16, got {output_stride}")
    if atrous_rates is None:
        return RATES[output_stride]
    if len(atrous_rates) != 3:
        raise ValueError(f"model.atrous_rates: {arch} takes 3 rates for its 3x3 ASPP branches, got "
                         f"{list(atrous_rates)}; the papers use {list(RATES[8])} at output stride 8 and "
                         f"{list(RATES[16])} at 16 (null picks them)")
    return tuple(int(r) for r in atrous_rates)
