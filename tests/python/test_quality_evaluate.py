"""svgear.quality.evaluate and metrics, end to end at a tiny config with a stand-in router."""
import csv
import json
import math
import os
import sys

_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python")
if os.path.abspath(_PY) not in map(os.path.abspath, sys.path):
    sys.path.insert(0, _PY)

import pytest  # noqa: E402
import torch  # noqa: E402

from svgear.quality import evaluate, metrics  # noqa: E402
from svgear.quality.model import DiTConfig, VideoDiT, dense_attention, save_checkpoint  # noqa: E402


class StandInRouter:
    """What svgear.AttentionRouter promises, with a crude 'sparse' method: attention over a
    strided subset of the keys (more keys at higher density)."""
    instances = []

    def __init__(self, method, density, num_layers, warmup_steps=0.2, warmup_layers=0, **options):
        self.method, self.density, self.num_layers = method, density, num_layers
        self.warmup_steps, self.warmup_layers, self.options = warmup_steps, warmup_layers, options
        self.step, self.num_steps, self.resets, self.steps_seen, self.layouts = 0, 1, 0, [], set()
        self.batches = set()
        StandInRouter.instances.append(self)

    def reset(self):
        self.resets += 1

    def set_step(self, step, num_steps):
        self.step, self.num_steps = step, num_steps
        self.steps_seen.append((step, num_steps))

    def __call__(self, layer_index, q, k, v, layout="bshd"):
        self.layouts.add(layout)
        self.batches.add(q.shape[0])
        assert 0 <= layer_index < self.num_layers
        if self.method == "dense" or self.step < self.warmup_steps * self.num_steps or layer_index < self.warmup_layers:
            return dense_attention(layer_index, q, k, v)
        stride = max(1, round(1 / self.density))
        return dense_attention(layer_index, q, k[:, ::stride], v[:, ::stride])


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = VideoDiT(DiTConfig(dim=32, num_heads=2, num_layers=2, video=(4, 16, 16)))
    with torch.no_grad():  # an untrained model predicts ~0: give it an output that depends on attention
        model.head.head.weight.normal_(0, 0.3)
        for block in model.blocks:
            block.modulation[:, 2].fill_(1.0)
    path = str(tmp_path / "ckpt")
    save_checkpoint(model, path, metadata={"train": {"shift": 2.0, "step": 0}})
    return path


def test_evaluate_end_to_end_with_a_stand_in_router(checkpoint, tmp_path, monkeypatch, capsys):
    StandInRouter.instances = []
    monkeypatch.setattr(evaluate, "make_router",
                        lambda m, d, L, w, wl, opts: StandInRouter(m, d, L, warmup_steps=w, warmup_layers=wl, **opts))
    out = str(tmp_path / "eval")
    rc = evaluate.main(["--checkpoint", checkpoint, "--out", out, "--num-videos", "2", "--steps", "5",
                        "--densities", "0.25,0.5", "--device", "cpu", "--frames-count", "3"])
    assert rc == 0
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 5  # dense + 2 methods x 2 densities, per video
    dense = [r for r in rows if r["method"] == "dense"]
    assert all(float(r["psnr"]) == math.inf and float(r["ssim"]) == pytest.approx(1.0) for r in dense)
    sparse = [r for r in rows if r["method"] != "dense"]
    assert all(math.isfinite(float(r["psnr"])) and 5 < float(r["psnr"]) < 100 for r in sparse)
    assert all(float(r["ssim"]) < 1 for r in sparse)
    assert {r["effective_density"] for r in rows if r["density"] == "0.25"} == {str(round((1 + 4 * 0.25) / 5, 4))}
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)["summary"]
    assert summary[0]["method"] == "dense" and summary[0]["psnr_mean"] == "inf"
    for name in ("pareto.png", "frames.png", "summary.csv"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    # the router protocol: one per method/budget, reset per video (+ the timing warm-up), every step set
    assert len(StandInRouter.instances) == 5
    for router in StandInRouter.instances:
        assert router.layouts == {"bshd"}
        assert router.resets >= 2
        assert router.steps_seen[-5:] == [(i, 5) for i in range(5)]
        if router.method != "dense":
            assert router.options == {"clusters_q": 64, "clusters_k": 64}  # clamped to the 64 tokens
    table = capsys.readouterr().out
    assert "inf" in table and "ear" in table and "svg2" in table


def test_a_conditional_model_is_evaluated_with_its_guidance(conditional_dit, tmp_path, monkeypatch):
    """Dense and sparse samples alike get the seed's labels and the checkpoint's guidance: the
    router sees the conditional and unconditional halves as one batch of 2."""
    path = str(tmp_path / "ckpt")
    save_checkpoint(conditional_dit, path, metadata={"train": {"shift": 2.0, "step": 0, "sample_guidance": 2.5}})
    StandInRouter.instances = []
    monkeypatch.setattr(evaluate, "make_router",
                        lambda m, d, L, w, wl, opts: StandInRouter(m, d, L, warmup_steps=w, warmup_layers=wl, **opts))
    out = str(tmp_path / "eval")
    assert evaluate.main(["--checkpoint", path, "--out", out, "--num-videos", "1", "--steps", "3",
                          "--methods", "dense,ear", "--densities", "0.5", "--device", "cpu"]) == 0
    assert all(r.batches == {2} for r in StandInRouter.instances)
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["info"]["guidance"] == 2.5


def test_a_given_frame_model_is_evaluated_from_each_scenes_leading_frames(tmp_path, monkeypatch):
    """Video i, dense and sparse alike, continues the leading frames of training scene seed + i."""
    from svgear.quality import data

    torch.manual_seed(0)
    model = VideoDiT(DiTConfig(dim=32, num_heads=2, num_layers=2, video=(4, 16, 16), num_given_frames=2))
    with torch.no_grad():
        model.head.head.weight.normal_(0, 0.3)
        model.patch_embedding.weight.normal_(0, 0.3)
    path = str(tmp_path / "ckpt")
    save_checkpoint(model, path, metadata={"train": {"shift": 2.0, "step": 0}})
    given = []
    forward = VideoDiT.forward

    def recording_forward(self, x, t, attention_fn=None, labels=None, given_frames=None):
        given.append(given_frames)
        return forward(self, x, t, attention_fn=attention_fn, labels=labels, given_frames=given_frames)

    monkeypatch.setattr(VideoDiT, "forward", recording_forward)
    scored = []
    psnr = metrics.psnr
    monkeypatch.setattr(metrics, "psnr", lambda a, b: scored.append((a.shape[1], b.shape[1])) or psnr(a, b))
    monkeypatch.setattr(evaluate, "make_router",
                        lambda m, d, L, w, wl, opts: StandInRouter(m, d, L, warmup_steps=w, warmup_layers=wl, **opts))
    out = str(tmp_path / "eval")
    assert evaluate.main(["--checkpoint", path, "--out", out, "--num-videos", "2", "--seed", "5", "--steps", "2",
                          "--methods", "dense,ear", "--densities", "0.5", "--device", "cpu", "--no-timing-warmup"]) == 0
    frames = [data.generate(seed, 1, 4, 16, 16)[:, :, :2] for seed in (5, 6)]
    # per video: dense reference, dense through the router, ear; 2 steps each
    assert len(given) == 2 * 3 * 2
    assert all(torch.equal(f.cpu(), frames[i // 6]) for i, f in enumerate(given))
    assert scored == [(2, 2)] * 4, "PSNR covers the 2 generated frames of each sparse and router-dense video"
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["info"]["given_frames"] == 2


def test_missing_router_says_what_to_do(monkeypatch):
    import svgear

    monkeypatch.delattr(svgear, "AttentionRouter", raising=False)
    with pytest.raises(RuntimeError, match="AttentionRouter"):
        evaluate.make_router("ear", 0.2, 8, 0.2, 0, {})


def test_psnr_and_ssim():
    a = torch.rand(3, 4, 24, 24) * 2 - 1
    assert metrics.psnr(a, a) == math.inf
    assert metrics.ssim(a, a, backend="torch") == pytest.approx(1.0)
    b = (a + 0.1).clamp(-1, 1)
    mse = float((((a + 1) / 2 - (b + 1) / 2) ** 2).mean())
    assert metrics.psnr(b, a) == pytest.approx(10 * math.log10(1 / mse))
    noisy = (a + 0.2 * torch.randn_like(a)).clamp(-1, 1)
    s = metrics.ssim(noisy, a, backend="torch")
    assert 0 < s < metrics.ssim(b, a, backend="torch") < 1


def test_torch_ssim_matches_skimage():
    pytest.importorskip("skimage")
    torch.manual_seed(1)
    a = torch.rand(3, 3, 32, 40) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
    assert metrics.ssim(b, a, backend="torch") == pytest.approx(metrics.ssim(b, a, backend="skimage"), abs=1e-6)


def test_effective_density():
    assert evaluate.effective_density(0.2, 0.2, 0, 25, 8) == pytest.approx((5 + 20 * 0.2) / 25)
    assert evaluate.effective_density(0.2, 0.0, 2, 10, 8) == pytest.approx((2 + 6 * 0.2) / 8)
    assert evaluate.effective_density(1.0, 0.2, 0, 25, 8) == pytest.approx(1.0)


def test_evaluate_with_the_svgear_router_on_cpu(checkpoint, tmp_path):
    """The real svgear.AttentionRouter (CPU path, f32) when the library is built."""
    import svgear

    try:
        svgear.library_path()
    except Exception as error:  # noqa: BLE001 - whatever stops the library from loading
        pytest.skip("libsvgear is not built: %s" % error)
    if not hasattr(svgear, "AttentionRouter"):
        pytest.skip("svgear.AttentionRouter is not available")
    out = str(tmp_path / "eval")
    rc = evaluate.main(["--checkpoint", checkpoint, "--out", out, "--num-videos", "1", "--steps", "5",
                        "--densities", "0.3", "--clusters-q", "4", "--clusters-k", "8", "--device", "cpu",
                        "--frames-count", "2"])
    assert rc == 0
    with open(os.path.join(out, "results.csv")) as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"dense", "svg2", "ear"}
    assert float(rows["dense"]["psnr"]) == math.inf
    for method in ("svg2", "ear"):
        assert math.isfinite(float(rows[method]["psnr"])) and float(rows[method]["psnr"]) > 10


def test_pictures_without_matplotlib(tmp_path, monkeypatch):
    from svgear.quality import plots

    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    video = torch.rand(3, 5, 16, 16) * 2 - 1
    plots.frames_grid(str(tmp_path / "f.png"), [("a", video), ("b", -video)], count=3)
    plots.line_plot(str(tmp_path / "p.png"), [
        {"series": [{"label": "ear", "x": [0.1, 0.2], "y": [30.0, float("inf")]}]},
        {"logy": True, "series": [{"label": "loss", "x": [1, 2, 3], "y": [1.0, 0.5, 0.2]}]}])
    for name in ("f.png", "p.png"):
        with open(str(tmp_path / name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(str(tmp_path / "f.png"), "rb") as f:
        head = f.read(24)
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert (width, height) == (2 * (3 * 18 + 2), 2 * (2 * 18 + 2))
