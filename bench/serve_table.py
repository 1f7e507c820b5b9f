#!/usr/bin/env python3
"""Summarises bench/serve_load.sh's results.jsonl for one run (the latest by
default): medians over rounds and the ratios the serving issue asks for.

    python3 bench/serve_table.py runs/serve-load/results.jsonl [RUN_ID]
"""
import json
import statistics
import sys


def main():
    path = sys.argv[1]
    rows = [json.loads(line) for line in open(path) if line.strip()]
    run = sys.argv[2] if len(sys.argv) > 2 else rows[-1]["run_id"]
    rows = [r for r in rows if r["run_id"] == run]
    by = {}
    for r in rows:
        by.setdefault(r["what"], []).append(r)

    def med(what, key):
        vals = [r[key] for r in by.get(what, []) if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    print(f"run {run} on {rows[0]['cpu']}")
    inproc = med("in-process", "latency_ms_1x200_median")
    inproc_cps = med("in-process", "latency_candidates_per_second_1x200")
    serve = med("serve-c1", "p50_ms")
    torch = med("deepctr-torch", "latency_ms_1x200_median")
    keras = med("tf-keras", "latency_ms_1x200_median")
    n = len(by.get("serve-c1", []))
    print(f"\n1 x 200, 50-behaviour history, medians over {n} rounds (A B C D alternating)")
    print("| measure | ms |")
    print("|---|---:|")
    for name, v in [("din bench, in process (median)", inproc),
                    ("din serve over HTTP, 1 connection: p50", serve),
                    ("  p99", med("serve-c1", "p99_ms")),
                    ("  p99.9", med("serve-c1", "p999_ms")),
                    ("DeepCTR-Torch, one call (median)", torch),
                    ("TF/Keras, one call (median)", keras)]:
        if v is not None:
            print(f"| {name} | {v:.3f} |")
    if serve and inproc:
        print(f"\nHTTP p50 / in-process median: {serve / inproc:.3f}x (target <= 1.3)")
    refs = [v for v in (torch, keras) if v]
    if serve and refs:
        print(f"faster reference / HTTP p50: {min(refs) / serve:.2f}x (target >= 2)")

    c32 = by.get("serve-c32", [None])[-1]
    if c32:
        cps = c32["requests_per_second"] * 200
        print(f"\n32 connections, {c32['seconds']:.0f} s: {c32['requests']} requests, {c32['requests_per_second']:.1f} req/s = "
              f"{cps:.0f} candidates/s; p50 {c32['p50_ms']:.2f} ms, p99 {c32['p99_ms']:.2f} ms, p99.9 {c32['p999_ms']:.2f} ms; "
              f"errors {c32['non_2xx'] + c32['socket_errors']}")
        if inproc_cps:
            print(f"  vs in process back to back ({inproc_cps:.0f} candidates/s): {cps / inproc_cps:.1%} (target >= 80%)")
    over = by.get("serve-c256-queue64", [None])[-1]
    if over:
        print(f"\n256 connections, queue 64, {over['seconds']:.0f} s: {over['requests']} answers, {over['non_2xx']} shed (503), "
              f"{over['accepted']} accepted with p99 {over['accepted_p99_ms']:.1f} ms (server histogram); "
              f"all answers p50 {over['p50_ms']:.2f} ms, p99 {over['p99_ms']:.1f} ms; socket errors {over['socket_errors']}; "
              f"RSS {over['rss_mib_idle']:.0f} MiB before, then {over['rss_mib_min']:.0f}-{over['rss_mib_max']:.0f} MiB from second 3 on "
              f"(first {over['rss_mib_first']:.0f}, last {over['rss_mib_last']:.0f}); "
              f"alive after: {over['alive_after']}")
    rel = by.get("serve-reload-c8", [None])[-1]
    if rel:
        print(f"\nreload under load (8 connections, {rel['seconds']:.0f} s): {rel['requests']} requests, "
              f"failed {rel['non_2xx'] + rel['socket_errors']}; {rel['reloads_ok']} swaps accepted, "
              f"broken version refused {rel['broken_refused']}x; serving after: {rel['served_after'].get('model_version')}")
    st = by.get("schemathesis", [None])[-1]
    if st:
        print(f"\nschemathesis: {st['generated']} generated requests, exit code {st['exit_code']}, failures: {st['failures']}")


if __name__ == "__main__":
    main()
