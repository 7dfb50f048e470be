"""Print median-time ratios per benchmark group from a pytest-benchmark JSON file.

    python bench/report.py results.json [--baseline cpu]

Ratios are other provider's median / baseline's median within one group (one run, same
input), so > 1 means the baseline is faster. Benchmarks of bench_dense.py (extra_info
suite "dense") get their own table: measured time ratios beside multiply-add ratios, and
the issue's targets marked met or missed.
"""
import argparse
import json
from collections import defaultdict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json_file")
    ap.add_argument("--baseline", default="cpu")
    args = ap.parse_args()
    data = json.load(open(args.json_file))
    groups = defaultdict(dict)
    dense = [b for b in data["benchmarks"] if b.get("extra_info", {}).get("suite") == "dense"]
    scan = [b for b in data["benchmarks"] if b.get("extra_info", {}).get("suite") == "scan"]
    mitosis = [b for b in data["benchmarks"] if b.get("extra_info", {}).get("suite") == "mitosis"]
    for b in data["benchmarks"]:
        if b in dense or b in scan or b in mitosis:
            continue
        provider = b.get("extra_info", {}).get("provider", b["name"])
        groups[b["group"]][provider] = dict(b["stats"], mpx=b.get("extra_info", {}).get("megapixels"))
    m = data.get("machine_info", {})
    c = data.get("commit_info", {})
    print(f"machine: {m.get('cpu', {}).get('brand_raw', '?')}, {m.get('cpu', {}).get('count', '?')} cpus; "
          f"python {m.get('python_version', '?')}; commit {c.get('id', '?')[:10]}")
    print(f"| group | provider | median ms | IQR ms | median / {args.baseline} median | Mpx/s |")
    print("|---|---|---|---|---|---|")
    for group, provs in groups.items():
        base = provs.get(args.baseline, {}).get("median")
        for p, s in sorted(provs.items(), key=lambda kv: kv[1]["median"]):
            ratio = f"{s['median'] / base:.2f}x" if base else "-"
            mpx = f"{s['mpx'] / s['median']:.0f}" if s["mpx"] else "-"
            print(f"| {group} | {p} | {s['median'] * 1e3:.1f} | {s['iqr'] * 1e3:.1f} | {ratio} | {mpx} |")
        if "memcpy" in provs and base:  # a kernel moving the same bytes as a copy: the traffic bound
            print(f"  {group}: {args.baseline} reaches {provs['memcpy']['median'] / base:.2f} of the copy-bandwidth "
                  f"bound (memcpy of the same bytes)")
    if dense:
        dense_report(dense)
    if scan:
        scan_report(scan)
    if mitosis:
        mitosis_report(mitosis)


def _mark(ok):
    return "met" if ok else "MISSED"


def dense_report(benchmarks):
    """Per precision: each provider's median for the whole ROI (patch-based scaled from its
    batch), its ratio to the alpha = 1 dense scan, and the same ratio of multiply-adds."""
    for precision in sorted({b["extra_info"]["precision"] for b in benchmarks}):
        rows = {}
        for b in benchmarks:
            e = b["extra_info"]
            if e["precision"] != precision:
                continue
            if e["kind"] == "patch":  # one row per alpha: (alpha * L_m)^2 patches
                lm = int(b["group"].split("L_m=")[1].split()[0])
                for alpha in (1, 2, 4):
                    n = (alpha * lm) ** 2 * e["scale"]
                    rows[f"patch a={alpha} (scaled)"] = (b["stats"]["median"] * n, e["macs"] * n, alpha)
            else:
                rows[e["provider"]] = (b["stats"]["median"], e["macs"], e["alpha"])
        base = rows.get("dense a=1 minimal")
        if base is None:
            continue
        print(f"\n{precision}: whole ROI, median of the run; ratios to dense a=1")
        print("| provider | median s | time / dense a=1 | multiply-adds / dense a=1 |")
        print("|---|---|---|---|")
        for name, (t, macs, _) in sorted(rows.items(), key=lambda kv: kv[1][0]):
            print(f"| {name} | {t:.3f} | {t / base[0]:.3f}x | {macs / base[1]:.3f}x |")
        print("targets:")
        for alpha, limit in ((2, 1.05), (4, 1.45)):
            for plan in ("minimal", "paper"):
                r = rows.get(f"dense a={alpha} {plan}")
                if r:
                    ratio = r[0] / base[0]
                    print(f"  a={alpha} {plan}: {ratio:.3f}x a=1 (target <= {limit}x): {_mark(ratio <= limit)}")
        for plan in ("minimal", "paper"):
            d, sas = rows.get(f"dense a=2 {plan}"), rows.get("shift-stitch a=2")
            if d and sas:
                speed = sas[0] / d[0]
                print(f"  a=2 {plan} vs shift-and-stitch: {speed:.2f}x faster (target >= 3.7x): {_mark(speed >= 3.7)}")
        for alpha in (1, 2, 4):
            d, p = rows.get(f"dense a={alpha} minimal"), rows.get(f"patch a={alpha} (scaled)")
            if d and p:
                speed, mac_ratio = p[0] / d[0], p[1] / d[1]
                print(f"  a={alpha} vs patch-based (scaled): {speed:.1f}x faster, multiply-add ratio {mac_ratio:.1f}x, "
                      f"{speed / mac_ratio:.2f} of it (target >= 0.9): {_mark(speed >= 0.9 * mac_ratio)}")


def mitosis_report(benchmarks):
    """bench_mitosis.py: tissue throughput and GFLOP/s of the dense tellez_cnn against the
    bf16 matrix-multiply peak measured in the same run."""
    by = {b["extra_info"]["provider"]: (b["stats"]["median"], b["extra_info"]) for b in benchmarks}
    peak, peak32 = by.get("matmul bf16"), by.get("matmul fp32")
    print("\nmitosis: dense tellez_cnn (bench_mitosis.py), medians")
    for name in ("matmul bf16", "matmul fp32"):
        if name in by:
            t, e = by[name]
            print(f"  {name}: {e['flops'] / t / 1e9:.0f} GFLOP/s")
    for precision in ("fp32", "bf16"):
        if f"dense {precision}" not in by:
            continue
        t, e = by[f"dense {precision}"]
        gflops = e["flops"] / t / 1e9
        mpx = e["megapixels"] / t
        line = (f"  dense {precision}: {mpx:.2f} Mpx/s of tissue, {1600 / mpx / 60:.1f} min per cm^2 at 0.25 um/px, "
                f"{gflops:.0f} GFLOP/s")
        if peak:
            frac = gflops / (peak[1]["flops"] / peak[0] / 1e9)
            line += f" = {frac:.2f} of the bf16 matmul peak (target >= 0.5): {_mark(frac >= 0.5)}"
        if peak32:
            line += f"; {gflops / (peak32[1]['flops'] / peak32[0] / 1e9):.2f} of the fp32 matmul peak"
        print(line)


def scan_report(benchmarks):
    """bench_scan.py: whole scan against the model alone; peak memory of 20k and 80k slides."""
    by = {b["extra_info"]["provider"]: b["extra_info"] for b in benchmarks}
    print("\nwhole-slide scan (bench_scan.py)")
    o = by.get("overhead 20k")
    if o:
        pairs = ", ".join(f"{s / m:.3f}" for s, m in zip(o["scan_s"], o["model_s"]))
        print(f"  scan / model alone on the same ROIs, per round: {pairs}; median {o['ratio']:.3f} (target <= 1.10): "
              f"{_mark(o['ratio'] <= 1.10)}; best / best {min(o['scan_s']):.2f} s / {min(o['model_s']):.2f} s = "
              f"{o['ratio_best']:.3f}; {o['rois']} ROIs of {o['roi_outputs']}^2 cells, {o['tissue_mm2']:.1f} mm^2 tissue")
    m20, m80 = by.get("memory 20k"), by.get("memory 80k")
    for name, m in (("20k", m20), ("80k", m80)):
        if m:
            print(f"  {name}: peak RSS {m['scan_peak_mb']:.0f} MB after the scan, {m['save_peak_mb']:.0f} MB after "
                  f"writing the outputs (interpreter + torch: {m['base_mb']:.0f} MB); map {m['map_shape']}, "
                  f"{m['rois']}/{m['rois_total']} ROIs (target < 2048 MB): {_mark(m['save_peak_mb'] < 2048)}")
    if m20 and m80:
        growth = m80["save_peak_mb"] / m20["save_peak_mb"] - 1
        print(f"  peak growth 20k -> 80k: {growth * 100:+.1f}% (target < 20%): {_mark(growth < 0.20)}")


if __name__ == "__main__":
    main()
