"""svgear.quality.preview: sampler comparisons and one-step denoising of a checkpoint."""
import os
import sys

_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python")
if os.path.abspath(_PY) not in map(os.path.abspath, sys.path):
    sys.path.insert(0, _PY)

import pytest  # noqa: E402
import torch  # noqa: E402

from svgear.quality import preview  # noqa: E402
from svgear.quality.model import DiTConfig, VideoDiT, save_checkpoint  # noqa: E402


@pytest.fixture()
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = VideoDiT(DiTConfig(dim=32, num_heads=2, num_layers=2, video=(4, 16, 16)))
    path = str(tmp_path / "ckpt")
    save_checkpoint(model, path, metadata={"train": {"shift": 5.0, "sample_shift": 3.0, "step": 7}})
    return path


def test_sampling_grid(checkpoint, tmp_path, capsys):
    out = str(tmp_path / "samples.png")
    assert preview.main(["--checkpoint", checkpoint, "--out", out, "--shifts", "3,2", "--steps", "2",
                         "--num-samples", "1", "--device", "cpu"]) == 0
    assert os.path.getsize(out) > 0
    assert "wrote %s (2 videos)" % out in capsys.readouterr().out


def test_denoising_reports_the_x0_error_at_each_time(checkpoint, tmp_path, capsys):
    out = str(tmp_path / "denoise.png")
    assert preview.main(["--checkpoint", checkpoint, "--out", out, "--denoise", "0,0.5,1", "--video", "4x8x8",
                         "--device", "cpu"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("t=")]
    assert [line.split(":")[0] for line in lines] == ["t=0.00", "t=0.50", "t=1.00"]
    # At t = 0 the input is the video itself and x_t - t v returns it exactly.
    assert "x0 prediction MSE 0.0000" in lines[0]
    assert os.path.getsize(out) > 0


def test_denoising_rows_are_the_noised_video_and_the_prediction():
    torch.manual_seed(0)
    model = VideoDiT(DiTConfig(dim=32, num_heads=2, num_layers=2, video=(4, 16, 16))).eval()
    rows, table = preview.denoise_rows(model, [0.0, 1.0], (4, 8, 8), "cpu")
    assert [label for label, _ in rows] == ["training video", "t=0.00 input", "t=0.00 x0 prediction",
                                            "t=1.00 input", "t=1.00 x0 prediction"]
    assert torch.equal(rows[1][1], rows[0][1].clamp(-1, 1)), "t = 0 leaves the video as it is"
    assert table[1][2] == table[0][2] > 0, "the mean predictor's error does not depend on t"


def test_bad_denoise_times_say_what_is_wrong(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        preview.main(["--checkpoint", checkpoint, "--out", str(tmp_path / "x.png"), "--denoise", "0.5,1.5",
                      "--device", "cpu"])
    assert "--denoise times must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        preview.main(["--checkpoint", checkpoint, "--out", str(tmp_path / "x.png"), "--denoise", "0.5",
                      "--video", "4x9x8", "--device", "cpu"])
    assert "not divisible by patch" in capsys.readouterr().err


def test_a_conditional_model_is_previewed_at_each_guidance(conditional_dit, tmp_path, capsys):
    path = str(tmp_path / "ckpt")
    save_checkpoint(conditional_dit, path, metadata={"train": {"shift": 5.0, "sample_guidance": 3.0}})
    out = str(tmp_path / "samples.png")
    assert preview.main(["--checkpoint", path, "--out", out, "--guidance", "1,3", "--steps", "2",
                         "--num-samples", "1", "--device", "cpu"]) == 0
    assert "wrote %s (2 videos)" % out in capsys.readouterr().out
    with pytest.raises(SystemExit):
        preview.main(["--checkpoint", path, "--out", out, "--guidance", "-1", "--device", "cpu"])
    assert "--guidance must be >= 0" in capsys.readouterr().err
