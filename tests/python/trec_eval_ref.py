"""Reference metrics from pytrec_eval (trec_eval's own C code).

usage: trec_eval_ref.py QRELS.tsv RUN.trec OUT.json

QRELS.tsv is BEIR's `query-id corpus-id score` (header optional); RUN.trec is
`qid Q0 docid rank score tag`. Writes {qid: {measure: value}} with rir's
ir-measures names. RR@k is recip_rank over the run cut to its top k in
trec_eval's order (score desc, doc id desc), which is what ir-measures does.
"""
import json
import sys

import pytrec_eval

qrels_path, run_path, out_path = sys.argv[1:4]

qrels = {}
with open(qrels_path) as f:
    for i, line in enumerate(f):
        cols = line.rstrip("\n").split("\t")
        if i == 0 and cols[0] == "query-id":
            continue
        q, d, r = cols
        qrels.setdefault(q, {})[d] = int(r)

run = {}
with open(run_path) as f:
    for line in f:
        q, _, d, _, s, _ = line.split()
        run.setdefault(q, {})[d] = float(s)

CUT = {
    "ndcg_cut": [1, 3, 5, 10, 100, 1000],
    "map_cut": [10, 100, 1000],
    "recall": [1, 10, 100, 1000],
    "P": [1, 5, 10, 100],
}
NAME = {"ndcg_cut": "nDCG", "map_cut": "AP", "recall": "R", "P": "P"}
spec = {f"{m}.{','.join(map(str, ks))}" for m, ks in CUT.items()} | {"ndcg", "map", "recip_rank"}
ev = pytrec_eval.RelevanceEvaluator(qrels, spec)
res = ev.evaluate(run)

out = {}
for q, vals in res.items():
    o = {}
    for m, ks in CUT.items():
        for k in ks:
            o[f"{NAME[m]}@{k}"] = vals[f"{m}_{k}"]
    o["nDCG"] = vals["ndcg"]
    o["AP"] = vals["map"]
    o["RR"] = vals["recip_rank"]
    out[q] = o


def trec_sorted(docs):
    # score descending, then doc id descending (trec_eval's tie rule)
    return sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)


for k in [1, 10, 100]:
    cut = {q: dict(trec_sorted(d)[:k]) for q, d in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    for q, vals in rr.items():
        out[q][f"RR@{k}"] = vals["recip_rank"]

with open(out_path, "w") as f:
    json.dump(out, f)
