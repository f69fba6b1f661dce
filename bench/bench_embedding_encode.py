"""Cost of an in-graph embedding at prompt-encode time (issue 5).

Encodes, with ComfyUI's own CLIPTextEncode node, a prompt that uses an in-memory embedding through Dojo
Apply Embedding (`embedding:bench_emb`, N vectors) and a plain prompt of exactly the same token length
(the embedding replaced by N one-token words) on the plain CLIP; interleaved, median of R runs each.
Also times tokenization alone (where Dojo's hook lives). Target: the embedding prompt within 10%.

Usage: COMFYUI_PATH=/root/ComfyUI OMP_NUM_THREADS=1 python bench/bench_embedding_encode.py \
           [--vectors 4] [--runs 30] [--sdxl]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "integration"), str(REPO / "tests")]


def timed(fn, runs):
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--vectors", type=int, default=4)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--sdxl", action="store_true", help="the 1.9 GB smallest SDXL checkpoint (CLIP-L + G)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch
    import conftest  # noqa: F401  (makes comfyui_dojo importable from this checkout)
    from comfy_harness import ComfyUI, comfyui_path, make_base_directory
    torch.set_num_threads(args.threads)
    comfy = ComfyUI(comfyui_path(), make_base_directory(Path(tempfile.mkdtemp())))
    import tiny_files
    ckpt = tiny_files.provide_sdxl_checkpoint(comfy.base) if args.sdxl else tiny_files.provide_sd15_checkpoint(comfy.base)
    with torch.inference_mode():
        clip = comfy.nodes.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint(ckpt)[1]
    import importlib
    pack = sys.modules[comfy.pack_module_name()].__name__
    nodes = importlib.import_module(f"{pack}.nodes.embedding_nodes")
    ti = importlib.import_module(f"{pack}.nodes.ti_training")
    g = torch.Generator().manual_seed(0)
    widths = {"clip_l": 768, "clip_g": 1280}
    keys = ["clip_l", "clip_g"] if args.sdxl else ["clip_l"]
    emb = ti.DojoEmbedding("bench_emb", {k: torch.randn(args.vectors, widths[k], generator=g) * 0.02 for k in keys})
    emb_clip = nodes.DojoApplyEmbedding.execute(clip, emb).result[0]
    words = " ".join(["cat"] * args.vectors)
    with_emb = "a photo of embedding:bench_emb sitting on a wooden table, soft light, detailed"
    plain = f"a photo of {words} sitting on a wooden table, soft light, detailed"
    tokens_e, tokens_p = emb_clip.tokenize(with_emb), clip.tokenize(plain)
    for key in tokens_e:
        assert [len(s) for s in tokens_e[key]] == [len(s) for s in tokens_p[key]]
        assert sum(torch.is_tensor(t) for t, _ in tokens_e[key][0]) == args.vectors
    encode = comfy.nodes.NODE_CLASS_MAPPINGS["CLIPTextEncode"]().encode

    def enc(c, text):
        with torch.inference_mode():
            encode(c, text)

    for _ in range(3):  # warm-up
        enc(emb_clip, with_emb)
        enc(clip, plain)
    t_emb, t_plain = [], []
    for _ in range(args.runs):  # interleaved, so that load on the machine hits both alike
        t_emb += timed(lambda: enc(emb_clip, with_emb), 1)
        t_plain += timed(lambda: enc(clip, plain), 1)
    tok_emb = timed(lambda: emb_clip.tokenize(with_emb), 200)
    tok_plain = timed(lambda: clip.tokenize(plain), 200)
    m_emb, m_plain = statistics.median(t_emb), statistics.median(t_plain)
    print(f"ComfyUI {comfy.version}, {'SDXL CLIP-L+G' if args.sdxl else 'SD1.5 CLIP-L'}, {args.vectors} vectors, "
          f"{args.threads} thread(s), {args.runs} runs each (median)")
    print(f"  CLIPTextEncode, plain prompt          : {m_plain * 1e3:8.2f} ms")
    print(f"  CLIPTextEncode, in-graph embedding    : {m_emb * 1e3:8.2f} ms   ratio {m_emb / m_plain:.3f}")
    print(f"  tokenize only, plain / with embedding : {statistics.median(tok_plain) * 1e6:.0f} us / "
          f"{statistics.median(tok_emb) * 1e6:.0f} us")
    print("  target: ratio <= 1.10 -> " + ("met" if m_emb / m_plain <= 1.10 else "NOT met"))


if __name__ == "__main__":
    main()
