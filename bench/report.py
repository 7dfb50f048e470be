"""Print median-time ratios per benchmark group from a pytest-benchmark JSON file.

    python bench/report.py results.json [--baseline cpu]

Ratios are other provider's median / baseline's median within one group (one run, same
input), so > 1 means the baseline is faster.
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
    for b in data["benchmarks"]:
        provider = b.get("extra_info", {}).get("provider", b["name"])
        groups[b["group"]][provider] = b["stats"]
    m = data.get("machine_info", {})
    c = data.get("commit_info", {})
    print(f"machine: {m.get('cpu', {}).get('brand_raw', '?')}, {m.get('cpu', {}).get('count', '?')} cpus; "
          f"python {m.get('python_version', '?')}; commit {c.get('id', '?')[:10]}")
    print(f"| group | provider | median ms | IQR ms | median / {args.baseline} median |")
    print("|---|---|---|---|---|")
    for group, provs in groups.items():
        base = provs.get(args.baseline, {}).get("median")
        for p, s in sorted(provs.items(), key=lambda kv: kv[1]["median"]):
            ratio = f"{s['median'] / base:.2f}x" if base else "-"
            print(f"| {group} | {p} | {s['median'] * 1e3:.1f} | {s['iqr'] * 1e3:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
