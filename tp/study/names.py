"""The format names ``qformats eval`` accepts beyond qformats' presets and specs, kept light
(qformats only) so that ``qformats inspect`` explains every one of them without importing the
TP runtime: the baseline and Dong et al.'s calibrated outlier formats."""
from __future__ import annotations

import difflib

BASELINE = "bf16"  # the uncompressed all-reduce (the baseline row of qformats eval)
OUTLIER_FORMAT = "outlier_int4"  # Dong et al.: calibrated static INT4 + floor(E/64) bf16 outlier features
# The calibrated formats by name: the bf16 outlier features of one calibration, the other
# features in static INT4 (None) or in a block format with dynamic scales. int4/b64/bf16 (not b32)
# because with the 9 bf16 outliers of a 576-wide row it costs 4.5 bits per value, what
# int4/b32/bf16 costs without them: the comparison is at equal wire bits.
OUTLIER_FORMATS = {
    OUTLIER_FORMAT: None,
    "outlier_int4_dyn": "int4/b64/bf16",
    "outlier_int4_dyn_h32": "int4/b64/bf16+h32",
}
# "outlier:SPEC": the calibrated outliers with any other block format for the rest.
OUTLIER_PREFIX = "outlier:"


def calibrated_rest(name: str):
    """``(True, rest)`` for an outlier format name (``rest``: the non-outliers' format string, None
    for static INT4 scales), ``(False, None)`` otherwise. Names are case-insensitive."""
    key = name.strip()
    if key.lower() in OUTLIER_FORMATS:
        return True, OUTLIER_FORMATS[key.lower()]
    if key.lower().startswith(OUTLIER_PREFIX):
        rest = key[len(OUTLIER_PREFIX):].strip()
        if not rest:
            raise ValueError(f"{OUTLIER_PREFIX}SPEC needs a block format after the colon, e.g. {OUTLIER_PREFIX}int4/b32/bf16")
        return True, rest
    return False, None


def suggest(name: str, extra=()) -> str:
    """' (did you mean X?)' for a misspelt name among the presets and ``extra`` names, else ''."""
    from qformats import PRESETS

    close = difflib.get_close_matches(name.strip().lower(), [*extra, *PRESETS], n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def explain_name(name: str, explain) -> str:
    """``qformats inspect NAME``: ``explain`` (qformats.describe.explain) of a preset or spec, or a
    description of the baseline and of the calibrated outlier formats that eval accepts."""
    key = name.strip()
    if key.lower() in (BASELINE, "none"):
        return (f"format      {BASELINE} (the uncompressed all-reduce: qformats eval's baseline)\n"
                "bits/value  16 (bf16 on the wire; the eval's baseline model itself computes in fp32 without TP)")
    calibrated, rest = calibrated_rest(key)
    if calibrated:
        head = [f"format      {key}: Dong et al.'s outlier-aware all-reduce, calibrated on the model at run time",
                "outliers    the k = floor(E/64) features with the largest calibrated range (E = row width) travel in bf16",
                "rest        " + ("INT4 with static per-feature scales from the calibration (clipped at "
                                  "--calib-clip RMS); about 4.2 bits per value" if rest is None
                                  else f"{rest}, with dynamic block scales:")]
        if rest is None:
            return "\n".join(head)
        return "\n".join(head) + "\n" + "\n".join("  " + ln for ln in explain(rest).splitlines())
    try:
        return explain(key)
    except ValueError as exc:
        hint = suggest(key, [BASELINE, *OUTLIER_FORMATS])
        if hint and "did you mean" not in str(exc):
            raise ValueError(f"{exc}{hint}") from None
        raise
