"""PNG pictures of a run: SimMIM reconstructions, expert loads, loss curves.

Everything draws on matplotlib `Figure` objects with the Agg canvas directly
(no pyplot, no display, no global backend switch), so it runs on headless
training hosts and in tests. Each function writes one PNG and returns its path.

Display composites, computed from de-normalised (physical-unit) pixels:

* optical: RGB as stored;
* multispectral: the bands nearest 664.6 / 559.8 / 492.4 nm (Sentinel-2
  B4 / B3 / B2, DESIGN.md s.4) as R / G / B, by wavelength, so any band order works;
* SAR-L2 (sigma0 dB, VV then VH): R = VV in [-25, 0] dB, G = VH in [-32, -5] dB,
  B = VV/VH (VV_dB - VH_dB) in [0, 15] dB: fixed ranges around the typical land
  medians (VV -12..-14, VH -18..-21 dB), so pictures of different steps compare;
* SAR-L1 (Re/Im of HH, HV, VH, VV): Pauli RGB, R = |HH - VV|, G = |HV + VH| / 2
  (= |HV| for a reciprocal target), B = |HH + VV|, in amplitude dB.
Reflectance and Pauli composites are stretched to the 2nd-98th percentile of the
TARGET image of each row, and the same stretch is applied to the masked input
and the reconstruction, so differences in brightness are real.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ringmoe.data.sensors import S2_BANDS

RGB_NM = tuple(S2_BANDS[band][0] for band in ("B4", "B3", "B2"))   # Sentinel-2 red, green, blue (nm)
SAR_L2_DB_RANGES = ((-25.0, 0.0), (-32.0, -5.0), (0.0, 15.0))  # VV, VH, VV/VH ratio
MASK_GREY = 0.5
COLUMNS = ("masked input", "reconstruction (visible pasted)", "target")


def _save(fig: Figure, path: str) -> str:
    FigureCanvasAgg(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def _wavelengths(batch_m: Mapping, model, modality: str) -> np.ndarray | None:
    """Band wavelengths (nm) from the batch's 'spectra' or the model config, else None."""
    spectra = batch_m.get("spectra") if isinstance(batch_m, Mapping) else None
    try:
        if spectra is not None:
            wavelengths = np.asarray(spectra[0], np.float64)
        elif model is not None and hasattr(model, "spectra"):
            wavelengths = np.asarray(model.spectra(modality)[0], np.float64)
        else:
            return None
    except (KeyError, ValueError, TypeError, IndexError):
        return None
    return wavelengths.reshape(-1) if wavelengths.size else None


def composite(modality: str, x: np.ndarray, wavelengths: np.ndarray | None = None, *, physical: bool = True
              ) -> tuple[np.ndarray, tuple | None]:
    """(..., H, W, C) physical pixels -> ((..., H, W, 3) display values, fixed (lo, hi) per channel or None).

    None means "stretch by percentiles"; `physical=False` (no norm stats) always does.
    """
    c = x.shape[-1]

    def pick(indices):
        return np.stack([x[..., min(i, c - 1)] for i in indices], axis=-1)

    fixed = None
    if modality == "multispectral" and wavelengths is not None and len(wavelengths) == c:
        rgb = pick([int(np.argmin(np.abs(wavelengths - nm))) for nm in RGB_NM])
    elif modality == "multispectral":
        rgb = pick([2, 1, 0])  # no wavelengths: assume B2, B3, B4 ... order
    elif modality == "sar_l2" and c >= 2:
        vv, vh = x[..., 0], x[..., 1]
        rgb, fixed = np.stack([vv, vh, vv - vh], axis=-1), SAR_L2_DB_RANGES
    elif modality == "sar_l2":
        rgb, fixed = pick([0, 0, 0]), (SAR_L2_DB_RANGES[0],) * 3
    elif modality == "sar_l1":
        pairs = [x[..., 2 * i] + 1j * x[..., 2 * i + 1] for i in range(c // 2)] or [x[..., 0].astype(complex)]
        if len(pairs) >= 4:
            hh, hv, vh, vv = pairs[:4]
            amps = [np.abs(hh - vv), np.abs(hv + vh) / 2, np.abs(hh + vv)]
        else:
            amps = [np.abs(pairs[0])] * 3
        rgb = 20.0 * np.log10(np.stack(amps, axis=-1) + 1e-6)
    else:
        rgb = pick([0, 1, 2])
    return rgb, (fixed if physical else None)


def _stretch(images: Sequence[np.ndarray], reference: np.ndarray, fixed) -> list[np.ndarray]:
    """Maps display values to [0, 1]: fixed ranges per channel, or the reference's 2-98 %."""
    if fixed is not None:
        lo = np.array([r[0] for r in fixed])
        hi = np.array([r[1] for r in fixed])
    else:
        finite = reference[np.isfinite(reference)]
        lo, hi = (np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0))
        lo, hi = np.full(3, lo), np.full(3, hi)
    scale = np.where(hi > lo, hi - lo, 1.0)
    return [np.clip(np.nan_to_num((im - lo) / scale, nan=0.0), 0.0, 1.0) for im in images]


def _pixel_mask(mask, rows: int, height: int, width: int) -> np.ndarray:
    if mask is None:
        return np.zeros((rows, height, width), bool)
    mask = np.asarray(mask, bool)[:rows]
    return np.repeat(np.repeat(mask, height // mask.shape[1], axis=1), width // mask.shape[2], axis=2)


def save_reconstructions(path: str, batch: Mapping, outputs: Mapping, model, norm_stats: Mapping | None, *,
                         max_rows: int = 4) -> str:
    """One PNG: per modality up to `max_rows` images, columns masked input /
    reconstruction with the visible patches pasted from the input (as SimMIM shows
    it) / target.

    batch[m]: 'pixels' (B, H, W, C) normalised, 'mask' (B, h, w) True = masked;
    outputs[m]['reconstruction'] (B, H, W, C) in the same normalised units; model
    gives band wavelengths (`spectra`); norm_stats[m] = {'mean': (C,), 'std': (C,)}
    de-normalises (without it the composites are percentile-stretched as they are).
    """
    norm_stats = norm_stats or {}
    panels = []  # (label, [masked, pasted, target]) in [0, 1]
    for modality in [m for m in batch if m in outputs]:
        target = np.asarray(batch[modality]["pixels"], np.float32)[:max_rows]
        rows, height, width, _ = target.shape
        recon = np.asarray(outputs[modality]["reconstruction"], np.float32)[:rows]
        stats = norm_stats.get(modality)
        if stats is not None:
            mean, std = np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
            target, recon = target * std + mean, recon * std + mean
        masked = _pixel_mask(batch[modality].get("mask"), rows, height, width)
        pasted = np.where(masked[..., None], recon, target)
        wavelengths = _wavelengths(batch[modality], model, modality)
        shown_target, fixed = composite(modality, target, wavelengths, physical=stats is not None)
        shown_pasted, _ = composite(modality, pasted, wavelengths, physical=stats is not None)
        for i in range(rows):
            t, p = _stretch([shown_target[i], shown_pasted[i]], shown_target[i], fixed)
            panels.append((f"{modality} #{i}", [np.where(masked[i, ..., None], MASK_GREY, t), p, t]))

    fig = Figure(figsize=(3 * 2.4, max(len(panels), 1) * 2.4 + 0.4))
    if not panels:
        fig.text(0.5, 0.5, "no modality with both a batch and an output", ha="center")
        return _save(fig, path)
    axes = fig.subplots(len(panels), 3, squeeze=False)
    for r, (label, images) in enumerate(panels):
        for c, image in enumerate(images):
            ax = axes[r, c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(COLUMNS[c], fontsize=9)
        axes[r, 0].set_ylabel(label, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def save_expert_load_heatmap(path: str, load: Mapping[str, np.ndarray]) -> str:
    """One panel per router group ('optical/modal', 'sar_l1/collaborative', ...):
    layers x experts, colour = share of the group's assignments, each cell annotated."""
    groups = [(k, np.asarray(v, np.float64).reshape(np.shape(v)[0], -1)) for k, v in load.items()]
    if not groups:
        fig = Figure(figsize=(4, 2))
        fig.text(0.5, 0.5, "no routed experts (dense FFNs)", ha="center", va="center")
        return _save(fig, path)
    cols = min(len(groups), 4)
    rows = math.ceil(len(groups) / cols)
    layers = max(g.shape[0] for _, g in groups)
    experts = max(g.shape[1] for _, g in groups)
    fig = Figure(figsize=(cols * max(3.8, 1.8 + 0.55 * experts), rows * (1.0 + 0.3 * layers)))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, (name, grid) in zip(axes.flat, groups):
        vmax = max(float(np.nanmax(grid)) if grid.size else 0.0, 1e-9)
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.08, pad=0.03)
        ax.set_title(f"{name} (balanced {1 / grid.shape[1]:.2f})", fontsize=9)
        ax.set_xticks(range(grid.shape[1]), [f"e{j}" for j in range(grid.shape[1])], fontsize=7)
        ax.set_yticks(range(grid.shape[0]), [str(i) for i in range(grid.shape[0])], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        if grid.size <= 600:
            for (i, j), value in np.ndenumerate(grid):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if value > 0.6 * vmax else "white")
    fig.tight_layout()
    return _save(fig, path)


def read_jsonl(path: str) -> list[dict]:
    """Records of a metrics.jsonl (lines that do not parse are skipped; null -> NaN)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append({k: (math.nan if v is None else v) for k, v in record.items()})
    return records


def default_loss_keys(records: Sequence[Mapping]) -> tuple[list[str], list[str], list[str]]:
    """(totals, terms, eval): 'loss' and '<modality>/total'; every other '<modality>/<term>'
    (router and load statistics excluded); the fixed-batch 'eval/loss' and 'eval/<modality>/simmim'."""
    names = sorted({k for r in records for k in r})
    scoped = [k for k in names if k.count("/") == 1 and k.split("/")[0] not in ("router", "load", "eval")]
    totals = (["loss"] if "loss" in names else []) + [k for k in scoped if k.endswith("/total")]
    evals = [k for k in names if k == "eval/loss" or (k.startswith("eval/") and k.endswith("/simmim"))]
    return totals, [k for k in scoped if not k.endswith("/total")], evals


def save_loss_curves(path: str, metrics_jsonl_path: str, keys: Sequence[str] | None = None) -> str:
    """Loss curves vs step, log y, from metrics.jsonl: with `keys` one panel of those;
    by default the total and per-modality totals, and beside them each objective term."""
    records = read_jsonl(metrics_jsonl_path) if os.path.exists(metrics_jsonl_path) else []
    panels = [("loss", list(keys))] if keys is not None else [
        (title, ks) for title, ks in zip(("total and per modality", "objective terms", "fixed eval batches: loss and masked L1"),
                                  default_loss_keys(records))
        if ks]
    fig = Figure(figsize=(6.5 * max(len(panels), 1), 4.2))
    if not panels or not records:
        fig.text(0.5, 0.5, f"no losses in {os.path.basename(metrics_jsonl_path)}", ha="center")
        return _save(fig, path)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, series) in zip(axes, panels):
        drawn = 0
        for key in series:
            points = [(r["step"], r[key]) for r in records
                      if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and r[key] > 0]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=key, linewidth=2.0 if key == "loss" else 1.0)
                drawn += 1
        if drawn:
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
