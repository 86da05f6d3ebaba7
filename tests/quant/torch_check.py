"""torch_check.py -- confirms bnb_ref.py against torch (not part of `make check`).

Run where torch is installed (the GPU machine): `python3 tests/quant/torch_check.py`. bitsandbytes
itself is not needed: its backends/default/ops.py operations are pure torch, so they are redone
here in torch (quantize_4bit "nf4", quantize_blockwise, create_dynamic_map, the double
quantization's mean, Int8Params' int8_vectorwise_quant) and compared byte for byte with the
NumPy reference that `make check` trusts. Prints one line per check and exits 1 on a mismatch.
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bnb_ref  # noqa: E402

torch.set_num_threads(1)
fails = 0


def check(name, ok, detail=""):
    global fails
    print(("ok     " if ok else "FAILED ") + name + (f"  ({detail})" if detail else ""))
    fails += 0 if ok else 1


def t_dynamic_map():
    data = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def t_blocks(A, bs):
    A_flat = A.reshape(-1).float()
    n = A_flat.numel()
    rem = n % bs
    full = n - rem
    A_com = A_flat[:full].reshape(full // bs, bs)
    absmax = A_com.abs().max(dim=-1)[0]
    scaled = torch.clamp(A_com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = A_flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(A_flat[full:] / am, -1, 1)])
    return scaled, absmax


def t_nf4(A, bs=64):
    code = torch.tensor(bnb_ref.NF4_CODE.tolist(), dtype=torch.float32)
    code = code / code.abs().max()
    bounds = (code[:-1] + code[1:]) / 2
    scaled, absmax = t_blocks(A, bs)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    return ((q[::2] << 4) | q[1::2]).numpy(), absmax.numpy()


def t_blockwise(A, code, bs):
    scaled, absmax = t_blocks(A, bs)
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8).numpy(), absmax.numpy()


def t_int8(W):
    B = W.to(torch.float16)
    row_stats = torch.max(B.abs(), dim=1).values.float()
    return torch.round(B * (127.0 / row_stats.unsqueeze(-1))).to(torch.int8).numpy(), row_stats.numpy()


print("torch", torch.__version__, "cpu capability", torch.backends.cpu.get_cpu_capability())
tm = t_dynamic_map().numpy()
rm = bnb_ref.dynamic_map()
check("dynamic map", np.array_equal(tm.view(np.uint32), rm.view(np.uint32)),
      f"{int((tm != rm).sum())} of 256 differ")
for w in (0, 16):
    alt = np.array(sorted(
        [v for i in range(7) for m in [((bnb_ref._linspace_f32(0.1, 1.0, 2 ** i + 1, w)[:-1]
                                        + bnb_ref._linspace_f32(0.1, 1.0, 2 ** i + 1, w)[1:])
                                       / np.float32(2)).astype(np.float32)]
         for v in list((np.float32(10.0 ** (i - 6)) * m).astype(np.float32))
         + list((-np.float32(10.0 ** (i - 6)) * m).astype(np.float32))] + [0.0, 1.0]),
        dtype=np.float32)
    print(f"       (a {w or 'scalar'}-wide linspace would differ in {int((alt != tm).sum())})")

rng = np.random.default_rng(1)
cases = {"normal": rng.standard_normal(64 * 999).astype(np.float32),
         "tail": rng.standard_normal(64 * 5 + 13).astype(np.float32),
         "zeros": np.zeros(256, np.float32),
         "bf16": (rng.standard_normal(64 * 77).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)}
bounds = ((bnb_ref.NF4_CODE[:-1] + bnb_ref.NF4_CODE[1:]) / np.float32(2)).astype(np.float32)
ties = np.zeros(64, np.float32)
ties[:16] = np.concatenate([[2.0], bounds * np.float32(2.0)])
cases["ties"] = ties
for name, x in cases.items():
    tp, ta = t_nf4(torch.from_numpy(x))
    rp, ra = bnb_ref.quantize_nf4(x)
    check(f"nf4 {name}", np.array_equal(tp, rp) and np.array_equal(ta.view(np.uint32), ra.view(np.uint32)))
code = torch.from_numpy(tm)
for nb in (300, 512, 409600):
    am = (np.abs(rng.standard_normal(nb)) * 0.05 + 0.01).astype(np.float32)
    toff = torch.from_numpy(am).mean()
    roff = np.float32(am.astype(np.float64).mean())
    tq, ta2 = t_blockwise(torch.from_numpy(am) - toff, code, 256)
    rq, ra2, _ = bnb_ref.double_quantize(am, rm)
    check(f"double quant offset n={nb}", float(toff) == float(roff),
          f"torch {float(toff)!r} numpy {float(roff)!r}")
    check(f"double quant codes n={nb}", np.array_equal(tq, rq) and np.array_equal(ta2, ra2))
W = rng.standard_normal((300, 200)).astype(np.float32) * 0.03
W[4, :6] = [127.0, 2.5, 3.5, -2.5, 0.5, 1.5]
W[4, 6:] = 0
tw, ts = t_int8(torch.from_numpy(W))
rw, rs = bnb_ref.quantize_int8(W)
check("int8", np.array_equal(tw, rw) and np.array_equal(ts, rs), f"{int((tw != rw).sum())} differ")
sys.exit(1 if fails else 0)
