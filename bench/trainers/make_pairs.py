"""DPO pairs shaped like the quickstart's RLRF job, from a BEIR corpus (no judgments read).

Usage: python make_pairs.py BEIR_DATASET_DIR OUT.jsonl [PAIRS]

LLaMA-Factory's sharegpt "ranking" format, as rir's rlrf-data stage writes it:
a system turn, a user turn asking for a query about a passage (its first 600
characters), the passage's title as the chosen answer and its first sentence
as the rejected one. Only the speed of a DPO step is measured with it.
"""
import json
import sys

beir, out = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 40
written = 0
with open(out, "w", encoding="utf-8") as f:
    for line in open(f"{beir}/corpus.jsonl", encoding="utf-8"):
        d = json.loads(line)
        if not d.get("title") or ". " not in d["text"]:
            continue
        row = {
            "conversations": [
                {"from": "system", "value": "You write search queries for scientific passages."},
                {"from": "human", "value": "Write a short query that this passage answers.\nPassage: " + d["text"][:600]},
            ],
            "chosen": {"from": "gpt", "value": d["title"]},
            "rejected": {"from": "gpt", "value": d["text"].split(". ")[0] + "."},
        }
        f.write(json.dumps(row) + "\n")
        written += 1
        if written == n:
            break
