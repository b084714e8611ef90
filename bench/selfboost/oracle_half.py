# DIAGNOSTIC ONLY, never a result: real SciFact test claims with even ids
# (half A) become training data (relevant documents as positives, the base
# run's ranks 4-40 non-relevant as negatives), so that a model trained on
# them can be evaluated on the odd half (paired.py ... odd). It measures how
# much in-domain training of *this* kind can move the other half at all.
# usage: oracle_half.py SCIFACT_DIR BASE_TREC_RUN OUT.jsonl
import json, sys
S, BASE_RUN, OUT = sys.argv[1], sys.argv[2], sys.argv[3]
docs={}
for l in open(f'{S}/corpus.jsonl'): d=json.loads(l); docs[d['_id']]=(d['title']+' '+d['text']).strip()
qs={json.loads(l)['_id']:json.loads(l)['text'] for l in open(f'{S}/queries.jsonl')}
rel={}
for l in list(open(f'{S}/qrels/test.tsv'))[1:]:
    q,d,s=l.split(); rel.setdefault(q,set()).add(d)
run={}
for l in open(BASE_RUN):
    q,_,d,r,s,_=l.split(); run.setdefault(q,[]).append(d)
A=[q for q in sorted(rel) if int(q)%2==0]
with open(OUT,'w') as o:
    for q in A:
        negs=[d for d in run[q][3:40] if d not in rel[q]][:7]
        for p in sorted(rel[q]):
            o.write(json.dumps({'query':qs[q],'answer':'','pos':[docs[p]],'neg':[docs[d] for d in negs]})+'\n')
print(len(A), 'queries in A')
