"""A compiled step by XLA's own counts: FLOPs and bytes accessed per device, the arithmetic
intensity against the chip's ridge point, a roofline time, and where the bytes go.

XLA's `bytes accessed` is a count of the program, not a measurement: it sums each kernel's
operands and results as if every one went to HBM and back. On TPUs the compiled program says
where each array lives: XLA:TPU places many operands and results in VMEM (a layout's `S(1)`:
arrays prefetched whole or in slices, intermediates between adjacent kernels), so a second count, HBM
traffic, sums only the arrays in HBM (and each HBM<->VMEM copy once). Both leave out caches and
the overlap of compute, memory traffic and collectives. The roofline time max(FLOPs / peak,
bytes / bandwidth) is given for both counts, beside the FLOP-based 40%-MFU estimate.
"""

import collections
import re

from mae_jax.tools import hlo

# Model stages, by the Flax module path in a kernel's metadata (first match wins).
_COMPONENTS = (("masking shuffle/gather", ("position_and_mask", "take_along_axis", "argsort", "/sort", "gather")),
               ("patch embedding", ("patch_embed",)),
               ("attention", ("/attn/",)),
               ("MLP", ("/fc1/", "/fc2/", "/mlp/")),
               ("GELU", ("gelu",)),
               ("LayerNorm", ("norm",)),
               ("prediction head", ("/pred/", "/head/")),
               ("embedding", ("/embed/",)))


def stage(op_name: str) -> str:
  """The model stage a kernel belongs to, from its JAX source path: e.g. 'encoder attention
  (backward)', 'decoder MLP (forward)', 'loss (forward)', 'optimizer update and gradient norm'."""
  if "jvp(" not in op_name:
    if "threefry" in op_name or "_uniform" in op_name or "random" in op_name:
      return "masking noise (PRNG)"
    if op_name.startswith("state."):
      return "train state (copies)"
    return "optimizer update and gradient norm" if op_name else "unattributed"
  direction = "backward" if "transpose(jvp(" in op_name else "forward"
  path = op_name.split("jvp(", 1)[1].split(")", 1)[1] + "/"
  part = next((p for p in ("encoder", "decoder") if f"/{p}/" in path), "")
  component = next((c for c, keys in _COMPONENTS if any(k in path for k in keys)), "")
  if not component and re.search(r"/block[^/]*/(erf|mul|tanh|exp|integer_pow|pow|logistic)/", path):
    component = "GELU"  # applied in the block's own scope, between fc1 and fc2
  elif not component and re.search(r"/block[^/]*/(add|add_any)/", path):
    component = "residual adds"
  elif not component and part and re.search(r"/(concatenate|pad|split|dynamic_update_slice|broadcast_in_dim)/$", path):
    component = "token concat/split (cls, mask tokens)"
  if not part:
    label = component or "loss"
  else:
    label = f"{part} {component or 'other'}"
  return f"{label} ({direction})"


def _label(kernel: dict) -> str:
  """A kernel's stage; one without metadata by what it is (on TPUs mostly asynchronous copies and
  slices: parameters and constants prefetched from HBM into VMEM, and back)."""
  if kernel["op_name"]:
    return stage(kernel["op_name"])
  return {"copy-done": "HBM<->VMEM copies (copy-start/done)", "copy": "copies (layout)",
          "slice-done": "slices into VMEM (slice-start/done)",
          "custom-call": "slices joined in VMEM (custom calls)"}.get(
      kernel["opcode"], f"no metadata ({kernel['opcode']})")


def cost(compiled) -> dict:
  """XLA's cost analysis of a compiled (or lowered) program (per device for an SPMD program):
  flops, bytes."""
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):  # older JAX: one dict per computation
    c = c[0] if c else {}
  c = c or {}
  return {"flops": float(c.get("flops", 0.0)), "bytes_accessed": float(c.get("bytes accessed", 0.0))}


def breakdown(hlo_text: str, top: int = 8) -> dict:
  """Where one run's bytes go: the kernels' totals (operands + results, loops counted per
  iteration; all of them, and those in HBM), the `top` stages and kernels by HBM traffic."""
  ks = hlo.kernels(hlo_text)
  by_stage, hbm_by_stage = collections.Counter(), collections.Counter()
  for k in ks:
    by_stage[_label(k)] += k["bytes"]
    hbm_by_stage[_label(k)] += k["hbm_bytes"]
  biggest = sorted(ks, key=lambda k: (-k["hbm_bytes"], -k["bytes"]))[:top]
  return {"kernel_bytes": sum(k["bytes"] for k in ks), "hbm_bytes": sum(k["hbm_bytes"] for k in ks),
          "stages": [{"stage": s, "hbm_bytes": b, "bytes": by_stage[s]} for s, b in hbm_by_stage.most_common(top)],
          "kernels": [{"name": k["name"], "opcode": k["opcode"], "bytes": k["bytes"], "hbm_bytes": k["hbm_bytes"],
                       "stage": _label(k)} for k in biggest]}


def summary(compiled, hlo_text: str, peak_flops, bandwidth, flops_fallback: float = 0.0,
            loops: bool = False) -> dict:
  """FLOPs, bytes, intensity, ridge and roofline time per device (None where the chip's figures
  are not known), and the breakdown. Where XLA's count does not cover the step, the FLOPs are
  `flops_fallback` (XLA:CPU's count of the same step, unrolled) and the bytes the kernels' sum
  (loop bodies per iteration); `counted_by` says which. That is where XLA gives no count (XLA:GPU
  compiled for a target without the device reports 0), and with `loops` (scanned layers,
  accumulated micro-batches: XLA's cost analysis counts a loop body once)."""
  c = cost(compiled)
  out = {"flops_per_device": c["flops"], "bytes_accessed_per_device": c["bytes_accessed"],
         "counted_by": "XLA", **breakdown(hlo_text)}
  if loops or not c["flops"] or not c["bytes_accessed"]:
    why = "loop bodies counted once by XLA" if loops and c["flops"] else "XLA gave no count"
    out.update(flops_per_device=flops_fallback or c["flops"], bytes_accessed_per_device=out["kernel_bytes"],
               counted_by=f"the compiled HLO's kernels (bytes) and XLA:CPU (FLOPs); {why}")
  flops, traffic, hbm = out["flops_per_device"], out["bytes_accessed_per_device"], out["hbm_bytes"]
  out["arithmetic_intensity"] = flops / traffic if traffic else None
  out["hbm_arithmetic_intensity"] = flops / hbm if hbm else None
  if peak_flops and bandwidth:
    out["ridge_flops_per_byte"] = peak_flops / bandwidth
    out["compute_s"] = flops / peak_flops
    out["memory_s"] = traffic / bandwidth
    out["roofline_step_s"] = max(out["compute_s"], out["memory_s"])
    out["hbm_memory_s"] = hbm / bandwidth
    out["hbm_roofline_step_s"] = max(out["compute_s"], out["hbm_memory_s"])
  return out


def report_lines(r: dict) -> list[str]:
  """The summary as the indented lines `mae_jax.compile` prints under a job."""
  gib = 2**30
  by = "XLA's count" if r["counted_by"] == "XLA" else "counted from " + r["counted_by"]
  out = [f"  flops_per_device: {r['flops_per_device'] / 1e12:.4g} TFLOP per step ({by})",
         f"  bytes_accessed_per_device: {r['bytes_accessed_per_device'] / gib:.4g} GiB per step ({by}: "
         "each op's operands and results as if from HBM; VMEM/cache reuse and overlap left out)"]
  if r["arithmetic_intensity"] is not None:
    ridge = (f" against the chip's ridge {r['ridge_flops_per_byte']:.0f}" if "ridge_flops_per_byte" in r else "")
    out.append(f"  arithmetic_intensity: {r['arithmetic_intensity']:.1f} FLOP/byte{ridge}")
  if "roofline_step_s" in r:
    bound = "memory" if r["memory_s"] > r["compute_s"] else "compute"
    out.append(f"  roofline_step_s: {r['roofline_step_s'] * 1e3:.1f} ms, {bound}-bound (compute "
               f"{r['compute_s'] * 1e3:.1f} ms at peak, bytes accessed {r['memory_s'] * 1e3:.1f} ms at full bandwidth)")
  out.append(f"  hbm_bytes_per_device: {r['hbm_bytes'] / gib:.4g} GiB per step (the kernels' operands and results "
             "that are in HBM; those XLA placed in VMEM left out)")
  if r["hbm_arithmetic_intensity"] is not None:
    out.append(f"  hbm_arithmetic_intensity: {r['hbm_arithmetic_intensity']:.1f} FLOP/byte")
  if "hbm_roofline_step_s" in r:
    bound = "memory" if r["hbm_memory_s"] > r["compute_s"] else "compute"
    out.append(f"  hbm_roofline_step_s: {r['hbm_roofline_step_s'] * 1e3:.1f} ms, {bound}-bound "
               f"(HBM traffic {r['hbm_memory_s'] * 1e3:.1f} ms at full bandwidth)")
  total = r["hbm_bytes"] or 1
  out.append(f"  HBM traffic by stage (loops per iteration; in brackets all bytes accessed, "
             f"{r['kernel_bytes'] / gib:.4g} GiB in all):")
  out += [f"    {s['stage']}: {s['hbm_bytes'] / gib:.3g} GiB ({s['hbm_bytes'] / total:.0%}) [{s['bytes'] / gib:.3g} GiB]"
          for s in r["stages"]]
  out.append("  kernels moving the most HBM bytes:")
  out += [f"    {k['name']} ({k['opcode']}, {k['stage']}): {k['hbm_bytes'] / gib:.3g} GiB [{k['bytes'] / gib:.3g} GiB]"
          for k in r["kernels"][:5]]
  return out
