#!/usr/bin/env python3
"""GPU benchmark of svgear against what a user would run instead, in one run on one GPU.

For each model shape, `svgear-bench` (C++, bench/svgear_bench.cpp) generates the built-in
workload, times svgear's stages, whole EAR / SVG2 ops and its dense kernel with CUDA events,
and leaves q/k/v (bf16) and the EAR block selection in a folder. This script then times, on the
same tensors and GPU:
  - torch.nn.functional.scaled_dot_product_attention with the cuDNN backend (the dense baseline),
  - FlexAttention (torch.compile'd) with a BlockMask from the same cluster-permuted selection
    rounded to its 128-token blocks (BlockMask.from_kv_blocks),
and prints one table, writes bench_results.json and BENCHMARKS.md rows under --out.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

import numpy as np
import torch
import torch.nn.functional as F

SHAPES = {
    # name: (batch, heads, frames, height, width, head_dim)
    "wan2.1-1.3b-480p": (2, 12, 21, 30, 52, 128),
    "wan2.1-14b-720p": (1, 40, 21, 45, 80, 128),
    "hunyuan-720p": (1, 24, 33, 45, 80, 128),
}


def median_ms(fn, warmup=3, repeat=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def load_bin(folder, name, dtype, shape):
    return np.fromfile(os.path.join(folder, name), dtype=dtype).reshape(shape)


def load_qkv(folder, meta):
    b, h, s, d = meta["shape"]
    out = []
    for name in "qkv":
        raw = np.fromfile(os.path.join(folder, name + ".bf16"), dtype=np.uint16)
        t = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(b, h, s, d)
        out.append(t.cuda())
    return out


def flex_block_mask(folder, meta, block=128):
    """kv-block lists of the 128x128 tiles touched by the selected (q-cluster, k-cluster) blocks,
    in each head's cluster-permuted order."""
    from torch.nn.attention.flex_attention import BlockMask

    b, h, s, _ = meta["shape"]
    cq, ck = meta["clusters_q"], meta["clusters_k"]
    bh = b * h
    q_offsets = load_bin(folder, "q_offsets.i32", np.int32, (bh, cq + 1))
    k_offsets = load_bin(folder, "k_offsets.i32", np.int32, (bh, ck + 1))
    selected = load_bin(folder, "selected.u8", np.uint8, (bh, cq, ck)).astype(np.int32)
    tiles = (s + block - 1) // block
    kv_num = np.zeros((bh, tiles), dtype=np.int32)
    kv_idx = np.zeros((bh, tiles, tiles), dtype=np.int32)
    tile_pairs = 0
    for head in range(bh):
        # Cluster of each token position, then of each tile's first and last position.
        q_cluster_of = np.searchsorted(q_offsets[head], np.arange(s), side="right") - 1
        k_cluster_of = np.searchsorted(k_offsets[head], np.arange(s), side="right") - 1
        qa = q_cluster_of[np.arange(tiles) * block]
        qb = q_cluster_of[np.minimum(np.arange(tiles) * block + block - 1, s - 1)]
        ka = k_cluster_of[np.arange(tiles) * block]
        kb = k_cluster_of[np.minimum(np.arange(tiles) * block + block - 1, s - 1)]
        # 2D prefix sums: does rectangle [qa..qb] x [ka..kb] of the cluster mask hold a selected block?
        prefix = np.zeros((cq + 1, ck + 1), dtype=np.int64)
        prefix[1:, 1:] = selected[head].cumsum(0).cumsum(1)
        count = (prefix[qb[:, None] + 1, kb[None, :] + 1] - prefix[qa[:, None], kb[None, :] + 1]
                 - prefix[qb[:, None] + 1, ka[None, :]] + prefix[qa[:, None], ka[None, :]])
        mask = count > 0
        tile_pairs += int(mask.sum())
        kv_num[head] = mask.sum(1)
        for t in range(tiles):
            cols = np.nonzero(mask[t])[0]
            kv_idx[head, t, : len(cols)] = cols
    kv_num_t = torch.from_numpy(kv_num).reshape(b, h, tiles).cuda()
    kv_idx_t = torch.from_numpy(kv_idx).reshape(b, h, tiles, tiles).cuda()
    block_mask = BlockMask.from_kv_blocks(kv_num_t, kv_idx_t, BLOCK_SIZE=block, seq_lengths=(s, s))
    tile_density = tile_pairs / (bh * tiles * tiles)
    return block_mask, tile_density


def permute(t, order):
    b, h, s, d = t.shape
    return torch.gather(t, 2, order.view(b, h, s, 1).expand(b, h, s, d).long())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cli", default="build-device/bin/svgear-bench", help="path of svgear-bench")
    parser.add_argument("--out", default="/tmp/svgear-bench")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--density", type=float, default=0.12)
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a minute)")
    parser.add_argument("--bench-args", default="",
                        help='more svgear-bench options, e.g. "--probe-queries 0 --probe-mean"')
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    rows = []
    for name in args.shapes.split(","):
        b, h, f, hh, w, d = SHAPES[name]
        folder = os.path.join("/tmp", "svgear-bench-" + name)
        os.makedirs(folder, exist_ok=True)
        cmd = [args.cli, "--batch", str(b), "--heads", str(h), "--frames", str(f), "--height", str(hh),
               "--width", str(w), "--head-dim", str(d), "--density", str(args.density), "--dump", folder] + args.bench_args.split()
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        with open(os.path.join(folder, "result.json")) as fh:
            ours = json.load(fh)
        q, k, v = load_qkv(folder, ours)
        s = q.shape[2]
        flops_dense = 4.0 * b * h * s * s * d
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        row = {"shape": name, "B": b, "H": h, "S": s, "D": d, "cudnn_ms": cudnn_ms,
               "cudnn_tflops": flops_dense / cudnn_ms / 1e9, **ours["times_ms"], "density": ours["density"],
               "computed_over_exact": ours.get("ear_plan", {}).get("computed_over_exact", float("nan"))}
        if not args.no_flex:
            from torch.nn.attention.flex_attention import flex_attention

            block_mask, tile_density = flex_block_mask(folder, ours)
            q_order = torch.from_numpy(load_bin(folder, "q_order.i32", np.int32, (b, h, s))).cuda()
            k_order = torch.from_numpy(load_bin(folder, "k_order.i32", np.int32, (b, h, s))).cuda()
            qp, kp, vp = permute(q, q_order), permute(k, k_order), permute(v, k_order)
            flex = torch.compile(flex_attention, dynamic=False)
            flex_ms = median_ms(lambda: flex(qp, kp, vp, block_mask=block_mask))
            row.update(flex_ms=flex_ms, flex_tile_density=tile_density,
                       flex_tflops=flops_dense * tile_density / flex_ms / 1e9)
            del qp, kp, vp
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v
        torch.cuda.empty_cache()

    with open(os.path.join(args.out, "bench_results.json"), "w") as fh:
        json.dump({"gpu": gpu, "rows": rows}, fh, indent=1)
    today = datetime.date.today().isoformat()
    print(f"\n{gpu}, {today}, EAR at requested density {args.density} {args.bench_args}".rstrip())
    # kernel TF/s counts the selected (query, key) pairs; "on tiles" counts what the kernel computes
    # (64-row tiles x 128-key steps, compensation steps included: svgear-bench's ear_plan), the
    # measure FlexAttention's TF/s uses for its 128x128 tiles.
    header = ("shape", "S", "cuDNN ms", "TF/s", "our dense ms", "EAR op ms", "x cuDNN", "kernel TF/s",
              "kernel TF/s on tiles", "flex ms", "flex TF/s", "cluster+probe+perm ms", "% cuDNN")
    print(" | ".join(header))
    lines = []
    for r in rows:
        sparse_tflops = 4.0 * r["B"] * r["H"] * r["S"] ** 2 * r["D"] * r["density"] / r["attend_ms"] / 1e9
        overhead = r["cluster_ms"] + r["score_ms"] + r["permute_ms"]  # k-means + means + probe (+ permutations)
        cells = (r["shape"], r["S"], f'{r["cudnn_ms"]:.2f}', f'{r["cudnn_tflops"]:.0f}', f'{r["dense_ms"]:.2f}',
                 f'{r["ear_ms"]:.2f}', f'{r["cudnn_ms"] / r["ear_ms"]:.2f}', f"{sparse_tflops:.0f}",
                 f'{sparse_tflops * r["computed_over_exact"]:.0f}',
                 f'{r.get("flex_ms", float("nan")):.2f}', f'{r.get("flex_tflops", float("nan")):.0f}',
                 f"{overhead:.2f}", f'{100 * overhead / r["cudnn_ms"]:.1f}')
        print(" | ".join(str(c) for c in cells))
        lines.append(f"| {today} | {gpu} | " + " | ".join(str(c) for c in cells) + " |")
    with open(os.path.join(args.out, "BENCHMARKS-rows.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
