"""test_mmproj.py -- %export_gguf's mmproj file (the image tower and projector), loaded and run
by llama.cpp's own multimodal code.

llama.cpp here is the source node-llama-cpp ships (tests/gguf/node_modules/node-llama-cpp/llama/
gitRelease.bundle, installed by `npm ci`), built by build-mtmd: libmtmd + libllama + ggml, CPU
only, once into the build tree (tests/gguf/mtmd-cache/; LATHE_MTMD_CACHE moves it), with
mtmd_probe.c linked against it. The probe does what llama-mtmd-cli does: mtmd_tokenize on a
prompt with an image marker, mtmd_encode_chunk (clip.cpp's Gemma 3 graph), then
mtmd_helper_eval_chunks and greedy decoding. lathe's side is tests/gguf/mmproj_tool (the tower's
soft tokens and gemma3_forward_images, the path %%chat image= takes); the export goes through
the %export_gguf magic (`lathe run`).

On tiny random multimodal checkpoints (tests/vision/vision_ref.py's, as tests/vision uses):
  * the mmproj's metadata and tensors are what llama.cpp's convert_hf_to_gguf.py --mmproj
    writes for Gemma 3 (keys and value types, names, shapes, types, values: the checkpoint's,
    soft_emb_norm + 1, the projection as stored);
  * llama.cpp's image embeddings equal lathe's soft tokens, its logits after the prompt and
    after each greedy token equal lathe's, and its greedy continuation equals lathe's token for
    token (f32 and f16 exports; steps after a near-tie are not compared). These random models
    continue by repeating the prompt's last token, so the logits carry most of the check;
  * a different image changes llama.cpp's embeddings the way it changes lathe's; a projection
    written transposed (same shape, wrong layout) is caught;
  * the cell output names both files with their sizes; mmproj= and mmproj=none; a text-only
    model writes only the text file and says so; an unwritable or existing mmproj path is a
    clear error and leaves no file under either final name.
"""
import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

SRC = os.environ.get("LATHE_SRCDIR") or os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("LATHE_BUILDDIR") or SRC
HERE = os.path.join(SRC, "tests", "gguf")
LATHE = os.path.join(BUILD, "lathe")
TOOL = os.path.join(BUILD, "tests", "gguf", "mmproj_tool")
TINY = os.path.join(SRC, "models", "tiny")
CACHE = os.environ.get("LATHE_MTMD_CACHE") or os.path.join(BUILD, "tests", "gguf", "mtmd-cache")
sys.path.insert(0, os.path.join(SRC, "tests", "vision"))
sys.path.insert(0, os.path.join(SRC, "tests", "fixtures"))
import vision_ref as vr  # noqa: E402

IMAGE_ID = 4096
# The prompt as lathe's chat renders one image turn (processing_gemma3.py's block:
# "\n\n<start_of_image>" + soft tokens + "<end_of_image>\n\n"), mtmd's marker standing for the
# image: mtmd writes <start_of_image> and <end_of_image> around its image chunk itself.
PROMPT = "<start_of_turn>user\n\n\n<__media__>\n\nWhat is in the picture?<end_of_turn>\n<start_of_turn>model\n"
STEPS = 10
# Largest |llama.cpp - lathe| allowed, as a fraction of the largest |lathe| value. llama.cpp's
# CPU GELU goes through an fp16 table and the projection is f16 in every mmproj
# (convert_hf_to_gguf.py forces it): measured on these checkpoints (5 seeds), the soft tokens
# differ by 5e-4..1.2e-3 of their scale (f32 and f16 exports), the logits by 1e-4..5e-4. A
# projection written transposed is off by ~1.5 (soft tokens) and ~0.1 (logits).
TOL = {"f32": 4e-3, "f16": 5e-3}
TOL_LOGITS = {"f32": 1.5e-3, "f16": 2e-3}
MIN_MARGIN = 0.05  # logit top-2 gap below which a greedy step may legitimately flip
MIN_COMPARED = 6


def run_cells(script, tmp_path, check=True):
    path = tmp_path / "cells.lathe"
    path.write_text(script)
    env = dict(os.environ, LATHE_TINY_DIR=TINY)
    p = subprocess.run([LATHE, "run", str(path)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env=env)
    out = p.stdout.decode() + p.stderr.decode()
    if check:
        assert p.returncode == 0, out
    return p.returncode, out


def sizes_printed(out):
    """{path: bytes} from the cell's 'wrote PATH: 1.53 MiB, ...' lines."""
    unit = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}
    return {m.group(1): float(m.group(2)) * unit[m.group(3)]
            for m in re.finditer(r"wrote (\S+): ([\d.]+) (B|KiB|MiB|GiB)", out)}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("mmproj")


@pytest.fixture(scope="module")
def ckpt(work):
    d = str(work / "hub")
    cfg, t = vr.make_checkpoint(d, layout="hub", dtype="F32", vocab=4160, image_id=IMAGE_ID,
                                seed=11, tokenizer=os.path.join(TINY, "tokenizer.model"))
    return d, cfg, t


@pytest.fixture(scope="module")
def images(work):
    out = []
    for seed in (1, 2):
        path = str(work / f"img{seed}.png")
        vr.write_png(path, vr.test_image(32, 32, seed))  # the tower's size: no resize on either side
        out.append(path)
    return out


@pytest.fixture(scope="module")
def exports(work, ckpt):
    """{type: (text path, mmproj path, cell output)} through %export_gguf."""
    d = ckpt[0]
    res = {}
    for ty in ("f32", "f16"):
        text = str(work / ty / f"m-{ty}.gguf")
        _, out = run_cells(f"%load {d} device=cpu\n%export_gguf {text} type={ty}\n", work)
        res[ty] = (text, str(work / ty / f"mmproj-m-{ty}.gguf"), out)
    return res


@pytest.fixture(scope="module")
def probe():
    if not os.access(LATHE, os.X_OK) or not os.access(TOOL, os.X_OK):
        pytest.fail(f"{LATHE} or {TOOL} is not built (make check builds them)")
    p = subprocess.run([os.path.join(HERE, "build-mtmd"), CACHE], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    if p.returncode != 0:
        pytest.fail("building llama.cpp's libmtmd failed (tests/gguf/build-mtmd; npm ci in "
                    "tests/gguf and cmake are needed, ./quickstart check installs both):\n"
                    + p.stderr.decode(errors="replace"))
    return p.stdout.decode().strip().splitlines()[-1]


@pytest.fixture(scope="module")
def gguf_py(probe):
    """llama.cpp's own GGUF reader (gguf-py, from the source build-mtmd cloned)."""
    sys.path.insert(0, os.path.join(os.path.dirname(probe), "src", "gguf-py"))
    import gguf
    return gguf


def run_probe(probe, text, mmproj, image, out, n=STEPS):
    p = subprocess.run([probe, text, mmproj, image, PROMPT, str(n), str(out)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    with open(out) as f:
        return json.load(f)


def lathe_side(d, image, ids, n=STEPS):
    p = subprocess.run([TOOL, d, image, "--ids", ",".join(map(str, ids)), "--n", str(n)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    return json.loads(p.stdout)


def flat_ids(chunks, image_id=IMAGE_ID):
    """llama.cpp's chunks as one id sequence, the image chunk as image tokens."""
    ids = []
    for c in chunks:
        ids += [image_id] * c["image"] if isinstance(c, dict) else c
    return ids


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---- the file itself ----------------------------------------------------------------------

def test_metadata_and_tensors_as_llama_cpp_converts_them(exports, ckpt, gguf_py):
    d, cfg, t = ckpt
    r = gguf_py.GGUFReader(exports["f16"][1])
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    vc = cfg["vision_config"]
    want = {"general.architecture": "clip", "general.type": "mmproj", "clip.projector_type": "gemma3",
            "clip.has_vision_encoder": True, "clip.use_gelu": True,
            "clip.vision.projection_dim": 64, "clip.vision.image_size": 32,
            "clip.vision.patch_size": 4, "clip.vision.embedding_length": vc["hidden_size"],
            "clip.vision.feed_forward_length": vc["intermediate_size"],
            "clip.vision.block_count": vc["num_hidden_layers"],
            "clip.vision.attention.head_count": vc["num_attention_heads"],
            "clip.vision.image_mean": [0.5] * 3, "clip.vision.image_std": [0.5] * 3,
            # 8x8 patches pooled to 4x4 soft tokens: Gemma3VisionModel writes 2 (4 is the default)
            "clip.vision.projector.scale_factor": 2}
    for k, v in want.items():
        assert kv.get(k) == v, (k, kv.get(k))
    assert abs(kv["clip.vision.attention.layer_norm_epsilon"] - 1e-6) < 1e-12
    G = gguf_py.GGUFValueType
    types = {k: f.types[0] for k, f in r.fields.items()}
    for k in ("clip.vision.image_size", "clip.vision.block_count", "clip.vision.projection_dim"):
        assert types[k] == G.UINT32, k
    assert types["clip.vision.attention.layer_norm_epsilon"] == G.FLOAT32
    assert types["clip.has_vision_encoder"] == G.BOOL

    vp, pp = "vision_tower.vision_model.", "multi_modal_projector."
    names = {"v.patch_embd.weight": vp + "embeddings.patch_embedding.weight",
             "v.patch_embd.bias": vp + "embeddings.patch_embedding.bias",
             "v.position_embd.weight": vp + "embeddings.position_embedding.weight",
             "v.post_ln.weight": vp + "post_layernorm.weight",
             "v.post_ln.bias": vp + "post_layernorm.bias",
             "mm.soft_emb_norm.weight": pp + "mm_soft_emb_norm.weight",
             "mm.input_projection.weight": pp + "mm_input_projection_weight"}
    per = {"ln1": "layer_norm1", "ln2": "layer_norm2", "attn_q": "self_attn.q_proj",
           "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_out": "self_attn.out_proj", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}
    for i in range(vc["num_hidden_layers"]):
        for g, h in per.items():
            for s in ("weight", "bias"):
                names[f"v.blk.{i}.{g}.{s}"] = f"{vp}encoder.layers.{i}.{h}.{s}"
    got = {x.name: x for x in r.tensors}
    assert set(got) == set(names)
    Q = gguf_py.GGMLQuantizationType
    for g, h in names.items():
        x, ref = got[g], np.asarray(t[h], np.float64)
        # gguf-py lists ne fastest first: transformers' shape reversed
        assert list(x.shape) == list(reversed(ref.shape)), g
        if g == "mm.input_projection.weight":
            want_type = Q.F16  # Gemma3VisionModel.tensor_force_quant
        elif ref.ndim == 1 or ".embd." in g or "position_embd" in g or "patch_embd" in g:
            want_type = Q.F32
        else:
            want_type = Q.F16
        assert x.tensor_type == want_type, (g, x.tensor_type)
        if g == "mm.soft_emb_norm.weight":
            ref = ref + 1.0  # Gemma3VisionModel.modify_tensors
        ref = ref.astype(np.float16) if want_type == Q.F16 else ref.astype(np.float32)
        assert np.array_equal(np.asarray(x.data).reshape(-1), ref.reshape(-1)), g


def test_cell_output_names_both_files_with_sizes(exports):
    for ty, (text, mm, out) in exports.items():
        sizes = sizes_printed(out)
        assert set(sizes) == {text, mm}, out
        for path, printed in sizes.items():
            real = os.path.getsize(path)
            assert abs(printed - real) <= 0.01 * real + 1, (path, printed, real)
        assert f"llama-mtmd-cli -m {text} --mmproj {mm}" in out
        assert f"llama-server -m {text} --mmproj {mm}" in out


# ---- llama.cpp runs it ----------------------------------------------------------------------

@pytest.mark.parametrize("ty", ["f32", "f16"])
def test_llama_cpp_matches_lathe(probe, exports, ckpt, images, work, ty):
    text, mm, _ = exports[ty]
    got = run_probe(probe, text, mm, images[0], work / f"probe-{ty}.json")
    cfg = ckpt[1]
    chunks = got["chunks"]
    # mtmd's chunks: text ... <start_of_image> | 16 embeddings | <end_of_image> ... text
    assert [isinstance(c, dict) for c in chunks] == [False, True, False], chunks
    assert chunks[1]["image"] == cfg["mm_tokens_per_image"]
    assert chunks[0][0] == 2 and chunks[0][-1] == cfg["boi_token_index"], chunks[0]
    assert chunks[2][0] == cfg["eoi_token_index"], chunks[2]
    ids = flat_ids(chunks)
    mine = lathe_side(ckpt[0], images[0], ids)

    e = rel_err(np.reshape(got["embd"], (-1, got["n_embd"])), np.reshape(mine["embd"], (-1, 64)))
    assert e <= TOL[ty], f"image embeddings: {e:.3g} of their scale"
    # the logits after the prompt and after each greedy token (the image block in the cache)
    for step, (a, b) in enumerate(zip(got["steps"], mine["steps"])):
        e = rel_err(a, b)
        assert e <= TOL_LOGITS[ty], f"logits at step {step}: {e:.3g} of their scale"
    assert len(got["steps"]) == len(mine["steps"]) == STEPS + 1

    # greedy, token for token, up to the first step whose top-2 gap (lathe's) is a near-tie
    compared = 0
    for step, (a, b) in enumerate(zip(got["greedy"], mine["greedy"])):
        if mine["margins"][step] < MIN_MARGIN:
            break
        assert a == b, f"step {step}: llama.cpp {got['greedy']} vs lathe {mine['greedy']}"
        compared += 1
    assert compared >= MIN_COMPARED, (compared, mine["margins"])


def test_the_image_matters_to_both(probe, exports, ckpt, images, work):
    text, mm, _ = exports["f32"]
    a = run_probe(probe, text, mm, images[0], work / "a.json", n=1)
    b = run_probe(probe, text, mm, images[1], work / "b.json", n=1)
    ids = flat_ids(b["chunks"])
    mine_b = lathe_side(ckpt[0], images[1], ids, n=1)
    moved = rel_err(a["embd"], b["embd"])
    assert moved > 0.1, "a different image hardly moves llama.cpp's embeddings"
    assert rel_err(b["embd"], mine_b["embd"]) <= TOL["f32"]
    assert rel_err(b["steps"][0], mine_b["steps"][0]) <= TOL_LOGITS["f32"]
    assert rel_err(a["steps"][0], b["steps"][0]) > 10 * TOL_LOGITS["f32"]


def transposed_copy(src, dst, gguf_py, name="mm.input_projection.weight"):
    """src with one tensor's values laid out transposed (its shape, hence the file, unchanged):
    the bug a writer that forgot the projection's layout would have."""
    r = gguf_py.GGUFReader(src)
    x = next(t for t in r.tensors if t.name == name)
    ne0, ne1 = int(x.shape[0]), int(x.shape[1])
    data = np.asarray(x.data).reshape(ne1, ne0)
    swapped = np.ascontiguousarray(data.T).reshape(ne1, ne0)
    raw = bytearray(open(src, "rb").read())
    off = int(x.data_offset)
    raw[off:off + swapped.nbytes] = swapped.tobytes()
    with open(dst, "wb") as f:
        f.write(raw)


def test_a_transposed_projection_is_caught(probe, exports, ckpt, images, work, gguf_py):
    text, mm, _ = exports["f32"]
    bad = str(work / "mmproj-transposed.gguf")
    transposed_copy(mm, bad, gguf_py)
    got = run_probe(probe, text, bad, images[0], work / "bad.json", n=1)
    mine = lathe_side(ckpt[0], images[0], flat_ids(got["chunks"]), n=1)
    assert rel_err(got["embd"], mine["embd"]) > 10 * TOL["f32"]
    assert rel_err(got["steps"][0], mine["steps"][0]) > 10 * TOL_LOGITS["f32"]


# ---- names, options and refusals (no llama.cpp needed) -------------------------------------

def test_mmproj_option_and_none(work, ckpt):
    d = ckpt[0]
    where = work / "opt"
    _, out = run_cells(f"%load {d} device=cpu\n"
                       f"%export_gguf {where}/a.gguf type=q8_0 mmproj={where}/vision/p.gguf\n"
                       f"%export_gguf {where}/b.gguf mmproj=none\n"
                       f"%export_gguf {where}/c.gguf type=bf16 mmproj=auto\n", work)
    assert os.path.exists(where / "vision" / "p.gguf") and os.path.exists(where / "a.gguf")
    assert "f16 (llama.cpp's mmproj files are not quantized)" in out
    assert os.path.exists(where / "b.gguf") and not os.path.exists(where / "mmproj-b.gguf")
    assert "no mmproj file: mmproj=none" in out
    assert os.path.exists(where / "c.gguf") and os.path.exists(where / "mmproj-c.gguf")
    assert sorted(os.listdir(where)) == ["a.gguf", "b.gguf", "c.gguf", "mmproj-c.gguf", "vision"]


def test_text_only_model_writes_only_the_text_file(work):
    where = work / "textonly"
    _, out = run_cells(f"%load tiny device=cpu\n%export_gguf {where}/t.gguf type=f16\n", work)
    assert os.listdir(where) == ["t.gguf"]
    assert "no mmproj file: the model has no image tower" in out
    rc, out = run_cells(f"%load tiny device=cpu\n"
                        f"%export_gguf {where}/u.gguf mmproj={where}/mmproj-u.gguf\n", work,
                        check=False)
    assert rc != 0 and "has no image tower" in out and "leave mmproj= out" in out
    assert os.listdir(where) == ["t.gguf"]


def test_unwritable_or_existing_mmproj_path_leaves_nothing(work, ckpt):
    d = ckpt[0]
    where = work / "refuse"
    where.mkdir()
    (where / "file").write_text("not a folder")
    # a folder that cannot be made (below a file): refused before anything is written
    rc, out = run_cells(f"%load {d} device=cpu\n"
                        f"%export_gguf {where}/m.gguf mmproj={where}/file/sub/mm.gguf\n", work,
                        check=False)
    assert rc != 0 and f"{where}/file" in out, out
    # a folder that exists but takes no files (/proc)
    rc, out = run_cells(f"%load {d} device=cpu\n%export_gguf {where}/m.gguf mmproj=/proc/mm.gguf\n",
                        work, check=False)
    assert rc != 0 and "/proc" in out, out
    assert sorted(os.listdir(where)) == ["file"], os.listdir(where)
    # the mmproj is written first; a text file that then fails takes it away with it
    rc, out = run_cells(f"%load {d} device=cpu\n"
                        f"%export_gguf /proc/m.gguf mmproj={where}/mmproj-m.gguf\n", work,
                        check=False)
    assert rc != 0 and "/proc/m.gguf" in out, out
    assert sorted(os.listdir(where)) == ["file"], os.listdir(where)
    # an existing mmproj is kept and the text file is not written
    (where / "mmproj-m.gguf").write_bytes(b"old")
    rc, out = run_cells(f"%load {d} device=cpu\n%export_gguf {where}/m.gguf\n", work, check=False)
    assert rc != 0 and "mmproj-m.gguf: file exists; pass overwrite=true" in out, out
    assert (where / "mmproj-m.gguf").read_bytes() == b"old"
    assert sorted(os.listdir(where)) == ["file", "mmproj-m.gguf"]
    # a bad mmproj= value is a cell error
    rc, out = run_cells(f"%load {d} device=cpu\n%export_gguf {where}/m.gguf mmproj=mm.bin\n",
                        work, check=False)
    assert rc != 0 and "mmproj= should be auto, none or a file name ending in .gguf" in out
