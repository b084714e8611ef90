# Two diagnostics of a queries.jsonl, both quoted in BENCHMARKS' sweep rows:
#  - how the queries read: mean share of a query's words found in its
#    passage (title + text) and mean words per query; with --test, the same
#    for the dataset's own test queries against their relevant documents;
#  - coverage: how many test queries have a relevant document among the
#    passages the pseudo queries were written from (uses test judgments to
#    *describe* a query set, never to choose or filter anything).
# usage: query_stats.py BEIR_DIR QUERIES.jsonl [--test]
import json, re, sys
S, qfile = sys.argv[1], sys.argv[2]
docs = {}
for l in open(f'{S}/corpus.jsonl'):
    d = json.loads(l); docs[d['_id']] = (d.get('title', '') + ' ' + d['text'])
rel = {}
for l in list(open(f'{S}/qrels/test.tsv'))[1:]:
    q, d, s = l.split(); rel.setdefault(q, set()).add(d)
tok = lambda s: set(re.findall(r'[a-z0-9]+', s.lower()))
def stats(pairs):
    ov = [len(tok(q) & tok(docs[d])) / max(1, len(tok(q))) for q, d in pairs]
    wl = [len(q.split()) for q, _ in pairs]
    return sum(ov) / len(ov), sum(wl) / len(wl)
qs = [json.loads(l) for l in open(qfile)]
o, w = stats([(q['text'], q['passage_id']) for q in qs])
print(f'{qfile}: {len(qs)} queries, word overlap with the passage {o:.2f}, {w:.1f} words')
cov = {q['passage_id'] for q in qs}
n = sum(1 for q in rel if rel[q] & cov)
print(f'coverage: {n} of {len(rel)} test queries ({n / len(rel):.1%}) have a relevant document among {len(cov)} source passages')
if '--test' in sys.argv:
    tq = {json.loads(l)['_id']: json.loads(l)['text'] for l in open(f'{S}/queries.jsonl')}
    o, w = stats([(tq[q], d) for q in rel for d in rel[q]])
    print(f'test queries: word overlap with their relevant documents {o:.2f}, {w:.1f} words')
