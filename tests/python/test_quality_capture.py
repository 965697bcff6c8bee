"""svgear.quality.capture: real Q/K/V files in the svgear CLI's format."""
import json
import os
import subprocess
import sys

_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python")
if os.path.abspath(_PY) not in map(os.path.abspath, sys.path):
    sys.path.insert(0, _PY)

import torch  # noqa: E402

from svgear.quality import capture, st_io  # noqa: E402
from svgear.quality.model import DiTConfig, VideoDiT, save_checkpoint  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def test_capture_writes_readable_safetensors(tmp_path, capsys):
    torch.manual_seed(0)
    model = VideoDiT(DiTConfig(dim=64, num_heads=2, num_layers=3, video=(4, 16, 16)))
    with torch.no_grad():  # make the output and the modulation depend on t, as after training
        model.head.head.weight.normal_(0, 0.3)
        model.time_projection[1].weight.normal_(0, 0.1)
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(model, ckpt, metadata={"train": {"shift": 2.0}})
    out = str(tmp_path / "qkv")
    rc = capture.main(["--checkpoint", ckpt, "--out", out, "--layers", "0,2", "--steps", "1,3", "--num-steps", "4",
                       "--video", "4x16x12", "--heads", "all", "--dtype", "f32", "--device", "cpu"])
    assert rc == 0
    names = sorted(os.listdir(out))
    assert names == ["qkv_layer%02d_step%02d.safetensors" % (l, s) for l in (0, 2) for s in (1, 3)]
    grid = (4, 4, 3)
    seen = []
    for name in names:
        tensors, meta = st_io.load_file(os.path.join(out, name), use_package=False)
        assert set(tensors) == {"q", "k", "v"}
        for t in tensors.values():
            assert t.shape == (1, 2, 48, 32) and t.dtype == torch.float32 and torch.isfinite(t).all()
        assert (meta["frames"], meta["height"], meta["width"]) == tuple(str(g) for g in grid)
        assert meta["num_steps"] == "4" and meta["layer"] in ("0", "2")
        seen.append(tensors["q"])
    assert not torch.equal(seen[0], seen[1]), "different steps give different queries"
    assert "4 files" in capsys.readouterr().out

    # bf16 and a subset of heads
    rc = capture.main(["--checkpoint", ckpt, "--out", str(tmp_path / "bf16"), "--layers", "1", "--steps", "0",
                       "--num-steps", "2", "--video", "4x16x16", "--heads", "1", "--device", "cpu"])
    assert rc == 0
    tensors, meta = st_io.load_file(str(tmp_path / "bf16" / "qkv_layer01_step00.safetensors"))
    assert tensors["k"].dtype == torch.bfloat16 and tensors["k"].shape == (1, 1, 64, 32)
    assert meta["heads"] == "1"

    # the CLI reads them, when it is built
    cli = os.path.join(ROOT, "build", "bin", "svgear")
    if os.access(cli, os.X_OK):
        result = subprocess.run([cli, "eval", "--input", os.path.join(out, names[-1]), "--method", "ear",
                                 "--density", "0.5", "--clusters-q", "4", "--clusters-k", "8", "--json"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["shape"] == [1, 2, 48, 32] and 0 <= report["rel_l2"] < 1


def test_a_conditional_model_is_captured_under_its_guidance(conditional_dit, tmp_path):
    """With guidance attention sees the conditional and unconditional halves as one batch; the
    files keep the conditional half, which differs from an unguided capture's from step 1 on."""
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(conditional_dit, ckpt, metadata={"train": {"shift": 2.0, "sample_guidance": 4.0}})
    # 4x32x32: scene 0's window there shows a triangle (the 16x16 one shows nothing: all-zero labels)
    common = ["--checkpoint", ckpt, "--layers", "1", "--steps", "0,2", "--num-steps", "3", "--video", "4x32x32",
              "--heads", "all", "--dtype", "f32", "--device", "cpu"]
    assert capture.main(common + ["--out", str(tmp_path / "guided")]) == 0
    assert capture.main(common + ["--out", str(tmp_path / "plain"), "--guidance", "1"]) == 0
    guided = {s: st_io.load_file(str(tmp_path / "guided" / ("qkv_layer01_step%02d.safetensors" % s)), use_package=False)
              for s in (0, 2)}
    plain = {s: st_io.load_file(str(tmp_path / "plain" / ("qkv_layer01_step%02d.safetensors" % s)), use_package=False)
             for s in (0, 2)}
    assert guided[0][1]["guidance"] == "4.0" and plain[0][1]["guidance"] == "1.0"
    assert guided[0][0]["q"].shape == (1, 2, 256, 16)
    assert torch.equal(guided[0][0]["q"], plain[0][0]["q"]), "step 0 sees the same (conditional) input"
    assert not torch.equal(guided[2][0]["q"], plain[2][0]["q"]), "guidance moved the trajectory"
