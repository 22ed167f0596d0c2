"""Sensor presets: how one sensor's file values become schema pixels in physical units.

A preset fixes the modality, the band list (with the physics of DESIGN.md section 4:
wavelength/bandwidth for optical bands, radar frequency/polarisation/part for SAR),
the nominal GSD, the no-data value, the band count and source dtypes a file must
have, and the named scaling (`SCALINGS`) from file values to the unit in
`schema.UNITS`, with its range check where a wrong unit would pass silently.
Ingesters (GeoTIFF, TFDS) only read arrays; everything sensor-specific lives here,
so a new sensor is one new entry in `PRESETS`.

Presets take options from a spec string `name[:key=value[:key=value]]`, e.g.
`sentinel2_l2a:offset=-1000`.

Sentinel-2 offset: taken only from evidence (options, tags, band scale/offset
metadata, a file written before baseline 04.00), never from acquisition dates; see
`s2offset`.

Sentinel-1 backscatter. `sentinel1_db` takes sigma0 in dB; `sentinel1_linear` takes
linear sigma0 and converts it with 10 log10, values <= 0 (left by thermal-noise
removal) becoming no-data. Linear values read as dB would pass every other check
(they are finite and small) and give intensities 10^(x/10) ~ 1 everywhere, so both
range-check each image: the median of the valid values must lie in [-35, 5] dB, and
dB data must be mostly below -1, linear data (never below -1) must not be; otherwise
a RecordError names the file and the other preset.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from ringmoe.data import s2offset
from ringmoe.data.schema import MODALITIES, Band, ModalityImage, RecordError

# DESIGN.md section 4: Sentinel-2 (S2A) central wavelength nm, bandwidth nm, native GSD m.
S2_BANDS = {
    "B1": (442.7, 21, 60), "B2": (492.4, 66, 10), "B3": (559.8, 36, 10), "B4": (664.6, 31, 10),
    "B5": (704.1, 15, 20), "B6": (740.5, 15, 20), "B7": (782.8, 20, 20), "B8": (832.8, 106, 10),
    "B8A": (864.7, 21, 20), "B9": (945.1, 20, 60), "B10": (1373.5, 31, 60),
    "B11": (1613.7, 91, 20), "B12": (2202.4, 175, 20),
}
S2_L1C_ORDER = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
S2_L2A_ORDER = tuple(b for b in S2_L1C_ORDER if b != "B10")
S1_FREQUENCY_GHZ = 5.405          # C band, wavelength 5.55 cm
# Fill written for no-data pixels whose source value has no finite physical image (NaN).
DB_NODATA_FILL = -9999.0


def sentinel2_band(name: str) -> Band:
    """The Band entry of one Sentinel-2 band ('B1'..'B12', 'B8A')."""
    wavelength, bandwidth, _ = S2_BANDS[name]
    return Band(name, wavelength_nm=float(wavelength), bandwidth_nm=float(bandwidth))


def sar_bands(polarizations: tuple[str, ...], frequency_ghz: float, complex_parts: bool) -> tuple[Band, ...]:
    """SAR channels: one per polarisation (detected) or re/im interleaved per polarisation."""
    if not complex_parts:
        return tuple(Band(p, frequency_ghz=frequency_ghz, polarization=p) for p in polarizations)
    return tuple(Band(f"{p}_{part}", frequency_ghz=frequency_ghz, polarization=p, part=part)
                 for p in polarizations for part in ("re", "im"))


@dataclasses.dataclass(frozen=True)
class SensorPreset:
    """Everything needed to turn one sensor's file into a `ModalityImage`.

    `scaling` names the file->physical map in `SCALINGS`. `nodata` is the file value
    that means no data when the file declares none. `complex_bands` is the band count
    of a complex-typed source (real-typed sources need len(bands))."""
    name: str
    modality: str
    bands: tuple[Band, ...]
    gsd_m: float
    dtypes: tuple[str, ...]
    scaling: str
    nodata: float | None = None
    complex_bands: int | None = None
    options: tuple[str, ...] = ()
    description: str = ""

    def bind(self, where: str, *, count: int, dtype: str, options: Mapping[str, str] | None = None,
             tags: Mapping[str, str] | None = None, file_nodata: float | None = None,
             gsd_m: float | None = None, scales: Sequence[float] | None = None,
             offsets: Sequence[float] | None = None) -> "Converter":
        """Checks a source's band count and dtype, resolves options, tags and the per-band
        scale/offset metadata (`scales`/`offsets`, as rasterio's `ds.scales`/`ds.offsets`);
        raises RecordError naming `where`."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise RecordError(f"{where}: sensor preset {self.name!r} has no option(s) {unknown}; "
                              f"valid: {list(self.options) or 'none'}")
        dtype = np.dtype(dtype).name
        if dtype not in self.dtypes:
            raise RecordError(f"{where}: sensor preset {self.name!r} expects dtype "
                              f"{' or '.join(self.dtypes)}, got {dtype}")
        is_complex = np.issubdtype(np.dtype(dtype), np.complexfloating)
        expected = self.complex_bands if is_complex else len(self.bands)
        if count != expected:
            raise RecordError(f"{where}: sensor preset {self.name!r} expects {expected} bands "
                              f"({', '.join(b.name for b in self.bands)}), got {count}")
        band_scaling = None if scales is None and offsets is None else (
            tuple(scales) if scales is not None else (1.0,) * count,
            tuple(offsets) if offsets is not None else (0.0,) * count)
        scaling = SCALINGS[self.scaling]
        if scaling.resolve_offset is not None:
            offset = scaling.resolve_offset(self.name, options, tags or {}, band_scaling, where)
        else:
            _check_default_band_scaling(self, band_scaling, where)
            offset = 0
        bands = self.bands
        if "frequency_ghz" in options:
            freq = _float_option(options, "frequency_ghz", where, self.name)
            bands = tuple(dataclasses.replace(b, frequency_ghz=freq) for b in bands)
        if "gsd_m" in options:
            gsd_m = _float_option(options, "gsd_m", where, self.name)
        src_nodata = file_nodata if file_nodata is not None else self.nodata
        return Converter(self, bands, offset, src_nodata, float(gsd_m or self.gsd_m))


@dataclasses.dataclass(frozen=True)
class Converter:
    """A preset bound to one source: turns raw (H, W, C_file) arrays into ModalityImages."""
    preset: SensorPreset
    bands: tuple[Band, ...]
    offset: int
    src_nodata: float | None
    gsd_m: float

    def image(self, raw: np.ndarray, where: str) -> ModalityImage:
        """Scales raw file values to physical units; no-data pixels get the fill value
        `ModalityImage.nodata`, as do values outside the scaling's domain; values the
        scaling's range check rejects, or any other NaN/Inf, are a RecordError naming `where`."""
        scaling = SCALINGS[self.preset.scaling]
        if np.iscomplexobj(raw):  # only complex presets accept complex dtypes (bind)
            # (H, W, P) complex -> (H, W, 2P) real with re/im interleaved per polarisation.
            raw = np.stack([raw.real, raw.imag], axis=-1).reshape(*raw.shape[:2], -1)
        x = raw.astype(np.float64)
        missing = _nodata_mask(raw, self.src_nodata)
        if scaling.check is not None:
            valid = np.isfinite(x) if missing is None else np.isfinite(x) & ~missing
            if valid.any():
                scaling.check(x[valid], f"{where}: {self.preset.name}")
        if scaling.invalid is not None:
            outside = scaling.invalid(x)
            missing = outside if missing is None else missing | outside
        pixels = scaling.apply(x, self.offset)
        fill = None
        if missing is not None:
            fill = self._fill()
            if missing.any():
                pixels[missing] = fill
        bad = ~np.isfinite(pixels)
        if bad.any():
            per_band = bad.reshape(-1, bad.shape[-1]).sum(0)
            names = [f"{b.name}:{int(n)}" for b, n in zip(self.bands, per_band) if n]
            raise RecordError(f"{where}: {int(bad.sum())} NaN/Inf pixels not marked as nodata "
                              f"(per band {', '.join(names)})")
        return ModalityImage(modality=self.preset.modality, pixels=pixels.astype(np.float32),
                             bands=self.bands, sensor=self.preset.name, gsd_m=self.gsd_m, nodata=fill)

    def _fill(self) -> float:
        """Physical value written into no-data pixels: the image of the source no-data
        value (e.g. S2 DN 0 -> offset/10000), or DB_NODATA_FILL when that is NaN/Inf
        (e.g. linear sigma0 0 -> -inf dB) or the source has no no-data value."""
        if self.src_nodata is None:
            return DB_NODATA_FILL
        value = float(SCALINGS[self.preset.scaling].apply(np.array([self.src_nodata], np.float64), self.offset)[0])
        return value if np.isfinite(value) else DB_NODATA_FILL


def _nodata_mask(raw: np.ndarray, nodata: float | None) -> np.ndarray | None:
    if nodata is None:
        return None
    if np.isnan(nodata):
        return np.isnan(raw)
    return raw == nodata


def _float_option(options: Mapping[str, str], key: str, where: str, preset: str) -> float:
    try:
        return float(options[key])
    except ValueError:
        raise RecordError(f"{where}: sensor preset {preset!r}: option {key}={options[key]!r} "
                          "is not a number") from None


def _check_default_band_scaling(preset: SensorPreset, band_scaling, where: str) -> None:
    """Presets whose scaling does not read band scale/offset metadata refuse a file that
    has any other than GDAL's default (1, 0): its values would be misread."""
    if band_scaling is None:
        return
    scales, offsets = band_scaling
    if any(a != 1.0 for a in scales) or any(b != 0.0 for b in offsets):
        raise RecordError(f"{where}: sensor preset {preset.name!r} does not apply band scale/offset "
                          f"metadata, but the file has {[f'{a:g}/{b:g}' for a, b in zip(scales, offsets)]}")


# Sentinel-1 sigma0 range checks: over land and water the median sigma0 lies in
# [-35, 5] dB (DESIGN.md section 4: land medians VV -12..-14, VH -18..-21 dB). dB values
# are mostly below -1 (VH nearly always is); linear sigma0 is never below -1 (it is >= 0
# up to small negatives left by thermal-noise removal).
SIGMA0_DB_RANGE = (-35.0, 5.0)
SIGMA0_DB_MIN_BELOW_M1 = 0.1        # dB data: at least this fraction of values below -1
SIGMA0_LINEAR_MAX_BELOW_M1 = 0.01   # linear data: at most this fraction below -1


def _check_sigma0_db(values: np.ndarray, where: str) -> None:
    """Valid file values of a sigma0-in-dB source; RecordError when they are not dB."""
    median, below = float(np.median(values)), float(np.mean(values < -1.0))
    lo, hi = SIGMA0_DB_RANGE
    if not lo <= median <= hi:
        raise RecordError(f"{where}: median {median:.3g} dB of valid pixels is outside [{lo:g}, {hi:g}]: "
                          "not sigma0 in dB")
    if below < SIGMA0_DB_MIN_BELOW_M1:
        raise RecordError(f"{where}: looks like linear sigma0, not dB (median {median:.3g}, only "
                          f"{below:.1%} of valid values below -1, where dB backscatter is mostly "
                          "negative); use sentinel1_linear")


def _check_sigma0_linear(values: np.ndarray, where: str) -> None:
    """Valid file values of a linear sigma0 source; RecordError when they look like dB
    or their median is outside the sigma0 range."""
    below = float(np.mean(values < -1.0))
    if below > SIGMA0_LINEAR_MAX_BELOW_M1:
        raise RecordError(f"{where}: {below:.1%} of valid values are below -1, which linear sigma0 "
                          f"never is (median {float(np.median(values)):.3g}); these look like dB: "
                          "use sentinel1_db")
    positive = values[values > 0]
    if positive.size:
        median_db = 10.0 * np.log10(float(np.median(positive)))
        lo, hi = SIGMA0_DB_RANGE
        if not lo <= median_db <= hi:
            raise RecordError(f"{where}: median {median_db:.3g} dB of positive values is outside "
                              f"[{lo:g}, {hi:g}]: not linear sigma0")


def _linear_to_db(x: np.ndarray, offset: int) -> np.ndarray:
    """10 log10(sigma0); non-positive values give -inf/NaN here and are no-data (`invalid`)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return 10.0 * np.log10(x)


@dataclasses.dataclass(frozen=True)
class Scaling:
    """A named file->physical map (the `scaling` of a preset).

    `apply(x, offset)`: float64 file values -> physical values (`offset` is the DN
    offset `resolve_offset` bound; 0 when it is None). `resolve_offset(preset_name,
    options, tags, band_scaling, where)`: that offset; a scaling without it refuses non-default
    band scale/offset metadata. `invalid(x)`: file values outside the map's domain, which
    become no-data. `check(valid_values, where)`: RecordError when a source's valid file
    values cannot be in the unit the preset claims (e.g. linear sigma0 given as dB)."""
    apply: Callable[[np.ndarray, int], np.ndarray]
    resolve_offset: Callable[..., int] | None = None
    invalid: Callable[[np.ndarray], np.ndarray] | None = None
    check: Callable[[np.ndarray, str], None] | None = None


SCALINGS: dict[str, Scaling] = {
    "s2_dn": Scaling(lambda x, offset: (x + offset) / 10000.0, resolve_offset=s2offset.resolve),
    "uint8": Scaling(lambda x, offset: x / 255.0),
    "complex": Scaling(lambda x, offset: x),     # re/im parts (complex split in Converter.image)
    "sigma0_db": Scaling(lambda x, offset: x, check=_check_sigma0_db),
    "sigma0_linear": Scaling(_linear_to_db, invalid=lambda x: x <= 0, check=_check_sigma0_linear),
}


PRESETS: dict[str, SensorPreset] = {p.name: p for p in (
    SensorPreset(
        "sentinel2_l2a", "multispectral", tuple(sentinel2_band(b) for b in S2_L2A_ORDER), 10.0,
        ("uint16", "int16"), "s2_dn", nodata=0, options=("offset", "baseline", "harmonized"),
        description="Sentinel-2 L2A surface reflectance DNs, 12 bands B1..B12 without B10"),
    SensorPreset(
        "sentinel2_l1c", "multispectral", tuple(sentinel2_band(b) for b in S2_L1C_ORDER), 10.0,
        ("uint16", "int16"), "s2_dn", nodata=0, options=("offset", "baseline", "harmonized"),
        description="Sentinel-2 L1C top-of-atmosphere reflectance DNs, 13 bands incl. B10"),
    SensorPreset(
        "sentinel1_db", "sar_l2", sar_bands(("VV", "VH"), S1_FREQUENCY_GHZ, False), 10.0,
        ("float32", "float64"), "sigma0_db",
        description="Sentinel-1 GRD (IW) backscatter sigma0 in dB, bands VV, VH"),
    SensorPreset(
        "sentinel1_linear", "sar_l2", sar_bands(("VV", "VH"), S1_FREQUENCY_GHZ, False), 10.0,
        ("float32", "float64"), "sigma0_linear", nodata=0.0,
        description="Sentinel-1 GRD (IW) backscatter sigma0 in linear power, bands VV, VH -> dB "
                    "(10 log10); values <= 0 (thermal-noise removal) are no-data"),
    SensorPreset(
        "sentinel1_slc", "sar_l1", sar_bands(("VH", "VV"), S1_FREQUENCY_GHZ, True), 10.0,
        ("complex64", "complex128", "float32", "float64"), "complex", nodata=0, complex_bands=2,
        options=("gsd_m",),
        description="Sentinel-1 SLC dual-pol: complex VH, VV (2 complex or 4 re/im bands)"),
    SensorPreset(
        "rgb", "optical",
        (Band("R", 664.6, 31.0), Band("G", 559.8, 36.0), Band("B", 492.4, 66.0)), 10.0,
        ("uint8",), "uint8", options=("gsd_m",),
        description="8-bit true colour R, G, B -> [0, 1]; wavelengths nominal (Sentinel-2 B4/B3/B2)"),
    SensorPreset(
        "sar_l1_quadpol", "sar_l1", sar_bands(("HH", "HV", "VH", "VV"), 5.4, True), 8.0,
        ("complex64", "complex128", "float32", "float64"), "complex", nodata=0, complex_bands=4,
        options=("frequency_ghz", "gsd_m"),
        description="complex quad-pol scattering matrix HH, HV, VH, VV -> 8 re/im channels; "
                    "defaults: C band 5.4 GHz, 8 m (Gaofen-3 QPSI); set frequency_ghz/gsd_m"),
)}
assert all(p.modality in MODALITIES and p.scaling in SCALINGS for p in PRESETS.values())


def parse_spec(spec: str, where: str = "sensor") -> tuple[SensorPreset, dict[str, str]]:
    """`name[:key=value...]` -> (preset, options); unknown names are a RecordError."""
    name, *parts = spec.strip().split(":")
    if name not in PRESETS:
        raise RecordError(f"{where}: unknown sensor preset {name!r}; known: {sorted(PRESETS)}")
    options = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise RecordError(f"{where}: sensor option {part!r} in {spec!r} is not key=value")
        options[key.strip()] = value.strip()
    return PRESETS[name], options


def get_preset(name: str) -> SensorPreset:
    """The preset called `name` (no options)."""
    return parse_spec(name)[0]
