"""Sentinel-2 DN offset, from evidence only.

Since processing baseline 04.00 (in production from 25 Jan 2022) DNs carry an
offset: reflectance = (DN + offset) / 10000 with offset -1000, unless the product was
harmonised back to the old convention (offset 0). The baseline, not the
acquisition date, decides: the Collection-1 reprocessing (baseline 05.xx) of 2015-2021
acquisitions carries the offset too, so sensing/acquisition dates (PRODUCT_START_TIME,
DATATAKE_SENSING_START, SENSING_TIME, STAC `datetime`) prove nothing. A wrong guess
shifts every reflectance by 0.1, so the offset is taken from the first of these that
says anything, and never guessed: the options `offset=`, `harmonized=true` (0),
`baseline=` (e.g. 04.00 -> -1000); the tags BOA_ADD_OFFSET / RADIO_ADD_OFFSET; the
band scale/offset metadata of GDAL/STAC COGs (scale 1e-4 with offset -0.1 -> -1000,
with offset 0 -> 0, anything else an error); the tags HARMONIZED, PROCESSING_BASELINE;
a TIFF DateTime (when the file was written; GDAL's TIFFTAG_DATETIME) before 2022-01-25
-> 0, since such a file predates the offset. Anything else is a RecordError asking for
the option. The real chips in data/real carry none of these (their S1/RGB/LULC files
have only acquisition `datetime` tags, 2017-2021); their DNs start at 1 in dark bands
(B1 max 691 on one chip), which with -1000 would be negative reflectance, so they are
given as `sentinel2_l2a:offset=0` (tests/data/real_chips.csv).
"""
from __future__ import annotations

import datetime as dt
import re
from typing import Mapping, Sequence

import numpy as np

from ringmoe.data.schema import RecordError

BASELINE_04_DATE = dt.date(2022, 1, 25)


def resolve(preset: str, options: Mapping[str, str], tags: Mapping[str, str],
            band_scaling: tuple[Sequence[float], Sequence[float]] | None, where: str) -> int:
    """The DN offset of the source `where` bound to Sentinel-2 preset `preset`, from the
    first source in `EVIDENCE` that settles it; a RecordError naming `where` when none does.
    `band_scaling` is (per-band scales, per-band offsets) or None."""
    upper = {k.upper(): v for k, v in tags.items()}
    where = f"{where}: {preset}"
    for evidence in EVIDENCE:
        offset = evidence(options, upper, band_scaling, where)
        if offset is not None:
            return offset
    raise RecordError(f"{where}: cannot tell the DN offset (processing baseline unknown: no "
                      "BOA_ADD_OFFSET/RADIO_ADD_OFFSET/PROCESSING_BASELINE tag, no band scale/offset, "
                      f"no TIFF DateTime (file written) before {BASELINE_04_DATE}; acquisition dates "
                      f"do not tell); give the sensor as {preset}:offset=0 (pre-04.00 or harmonised) "
                      f"or {preset}:offset=-1000")


def _offset_from_options(options, tags, band_scaling, where) -> int | None:
    if "offset" in options:
        try:
            return int(options["offset"])
        except ValueError:
            raise RecordError(f"{where}: option offset={options['offset']!r} is not an integer") from None
    if options.get("harmonized", "").lower() in ("1", "true", "yes"):
        return 0
    if "baseline" in options:
        return _offset_for_baseline(options["baseline"], f"{where}: option baseline")
    return None


def _offset_from_offset_tags(options, tags, band_scaling, where) -> int | None:
    for key in ("BOA_ADD_OFFSET", "RADIO_ADD_OFFSET"):
        if key in tags:
            try:
                return int(float(tags[key]))
            except ValueError:
                raise RecordError(f"{where}: tag {key}={tags[key]!r} is not a number") from None
    return None


def _offset_from_band_scaling(options, tags, band_scaling, where) -> int | None:
    """GDAL/STAC COGs state reflectance = DN * scale + offset per band: scale 1e-4 with
    offset -0.1 is DN offset -1000, with offset 0 it is 0; other values are an error."""
    if band_scaling is None:
        return None
    scales, offsets = (np.asarray(v, np.float64) for v in band_scaling)
    if np.all(scales == 1.0) and np.all(offsets == 0.0):
        return None                                   # GDAL's default: no statement
    if np.allclose(scales, 1e-4, rtol=1e-6, atol=0.0):
        for reflectance_offset, dn_offset in ((-0.1, -1000), (0.0, 0)):
            if np.allclose(offsets, reflectance_offset, rtol=0.0, atol=1e-7):
                return dn_offset
    raise RecordError(f"{where}: band scale/offset {[f'{a:g}/{b:g}' for a, b in zip(scales, offsets)]} "
                      "not understood; Sentinel-2 DNs need scale 1e-4 with offset -0.1 (DN offset -1000) "
                      "or 0 on every band; if you know the DN offset, give it as the option offset=N")


def _offset_from_baseline_tags(options, tags, band_scaling, where) -> int | None:
    if tags.get("HARMONIZED", "").lower() in ("1", "true", "yes"):
        return 0
    if "PROCESSING_BASELINE" in tags:
        return _offset_for_baseline(tags["PROCESSING_BASELINE"], f"{where}: tag PROCESSING_BASELINE")
    return None


def _offset_from_file_date(options, tags, band_scaling, where) -> int | None:
    """A file written (TIFF DateTime, GDAL's TIFFTAG_DATETIME) before baseline 04.00
    existed cannot hold offset DNs."""
    date = _parse_date(tags.get("TIFFTAG_DATETIME", ""))
    return 0 if date is not None and date < BASELINE_04_DATE else None


# Sources of evidence for the Sentinel-2 DN offset, most direct first; each returns the
# offset it proves, None when it says nothing, or raises RecordError when it is malformed.
EVIDENCE = (_offset_from_options, _offset_from_offset_tags, _offset_from_band_scaling,
            _offset_from_baseline_tags, _offset_from_file_date)


def _offset_for_baseline(text: str, where: str) -> int:
    try:
        return -1000 if float(text) >= 4.0 else 0
    except ValueError:
        raise RecordError(f"{where}: processing baseline {text!r} is not like '04.00'") from None


def _parse_date(text: str) -> dt.date | None:
    """The date of 'YYYY-MM-DD...', 'YYYY:MM:DD ...' (TIFF) or 'YYYYMMDD...'; None otherwise."""
    m = re.match(r"\s*(\d{4})[-:]?(\d{2})[-:]?(\d{2})", text)
    if not m:
        return None
    try:
        return dt.date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None
