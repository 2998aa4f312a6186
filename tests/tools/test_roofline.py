"""Bytes per kernel from compiled HLO, counted by hand on small programs, and their model stages."""

import pytest

from mae_jax.tools import hlo, roofline

# A loop of 3 iterations whose body runs one fusion; a reducer and a fusion body that must not be
# counted as kernels of their own. Operands are named without shapes, as compiled HLO prints them.
PROGRAM = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_computation (p: f32[8,128]) -> f32[8,128] {
  %p = f32[8,128]{1,0} parameter(0)
  ROOT %m = f32[8,128]{1,0} multiply(%p, %p)
}

%body (t: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %t = (s32[], f32[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[8,128]{1,0} get-tuple-element(%t), index=1
  %y = f32[8,128]{1,0} fusion(%x), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(step)/transpose(jvp(MAE))/encoder/block0/attn/mul"}
  ROOT %r = (s32[], f32[8,128]{1,0}) tuple(%i, %y)
}

%cond (t: (s32[], f32[8,128])) -> pred[] {
  %t = (s32[], f32[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8,128], w: bf16[4,100]) -> f32[] {
  %x = f32[8,128]{1,0} parameter(0)
  %w = bf16[4,100]{1,0:T(8,128)(2,1)} parameter(1)
  %c = bf16[4,100]{1,0:T(8,128)(2,1)} copy(%w)
  %z = s32[] constant(0)
  %init = (s32[], f32[8,128]{1,0}) tuple(%z, %x)
  %loop = (s32[], f32[8,128]{1,0}) while(%init), condition=%cond, body=%body
  %out = f32[8,128]{1,0} get-tuple-element(%loop), index=1
  ROOT %sum = f32[] reduce(%out, %z), dimensions={0,1}, to_apply=%add, metadata={op_name="jit(step)/jvp(MAE)/sub"}
}
"""


def test_kernels_count_operands_and_results_once_per_execution():
  ks = {k["name"]: k for k in hlo.kernels(PROGRAM)}
  # The fusion reads and writes 8 x 128 float32 (4,096 B each way), 3 times: 24,576 B.
  assert ks["y"]["bytes"] == 3 * 2 * 8 * 128 * 4
  # The copy of a tiled bfloat16 [4, 100]: 100 pads to 128 and 4 to 8, read and written.
  assert ks["c"]["bytes"] == 2 * 8 * 128 * 2
  # The reduce reads the array and the scalar init and writes a scalar: 4,096 + 4 + 4 (the
  # loop condition's compare counts too: 4 + 4 + 1 bytes, 4 times).
  assert ks["sum"]["bytes"] == 4096 + 8
  assert ks["lt"]["bytes"] == 4 * (4 + 4 + 1)  # the condition runs 3 + 1 times
  # Not kernels: the fusion body and the reducer (their work is their callers'), bookkeeping.
  assert not {"m", "s", "init", "loop", "out", "x", "i", "n", "r"} & set(ks)
  assert hlo.shape_bytes("bf16[16,64,48]{1,2,0:T(8,128)(2,1)}") == 16 * 48 * 128 * 2  # dims 1, 2 padded
  assert hlo.shape_bytes("pred[7]") == 7 and hlo.shape_bytes("f32[3,5]{1,0}") == 60


# A `call` (its body runs as kernels of the caller's), a conditional (each branch counted once:
# an upper bound) and an asynchronous slice (its wrapped computation is not a kernel of its own:
# the pair counts at its -done).
CALLS = """HloModule c

%called (p: f32[256]) -> f32[256] {
  %p = f32[256]{0} parameter(0)
  ROOT %neg = f32[256]{0} negate(%p)
}

%yes (p: f32[256]) -> f32[256] {
  %p = f32[256]{0} parameter(0)
  ROOT %ex = f32[256]{0} exponential(%p)
}

%no (p: f32[256]) -> f32[256] {
  %p = f32[256]{0} parameter(0)
  ROOT %ab = f32[256]{0} abs(%p)
}

%wrapped (p: f32[256]) -> f32[128] {
  %p = f32[256]{0} parameter(0)
  ROOT %sl = f32[128]{0} slice(%p), slice={[0:128]}
}

ENTRY %main (x: f32[256], b: pred[]) -> f32[128] {
  %x = f32[256]{0} parameter(0)
  %b = pred[] parameter(1)
  %k = f32[256]{0} call(%x), to_apply=%called
  %br = f32[256]{0} conditional(%b, %k, %k), true_computation=%yes, false_computation=%no
  %st = ((f32[256]{0}), f32[128]{0}) async-start(%br), calls=%wrapped
  ROOT %dn = f32[128]{0} async-done(%st)
}
"""


def test_called_and_branch_computations_are_kernels_async_wrappers_are_not():
  ks = {k["name"]: k["bytes"] for k in hlo.kernels(CALLS)}
  assert ks == {"neg": 2 * 1024, "ex": 2 * 1024, "ab": 2 * 1024, "dn": 2 * 512}
  graph = hlo.call_graph(CALLS)
  assert graph["inner"] == {"wrapped"}
  assert hlo.runs(graph, kernels_only=False) == {"main": 1, "called": 1, "yes": 1, "no": 1, "wrapped": 1}
  # per_run sees every computation, wrapped ones too: one slice, one negate.
  assert hlo.per_run(CALLS, lambda line: int(" slice(" in line or " negate(" in line)) == 2


# XLA:TPU's memory spaces: an array sliced from HBM into VMEM (S(1)), joined there, and used by
# a fusion whose other operand and result are in HBM.
VMEM = """HloModule v

%fused (a: f32[8,128], b: f32[8,128]) -> f32[8,128] {
  %a = f32[8,128]{1,0:T(8,128)} parameter(0)
  %b = f32[8,128]{1,0:T(8,128)S(1)} parameter(1)
  ROOT %m = f32[8,128]{1,0:T(8,128)} multiply(%a, %b)
}

ENTRY %main (x: f32[8,128], w: f32[8,128]) -> f32[8,128] {
  %x = f32[8,128]{1,0:T(8,128)} parameter(0)
  %w = f32[8,128]{1,0:T(8,128)} parameter(1)
  %st = ((f32[8,128]{1,0:T(8,128)}), f32[8,128]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%w), slice={[0:8], [0:128]}
  %sd = f32[8,128]{1,0:T(8,128)S(1)} slice-done(%st)
  %j = f32[8,128]{1,0:T(8,128)S(1)} custom-call(%sd), custom_call_target="ConcatBitcast"
  ROOT %f = f32[8,128]{1,0:T(8,128)} fusion(%x, %j), kind=kLoop, calls=%fused
}
"""


def test_hbm_traffic_leaves_out_arrays_in_vmem():
  tile = 8 * 128 * 4
  ks = {k["name"]: k for k in hlo.kernels(VMEM)}
  # XLA's way: every operand and result as if from HBM.
  assert {n: k["bytes"] for n, k in ks.items()} == {"sd": 2 * tile, "j": 2 * tile, "f": 3 * tile}
  # In HBM: the slice reads the weight once (its copy lands in VMEM), the join stays in VMEM, the
  # fusion reads x and writes its result.
  assert {n: k["hbm_bytes"] for n, k in ks.items()} == {"sd": tile, "j": 0, "f": 2 * tile}
  assert hlo.shape_bytes("f32[8,128]{1,0:T(8,128)S(1)}", hbm_only=True) == 0
  b = roofline.breakdown(VMEM)
  assert (b["kernel_bytes"], b["hbm_bytes"]) == (7 * tile, 3 * tile)
  assert {s["stage"]: s["hbm_bytes"] for s in b["stages"]} == {
      "slices into VMEM (slice-start/done)": tile, "slices joined in VMEM (custom calls)": 0,
      "no metadata (fusion)": 2 * tile}


# Scanned layers stack their residuals: a fusion updates one layer's row of a [4, 8, 128] buffer in
# place (dynamic-update-slice), another reads one row back (dynamic-slice).
STACKED = """HloModule s

%update_body (buf: f32[4,8,128], row: f32[1,8,128], i: s32[]) -> f32[4,8,128] {
  %buf = f32[4,8,128]{2,1,0} parameter(0)
  %row = f32[1,8,128]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = f32[4,8,128]{2,1,0} dynamic-update-slice(%buf, %row, %i, %z, %z)
}

%slice_body (buf: f32[4,8,128], i: s32[]) -> f32[1,8,128] {
  %buf = f32[4,8,128]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[1,8,128]{2,1,0} dynamic-slice(%buf, %i, %z, %z), dynamic_slice_sizes={1,8,128}
}

ENTRY %main (buf: f32[4,8,128], row: f32[1,8,128], i: s32[]) -> (f32[4,8,128], f32[1,8,128]) {
  %buf = f32[4,8,128]{2,1,0} parameter(0)
  %row = f32[1,8,128]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  %u = f32[4,8,128]{2,1,0} fusion(%buf, %row, %i), kind=kLoop, calls=%update_body
  %r = f32[1,8,128]{2,1,0} fusion(%u, %i), kind=kLoop, calls=%slice_body
  ROOT %t = (f32[4,8,128]{2,1,0}, f32[1,8,128]{2,1,0}) tuple(%u, %r)
}
"""


def test_dynamic_slices_move_the_slice_not_the_buffer():
  row = 8 * 128 * 4
  ks = {k["name"]: k["bytes"] for k in hlo.kernels(STACKED)}
  # The update reads the row (and the index) and writes it into the buffer in place.
  assert ks["u"] == 2 * (row + 4)
  # The slice reads one row of the buffer (and the index) and writes it.
  assert ks["r"] == row + 4 + row


@pytest.mark.parametrize("op_name, want", [
    ("jit(traced)/jvp(MAE)/encoder/block3/attn/qkv/dot_general", "encoder attention (forward)"),
    ("jit(traced)/transpose(jvp(MAE))/decoder/block0/fc2/dot_general", "decoder MLP (backward)"),
    ("jit(traced)/jvp(MAE)/encoder/block1/erf", "encoder GELU (forward)"),
    ("jit(traced)/transpose(jvp(MAE))/encoder/block1/mul", "encoder GELU (backward)"),
    ("jit(traced)/jvp(MAE)/encoder/block1/add", "encoder residual adds (forward)"),
    ("jit(traced)/jvp(MAE)/encoder/block0/norm2/rsqrt", "encoder LayerNorm (forward)"),
    ("jit(traced)/jvp(MAE)/encoder/encoder.position_and_mask/jit(take_along_axis)/gather",
     "encoder masking shuffle/gather (forward)"),
    ("jit(traced)/jvp(MAE)/encoder/patch_embed/convert_element_type", "encoder patch embedding (forward)"),
    ("jit(traced)/transpose(jvp(MAE))/decoder/pad", "decoder token concat/split (cls, mask tokens) (backward)"),
    ("jit(traced)/jvp(MAE)/sub", "loss (forward)"),
    ("jit(traced)/mul", "optimizer update and gradient norm"),
    ("jit(traced)/jit(_uniform)/while/body/closed_call/add", "masking noise (PRNG)"),
])
def test_stages_from_the_source_path(op_name, want):
  assert roofline.stage(op_name) == want


def test_summary_fields_follow_from_the_counts():
  class Compiled:
    def cost_analysis(self):
      return {"flops": 8e12, "bytes accessed": 1e11}
  r = roofline.summary(Compiled(), PROGRAM, peak_flops=2e14, bandwidth=8e11)
  assert r["arithmetic_intensity"] == 80 and r["ridge_flops_per_byte"] == 250
  assert r["compute_s"] == 0.04 and r["memory_s"] == 0.125 and r["roofline_step_s"] == 0.125
  assert r["kernel_bytes"] == sum(k["bytes"] for k in hlo.kernels(PROGRAM))
  assert r["stages"][0]["stage"] == "encoder attention (backward)"  # the loop's fusion, 3 times
  assert "memory-bound" in "\n".join(roofline.report_lines(r))
  # No array of PROGRAM is in VMEM: its HBM traffic is all of its bytes.
  assert r["hbm_bytes"] == r["kernel_bytes"]
  assert r["hbm_arithmetic_intensity"] == 8e12 / r["hbm_bytes"]
  assert r["hbm_roofline_step_s"] == max(0.04, r["hbm_bytes"] / 8e11)
