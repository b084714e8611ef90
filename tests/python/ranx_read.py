"""Reads a rir TREC run file with ranx as a user would (the kind inferred
from the file name, no renaming) and evaluates it on BEIR qrels.

usage: ranx_read.py RUN QRELS.tsv MEASURE...

Prints {"name": the run's name, "queries": n, MEASURE: value, ...} as JSON.
"""
import json
import sys
from collections import defaultdict

from ranx import Qrels, Run, evaluate

run = Run.from_file(sys.argv[1])
qrels = defaultdict(dict)
with open(sys.argv[2]) as f:
    next(f)  # BEIR's header: query-id corpus-id score
    for line in f:
        q, d, s = line.split("\t")
        if int(s) > 0:
            qrels[q][d] = int(s)
measures = sys.argv[3:]
scores = evaluate(Qrels(dict(qrels)), run, measures, make_comparable=True)
if len(measures) == 1:
    scores = {measures[0]: scores}
print(json.dumps({"name": run.name, "queries": len(run), **{m: float(v) for m, v in scores.items()}}))
