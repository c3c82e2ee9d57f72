"""What a run did to one slide, as ``report.json`` and a self-contained ``report.html``.

The JSON is for machines (batch summaries, benchmarks, "is this slide already done"
checks); the HTML is for the person who ran it and must decide whether to trust the
slide: first the warnings (upsampled input, no tissue, nuclei cut at tile edges,
low-confidence classes, fragments), then crops of the slide at full resolution with
every nucleus outlined in its class colour (:mod:`wsi_pipeline.outputs.qc` picks them
from the densest to the sparsest tissue), the nucleus-size histogram, a per-class
table, the slide thumbnail with the tissue mask and where the nuclei of each class are,
where the time went and how even the tiles were. Images are PNGs embedded as base64 so
the file can be mailed or archived alone; one checkbox (a few lines of inline script)
hides the outlines to see the tissue under them.

The nuclei overlay cannot keep every nucleus (a slide holds hundreds of thousands), so
:class:`NucleiDensity` is one more sink on the stitcher that only counts nuclei per
class on a coarse grid: memory bounded by the grid, not the slide.

Stage seconds of read / infer / post-process are summed over tiles (worker busy time,
which exceeds the wall clock when several workers run at once); stitch and write are
spent in the main process. Throughputs divide by the slide's wall-clock seconds.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.atomic import write_text_atomic
from wsi_pipeline.nuclei import Nucleus
from wsi_pipeline.outputs.fields import UNTYPED_COLOR, UNTYPED_DESCRIPTION, UNTYPED_NAME
from wsi_pipeline.outputs.qc import FRAGMENT_UM2, Crop
from wsi_pipeline.slide.tissue import TissueMask

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
BATCH_REPORT_JSON = "batch_report.json"
STAGES = ("startup", "read", "infer", "postprocess", "stitch", "write")
_PACKAGES = (
    "wsi_pipeline",
    "torch",
    "numpy",
    "scipy",
    "scikit-image",
    "opencv-python-headless",
    "openslide-python",
    "openslide-bin",
    "tiffslide",
    "tifffile",
    "dask",
    "distributed",
    "zarr",
    "ome-zarr-models",
    "pyarrow",
    "shapely",
)


@dataclass
class SlideReport:
    """Everything ``report.json`` says about one slide; the run fills it in.

    Sizes are level-0 pixels unless named otherwise; ``mpp`` is the inference µm/px,
    ``slide_mpp`` the slide's level-0 (x, y). ``nuclei_per_class`` maps class name ->
    count (see :func:`per_class_counts`); ``seconds`` maps the stages of :data:`STAGES`
    to seconds; ``tile_seconds`` holds each tile's worker time, summarised in the JSON
    and drawn as a histogram. ``qc`` is :meth:`~wsi_pipeline.outputs.qc.NucleiQC.summary`
    (per-class confidences, area histogram); ``crops`` the windows the report shows.
    """

    slide: str
    name: str
    width: int
    height: int
    slide_mpp: tuple[float, float]
    mpp: float
    tissue_mm2: float
    tiles: int
    tiles_grid: int
    tile_size: int
    margin: int
    nuclei_per_class: dict[str, int]
    edge_touching: int
    seconds: dict[str, float]
    wall_seconds: float
    model: dict[str, Any]
    config: dict[str, Any]
    config_checksum: str
    classes: list[dict[str, Any]] = field(default_factory=list)
    tile_seconds: list[float] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=lambda: collect_versions())
    outputs: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    qc: dict[str, Any] = field(default_factory=dict)
    crops: list[dict[str, Any]] = field(default_factory=list)
    startup: dict[str, float] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    # Tiles taken from an interrupted run's checkpoint (their stage seconds are that run's).
    tiles_resumed: int = 0
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def nuclei(self) -> int:
        return int(sum(self.nuclei_per_class.values()))

    @property
    def tissue_mpx(self) -> float:
        """Tissue area in megapixels at the inference µm/px."""
        return self.tissue_mm2 / (self.mpp * self.mpp)

    def throughput(self) -> dict[str, float | None]:
        """Per wall-clock second; None when no time was measured."""
        wall = self.wall_seconds
        if wall <= 0:
            return {"tissue_mm2_per_s": None, "tissue_mpx_per_s": None, "nuclei_per_s": None, "s_per_tissue_mm2": None}
        return {
            "tissue_mm2_per_s": self.tissue_mm2 / wall,
            "tissue_mpx_per_s": self.tissue_mpx / wall,
            "nuclei_per_s": self.nuclei / wall,
            "s_per_tissue_mm2": wall / self.tissue_mm2 if self.tissue_mm2 > 0 else None,
        }

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` content."""
        seconds = {stage: float(self.seconds.get(stage, 0.0)) for stage in STAGES}
        seconds.update({k: float(v) for k, v in self.seconds.items() if k not in seconds})
        seconds["wall"] = float(self.wall_seconds)
        return {
            "slide": {
                "path": self.slide,
                "name": self.name,
                "width": int(self.width),
                "height": int(self.height),
                "mpp_x": float(self.slide_mpp[0]),
                "mpp_y": float(self.slide_mpp[1]),
            },
            "mpp": float(self.mpp),
            "tissue_mm2": float(self.tissue_mm2),
            "tissue_mpx": float(self.tissue_mpx),
            "tiles": {
                "processed": int(self.tiles),
                "grid": int(self.tiles_grid),
                "resumed": int(self.tiles_resumed),
                "tile_size": int(self.tile_size),
                "margin": int(self.margin),
                "seconds": summarise(self.tile_seconds),
            },
            "nuclei": {"total": self.nuclei, "per_class": {k: int(v) for k, v in self.nuclei_per_class.items()}},
            "edge_touching": int(self.edge_touching),
            "seconds": seconds,
            "startup": {k: float(v) for k, v in self.startup.items()},
            "engine": dict(self.engine),
            "throughput": self.throughput(),
            "model": dict(self.model),
            "classes": [{"id": int(c["id"]), "name": str(c["name"]), "color": list(c["color"])} for c in self.classes],
            "versions": dict(self.versions),
            "config": self.config,
            "config_checksum": self.config_checksum,
            "outputs": dict(self.outputs),
            "warnings": list(self.warnings),
            "qc": dict(self.qc),
            "crops": [dict(c) for c in self.crops],
            "created": self.created,
        }


def per_class_counts(per_type: Mapping[int, int], classes: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Type id -> count (the stitcher's) as class name -> count, every class listed
    (0 for absent ones) and untyped nuclei as :data:`UNTYPED_NAME` when there are any."""
    names = {int(c["id"]): str(c["name"]) for c in classes}
    counts = {names[i]: 0 for i in sorted(names)}
    for type_id, count in sorted(per_type.items()):
        name = names.get(int(type_id), UNTYPED_NAME if int(type_id) == 0 else f"type_{type_id}")
        counts[name] = counts.get(name, 0) + int(count)
    return counts


def summarise(values: Sequence[float]) -> dict[str, float | int | None]:
    """Count, mean, median, 95th percentile and max of a list of seconds."""
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "max": None}
    array = np.asarray(values, dtype=np.float64)
    return {
        "count": int(array.size),
        "mean": float(array.mean()),
        "p50": float(np.percentile(array, 50)),
        "p95": float(np.percentile(array, 95)),
        "max": float(array.max()),
    }


def collect_versions() -> dict[str, str]:
    """Python, platform and the installed versions of the packages results depend on."""
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


class NucleiDensity:
    """Counts nuclei per class on a coarse grid over the slide (a stitcher sink).

    Args:
        width, height: level-0 slide size.
        slide_mpp: level-0 µm/px (x, y), to express density per mm².
        num_types: type ids 0..num_types-1 (0 = no class), i.e. len(classes) + 1.
        cells: at most this many grid cells along the slide's longer side.
        cell_um: cell side in µm. Density is only meaningful over areas holding many
            nuclei (a ~7 µm nucleus in a cell of a few µm reads as 10⁵ per mm²), so
            cells are at least this large; on big slides ``cells`` caps the grid.
    """

    def __init__(
        self,
        width: int,
        height: int,
        slide_mpp: tuple[float, float],
        num_types: int,
        cells: int = 256,
        cell_um: float = 50.0,
    ) -> None:
        if width <= 0 or height <= 0 or num_types < 1 or cells < 1 or cell_um <= 0:
            raise ValueError(f"bad density grid: {width}x{height}, {num_types} types, {cells} cells, {cell_um} µm")
        self.width, self.height = int(width), int(height)
        # level-0 pixels per cell
        self.cell = max(max(self.width, self.height) / cells, cell_um / float(slide_mpp[0]))
        self.rows = max(1, math.ceil(self.height / self.cell))
        self.cols = max(1, math.ceil(self.width / self.cell))
        self.counts = np.zeros((num_types, self.rows, self.cols), dtype=np.int32)
        self.cell_mm2 = (self.cell * slide_mpp[0]) * (self.cell * slide_mpp[1]) / 1e6

    def add(self, nucleus: Nucleus) -> None:
        x, y = nucleus.centroid
        r = min(max(int(y / self.cell), 0), self.rows - 1)
        c = min(max(int(x / self.cell), 0), self.cols - 1)
        t = int(nucleus.type)
        if not 0 <= t < self.counts.shape[0]:
            raise ValueError(f"nucleus {nucleus.label} has type {t}, expected 0..{self.counts.shape[0] - 1}")
        self.counts[t, r, c] += 1

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def per_mm2(self) -> np.ndarray:
        """Nuclei per mm² in each cell (all classes)."""
        return self.counts.sum(axis=0) / self.cell_mm2


def write_report(
    out_dir: Path,
    report: SlideReport,
    *,
    thumbnail: np.ndarray | None = None,
    tissue: TissueMask | None = None,
    density: NucleiDensity | None = None,
    crops: Sequence[Crop] = (),
) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir``; returns both paths.

    ``thumbnail`` is an RGB image of the whole slide (any size; the tissue mask's
    thumbnail fits best); without it the overview shows the mask and density alone.
    ``crops`` (:func:`~wsi_pipeline.outputs.qc.read_crops`) are shown with their outlines;
    ``report.crops`` describes them in the JSON.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = report.to_dict()
    json_path = write_text_atomic(out_dir / REPORT_JSON, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    html_path = write_text_atomic(out_dir / REPORT_HTML, render_html(report, thumbnail, tissue, density, crops))
    return json_path, html_path


def write_batch_report(
    out_dir: Path, rows: Sequence[Mapping[str, Any]], last_run: Mapping[str, Any] | None = None
) -> Path:
    """Write ``batch_report.json``: totals by status plus every slide's row
    (path, status done/failed/skipped, reason, seconds, nuclei), and ``last_run`` (when the
    latest run started and which slides it touched: the rows span every run into the folder)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [dict(row) for row in rows]
    statuses = [str(row.get("status", "")) for row in rows]
    summary = {
        "slides": len(rows),
        "done": statuses.count("done"),
        "failed": statuses.count("failed"),
        "skipped": statuses.count("skipped"),
        "seconds": float(sum(float(row.get("seconds") or 0.0) for row in rows)),
        "nuclei": int(sum(int(row.get("nuclei") or 0) for row in rows)),
        "ok": all(status in ("done", "skipped") for status in statuses),
        "versions": collect_versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "last_run": dict(last_run or {}),
        "rows": rows,
    }
    return write_text_atomic(out_dir / BATCH_REPORT_JSON, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


# -- HTML --------------------------------------------------------------------------------


def render_html(
    report: SlideReport,
    thumbnail: np.ndarray | None = None,
    tissue: TissueMask | None = None,
    density: NucleiDensity | None = None,
    crops: Sequence[Crop] = (),
) -> str:
    """The report page: warnings, the nuclei drawn on crops of the slide, size and
    class figures, then the run's facts and timings."""
    data = report.to_dict()
    colors = _class_colors(report.classes)
    throughput = data["throughput"]
    summary = [
        ("Slide", report.slide),
        (
            "Size (level 0)",
            f"{report.width} x {report.height} px at {_fmt(report.slide_mpp[0])} x {_fmt(report.slide_mpp[1])} µm/px",
        ),
        ("Inference resolution", f"{_fmt(report.mpp)} µm/px"),
        ("Tissue", f"{_fmt(report.tissue_mm2)} mm² ({_fmt(report.tissue_mpx)} Mpx)"),
        ("Tiles", f"{report.tiles} of {report.tiles_grid} ({report.tile_size} px core, {report.margin} px margin)"
                  + (f"; {report.tiles_resumed} resumed from an interrupted run" if report.tiles_resumed else "")),
        ("Nuclei", f"{report.nuclei}"),
        ("Touching a tile edge", f"{report.edge_touching}"),
        ("Engine", ", ".join(f"{k}: {v} tile(s)" for k, v in report.engine.get("tiles_by_engine", {}).items())
                   + (f" (window {report.engine['window']} px)" if report.engine.get("window") else "")
                   + (_windows_line(report.engine["windows"]) if report.engine.get("windows", {}).get("total") else "")
                   + (f"; {report.engine['note']}" if report.engine.get("note") else "")),
        ("Start-up", ", ".join(f"{k} {_fmt(v)} s" for k, v in report.startup.items()) or "-"),
        ("Wall clock", f"{_fmt(report.wall_seconds)} s"),
        (
            "Tissue throughput",
            f"{_fmt(throughput['tissue_mm2_per_s'])} mm²/s, {_fmt(throughput['tissue_mpx_per_s'])} Mpx/s",
        ),
        ("Nuclei per second", _fmt(throughput["nuclei_per_s"])),
        ("Outputs", ", ".join(report.outputs.values())),
    ]
    model = [(str(k), _fmt(v)) for k, v in report.model.items()]
    windows = [c.window for c in crops]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(report.name)}: nuclei report</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(report.name)}</h1>",
        f'<p class="meta">wsi_pipeline report, {html.escape(report.created)}. Research use only.</p>',
        _warnings_panel(report.warnings),
        _table("Summary", summary),
        _crops_section(report, crops, colors),
        "<h2>Nuclei per class</h2>",
        _class_table(report),
        _image("Nuclei per class", _plot_class_counts(report.nuclei_per_class, colors)),
        "<h2>Nucleus size</h2>",
        _image("Nucleus size histogram", _plot_size_histogram(report.qc, report.classes)),
        "<h2>Slide overview</h2>",
        _image("Slide overview", _plot_overview(report, thumbnail, tissue, density, windows)),
        "<h2>Time per stage</h2>",
        _image("Time per stage", _plot_stage_times(data["seconds"])),
        "<h2>Tile times</h2>",
        _image("Tile times", _plot_tile_histogram(report.tile_seconds)),
        _table("Model", model),
        _table("Versions", list(report.versions.items())),
        f"<h2>Configuration</h2><p>checksum <code>{html.escape(report.config_checksum)}</code></p>"
        f"<pre>{html.escape(json.dumps(report.config, indent=2, default=str, ensure_ascii=False))}</pre>",
        f"<script>{_SCRIPT}</script>",
        "</body></html>\n",
    ]
    return "\n".join(parts)


def _image(title: str, png: bytes, css: str = "") -> str:
    encoded = base64.b64encode(png).decode("ascii")
    extra = f' class="{css}"' if css else ""
    return f'<img{extra} alt="{html.escape(title)}" src="data:image/png;base64,{encoded}">'


def _png_of(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    # zlib level 3, not PIL's 6: 2.7x faster on H&E crops for 7% more bytes (measured on the sample
    # pyramid's 512 px crops); photographic pixels barely compress further.
    Image.fromarray(np.ascontiguousarray(rgb[..., :3]).astype(np.uint8), "RGB").save(
        buffer, format="PNG", compress_level=3
    )
    return buffer.getvalue()


def _warnings_panel(warnings: Sequence[str]) -> str:
    if not warnings:
        return '<div class="warnings ok" id="warnings"><h2>Warnings</h2><p>None.</p></div>'
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return f'<div class="warnings" id="warnings"><h2>Warnings ({len(warnings)})</h2><ul>{items}</ul></div>'


def _legend(colors: Mapping[str, tuple[int, int, int]], names: Sequence[str]) -> str:
    items = "".join(
        f'<span class="swatch" style="background:rgb{tuple(colors.get(n, UNTYPED_COLOR))}"></span>{html.escape(n)} '
        for n in names
    )
    return f'<p class="legend">{items}</p>'


def _crops_section(report: SlideReport, crops: Sequence[Crop], colors: Mapping[str, tuple[int, int, int]]) -> str:
    """The crops at the inference resolution, outlines drawn; shown 1:1 (no resampling
    blurs the outlines), the raw crop under each for the outline toggle."""
    head = "<h2>Nuclei on the slide</h2>"
    if not crops:
        why = "no tissue was found" if report.tiles == 0 or report.tissue_mm2 <= 0 else "no crop could be read"
        return head + f'<p class="none">No crops: {why}.</p>'
    shown = [n for n, c in report.nuclei_per_class.items() if c] or list(report.nuclei_per_class)
    intro = (
        f"<p>{len(crops)} regions of {crops[0].window.width_px} x {crops[0].window.height_px} px at "
        f"{_fmt(report.mpp)} µm/px (what the model saw), chosen over the tissue from the densest to the sparsest; "
        "every nucleus outline is drawn in its class colour. "
        '<label><input type="checkbox" id="outlines" checked> outlines</label></p>'
    )
    figures = []
    for number, crop in enumerate(crops, start=1):
        w = crop.window
        counts = ", ".join(f"{k} {v}" for k, v in sorted(crop.per_class.items(), key=lambda kv: -kv[1])) or "none"
        caption = (
            f"{number}. {w.kind}: {crop.nuclei} nuclei ({_fmt(w.density_per_mm2)} / mm² around it); {counts}. "
            f"Level-0 box x {w.x0:.0f}, y {w.y0:.0f}, {w.width:.0f} x {w.height:.0f} px."
        )
        figures.append(
            f'<figure class="crop" style="width:{w.width_px}px">'
            f'<div class="stack" style="width:{w.width_px}px;height:{w.height_px}px">'
            + _image(f"crop {number}", _png_of(crop.image), "raw")
            + _image(f"crop {number} with nucleus outlines", _png_of(crop.outlined), "outlined")
            + f"</div><figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    return head + intro + _legend(colors, shown) + '<div class="crops">' + "".join(figures) + "</div>"


def _class_table(report: SlideReport) -> str:
    """Count, share, size and confidence per class (from the QC summary when there is one)."""
    rows = report.qc.get("per_class") if report.qc else None
    if not rows:
        total = max(report.nuclei, 1)
        counts = [(n, f"{c:,} ({100 * c / total:.1f}%)") for n, c in report.nuclei_per_class.items()]
        return _table("", counts)
    head = (
        "<tr><th></th><th>class</th><th>nuclei</th><th>share</th><th>median area µm²</th>"
        "<th>mean class probability</th><th>mean vote fraction</th><th>low-confidence</th></tr>"
    )
    body = []
    for row in rows:
        if not row["count"] and row["id"] == 0:
            continue
        color = tuple(int(v) for v in row["color"])
        name = html.escape(row["name"])
        if row["id"] == 0:
            name = f'<span title="{html.escape(UNTYPED_DESCRIPTION)}">{name} (untyped)</span>'
        low = f"{row['low_confidence']:,}" if row["id"] else "n/a"
        body.append(
            f'<tr><td><span class="swatch" style="background:rgb{color}"></span></td><td>{name}</td>'
            f"<td>{row['count']:,}</td><td>{100 * row['share']:.1f}%</td><td>{_fmt(row['median_area_um2'])}</td>"
            f"<td>{_fmt(row['mean_class_probability'])}</td><td>{_fmt(row['mean_vote_fraction'])}</td>"
            f"<td>{low}</td></tr>"
        )
    note = (
        f'<p class="note"><b>{html.escape(UNTYPED_NAME)}</b>: {html.escape(UNTYPED_DESCRIPTION)}. '
        "<b>Mean class probability</b>: the type head's probability of the nucleus' class, averaged over its pixels; "
        "<b>vote fraction</b>: the share of its pixels whose most probable class is its class. "
        f"<b>Low-confidence</b>: mean class probability below {_fmt(report.qc.get('low_confidence_below'))}.</p>"
    )
    return f'<table class="classes">{head}{"".join(body)}</table>{note}'


def _class_colors(classes: Sequence[Mapping[str, Any]]) -> dict[str, tuple[int, int, int]]:
    colors: dict[str, tuple[int, int, int]] = {
        str(c["name"]): (int(c["color"][0]), int(c["color"][1]), int(c["color"][2])) for c in classes
    }
    colors.setdefault(UNTYPED_NAME, UNTYPED_COLOR)
    return colors


# -- plots (matplotlib's Agg backend: no display needed) ---------------------------------


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), squeeze=False, layout="constrained")


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _plot_overview(
    report: SlideReport,
    thumbnail: np.ndarray | None,
    tissue: TissueMask | None,
    density: NucleiDensity | None,
    windows: Sequence[Any] = (),
) -> bytes:
    """Three panels over the same level-0 frame: thumbnail + tissue outline + the crops
    shown above (numbered boxes), nuclei per mm², and each cell's most frequent class
    (opacity following density)."""
    width, height = report.width, report.height
    extent = (0, width, height, 0)
    fig, axes = _figure(15, 5.2 * max(0.35, min(1.5, height / width)) + 0.8, ncols=3)
    axes = axes[0]
    grey = None
    if thumbnail is not None:
        rgb = np.asarray(thumbnail)[..., :3]
        grey = rgb.astype(np.float32).mean(axis=2) / 255.0
        axes[0].imshow(rgb, extent=extent, interpolation="nearest")
    if tissue is not None and tissue.mask.any():
        mh, mw = tissue.mask.shape
        mask_extent = (0, mw * tissue.downsample_x, mh * tissue.downsample_y, 0)
        axes[0].contour(
            tissue.mask.astype(np.float32),
            levels=[0.5],
            colors=["#00a0ff"],
            linewidths=1.2,
            extent=mask_extent,
            origin="upper",
        )
    from matplotlib.patches import Rectangle

    for number, w in enumerate(windows, start=1):
        axes[0].add_patch(Rectangle((w.x0, w.y0), w.width, w.height, fill=False, edgecolor="#ffd400", linewidth=1.5))
        axes[0].text(w.x0, w.y0, str(number), color="#ffd400", fontsize=9, va="bottom", fontweight="bold")
    axes[0].set_title(f"Tissue ({_fmt(report.tissue_mm2)} mm², outline)" + (", crops" if windows else ""))
    for ax in axes[1:]:
        if grey is not None:
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1, alpha=0.35, extent=extent, interpolation="nearest")
    if density is not None and density.total:
        per_mm2 = density.per_mm2()
        top = float(np.percentile(per_mm2[per_mm2 > 0], 99))
        shown = np.ma.masked_where(per_mm2 == 0, per_mm2)
        dense = axes[1].imshow(shown, cmap="magma", vmin=0, vmax=max(top, 1e-9), extent=extent, interpolation="nearest")
        fig.colorbar(dense, ax=axes[1], shrink=0.8, label="nuclei / mm²")
        axes[2].imshow(_dominant_class_rgba(density, report.classes, top), extent=extent, interpolation="nearest")
        _class_legend(axes[2], density, report.classes)
    else:
        for ax in axes[1:]:
            ax.text(0.5, 0.5, "no nuclei", ha="center", va="center", transform=ax.transAxes)
    axes[1].set_title("Nuclei density")
    axes[2].set_title("Most frequent class")
    for ax in axes:
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    return _png(fig)


def _type_colors(classes: Sequence[Mapping[str, Any]], num_types: int) -> tuple[np.ndarray, list[str]]:
    """RGB in [0, 1] and name per type id 0..num_types-1."""
    colors = np.tile(np.array(UNTYPED_COLOR, dtype=np.float32) / 255.0, (num_types, 1))
    names = [UNTYPED_NAME] + [f"type_{i}" for i in range(1, num_types)]
    for cls in classes:
        i = int(cls["id"])
        if 0 < i < num_types:
            colors[i] = np.asarray(cls["color"][:3], dtype=np.float32) / 255.0
            names[i] = str(cls["name"])
    return colors, names


def _dominant_class_rgba(density: NucleiDensity, classes: Sequence[Mapping[str, Any]], top: float) -> np.ndarray:
    colors, _ = _type_colors(classes, density.counts.shape[0])
    dominant = density.counts.argmax(axis=0)
    rgba = np.zeros((*dominant.shape, 4), dtype=np.float32)
    rgba[..., :3] = colors[dominant]
    rgba[..., 3] = np.clip(density.per_mm2() / max(top, 1e-9), 0.0, 1.0) ** 0.5
    return rgba


def _class_legend(ax: Any, density: NucleiDensity, classes: Sequence[Mapping[str, Any]]) -> None:
    from matplotlib.patches import Patch

    colors, names = _type_colors(classes, density.counts.shape[0])
    present = density.counts.sum(axis=(1, 2)) > 0
    handles = [Patch(color=colors[i], label=names[i]) for i in range(len(names)) if present[i]]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _plot_class_counts(counts: Mapping[str, int], colors: Mapping[str, tuple[int, int, int]]) -> bytes:
    names = list(counts)
    values = [int(counts[n]) for n in names]
    fig, ax = _figure(7, 0.45 * max(len(names), 2) + 1.0)
    ax = ax[0, 0]
    bar_colors = [np.asarray(colors.get(n, UNTYPED_COLOR), dtype=np.float32) / 255.0 for n in names]
    ax.barh(names, values, color=bar_colors, edgecolor="#333", linewidth=0.5)
    ax.invert_yaxis()
    total = max(sum(values), 1)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:,} ({100 * v / total:.1f}%)", va="center", fontsize=9)
    ax.set_xlim(0, max(max(values, default=0), 1) * 1.3)
    ax.set_xlabel("nuclei")
    return _png(fig)


def _plot_size_histogram(qc: Mapping[str, Any], classes: Sequence[Mapping[str, Any]]) -> bytes:
    """Nucleus areas on log bins, stacked by class, the fragment threshold marked:
    fragments and merged blobs show as humps apart from the main one."""
    fig, ax = _figure(7, 3.2)
    ax = ax[0, 0]
    histogram = qc.get("area_histogram") if qc else None
    if not histogram or not sum(histogram["counts"]):
        ax.text(0.5, 0.5, "no nuclei", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("nucleus area (µm²)")
        return _png(fig)
    edges = np.asarray(histogram["edges_um2"], dtype=np.float64)
    colors = _class_colors(classes)
    bottom = np.zeros(len(edges) - 1)
    for name, counts in histogram.get("per_class", {"all": histogram["counts"]}).items():
        inner = np.asarray(counts, dtype=np.float64)[1 : len(edges)]  # bins between the first and last edge
        if not inner.any():
            continue
        color = np.asarray(colors.get(name, (76, 120, 168)), dtype=np.float32) / 255.0
        # One stepped area per class on top of the classes below it (not a bar per bin: one
        # artist instead of ~50 patches, which made this plot the report's slowest).
        ax.stairs(bottom + inner, edges, baseline=bottom.copy(), fill=True, color=color, label=name)
        ax.stairs(bottom + inner, edges, color="#333", linewidth=0.3)
        bottom += inner
    ax.set_xscale("log")
    fragment = float(qc.get("fragment_below_um2", FRAGMENT_UM2))
    ax.axvline(fragment, color="#e45756", linestyle="--")
    ax.set_title(
        f"fragments (< {fragment:g} µm², left of the dashed line): {qc.get('fragments', 0):,} "
        f"({100 * qc.get('fragment_fraction', 0):.1f}%)",
        color="#e45756",
        fontsize=10,
    )
    total = np.asarray(histogram["counts"])
    outside = int(total[0] + total[-1])
    ax.set_xlabel(
        "nucleus area (µm², log scale)" + (f"; {outside} outside {edges[0]:g}-{edges[-1]:g} µm²" if outside else "")
    )
    ax.set_ylabel("nuclei")
    ax.legend(frameon=False, fontsize=8, loc="upper right")
    return _png(fig)


def _plot_stage_times(seconds: Mapping[str, float]) -> bytes:
    stages = [s for s in STAGES if s in seconds]
    values = [float(seconds[s]) for s in stages]
    fig, ax = _figure(7, 2.8)
    ax = ax[0, 0]
    ax.barh(stages, values, color="#4c78a8")
    ax.invert_yaxis()
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f} s", va="center", fontsize=9)
    ax.set_xlim(0, max(max(values, default=0.0), 1e-3) * 1.25)
    wall = seconds.get("wall")
    ax.set_xlabel("seconds (read/infer/postprocess summed over tiles)" + (f"; wall clock {wall:.1f} s" if wall else ""))
    return _png(fig)


def _plot_tile_histogram(tile_seconds: Sequence[float]) -> bytes:
    fig, ax = _figure(7, 3.0)
    ax = ax[0, 0]
    if tile_seconds:
        values = np.asarray(tile_seconds, dtype=np.float64)
        ax.hist(values, bins=min(40, max(5, int(np.sqrt(values.size)) * 2)), color="#72b7b2", edgecolor="#333")
        ax.axvline(float(np.median(values)), color="#e45756", linestyle="--", label=f"median {np.median(values):.2f} s")
        ax.legend(frameon=False)
    else:
        ax.text(0.5, 0.5, "no tiles", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("seconds per tile (read + infer + postprocess)")
    ax.set_ylabel("tiles")
    return _png(fig)


def _windows_line(windows: dict[str, int]) -> str:
    """The engine row's account of the network windows (see ``engine_description``)."""
    line = f"; {windows['computed']} network windows computed"
    if windows.get("reused"):
        line += f", {windows['reused']} tile reads of a neighbour's"
    return line + f", {windows.get('skipped', 0)} on glass"


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    heading = f"<h2>{html.escape(title)}</h2>" if title else ""
    return f"{heading}<table>{body}</table>"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin-bottom:1em}th,td{padding:.25em .8em;border-bottom:1px solid #ddd;"
    "text-align:left;vertical-align:top}th{font-weight:600;white-space:nowrap}img{max-width:100%}"
    "pre{background:#f6f6f6;padding:1em;overflow:auto}.meta{color:#666}"
    ".warnings{background:#fff4e5;border-left:4px solid #e69500;padding:.2em 1em;margin-bottom:1em}"
    ".warnings.ok{background:#eef8ee;border-left-color:#3a3}"
    ".crops{display:flex;flex-wrap:wrap;gap:16px}.crop{margin:0}"
    ".stack{position:relative}.stack img{position:absolute;left:0;top:0;max-width:none;image-rendering:pixelated}"
    "body.no-outlines .stack img.outlined{visibility:hidden}"
    "figcaption{font-size:.85em;color:#444;margin-top:.3em}"
    ".swatch{display:inline-block;width:.9em;height:.9em;border:1px solid #333;margin:0 .3em 0 .6em;"
    "vertical-align:middle}.legend{margin:.3em 0}.note{font-size:.85em;color:#444;max-width:60em}"
    "table.classes td,table.classes th{text-align:right}table.classes td:nth-child(2){text-align:left}"
)

# The outline toggle; the page marks itself ready so a headless browser can tell the
# script ran to the end.
_SCRIPT = (
    "(function(){var box=document.getElementById('outlines');"
    "if(box){box.addEventListener('change',function(){document.body.classList.toggle('no-outlines',!box.checked);});}"
    "document.body.setAttribute('data-ready','1');})();"
)
