"""The emulator test cases: every CUDA kernel, forward and backward, through the real Python side
(``hilt_kernels.cuda.<op>.forward/backward`` on CPU tensors) against the reference backend run in
float64 on the same (rounded) inputs.

A case is a dict: ``id``, ``op`` and the op's parameters. ``run_case(case)`` returns a list of
failure messages ([] = pass). Imported by the child process (``run_cases.py``) that has the
sanitizer runtime preloaded; ``CASES`` / ``TSAN_IDS`` are read by the pytest side too (no torch
import at module level).

Coverage (see the issue): fp32/fp16/bf16; T not a multiple of the block size; D in {1, 13, 64, 80,
128} and each op's largest supported D; block sizes above a tile's rows (bla: > 64 / 32 rows);
random / fully padded / no padding masks; non-contiguous inputs (strided views of a fused tensor,
transposes) and stride-0 (expanded) inputs and gradients; outputs pre-filled with NaN
(HILT_DEBUG_NAN_FILL=1 in the child); attention_pool with values shared by H = 1024 heads.
"""

from __future__ import annotations

F32, F16, BF16 = "float32", "float16", "bfloat16"

CASES: list[dict] = [
    # ---------------------------------------------------------------- block_local_attention (D <= 128)
    # G4xDPT8 (D <= 32, 64-row tiles), G4xDPT16 (D <= 64, 64 rows), G8xDPT16 (D <= 128, 32 rows)
    dict(id="bla-f32-D1-b5-causal-randmask-noncontig", op="bla", dtype=F32, B=2, T=23, H=2, D=1, b=5, causal=True,
         mask="random", layout="fused", grad="random"),
    dict(id="bla-f16-D13-b8-T37-nomask", op="bla", dtype=F16, B=2, T=37, H=2, D=13, b=8, causal=False, mask=None,
         layout="contig", grad="random"),
    dict(id="bla-bf16-D64-b16-blockmask-sumgrad", op="bla", dtype=BF16, B=2, T=45, H=2, D=64, b=16, causal=True,
         mask="block", layout="contig", grad="expand"),
    dict(id="bla-f32-D80-b40-tilesplit-randmask", op="bla", dtype=F32, B=1, T=50, H=1, D=80, b=40, causal=False,
         mask="random", layout="transposed", grad="random"),
    dict(id="bla-f16-D128-b70-tilesplit-causal", op="bla", dtype=F16, B=1, T=72, H=1, D=128, b=70, causal=True,
         mask=None, layout="contig", grad="random"),
    dict(id="bla-f32-D128-b9-allpadded", op="bla", dtype=F32, B=2, T=20, H=1, D=128, b=9, causal=False, mask="all",
         layout="contig", grad="random"),
    dict(id="bla-bf16-D32-b1-causal-stride0-k", op="bla", dtype=BF16, B=1, T=7, H=3, D=32, b=1, causal=True, mask=None,
         layout="expand_k", grad="random"),
    dict(id="bla-f32-D24-b100-bigger-than-T", op="bla", dtype=F32, B=1, T=19, H=2, D=24, b=100, causal=False,
         mask="random", layout="contig", grad="expand"),
    # ---------------------------------------------------------------- window2_attention (any D)
    dict(id="w2a-f32-D1-causal", op="w2a", dtype=F32, B=2, T=5, H=3, D=1, causal=True, layout="contig",
         grad="random"),
    dict(id="w2a-f16-D13-noncontig", op="w2a", dtype=F16, B=1, T=9, H=2, D=13, causal=False, layout="fused",
         grad="random"),
    dict(id="w2a-bf16-D64-sumgrad", op="w2a", dtype=BF16, B=2, T=3, H=2, D=64, causal=True, layout="contig",
         grad="expand"),
    dict(id="w2a-f32-D80-transposed", op="w2a", dtype=F32, B=1, T=6, H=3, D=80, causal=False, layout="transposed",
         grad="random"),
    dict(id="w2a-f16-D128-causal", op="w2a", dtype=F16, B=1, T=5, H=2, D=128, causal=True, layout="contig",
         grad="random"),
    dict(id="w2a-f32-D300-large", op="w2a", dtype=F32, B=1, T=3, H=1, D=300, causal=False, layout="contig",
         grad="expand"),
    # ---------------------------------------------------------------- attention_pool (D <= 256 fp32 / 512 16-bit)
    dict(id="apool-f32-D1-b5-randmask", op="apool", dtype=F32, sdtype=F32, B=2, T=23, H=3, D=1, b=5, mask="random",
         shared=False, layout="contig", grad="random"),
    dict(id="apool-f16-D13-b8-blockmask-shared", op="apool", dtype=F16, sdtype=F32, B=2, T=21, H=4, D=13, b=8,
         mask="block", shared=True, layout="contig", grad="random"),
    dict(id="apool-bf16-D64-b16-noncontig-sumgrad", op="apool", dtype=BF16, sdtype=BF16, B=1, T=37, H=2, D=64, b=16,
         mask=None, shared=False, layout="fused", grad="expand"),
    dict(id="apool-f32-D80-b40-allpadded", op="apool", dtype=F32, sdtype=F16, B=2, T=50, H=2, D=80, b=40, mask="all",
         shared=False, layout="contig", grad="random"),
    dict(id="apool-f16-D128-b33-shared-stride0", op="apool", dtype=F16, sdtype=F16, B=1, T=40, H=3, D=128, b=33,
         mask="random", shared=True, layout="expand_t", grad="random"),
    dict(id="apool-f32-D256-largest", op="apool", dtype=F32, sdtype=F32, B=1, T=9, H=2, D=256, b=4, mask=None,
         shared=False, layout="contig", grad="random"),
    dict(id="apool-bf16-D512-largest-shared", op="apool", dtype=BF16, sdtype=F32, B=1, T=6, H=2, D=512, b=4,
         mask="random", shared=True, layout="contig", grad="random"),
    # H > 512 shared heads: the backward opts in to > 48 KiB of dynamic shared memory (96 H bytes). Backward only
    # (the forward kernel has no H limit and 1024 warps of it cost ~30 s here): `out` comes from the reference.
    dict(id="apool-f32-H1024-shared-bwd", op="apool", dtype=F32, sdtype=F32, B=1, T=3, H=1024, D=4, b=3, mask="random",
         shared=True, layout="contig", grad="random", fwd="reference"),
    # ---------------------------------------------------------------- ema_depth_scan
    dict(id="ema-f32-C13-perchannel-init-all", op="ema", dtype=F32, L=3, S=(3, 13), per_channel=True, init="full",
         return_all=True, layout="contig", grad="random"),
    dict(id="ema-f16-C64-scalar-last", op="ema", dtype=F16, L=4, S=(2, 3, 64), per_channel=False, init=None,
         return_all=False, layout="contig", grad="random"),
    dict(id="ema-bf16-C40-perchannel-bcastinit-sumgrad", op="ema", dtype=BF16, L=2, S=(9, 40), per_channel=True,
         init="bcast", return_all=True, layout="contig", grad="expand"),
    dict(id="ema-f32-C1-transposed", op="ema", dtype=F32, L=6, S=(7, 1), per_channel=False, init="full",
         return_all=True, layout="transposed", grad="random"),
    dict(id="ema-f32-C80-R20-last-sumgrad", op="ema", dtype=F32, L=3, S=(20, 80), per_channel=False, init=None,
         return_all=False, layout="contig", grad="expand"),
    dict(id="ema-f16-C1000-noncontig", op="ema", dtype=F16, L=2, S=(3, 1000), per_channel=False, init="bcast",
         return_all=True, layout="sliced", grad="random"),
]

# ThreadSanitizer is slower: a subset covering every kernel and each configuration family (bla's three
# G x DPT configs incl. tiles splitting a block, shared and per-head attention_pool values, both dalpha
# layouts, 1024 shared heads).
TSAN_IDS = [
    "bla-f32-D1-b5-causal-randmask-noncontig",
    "bla-bf16-D64-b16-blockmask-sumgrad",
    "bla-f32-D80-b40-tilesplit-randmask",
    "bla-f16-D128-b70-tilesplit-causal",
    "w2a-f16-D13-noncontig",
    "w2a-f32-D80-transposed",
    "apool-f16-D13-b8-blockmask-shared",
    "apool-bf16-D64-b16-noncontig-sumgrad",
    "apool-f32-D80-b40-allpadded",
    "apool-f32-H1024-shared-bwd",
    "ema-f32-C13-perchannel-init-all",
    "ema-bf16-C40-perchannel-bcastinit-sumgrad",
    "ema-f32-C80-R20-last-sumgrad",
]

# Device handling: a launch on device 1 while device 0 is current leaves device 0 current.
CASES.append(dict(id="device-restored-after-launch", op="device"))

BY_ID = {c["id"]: c for c in CASES}
assert len(BY_ID) == len(CASES) and all(i in BY_ID for i in TSAN_IDS)
