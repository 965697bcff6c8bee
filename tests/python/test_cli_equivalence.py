"""The Python package and the CLI run the same C API path: same file, same options, same output."""

import json
import struct
import subprocess

import numpy as np
import pytest

import svgear

torch = pytest.importorskip("torch")


def read_safetensors(path):
    """tensors (as float32 NumPy arrays) and metadata of a safetensors file."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        raw = data[8 + length + begin:8 + length + end]
        if entry["dtype"] == "F32":
            array = np.frombuffer(raw, np.float32)
        elif entry["dtype"] == "BF16":
            array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, np.float16).astype(np.float32)
        tensors[name] = array.reshape(entry["shape"])
    return tensors, metadata


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("method,options", [
    ("ear", {"density": 0.2}),
    ("svg2", {"density": 0.3}),
    ("svg2", {"top_p": 0.9}),
    ("ear", {"density": 0.15, "budget_scope": "head", "init": "strided"}),
    ("ear", {"density": 0.2, "probe_queries": 0, "probe_mean": True}),
])
def test_python_equals_cli_on_the_same_file(tmp_path, cli, method, options, dtype):
    qkv = tmp_path / "qkv.safetensors"
    subprocess.run([str(cli), "gen", "--out", str(qkv), "--frames", "4", "--height", "8", "--width", "8",
                    "--heads", "2", "--head-dim", "32", "--dtype", dtype], check=True, capture_output=True)
    flags = ["--clusters-q", "8", "--clusters-k", "16"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    out_file = tmp_path / "out.safetensors"
    run = subprocess.run([str(cli), "eval", "--input", str(qkv), "--method", method, "--json",
                          "--output", str(out_file)] + flags, check=True, capture_output=True, text=True)
    cli_report = json.loads(run.stdout)

    tensors, metadata = read_safetensors(qkv)
    assert metadata["frames"] == "4"
    # The CLI reads the file's dtype and writes float32 results; so does this call.
    inputs = [torch.from_numpy(tensors[n].copy()) for n in ("q", "k", "v")]
    if dtype == "BF16":
        inputs = [x.bfloat16() for x in inputs]  # exact: the values came from bf16
    out = torch.empty(inputs[0].shape, dtype=torch.float32)
    svgear.attention(*inputs, method=method, layout="bhsd", out=out, clusters_q=8, clusters_k=16, **options)
    out = out.numpy()
    cli_out, _ = read_safetensors(out_file)
    np.testing.assert_array_equal(out, cli_out["out"])
    assert svgear.last_report()["density"] == pytest.approx(cli_report["density"], abs=0)


def test_cli_reports_c_api_errors_with_exit_code_2(tmp_path, cli):
    qkv = tmp_path / "qkv.safetensors"
    subprocess.run([str(cli), "gen", "--out", str(qkv), "--frames", "2", "--height", "4", "--width", "4",
                    "--heads", "1", "--head-dim", "16"], check=True, capture_output=True)
    run = subprocess.run([str(cli), "eval", "--input", str(qkv), "--method", "ear", "--density", "0.2", "--clusters-q", "64"], capture_output=True, text=True)
    assert run.returncode == 2 and "exceeds the 32 query tokens" in run.stderr
