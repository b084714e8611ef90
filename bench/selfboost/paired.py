# Paired comparison of `rir eval` result files on a subset of the queries:
# usage paired.py BASE.json RUN1.json[,RUN2.json...] [odd|even|all]
# (odd/even: SciFact query ids by parity, the halves oracle_half.py uses).
# Paired t statistic and a two-sided randomization test (5,000 sign flips).
import json, sys, random, math
def pq(f): return {q: m['nDCG@10'] for q, m in json.load(open(f))['evaluation']['per_query'].items()}
base = pq(sys.argv[1]); half = sys.argv[3] if len(sys.argv) > 3 else 'odd'
for f in sys.argv[2].split(','):
    run = pq(f)
    qs = [q for q in base if (int(q) % 2 == 1) == (half == 'odd')] if half != 'all' else list(base)
    d = [run.get(q, 0) - base[q] for q in qs]
    n = len(d); m = sum(d) / n; sd = (sum((x - m) ** 2 for x in d) / (n - 1)) ** .5
    t = m / (sd / n ** .5) if sd else 0
    rnd = random.Random(0); obs = abs(sum(d)); c = 0
    for _ in range(5000):
        if abs(sum(x if rnd.random() < .5 else -x for x in d)) >= obs: c += 1
    print(f"{f}: n={n} base={sum(base[q] for q in qs)/n:.4f} run={sum(run.get(q,0) for q in qs)/n:.4f} delta={m:+.4f} t={t:.2f} p_rand={c/5000:.4f}")
