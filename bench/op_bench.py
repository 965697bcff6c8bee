"""One svgear attention call from Python, as the diffusers integration makes it: GPU time per
call (CUDA events, warm state) by layout (bshd = diffusers', bhsd = SDPA's) and call mode
(synchronize true/false), next to SDPA on the same tensors, and a torch.profiler table of the
kernels of a few warm calls. For the gap between svgear-bench's op time and the time per call
inside a denoising loop.

    python3 bench/op_bench.py [--tokens 32760 --heads 12 --head-dim 128 --method ear --density 0.12]
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import svgear  # noqa: E402


def gpu_ms(fn, repeats):
    fn()  # first-call work (library start-up, kernel selection) is not what is timed
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    wall = time.perf_counter()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats, (time.perf_counter() - wall) * 1e3 / repeats


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--method", default="ear")
    p.add_argument("--density", type=float, default=0.12)
    p.add_argument("--clusters-q", type=int, default=256)
    p.add_argument("--clusters-k", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--profile", default=None, help="write the torch.profiler kernel table here")
    args = p.parse_args()
    torch.manual_seed(0)
    shape = (1, args.tokens, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    options = dict(method=args.method, density=args.density, clusters_q=args.clusters_q, clusters_k=args.clusters_k)
    print("shape B1 S%d H%d D%d bf16, %s density %g, clusters %d/%d; %s" % (
        args.tokens, args.heads, args.head_dim, args.method, args.density, args.clusters_q, args.clusters_k,
        torch.cuda.get_device_name()))
    print("| call | GPU ms/call | host ms/call |")
    print("|---|---|---|")
    sdpa_ms = gpu_ms(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
                     args.repeats)
    print("| SDPA (bshd views) | %.2f | %.2f |" % sdpa_ms)
    calls = {}
    for layout in ("bshd", "bhsd"):
        qq, kk, vv = (t if layout == "bshd" else t.transpose(1, 2).contiguous() for t in (q, k, v))
        for sync in (True, False):
            state = svgear.LayerState()
            call = (lambda qq=qq, kk=kk, vv=vv, state=state, sync=sync, layout=layout:
                    svgear.attention(qq, kk, vv, layout=layout, state=state, synchronize=sync, **options))
            call()  # cold start
            call()
            ms = gpu_ms(call, args.repeats)
            state.synchronize()
            calls[(layout, sync)] = call
            print("| svgear %s, synchronize=%s | %.2f | %.2f |" % ((layout, sync) + ms))
            if sync:
                r = svgear.last_report()
                print("|   report: check %.2f, cluster %.2f, score %.2f, select %.2f, attend %.2f, total %.2f |  |  |" % (
                    r["check_ms"], r["cluster_ms"], r["score_ms"], r["select_ms"], r["attend_ms"], r["total_ms"]))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        call = calls[("bshd", False)]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                call()
            torch.cuda.synchronize()
        with open(args.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
        print("wrote", args.profile)


if __name__ == "__main__":
    main()
