"""test_vision.py -- Gemma 3 with images in lathe against vision_ref.py (float64 NumPy of
transformers' SiglipVisionModel + Gemma3MultiModalProjector + the image-block mask), through
`lathe logits MODEL --image FILE --ids ...`.

Logits must agree to 1e-4 of the largest logit on tiny random checkpoints in both weight layouts
(the Hub's language_model.model. / vision_tower. / multi_modal_projector. and transformers'
model.language_model. / model.vision_tower. / model.multi_modal_projector.), in F32 and BF16,
with the image token inside or past the embedding, one or two images, an image block longer
than the sliding window, an image that needs resizing (PIL's bilinear), and the committed
nested/ and tf5/ fixtures. A different image must change the logits after the block and only
there; a causal-only mask must not match. Bad input (a wrong number of image tokens, a
text-only model, truncated / empty / non-image / missing files) is refused with a message.
When tests/fixtures/vision/ (written by tests/fixtures/make_vision_fixture.py with
transformers on the GPU machine) exists, lathe must match its logits too.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "fixtures"))
import vision_ref as vr  # noqa: E402

SRCDIR = os.environ.get("LATHE_SRCDIR") or os.path.abspath(os.path.join(HERE, "..", ".."))
BUILDDIR = os.environ.get("LATHE_BUILDDIR") or SRCDIR
LATHE = os.path.join(BUILDDIR, "lathe")
TOK = os.path.join(SRCDIR, "models", "tiny", "tokenizer.model")
FIX = os.path.join(SRCDIR, "tests", "fixtures")
TOL = 1e-4


def lathe_logits(model, ids, images, out, check=True):
    args = [LATHE, "logits", model, "device=cpu"]
    for im in images:
        args += ["--image", im]
    args += ["--ids", ",".join(map(str, ids)), "--out", out]
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if check:
        assert p.returncode == 0, p.stderr.decode(errors="replace")
        return np.load(out)
    return p


def close(got, want, tol=TOL):
    err = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    assert err <= tol * scale, f"max abs diff {err:.3g} > {tol} x max |logit| {scale:.3g}"
    return err / scale


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("vision")


def checkpoint(work, name, **kw):
    d = str(work / name)
    if not os.path.exists(os.path.join(d, "config.json")):
        vr.make_checkpoint(d, tokenizer=TOK, **kw)
    return d, *vr.load_checkpoint(d)


def image_file(work, name, w, h, seed):
    path = str(work / name)
    img = vr.test_image(w, h, seed)
    vr.write_png(path, img)
    return path, img


@pytest.mark.parametrize("layout,dtype,vocab", [("hub", "F32", 4160), ("v5", "F32", 4160),
                                                ("hub", "BF16", 4160), ("v5", "F32", 4096)])
def test_logits_match_reference(work, layout, dtype, vocab):
    d, cfg, t = checkpoint(work, f"{layout}-{dtype}-{vocab}", layout=layout, dtype=dtype,
                           vocab=vocab, seed=11)
    png, img = image_file(work, "a.png", 32, 32, 1)
    ids = vr.image_ids(cfg)
    want = vr.logits(cfg, t, ids, vr.image_features(cfg, t, vr.pixels(img)))
    got = lathe_logits(d, ids, [png], str(work / "out.npy"))
    assert got.shape == (len(ids), vocab)
    close(got, want)


def test_mask_and_image_matter(work):
    d, cfg, t = checkpoint(work, "hub-F32-4160", layout="hub", dtype="F32", vocab=4160, seed=11)
    png, img = image_file(work, "a.png", 32, 32, 1)
    png2, img2 = image_file(work, "b.png", 32, 32, 2)
    ids = vr.image_ids(cfg)
    feats = vr.image_features(cfg, t, vr.pixels(img))
    got = lathe_logits(d, ids, [png], str(work / "o1.npy"))
    causal = vr.logits(cfg, t, ids, feats, bidir=False)
    scale = float(np.abs(causal).max())
    assert float(np.abs(got - causal).max()) > 100 * TOL * scale, "the image block's mask has no effect"
    other = lathe_logits(d, ids, [png2], str(work / "o2.npy"))
    close(other, vr.logits(cfg, t, ids, vr.image_features(cfg, t, vr.pixels(img2))))
    boi = ids.index(cfg["boi_token_index"])
    assert np.array_equal(other[:boi + 1], got[:boi + 1]), "tokens before the image saw it"
    assert float(np.abs(other[boi + 1:] - got[boi + 1:]).min(axis=1).max()) > 0
    assert float(np.abs(other[-1] - got[-1]).max()) > 100 * TOL * scale, "the image changes nothing"


def test_two_images_and_resize(work):
    d, cfg, t = checkpoint(work, "v5-F32-4160", layout="v5", dtype="F32", vocab=4160, seed=11)
    png, img = image_file(work, "wide.png", 45, 20, 3)   # downscaled in x, upscaled in y
    png2, img2 = image_file(work, "small.png", 13, 50, 4)
    ids = vr.image_ids(cfg, n_images=2)
    feats = np.concatenate([vr.image_features(cfg, t, vr.pixels(vr.pil_bilinear(im, 32, 32)))
                            for im in (img, img2)])
    got = lathe_logits(d, ids, [png, png2], str(work / "two.npy"))
    close(got, vr.logits(cfg, t, ids, feats))


def test_block_across_a_chunk_boundary(work):
    """The cached forward runs 256 tokens at a time; a block that would straddle two chunks
    must be moved whole into the next one (its tokens see each other)."""
    d, cfg, t = checkpoint(work, "hub-F32-4160", layout="hub", dtype="F32", vocab=4160, seed=11)
    png, img = image_file(work, "a.png", 32, 32, 1)
    rng = np.random.default_rng(3)
    before = [2] + [int(x) for x in rng.integers(10, 4000, 246)]  # the block spans 247 .. 264
    ids = vr.image_ids(cfg, text_before=before, text_after=[int(x) for x in rng.integers(10, 4000, 12)])
    assert ids.index(cfg["image_token_index"]) < 256 < len(ids) - ids[::-1].index(cfg["image_token_index"])
    want = vr.logits(cfg, t, ids, vr.image_features(cfg, t, vr.pixels(img)))
    close(lathe_logits(d, ids, [png], str(work / "long.npy")), want)


@pytest.mark.parametrize("name", ["nested", "tf5"])
def test_committed_fixtures_with_an_image(work, name):
    """Loading from the committed layouts (BF16 under language_model.model. / vision_tower.
    vision_model.; F16 in shards under model.language_model. / model.vision_tower., image id past
    the embedding). Their projector is zero (transformers' init), so the soft tokens are zero:
    this checks the layouts and the block, the random checkpoints above check the tower."""
    d = os.path.join(FIX, name)
    cfg, t = vr.load_checkpoint(d)
    side = cfg["vision_config"]["image_size"]
    png, img = image_file(work, f"{name}.png", side + 5, side - 3, 5)
    ids = vr.image_ids(cfg, text_before=(2, 40, 41), text_after=(42, 43, 44))
    want = vr.logits(cfg, t, ids, vr.image_features(cfg, t, vr.pixels(vr.pil_bilinear(img, side, side))))
    close(lathe_logits(d, ids, [png], str(work / f"{name}.npy")), want)


def refused(p, *words):
    msg = p.stderr.decode(errors="replace")
    assert p.returncode == 1, (p.returncode, msg)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_bad_input_is_refused(work):
    d, cfg, _ = checkpoint(work, "hub-F32-4160", layout="hub", dtype="F32", vocab=4160, seed=11)
    png, _ = image_file(work, "a.png", 32, 32, 1)
    ids = vr.image_ids(cfg)
    out = str(work / "bad.npy")
    short = [i for i in ids]
    short.remove(cfg["image_token_index"])
    refused(lathe_logits(d, short, [png], out, check=False), "15 image tokens", "16 image embeddings")
    refused(lathe_logits(d, ids, [png, png], out, check=False), "16 image tokens", "32 image embeddings")
    tiny = os.path.join(SRCDIR, "models", "tiny")
    refused(lathe_logits(tiny, [2, 5, 6], [png], out, check=False), "no image tower")
    with open(png, "rb") as f:
        data = f.read()
    cut = str(work / "cut.png")
    with open(cut, "wb") as f:
        f.write(data[: len(data) // 2])
    refused(lathe_logits(d, ids, [cut], out, check=False), "cut.png", "PNG")
    empty = str(work / "empty.png")
    open(empty, "wb").close()
    refused(lathe_logits(d, ids, [empty], out, check=False), "empty.png", "empty file")
    text = str(work / "notes.txt")
    with open(text, "w") as f:
        f.write("hello, not an image\n")
    refused(lathe_logits(d, ids, [text], out, check=False), "notes.txt", "not a PNG or JPEG")
    refused(lathe_logits(d, ids, [str(work / "missing.png")], out, check=False), "missing.png", "cannot open")


GOLDEN = os.path.join(FIX, "vision")
NO_GOLDEN = ("tests/fixtures/vision/ not generated yet: run tests/fixtures/make_vision_fixture.py "
             "with transformers on the GPU machine")


def golden_ref():
    with open(os.path.join(GOLDEN, "reference.json")) as f:
        return json.load(f)


@pytest.mark.skipif(not os.path.exists(os.path.join(GOLDEN, "reference.json")), reason=NO_GOLDEN)
def test_transformers_golden(work):
    ref = golden_ref()
    want = np.load(os.path.join(GOLDEN, ref["logits"]))
    assert ref["models"], "the script saved no model"
    for model in ref["models"]:  # every layout the script saved
        got = lathe_logits(os.path.join(GOLDEN, model), ref["ids"],
                           [os.path.join(GOLDEN, ref["image"])], str(work / "golden.npy"))
        close(got, want)
    cfg, t = vr.load_checkpoint(os.path.join(GOLDEN, ref["models"][0]))
    px = np.load(os.path.join(GOLDEN, "pixel_values.npy"))[0].astype(np.float64)
    close(vr.logits(cfg, t, ref["ids"], vr.image_features(cfg, t, px)), want)


@pytest.mark.skipif(not os.path.exists(os.path.join(GOLDEN, "reference.json")), reason=NO_GOLDEN)
def test_transformers_resize_golden(work):
    ref = golden_ref()
    if not ref.get("resized_pixels"):
        pytest.skip(f"the golden has no resized image ({ref.get('processor')})")
    if not ref.get("resized_processor_pil"):
        pytest.skip(f"the golden's processor {ref.get('resized_processor')} is not the PIL one")
    model = os.path.join(GOLDEN, ref["models"][0])
    cfg, _ = vr.load_checkpoint(model)
    side = cfg["vision_config"]["image_size"]
    src = np.load(os.path.join(GOLDEN, ref["resized_source"]))  # the PNG's uint8 pixels
    ours = vr.pixels(vr.pil_bilinear(src, side, side))
    theirs = np.load(os.path.join(GOLDEN, ref["resized_pixels"]))[0]
    assert np.abs(ours - theirs).max() <= 1e-6, "PIL bilinear resize differs from the processor's"
    got = lathe_logits(model, ref["ids"], [os.path.join(GOLDEN, ref["resized_image"])],
                       str(work / "golden2.npy"))
    close(got, np.load(os.path.join(GOLDEN, ref["resized_logits"])))
