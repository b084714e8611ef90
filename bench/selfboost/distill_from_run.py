# A distill.jsonl (the contrastive trainer's input) from pseudo queries and a
# teacher's TREC run over them (e.g. a fused BM25+MiniLM run from `rir fuse`
# on the pseudo_beir.py set): positive = the source passage, negatives = the
# teacher's top non-source passages, with the teacher's scores.
import json, sys, argparse, random
ap = argparse.ArgumentParser()
ap.add_argument("--queries"); ap.add_argument("--corpus"); ap.add_argument("--teacher")
ap.add_argument("--out"); ap.add_argument("--neg", type=int, default=7)
ap.add_argument("--skip", type=int, default=0, help="skip teacher's top-N non-source (false negatives)")
ap.add_argument("--roundtrip", type=int, default=0, help="keep only queries whose source is in teacher top-N")
ap.add_argument("--scores", default="raw")
a = ap.parse_args()
docs = {}
for l in open(a.corpus):
    d = json.loads(l); docs[d["_id"]] = (d.get("title","") + " " + d["text"]).strip()
run = {}
for l in open(a.teacher):
    q, _, d, r, s, _ = l.split()
    run.setdefault(q, []).append((int(r), d, float(s)))
n = kept = 0
with open(a.out, "w") as o:
    for l in open(a.queries):
        pq = json.loads(l); n += 1
        hits = sorted(run.get(pq["_id"], []))
        ids = [d for _, d, _ in hits]
        sc = {d: s for _, d, s in hits}
        src = pq["passage_id"]
        if a.roundtrip and src not in ids[:a.roundtrip]:
            continue
        negs = [d for d in ids if d != src][a.skip:a.skip + a.neg]
        if len(negs) < a.neg: continue
        lo = min(sc.values()) if sc else 0.0
        ps = sc.get(src, lo)
        o.write(json.dumps({"query": pq["text"], "answer": "", "pos": [docs[src]], "neg": [docs[d] for d in negs],
                            "pos_scores": [ps], "neg_scores": [sc[d] for d in negs]}) + "\n")
        kept += 1
print(f"{kept} of {n} queries written", file=sys.stderr)
