"""The Markdown rendering of an accelerator check's results document (experiments.accelerator_check)."""

RESULTS_README = "experiments/results/accelerator/README.md"


def _verdict(ok):
  return {True: "OK", False: "FAIL", None: "measured"}[ok]


def _flops_line(value):
  return "-" if not value else f"{value / 1e9:.2f}"


def markdown(doc: dict, all_parts) -> str:
  parts = doc["parts"]
  env = (parts.get("env") or {}).get("result")
  title = (f"{env['device_kind']} ({env['backend']}, {env['num_devices']} device(s))" if env
           else doc["device"])
  lines = [f"# Accelerator check: {title}", ""]
  if doc["reduced"]:
    lines += ["REDUCED mode (tiny sizes; numbers are not measurements).", ""]
  if env:
    lines += [f"JAX {env['jax']}, jaxlib {env['jaxlib']}, CUDA {env['cuda'] or '-'}, Flax {env['flax']}, "
              f"Optax {env['optax']}, Orbax {env['orbax']}, Python {env['python']}; default matmul "
              f"precision: {env['default_matmul_precision']}.", ""]
  lines += [f"Overall: {'OK' if doc['ok'] else 'FAILED'}; {doc['wall_seconds']:.0f} s over "
            f"{len(parts)} part(s)"
            + (f"; not run yet: {', '.join(doc['missing_parts'])}" if doc["missing_parts"] else "")
            + f". How these files are made: {RESULTS_README}.", "",
            "| part | result | wall s | XLA flags | matmul precision |", "|---|---|---|---|---|"]
  for name in all_parts:
    p = parts.get(name)
    if p is None:
      lines.append(f"| {name} | not run | - | - | - |")
    else:
      verdict = f"ERROR: {p['error']}"[:120] if "error" in p else _verdict(p["ok"])
      lines.append(f"| {name} | {verdict} | {p['wall_seconds']:.1f} | {p.get('xla_flags') or '-'} | "
                   f"{p.get('matmul_precision', '-')} |")
  result = lambda name: (parts.get(name) or {}).get("result")  # noqa: E731

  if result("peaks"):
    lines += ["", "## Dense matmul peak", ""]
    for p in result("peaks").values():
      lines.append(f"- {p['dtype']} at matmul precision '{p['matmul_precision']}': "
                   f"{p['flops_per_second'] / 1e12:.2f} TFLOP/s ({p['size']}^3 per device)")
  checks = [n for n in ("fold", "sync", "resume") if result(n)]
  if checks:
    lines += ["", "## Correctness (small models)", ""]
  if result("fold"):
    for name, f in result("fold")["models"].items():
      lines.append(f"- fold {name} (float64 fold, forward at 'highest'): max relative logit difference "
                   f"{f['max_relative_difference']:.2e} (tolerance {f['tolerance']:g}) -> {_verdict(f['ok'])}")
  if result("sync"):
    s = result("sync")
    lines.append(f"- BN sync jit == pmap ({s['devices']} device(s), 'highest'): loss rel. diff "
                 f"{s['max_loss_relative_difference']:.2e}, BN stats rel. diff "
                 f"{s['max_bn_stats_difference']:.2e} -> {_verdict(parts['sync']['ok'])}"
                 + ("" if s["proves_synchronisation"] else
                    ". With one device this proves nothing about synchronisation (there is nothing to "
                    "synchronise); it only shows the jit and pmap paths compute the same on this backend"))
  if result("resume"):
    r = result("resume")
    diff = "-" if r["max_abs_difference"] is None else f"{r['max_abs_difference']:.2e}"
    lines.append(f"- resume ({r['dtype']}): preempted at step {r['preempted_at']}, resumed to {r['final_step']}; "
                 f"bit-identical: {r['bit_identical']}, same tree structure: {r['same_structure']}, "
                 f"largest difference {diff} (required: {r['required']}; deterministic ops: "
                 f"{r['deterministic_ops']}) -> {_verdict(parts['resume']['ok'])}")
  inference = [n for n in all_parts if n.startswith("inference_") and result(n)]
  if inference:
    lines += ["", "## Inference (interleaved; ratios are medians of per-round ratios)", "",
              "f32 runs at the matmul precision named (on NVIDIA GPUs 'default' means TF32), its "
              "in-round peak too. GFLOP/img from XLA's cost analysis and from the analytic count "
              "(vitnorm.inference.flops); cost analysis has missed cuBLAS calls on GPU.", ""]
    for name in inference:
      for report in result(name)["reports"]:
        lines += [f"Matmul precision: '{report['matmul_precision']}'.", "", report["markdown"], "",
                  "| model | GFLOP/img cost analysis | GFLOP/img analytic | of peak (analytic) |",
                  "|---|---|---|---|"]
        for row in report["results"]:
          frac = row.get("fraction_of_matmul_peak_analytic")
          lines.append(f"| {row['model']} | {_flops_line(row.get('flops_per_image'))} | "
                       f"{_flops_line(row['analytic_flops_per_image'])} | "
                       f"{'-' if frac is None else f'{frac:.1%}'} |")
        lines.append("")
  if result("train"):
    lines += ["", "## Training step (jit, synthetic batches)", "",
              "| model | variant | dtype | batch | img/s | step ms | MFU (cost analysis) | MFU (analytic) | precision |",
              "|---|---|---|---|---|---|---|---|---|"]
    for t in result("train")["rows"]:
      pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
      lines.append(f"| {t['model']} | {t['variant']} | {t['dtype']} | {t['batch_size']} | "
                   f"{t['images_per_second']:.0f} | {1000 * t['step_seconds']:.2f} | {pct(t['mfu'])} | "
                   f"{pct(t['mfu_analytic'])} | {t['matmul_precision']} |")
    lines.append("\nMFU: 3 x forward FLOPs per step / step time / the bf16 matmul peak of the peaks part.")
  if result("quickstart"):
    q = result("quickstart")
    top1 = "-" if q["eval_top1"] is None else f"{100 * q['eval_top1']:.2f}%"
    lines += ["", "## Quickstart in bf16", "",
              f"{q['data']}: {q['status']} after {q['steps']} steps, eval top-1 {top1}, "
              f"{q['wall_seconds']:.0f} s wall"
              + (f", {q['train_img_per_s']:.0f} img/s incl. compilation" if q["train_img_per_s"] else "")]
  return "\n".join(lines) + "\n"
