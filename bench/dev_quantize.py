"""Row/column NVFP4 quantization: bit-exactness vs the reference and speed (GPU), or the
compiled kernels' registers and instruction counts (no GPU needed).

    python bench/dev_quantize.py            # check + time; JSON to $OUT/quantize.json if set
    python bench/dev_quantize.py --quick    # 8192x4096 checked + one training shape (< 2 min)
    python bench/dev_quantize.py --ncu      # one x and one dy call at 8192x4096 (for ncu)
    python bench/dev_quantize.py --offline [--base REV]   # sm_90 compile stats, no GPU
    python bench/dev_quantize.py --attribution   # instructions per element by copy, no GPU
    python bench/dev_quantize.py --amax --base REV_OR_DIR   # amax passes: working tree vs base
    python bench/dev_quantize.py --rowcol --base REV_OR_DIR   # encode pass: working tree vs base

GPU: checks codes, scales, global scales and BF16 block values against the reference
(``numerics.quantize`` of x and x^T, one child generator each) computed on the GPU (x: RTN
row + RHT RTN column; dy: SR row + RHT SR column; bf16) and counts mismatches. Times the
whole call (amax pass included), the encode pass alone (amax given), the amax pass and the
single-copy variants. Throughput is bytes of input per second over the copy bandwidth: a
``clone`` of a 1 GiB tensor, counted as bytes copied per second.

Offline: compiles every config of the row/column and amax kernels for sm_90 on the CPU and
prints registers, local memory (spills), the static SASS count and thread-instructions per
input element (warp instructions x 32 / elements of a program's tile; a loop body counts
once per iteration), plus the TTGIR layout conversions and shared-memory allocations.
``--base REV`` adds the same table for the kernels as committed at git revision REV.

``--amax --base REV_OR_DIR`` (GPU): the amax pass (``max|x|`` and ``max|RHT(x^T)|``, bf16) of
the working tree and of the base kernels (a git revision, or a folder holding them, such as a
frozen copy's ``hf_nvfp4/kernels`` where the machine has no git) side by side: GPU time from
CUDA-graph replay per shape, and the maxima of both on random tensors of many scales (equal
where both are exact; the reference's on a few); then the same for the grouped (MoE experts)
amax pass at MoE token shapes.

``--rowcol --base REV_OR_DIR`` (GPU): the same for the row/column encode pass (amax given)
in the two training calls (x: BF16 row values and RHT column codes, nearest; dy: both copies
as BF16 values, stochastic), every output compared byte for byte.
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
try:
    import hf_nvfp4  # noqa: F401
except ImportError as exc:  # the kernels need only torch + triton
    print(f"note: `import hf_nvfp4` failed ({exc}); loading its subpackages directly")
    _pkg = types.ModuleType("hf_nvfp4")
    _pkg.__path__ = [str(ROOT / "hf_nvfp4")]
    sys.modules["hf_nvfp4"] = _pkg

from hf_nvfp4.kernels import _tuning  # noqa: E402
from hf_nvfp4.kernels._common import seed_key, sign_mask  # noqa: E402
from hf_nvfp4.kernels._tuning import choices, median_ms  # noqa: E402
from hf_nvfp4.kernels.amax import amax_rowcol  # noqa: E402
from hf_nvfp4.kernels.quantize_rowcol import quantize_rowcol_nvfp4  # noqa: E402
from hf_nvfp4.numerics.quantize import quantize  # noqa: E402
from hf_nvfp4.numerics.rng import draw_seed, split_generator  # noqa: E402
from hf_nvfp4.recipe import Recipe  # noqa: E402

SPECS = Recipe().role_specs()
SIGN = tuple(SPECS.x_t.rht_sign)
CHECK_SHAPES = ((8192, 4096), (16384, 14336))
TRAIN_SHAPES = ((16384, 2048), (16384, 5632), (32768, 768), (32768, 2048))
ROLES = {"x": (SPECS.x, SPECS.x_t, False), "dy": (SPECS.dy, SPECS.dy_t, True)}


def keys_for(seed: int) -> tuple[torch.Tensor, int, int]:
    """Device keys and the two child seeds the reference draws from ``Generator(seed)``."""
    g_row, g_col = split_generator(torch.Generator().manual_seed(seed))
    rs, cs = draw_seed(g_row), draw_seed(g_col)
    return torch.tensor([seed_key(rs), seed_key(cs)], dtype=torch.int32, device="cuda"), rs, cs


def new_call(x, sr, keys, **kw):
    return quantize_rowcol_nvfp4(x, True, True, SIGN, sr, sr, keys, **kw)


def mismatches(x: torch.Tensor, role: str, seed: int = 11) -> dict:
    """Mismatching bytes / values of the kernel vs the reference on the GPU."""
    row, col, sr = ROLES[role]
    keys = keys_for(seed)[0]
    gens = split_generator(torch.Generator().manual_seed(seed))
    want = [quantize(t, "nvfp4", rounding=s.rounding, rht=s.rht, rht_sign=s.rht_sign,
                     generator=g)
            for t, s, g in ((x, row, gens[0]), (x.t().contiguous(), col, gens[1]))]
    got = new_call(x, sr, keys)
    vals = new_call(x, sr, keys, row_values=True, col_values=True)
    out = {}
    for i, (q, name) in enumerate(((want[0], "row"), (want[1], "col"))):
        data, scale = got[2 * i], got[2 * i + 1]
        out[f"{name}_codes"] = int((data != q.data).sum())
        out[f"{name}_scales"] = int((scale != q.scale.view(torch.uint8)).sum())
        out[f"{name}_global"] = int(float(got[4][i]) != float(q.global_scale))
        ref_vals = q.block_values().to(torch.bfloat16).view(torch.int16)
        out[f"{name}_values"] = int((vals[2 * i].view(torch.int16) != ref_vals).sum())
        del ref_vals
    del want, got, vals
    torch.cuda.empty_cache()
    return out


def time_shape(m: int, k: int, copy_gbps: float, check: bool) -> list[dict]:
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    in_bytes = x.numel() * 2
    amax = amax_rowcol(x, True, True, SIGN)
    rows = []

    def frac(ms: float) -> float:
        return in_bytes / ms / 1e6 / copy_gbps

    amax_ms = median_ms(lambda: amax_rowcol(x, True, True, SIGN), reps=20, warmup=3)
    for role, (_row, _col, sr) in ROLES.items():
        keys, rs, cs = keys_for(5)
        new_call(x, sr, keys)  # tuning happens here
        r = {"shape": f"{m}x{k}", "role": role}
        r["new_ms"] = median_ms(lambda sr=sr, keys=keys: new_call(x, sr, keys), reps=20, warmup=3)
        new_call(x, sr, keys, amax=amax)
        r["encode_ms"] = median_ms(lambda sr=sr, keys=keys: new_call(x, sr, keys, amax=amax),
                                   reps=20, warmup=3)
        new_call(x, sr, keys, amax=amax, row_values=True, col_values=True)
        r["values_encode_ms"] = median_ms(
            lambda sr=sr, keys=keys: new_call(x, sr, keys, amax=amax, row_values=True,
                                              col_values=True), reps=20, warmup=3)
        r["amax_ms"] = amax_ms
        for name, rw, cl in (("row_only_ms", True, False), ("col_only_ms", False, True)):
            def one(rw=rw, cl=cl, sr=sr, keys=keys):
                return quantize_rowcol_nvfp4(x, rw, cl, SIGN, sr, sr, keys, amax=amax)
            one()
            r[name] = median_ms(one, reps=20, warmup=3)
        r["new_frac"] = frac(r["new_ms"])
        r["encode_frac"] = frac(r["encode_ms"])
        if check:
            r["mismatches"] = mismatches(x, role)
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def copy_bandwidth() -> float:
    """GB/s of ``clone`` of a 1 GiB tensor, bytes copied per second."""
    src = torch.empty(2**29, dtype=torch.int16, device="cuda").random_()
    return src.numel() * 2 / median_ms(lambda: src.clone(), reps=20, warmup=3) / 1e6


AMAX_SHAPES = CHECK_SHAPES + TRAIN_SHAPES + ((16384, 768), (16384, 3072), (2048, 768))


def print_vs_base(rows: list[dict], label: str, width: int) -> None:
    """The table of an ``*_vs_base`` comparison: per shape base and new ms, ratio, equal."""
    print(f"{label:>{width}} {'base ms':>8} {'new ms':>8} {'new/base':>8} equal")
    for r in rows:
        if r["new_over_base"] is None:
            print(f"{r['shape']:>{width}} not timed: {r['base_ms']} / {r['new_ms']}")
        else:
            print(f"{r['shape']:>{width}} {r['base_ms']:8.4f} {r['new_ms']:8.4f} "
                  f"{r['new_over_base']:8.2f} {r['equal']}")


def amax_vs_base(base: str, tensors: int = 400) -> dict:
    """The amax pass of the working tree against ``base``'s (see the module doc)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from kernel_speed import graph_ms

    from hf_nvfp4.numerics.hadamard import hadamard_transform

    old = load_module("amax", base).amax_rowcol
    rows = []
    for m, k in AMAX_SHAPES:
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        r = {"shape": f"{m}x{k}"}
        for name, fn in (("base_ms", old), ("new_ms", amax_rowcol)):
            _tuning._CHOICES.clear()  # both use the key "amax2": each tunes its own pick
            r[name] = graph_ms(lambda x=x, fn=fn: fn(x, True, True, SIGN))
            r[name.replace("_ms", "_pick")] = dict(choices())
        r["equal"] = torch.equal(old(x, True, True, SIGN), amax_rowcol(x, True, True, SIGN))
        timed = all(isinstance(r[k], float) for k in ("base_ms", "new_ms"))  # else: why not
        r["new_over_base"] = r["new_ms"] / r["base_ms"] if timed else None
        rows.append(r)
        print(json.dumps(r), flush=True)
        del x
    g = torch.Generator(device="cuda").manual_seed(3)
    differ = wrong = 0
    for i in range(tensors):
        x = (torch.randn(512, 384, device="cuda", generator=g)
             * 2.0 ** float(torch.randint(-30, 30, (1,), device="cuda", generator=g))
             ).to(torch.bfloat16)
        new = amax_rowcol(x, True, True, SIGN)
        differ += int(not torch.equal(new, old(x, True, True, SIGN)))
        if i % 40 == 0:
            want = hadamard_transform(x.t().contiguous().reshape(-1, 16), SIGN).abs().max()
            wrong += int(float(new[1]) != float(want))
    out = {"rows": rows, "random_tensors": tensors, "differ_from_base": differ,
           "differ_from_reference": wrong, "reference_checked": len(range(0, tensors, 40))}
    print_vs_base(rows, "shape", 12)
    print(f"{tensors} random tensors: {differ} differ from the base; "
          f"{wrong} of {out['reference_checked']} from the reference")
    return out


TRAIN_CALLS = {  # role: the training call's flags (sr, row_values, col_values)
    "x": (False, True, False),  # the forward: BF16 row values, packed RHT column codes
    "dy": (True, True, True),  # the backward: both copies as BF16 values, stochastic
}


def rowcol_vs_base(base: str) -> dict:
    """The row/column encode pass (amax given) of the working tree against ``base``'s in the
    training calls: GPU time per shape and role, and whether every output is equal."""
    sys.path.insert(0, str(ROOT / "bench"))
    from kernel_speed import graph_ms

    old = load_module("quantize_rowcol", base).quantize_rowcol_nvfp4
    rows = []
    for m, k in CHECK_SHAPES + TRAIN_SHAPES:
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        amax = amax_rowcol(x, True, True, SIGN)
        keys = keys_for(5)[0]
        for role, (sr, rv, cv) in TRAIN_CALLS.items():
            r = {"shape": f"{m}x{k} {role}"}
            outs = {}
            for name, fn in (("base_ms", old), ("new_ms", quantize_rowcol_nvfp4)):
                _tuning._CHOICES.clear()  # one key for both: each tunes its own pick
                call = functools.partial(fn, x, True, True, SIGN, sr, sr, keys, amax=amax,
                                         row_values=rv, col_values=cv)
                r[name] = graph_ms(call)
                r[name.replace("_ms", "_pick")] = dict(choices())
                outs[name] = call()
            r["equal"] = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in
                             zip(outs["base_ms"], outs["new_ms"], strict=True))
            timed = all(isinstance(r[k], float) for k in ("base_ms", "new_ms"))
            r["new_over_base"] = r["new_ms"] / r["base_ms"] if timed else None
            rows.append(r)
            print(json.dumps(r), flush=True)
        del x
    print_vs_base(rows, "shape, role", 18)
    return {"rows": rows}


# MoE experts' token matrices (bench/moe.py's module: 8192 tokens top-8 over 64 experts,
# hidden 2048 and expert FFN 768; a 1B-class MoE's 128 experts, hidden 4096)
GROUPED_AMAX_SHAPES = ((64, 65536, 2048), (64, 65536, 768), (128, 131072, 4096))


def grouped_amax_vs_base(base: str, tensors: int = 100) -> dict:
    """The grouped (per-expert) amax pass of the working tree against ``base``'s: GPU time
    per shape (random uneven expert counts) and equality of both on random tensors."""
    sys.path.insert(0, str(ROOT / "bench"))
    from kernel_speed import graph_ms

    from hf_nvfp4.kernels import grouped as new_mod

    old_mod = load_module("grouped", base)

    def counts_for(experts: int, rows: int, g: torch.Generator) -> list[int]:
        w = torch.rand(experts, generator=g) + 0.2
        c = (w / w.sum() * rows).long()
        c[0] += rows - int(c.sum())
        return c.tolist()

    g = torch.Generator().manual_seed(5)
    rows = []
    for experts, m, k in GROUPED_AMAX_SHAPES:
        counts = counts_for(experts, m, g)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        r = {"shape": f"{experts} experts, {m}x{k}"}
        for name, mod in (("base_ms", old_mod), ("new_ms", new_mod)):
            layout = mod.GroupLayout.build(counts, x.device)
            r[name] = graph_ms(lambda x=x, mod=mod, layout=layout: mod.grouped_amax(
                x, layout, True, True, SIGN))
        r["equal"] = torch.equal(
            old_mod.grouped_amax(x, old_mod.GroupLayout.build(counts, x.device), True, True,
                                 SIGN),
            new_mod.grouped_amax(x, new_mod.GroupLayout.build(counts, x.device), True, True,
                                 SIGN))
        timed = all(isinstance(r[k], float) for k in ("base_ms", "new_ms"))
        r["new_over_base"] = r["new_ms"] / r["base_ms"] if timed else None
        rows.append(r)
        print(json.dumps(r), flush=True)
        del x
    from hf_nvfp4.numerics.testing import rht_amax_tie_blocks

    gd = torch.Generator(device="cuda").manual_seed(4)
    ties = rht_amax_tie_blocks(tensors, seed=8).to("cuda")
    differ = 0
    for i in range(tensors):
        counts = counts_for(8, 512, g)
        counts[1] += counts[3]  # an expert without rows
        counts[3] = 0
        x = (torch.randn(512, 256, device="cuda", generator=gd)
             * 2.0 ** float(torch.randint(-30, 30, (1,), device="cuda", generator=gd))
             ).to(torch.bfloat16)
        if i % 2:  # a midpoint tie (the fix-up's exact path) in the first expert's rows
            top = math.ceil(math.log2(float(x.float().abs().max()))) + 3  # above every output
            x[:16, 37] = ties[i] * 2.0 ** top
        a = new_mod.grouped_amax(x, new_mod.GroupLayout.build(counts, x.device), True, True,
                                 SIGN)
        b = old_mod.grouped_amax(x, old_mod.GroupLayout.build(counts, x.device), True, True,
                                 SIGN)
        differ += int(not torch.equal(a, b))
    print_vs_base(rows, "grouped shape", 28)
    print(f"{tensors} random grouped tensors (8 experts, one without rows, ties in half): "
          f"{differ} differ from the base")
    return {"rows": rows, "random_tensors": tensors, "differ_from_base": differ}


# ----------------------------------------------------------------------------- offline
D16 = [["tt.divisibility", 16]]  # what the launcher infers for 16-aligned pointers/ints
OFFLINE_ROLES = {  # role: (row SR, col SR, row values, column values)
    "x": (False, False, False, False), "x_values": (False, False, True, True),
    "x_train": (False, False, True, False),  # the forward's call: BF16 row values
    "dy": (True, True, False, False), "dy_values": (True, True, True, True),
}


def load_module(name: str, rev: str | None) -> types.ModuleType:
    """``hf_nvfp4.kernels.<name>`` as in the working tree, or as committed at git ``rev`` or
    held in the folder ``rev`` (with ``_common`` from the same place)."""
    if rev is None:
        return importlib.import_module(f"hf_nvfp4.kernels.{name}")
    full = f"hf_nvfp4.kernels._base_{name}"
    if full in sys.modules:
        return sys.modules[full]
    if Path(rev).is_dir():
        src = (Path(rev) / f"{name}.py").read_text()
    else:
        src = subprocess.run(["git", "-C", str(ROOT), "show",
                              f"{rev}:hf_nvfp4/kernels/{name}.py"],
                             capture_output=True, text=True, check=True).stdout
    if name != "_common":
        load_module("_common", rev)
        src = src.replace("from ._common import", "from ._base__common import")
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(full, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[full] = mod
    spec.loader.exec_module(mod)
    return mod


def compile_sm90(fn, types_: dict, consts: dict, warps: int, stages: int = 3):
    """``triton.compile`` of ``fn`` for sm_90 with ``types_`` for its runtime arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    consts = {k: v for k, v in consts.items() if k in names}
    sig = {n: types_[n] if n in types_ else "constexpr" for n in names}
    attrs = {(names.index(n),): D16 for n in names if n in types_ and n != "M"}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})


def sass_stats(kernel) -> dict:
    """REG, LOCAL bytes, SASS instruction count (NOPs excluded), the loop body's count and
    opcode histogram of a compiled kernel, from cuobjdump; TTGIR layout conversions."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        res = subprocess.run([tools / "cuobjdump", "-res-usage", cubin], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([tools / "cuobjdump", "-sass", cubin], capture_output=True,
                              text=True, check=True).stdout
    lines = [ln for ln in sass.splitlines()
             if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+\S", ln) and " NOP" not in ln]
    addr = [int(re.search(r"/\*([0-9a-f]{4,})\*/", ln).group(1), 16) for ln in lines]
    body = 0
    for i, ln in enumerate(lines):  # the longest backward branch = the main loop
        m = re.search(r"BRA\s+0x([0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < addr[i]:
            body = max(body, sum(1 for a in addr if int(m.group(1), 16) <= a <= addr[i]))
    ops = collections.Counter(
        re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", ln).group(1) for ln in lines)
    ttgir = kernel.asm["ttgir"]
    return {"reg": int(re.search(r"REG:(\d+)", res).group(1)),
            "local": int(re.search(r"LOCAL:(\d+)", res).group(1)),
            "sass": len(lines), "loop_body": body, "ops": dict(ops.most_common(8)),
            "convert_layout": ttgir.count("ttg.convert_layout"),
            "local_alloc": ttgir.count("ttg.local_alloc")}


def rowcol_types(qr: types.ModuleType, row_values: bool, col_values: bool) -> dict:
    """The pointer and integer argument types the launcher of ``qr`` (a quantize_rowcol
    module, possibly of an older revision) passes to its row/column kernel."""
    row_packed = "*u8" if "TLOAD" in qr._rowcol_kernel.arg_names else "*i32"
    # the column copy written as int32 words (join8 moved to _common later)
    col_words = hasattr(qr, "_join8") or hasattr(qr, "join8")
    col_type = "*i32" if col_words else "*bf16" if col_values else "*u8"
    return {"x_ptr": "*bf16", "amax_ptr": "*fp32", "keys_ptr": "*i32", "bd_ptr": "*bf16",
            "gs_ptr": "*fp32", "row_data_ptr": "*bf16" if row_values else row_packed,
            "row_scale_ptr": "*u8", "col_data_ptr": col_type, "col_scale_ptr": "*u8",
            "flags_ptr": "*i32", "M": "i32", "K": "i32", "stride_m": "i32", "M16": "i32"}


def offline_rowcol(rev: str | None) -> list[dict]:
    """Stats of every row/column kernel config for each role (bf16 x, RHT column)."""
    qr = load_module("quantize_rowcol", rev)
    rows = []
    for role, (row_sr, col_sr, row_values, col_values) in OFFLINE_ROLES.items():
        for cfg in qr._CONFIGS:
            bm, bk, warps = cfg[:3]
            types_ = rowcol_types(qr, row_values, col_values)
            consts = dict(DO_ROW=True, DO_COL=True, COL_RHT=True, RHT_SIGN=sign_mask(SIGN),
                          INTERPRET=False, FIX=0,
                          ROW_SR=row_sr, COL_SR=col_sr, ROW_VALUES=row_values,
                          COL_VALUES=col_values,
                          BM=bm, BK=bk, TLOAD=cfg[3] if len(cfg) > 3 else False)
            st = sass_stats(compile_sm90(qr._rowcol_kernel, types_, consts, warps))
            st.update(kernel="rowcol", role=role, config=str(cfg),
                      instr_per_elem=round(st["sass"] * warps * 32 / (bm * bk), 1))
            rows.append(st)
            print(json.dumps(st), flush=True)
    return rows


# One copy at a time, then the two calls of training: what each part of the row/column
# kernel costs (bf16 input, config BM=64, BK=128, 4 warps; RHT on unless said otherwise).
ATTRIBUTION = (
    ("row copy alone, packed, nearest", dict(DO_COL=False)),
    ("row copy alone, BF16 values, nearest", dict(DO_COL=False, ROW_VALUES=True)),
    ("row copy alone, BF16 values, stochastic", dict(DO_COL=False, ROW_VALUES=True, ROW_SR=True)),
    ("column copy alone, packed, nearest, no RHT", dict(DO_ROW=False, COL_RHT=False)),
    ("column copy alone, packed, nearest, RHT", dict(DO_ROW=False)),
    ("column copy alone, BF16 values, stochastic, RHT", dict(DO_ROW=False, COL_VALUES=True,
                                                             COL_SR=True)),
    ("x in training (row values + RHT column packed)", dict(ROW_VALUES=True)),
    ("dy in training (both copies values, stochastic, RHT)",
     dict(ROW_VALUES=True, COL_VALUES=True, ROW_SR=True, COL_SR=True)),
)


def offline_attribution() -> list[dict]:
    """Instructions per element of the working tree's row/column kernel per ATTRIBUTION
    variant, with the argument types its launcher passes."""
    qr = load_module("quantize_rowcol", None)
    bm, bk, warps = 64, 128, 4
    rows = []
    for label, flags in ATTRIBUTION:
        consts = dict(DO_ROW=True, DO_COL=True, COL_RHT=True, RHT_SIGN=sign_mask(SIGN),
                      INTERPRET=False, FIX=0, ROW_SR=False, COL_SR=False, ROW_VALUES=False,
                      COL_VALUES=False, BM=bm, BK=bk) | flags
        types_ = rowcol_types(qr, consts["ROW_VALUES"], consts["COL_VALUES"])
        st = sass_stats(compile_sm90(qr._rowcol_kernel, types_, consts, warps))
        st.update(variant=label, instr_per_elem=round(st["sass"] * warps * 32 / (bm * bk), 1))
        rows.append(st)
        print(f"{label:55s} REG {st['reg']:>3} LOCAL {st['local']:>3} "
              f"instructions/element {st['instr_per_elem']:>5}", flush=True)
    return rows


def offline_amax(rev: str | None) -> list[dict]:
    """Stats of every amax kernel config (row amax + RHT column amax, bf16)."""
    am = load_module("amax", rev)
    rows = []
    for cfg in am._CONFIGS:
        bk, tiles, warps, stages = cfg
        types_ = {"x_ptr": "*bf16", "out_ptr": "*fp32", "bd_ptr": "*bf16", "M": "i32",
                  "K": "i32", "stride_m": "i32"}
        consts = dict(DO_ROW=True, DO_COL=True, COL_RHT=True, RHT_SIGN=sign_mask(SIGN),
                      INTERPRET=False, BM=am._BM, BK=bk, TILES=tiles)
        st = sass_stats(compile_sm90(am._amax_kernel, types_, consts, warps, stages))
        executed = st["sass"] + st["loop_body"] * (tiles - 1)
        st.update(kernel="amax", role="row+rht col", config=str(cfg),
                  instr_per_elem=round(executed * warps * 32 / (am._BM * bk * tiles), 1))
        rows.append(st)
        print(json.dumps(st), flush=True)
    return rows


def offline(base: str | None) -> None:
    """Print the offline table of the working tree (and of ``base``, when given)."""
    tables = {"working tree": None} | ({f"git {base}": base} if base else {})
    out = {}
    for label, rev in tables.items():
        out[label] = offline_rowcol(rev) + offline_amax(rev)
    for label, rows in out.items():
        print(f"\n{label}\n{'kernel':>6} {'role':>9} {'config':>22} {'REG':>4} {'LOCAL':>5} "
              f"{'SASS':>5} {'loop':>5} {'instr/el':>8} {'cvt':>3} {'smem':>4}")
        for r in rows:
            print(f"{r['kernel']:>6} {r['role']:>9} {r['config']:>22} {r['reg']:>4} "
                  f"{r['local']:>5} {r['sass']:>5} {r['loop_body']:>5} "
                  f"{r['instr_per_elem']:>8} {r['convert_layout']:>3} {r['local_alloc']:>4}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "quantize_offline.json").write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ncu", action="store_true", help="x, dy and row-only calls at 8192x4096")
    ap.add_argument("--quick", action="store_true",
                    help="8192x4096 checked and one training shape timed")
    ap.add_argument("--offline", action="store_true",
                    help="sm_90 registers / instruction counts of every config, no GPU")
    ap.add_argument("--base", default=None,
                    help="with --offline: also the kernels at this rev; with --amax: the base "
                         "kernels (a rev or a folder)")
    ap.add_argument("--amax", action="store_true",
                    help="the amax pass against --base's on the GPU (time and maxima)")
    ap.add_argument("--rowcol", action="store_true",
                    help="the row/column encode of the training calls against --base's on "
                         "the GPU (time and equality)")
    ap.add_argument("--attribution", action="store_true",
                    help="instructions per element of each copy alone and of the training "
                         "calls (sm_90, no GPU)")
    args = ap.parse_args()
    if args.offline or args.attribution:
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launcher's default
    if args.attribution:
        rows = offline_attribution()
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "quantize_attribution.json").write_text(
                json.dumps(rows, indent=1))
        return
    if args.offline:
        offline(args.base)
        return
    if args.amax:
        if not args.base:
            raise SystemExit("--amax needs --base (a git revision or a kernels folder)")
        result = amax_vs_base(args.base)
        for part in ("dense", "grouped"):  # written after each part: a failure keeps the first
            if part == "grouped":
                result["grouped"] = grouped_amax_vs_base(args.base)
            if os.environ.get("OUT"):
                Path(os.environ["OUT"], "amax_vs_base.json").write_text(
                    json.dumps(result, indent=1))
        return
    if args.rowcol:
        if not args.base:
            raise SystemExit("--rowcol needs --base (a git revision or a kernels folder)")
        result = rowcol_vs_base(args.base)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "rowcol_vs_base.json").write_text(json.dumps(result, indent=1))
        return
    if args.ncu:
        torch.use_deterministic_algorithms(True)  # the first config, no tuning launches
        x = torch.randn(8192, 4096, device="cuda").to(torch.bfloat16)
        keys = keys_for(5)[0]
        for sr in (False, True):
            new_call(x, sr, keys)
        quantize_rowcol_nvfp4(x, True, False, None, False, False, None)
        torch.cuda.synchronize()
        return
    copy_gbps = copy_bandwidth()
    print(f"copy: {copy_gbps:.0f} GB/s (bytes copied per second)", flush=True)
    rows = []
    checked = CHECK_SHAPES[:1] if args.quick else CHECK_SHAPES
    for m, k in checked:
        rows += time_shape(m, k, copy_gbps, check=True)
    for m, k in TRAIN_SHAPES[:1] if args.quick else TRAIN_SHAPES:
        rows += time_shape(m, k, copy_gbps, check=False)
    picks = {key: v["choice"] for key, v in choices().items()}
    print(json.dumps(picks, indent=0))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "quantize.json").write_text(json.dumps(
            {"copy_GBps": copy_gbps, "rows": rows, "choices": choices()}, indent=1))
    print(f"\n{'shape':>12} {'role':>3} {'new ms':>7} {'new':>5} "
          f"{'enc ms':>7} {'enc':>5} {'amax':>6} {'row':>6} {'col':>6} {'vals':>6}  mismatches")
    for r in rows:
        bad = sum(r["mismatches"].values()) if "mismatches" in r else "-"
        print(f"{r['shape']:>12} {r['role']:>3} {r['new_ms']:7.3f} {r['new_frac']:5.2f} "
              f"{r['encode_ms']:7.3f} {r['encode_frac']:5.2f} {r['amax_ms']:6.3f} "
              f"{r['row_only_ms']:6.3f} {r['col_only_ms']:6.3f} {r['values_encode_ms']:6.3f}"
              f"  {bad}")


if __name__ == "__main__":
    main()
