"""PNG output: frame grids and line plots. matplotlib draws them (with labels) when importable;
otherwise a plain PNG writer (zlib) saves unlabelled images, so nothing here needs it."""
import math
import struct
import zlib

import numpy as np

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_png(path, image):
    """image: (H, W, 3) uint8."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def video_frames(video, count):
    """(3, T, H, W) in [-1, 1] -> list of (frame index, (H, W, 3) uint8), `count` evenly spaced."""
    v = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
    t = v.shape[0]
    idx = sorted({int(round(i * (t - 1) / max(count - 1, 1))) for i in range(min(count, t))})
    return [(i, v[i]) for i in idx]


def frames_grid(path, rows, count=6, title=None, scale=2):
    """rows: list of (label, video (3, T, H, W) in [-1, 1]); one row per video, `count` frames."""
    frames = [(label, video_frames(video, count)) for label, video in rows]
    if have_matplotlib():
        plt = _pyplot()
        h, w = frames[0][1][0][1].shape[:2]
        ncol = len(frames[0][1])
        fig, axes = plt.subplots(len(rows), ncol, figsize=(1.6 * ncol * w / h + 1.2, 1.6 * len(rows) + 0.5),
                                 squeeze=False)
        for r, (label, fr) in enumerate(frames):
            for c, (index, image) in enumerate(fr):
                ax = axes[r][c]
                ax.imshow(image, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title("frame %d" % index, fontsize=8)
                if c == 0:
                    ax.set_ylabel(label, fontsize=8)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    gap = 2
    h, w = frames[0][1][0][1].shape[:2]
    ncol = len(frames[0][1])
    canvas = np.full(((h + gap) * len(rows) + gap, (w + gap) * ncol + gap, 3), 255, np.uint8)
    for r, (_, fr) in enumerate(frames):
        for c, (_, image) in enumerate(fr):
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            canvas[y:y + h, x:x + w] = image
    write_png(path, np.kron(canvas, np.ones((scale, scale, 1), np.uint8)))


def _raster_plot(path, panels, width=480, height=360):
    """Fallback without matplotlib: one box per panel, a polyline + dots per series, no text."""
    canvas = np.full((height, width * len(panels), 3), 255, np.uint8)
    for p, panel in enumerate(panels):
        x0, x1, y0, y1 = p * width + 40, (p + 1) * width - 20, 20, height - 40
        canvas[y0:y1, x0] = canvas[y0:y1, x1] = 0
        canvas[y0, x0:x1] = canvas[y1, x0:x1] = 0
        pts = [(x, y) for s in panel["series"] for x, y in zip(s["x"], s["y"]) if math.isfinite(x) and math.isfinite(y)]
        if not pts:
            continue
        xs, ys = [q[0] for q in pts], [q[1] for q in pts]
        if panel.get("logy"):
            ys = [math.log10(max(v, 1e-12)) for v in ys]
        lo_x, hi_x = min(xs), max(xs) + 1e-12
        lo_y, hi_y = min(ys), max(ys) + 1e-12

        def to_px(x, y):
            if panel.get("logy"):
                y = math.log10(max(y, 1e-12))
            return (int(x0 + 5 + (x - lo_x) / (hi_x - lo_x) * (x1 - x0 - 10)),
                    int(y1 - 5 - (y - lo_y) / (hi_y - lo_y) * (y1 - y0 - 10)))

        for k, s in enumerate(panel["series"]):
            color = COLORS[k % len(COLORS)]
            points = [to_px(x, y) for x, y in zip(s["x"], s["y"]) if math.isfinite(x) and math.isfinite(y)]
            for (ax, ay), (bx, by) in zip(points, points[1:]):
                n = max(abs(bx - ax), abs(by - ay), 1)
                for i in range(n + 1):
                    canvas[ay + (by - ay) * i // n, ax + (bx - ax) * i // n] = color
            for ax, ay in points:
                canvas[max(ay - 2, 0):ay + 3, max(ax - 2, 0):ax + 3] = color
    write_png(path, canvas)


def line_plot(path, panels, title=None):
    """panels: list of {"title", "xlabel", "ylabel", "logy"?, "series": [{"label", "x", "y", "style"?}],
    "hlines"?: [(y, label)], "vlines"?: [(x, label)]}."""
    if not have_matplotlib():
        _raster_plot(path, panels)
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for k, s in enumerate(panel["series"]):
            ax.plot(s["x"], s["y"], s.get("style", "o-"), label=s["label"], color=np.array(COLORS[k % len(COLORS)]) / 255,
                    markersize=4, linewidth=1.2)
        for y, label in panel.get("hlines", []):
            ax.axhline(y, color="gray", linestyle="--", linewidth=1, label=label)
        for x, label in panel.get("vlines", []):
            ax.axvline(x, color="gray", linestyle=":", linewidth=1, label=label)
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(alpha=0.3)
        if panel["series"] or panel.get("hlines") or panel.get("vlines"):
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
