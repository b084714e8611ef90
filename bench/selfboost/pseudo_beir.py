# A BEIR-layout dataset whose queries are a queries stage's pseudo queries
# and whose qrels are their source passages, so `rir eval --dataset DIR`
# measures how well a retriever finds what the generator wrote from.
# usage: pseudo_beir.py QUERIES.jsonl OUT_DIR CORPUS.jsonl
import json, os, sys, glob
qfile, out, corpus = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(out + "/qrels", exist_ok=True)
if not os.path.exists(out + "/corpus.jsonl"):
    os.symlink(corpus, out + "/corpus.jsonl")
with open(qfile) as f, open(out + "/queries.jsonl", "w") as q, open(out + "/qrels/test.tsv", "w") as r:
    r.write("query-id\tcorpus-id\tscore\n")
    for line in f:
        d = json.loads(line)
        q.write(json.dumps({"_id": d["_id"], "text": d["text"]}) + "\n")
        r.write(f"{d['_id']}\t{d['passage_id']}\t1\n")
