"""A contrastive-training file shaped like the quickstart's RLGF job, from a BEIR corpus.

Usage: python make_distill.py BEIR_DATASET_DIR OUT.jsonl [QUERIES] [NEGATIVES]

No judgments are read: each of the first QUERIES documents with a title gives
a pseudo query (its title) and a positive (its text), and NEGATIVES other
documents drawn at random (seed 13) are its negatives, in FlagEmbedding's
format (query, pos, neg). Only the speed of a training step is measured with
it, so the negatives need not be hard; both engines read the same file.
"""
import json
import random
import sys

beir, out = sys.argv[1], sys.argv[2]
n_queries = int(sys.argv[3]) if len(sys.argv) > 3 else 200
n_neg = int(sys.argv[4]) if len(sys.argv) > 4 else 7
docs = [json.loads(line) for line in open(f"{beir}/corpus.jsonl", encoding="utf-8")]
rng = random.Random(13)
written = 0
with open(out, "w", encoding="utf-8") as f:
    for i, d in enumerate(docs):
        if not d.get("title"):
            continue
        negs = [docs[j]["text"] for j in rng.sample(range(len(docs)), n_neg + 1) if j != i][:n_neg]
        f.write(json.dumps({"query": d["title"], "pos": [d["text"]], "neg": negs}) + "\n")
        written += 1
        if written == n_queries:
            break
