"""hf_vision.py — transformers' Gemma 3 image tower for one 896 x 896 image, the reference for
bench/bench_vision.c: SiglipVisionModel with google/gemma-3-4b-it's vision_config (width 1152,
MLP 4304, 27 layers, 16 heads, patch 14) and Gemma3MultiModalProjector into 4B's text width
2560, random weights, bf16, SDPA attention, on the GPU. Times the forward (pixels already on the
GPU, as transformers' generate sees them) after 3 warm-ups and prints one JSON line: milliseconds
an image, images/s, peak memory of the forward (torch.cuda.max_memory_allocated after a reset).
Usage: python3 bench/hf_vision.py [ITERS]"""
import json
import sys
import time

import torch
from transformers import Gemma3Config, SiglipVisionConfig, SiglipVisionModel
from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector


def run(iters=20, dtype=torch.bfloat16):
    vc = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                            num_attention_heads=16, image_size=896, patch_size=14,
                            vision_use_head=False, layer_norm_eps=1e-6)
    vc._attn_implementation = "sdpa"
    cfg = Gemma3Config(vision_config=vc.to_dict(),
                       text_config=dict(hidden_size=2560, num_hidden_layers=1,
                                        vocab_size=262208),
                       mm_tokens_per_image=256)
    torch.manual_seed(0)
    with torch.device("cuda"):
        tower = SiglipVisionModel(vc).to(dtype).eval()
        proj = Gemma3MultiModalProjector(cfg).to(dtype).eval()
    pixels = torch.rand(1, 3, 896, 896, device="cuda", dtype=dtype) * 2 - 1
    with torch.no_grad():
        for i in range(3 + iters):
            if i == 3:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
            h = tower(pixel_values=pixels).last_hidden_state
            out = proj(h)
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3 / iters
    assert out.shape == (1, 256, 2560), out.shape
    print(json.dumps({"engine": "transformers", "bench": "vision_tower", "precision": "bf16",
                      "image": 896, "patches": 4096, "layers": 27, "ms_per_image": round(ms, 2),
                      "images_s": round(1e3 / ms, 1),
                      "forward_peak_gib": round((torch.cuda.max_memory_allocated() - base)
                                                / 2**30, 3),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
