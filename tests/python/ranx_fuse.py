"""ranx's fusion of TREC run files, for checking rir's.

usage: ranx_fuse.py OUT.json SPECS.json RUN.trec...

SPECS is a list of {"name", "norm", "method", "params"}; OUT gets
{name: {qid: {docid: score}}} of ranx.fuse(runs, norm, method, params) for
each (norm "none" passes None).
"""
import json
import sys

from ranx import Run, fuse

out, specs = sys.argv[1], json.load(open(sys.argv[2]))
runs = [Run.from_file(p, kind="trec") for p in sys.argv[3:]]
result = {}
for s in specs:
    norm = None if s["norm"] == "none" else s["norm"]
    fused = fuse(runs=runs, norm=norm, method=s["method"], params=s.get("params", {}))
    result[s["name"]] = {q: {d: float(v) for d, v in r.items()} for q, r in fused.to_dict().items()}
json.dump(result, open(out, "w"))
