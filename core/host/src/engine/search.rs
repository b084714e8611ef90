//! Top-k search by inner product: a built-in exact search (parallel, blocked
//! GEMM) and any Index plugin (faiss) behind the same result type.

use rayon::prelude::*;
use rir_sdk::{Embeddings, Hits};

/// Exact top-`k` by inner product for every query, using `threads` threads.
/// Within equal scores the lower corpus index comes first (deterministic).
pub fn exact_topk(queries: &Embeddings, corpus: &Embeddings, k: usize, threads: usize) -> Hits {
    assert_eq!(queries.dim, corpus.dim, "query and corpus dimensions differ");
    let k = k.min(corpus.rows).max(1);
    let (nq, n, dim) = (queries.rows, corpus.rows, queries.dim);
    let mut ids = vec![-1i64; nq * k];
    let mut scores = vec![f32::NEG_INFINITY; nq * k];
    // Queries in blocks of 32 against corpus blocks of 8,192 rows: the score
    // block (1 MiB) stays in cache and each GEMM is large enough to be fast.
    const QB: usize = 32;
    const CB: usize = 8192;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).build().expect("thread pool");
    pool.install(|| {
        ids.par_chunks_mut(QB * k).zip(scores.par_chunks_mut(QB * k)).enumerate().for_each(|(b, (ids, scores))| {
            let q0 = b * QB;
            let qn = (nq - q0).min(QB);
            let qdata = &queries.data[q0 * dim..(q0 + qn) * dim];
            let mut heaps: Vec<TopK> = (0..qn).map(|_| TopK::new(k)).collect();
            let mut block = vec![0f32; qn * CB];
            for c0 in (0..n).step_by(CB) {
                let cn = (n - c0).min(CB);
                let cdata = &corpus.data[c0 * dim..(c0 + cn) * dim];
                // block[qn x cn] = qdata[qn x dim] * cdata^T[dim x cn]
                unsafe {
                    matrixmultiply::sgemm(
                        qn, dim, cn, 1.0,
                        qdata.as_ptr(), dim as isize, 1,
                        cdata.as_ptr(), 1, dim as isize,
                        0.0, block.as_mut_ptr(), cn as isize, 1,
                    );
                }
                for (qi, heap) in heaps.iter_mut().enumerate() {
                    for (j, &s) in block[qi * cn..(qi + 1) * cn].iter().enumerate() {
                        heap.push(s, (c0 + j) as i64);
                    }
                }
            }
            for (qi, heap) in heaps.into_iter().enumerate() {
                for (slot, (s, id)) in heap.into_sorted().into_iter().enumerate() {
                    ids[qi * k + slot] = id;
                    scores[qi * k + slot] = s;
                }
            }
        });
    });
    Hits { queries: nq, k, ids, scores }
}

/// Bounded best-k collector: a min-heap on (score, -id).
struct TopK {
    k: usize,
    heap: std::collections::BinaryHeap<std::cmp::Reverse<Entry>>,
}

#[derive(PartialEq)]
struct Entry(f32, i64);
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    // Better = higher score, then lower id.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0).then_with(|| o.1.cmp(&self.1))
    }
}

impl TopK {
    fn new(k: usize) -> Self {
        Self { k, heap: std::collections::BinaryHeap::with_capacity(k + 1) }
    }
    #[inline]
    fn push(&mut self, s: f32, id: i64) {
        if self.heap.len() < self.k {
            self.heap.push(std::cmp::Reverse(Entry(s, id)));
        } else if let Some(std::cmp::Reverse(worst)) = self.heap.peek() {
            if Entry(s, id) > *worst {
                self.heap.pop();
                self.heap.push(std::cmp::Reverse(Entry(s, id)));
            }
        }
    }
    fn into_sorted(self) -> Vec<(f32, i64)> {
        let mut v: Vec<Entry> = self.heap.into_iter().map(|r| r.0).collect();
        v.sort_by(|a, b| b.cmp(a));
        v.into_iter().map(|e| (e.0, e.1)).collect()
    }
}

/// Recall of `approx` against `exact` at k: the share of exact top-k ids found.
pub fn recall_against(exact: &Hits, approx: &Hits, k: usize) -> f64 {
    let mut found = 0usize;
    let mut total = 0usize;
    for q in 0..exact.queries {
        let e: std::collections::HashSet<i64> =
            exact.ids[q * exact.k..q * exact.k + k.min(exact.k)].iter().copied().filter(|&i| i >= 0).collect();
        let a = &approx.ids[q * approx.k..q * approx.k + k.min(approx.k)];
        found += a.iter().filter(|i| e.contains(i)).count();
        total += e.len();
    }
    if total == 0 {
        1.0
    } else {
        found as f64 / total as f64
    }
}

/// A run (query id → (document id, score), best first) from `hits` over
/// `ds`'s queries in order; a slot without a hit (id −1) is skipped.
pub fn hits_to_run(ds: &crate::engine::data::Dataset, hits: &Hits) -> crate::engine::metrics::Run {
    let mut run = crate::engine::metrics::Run::new();
    for (qi, (qid, _)) in ds.queries.iter().enumerate() {
        let row = (0..hits.k)
            .filter_map(|j| {
                let id = hits.ids[qi * hits.k + j];
                (id >= 0).then(|| (ds.corpus[id as usize].id.clone(), hits.scores[qi * hits.k + j] as f64))
            })
            .collect();
        run.insert(qid.clone(), row);
    }
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_brute_force_including_ties() {
        // 50 queries x 20,000 docs crosses both block sizes; values repeat to force ties.
        let dim = 8;
        let mk = |n: usize, seed: u64| {
            let mut x = seed;
            let data = (0..n * dim)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ((x % 5) as f32) - 2.0
                })
                .collect();
            Embeddings::new(n, dim, data).unwrap()
        };
        let (q, c) = (mk(50, 7), mk(20_000, 11));
        let hits = exact_topk(&q, &c, 10, 2);
        for qi in 0..q.rows {
            let mut all: Vec<(f32, i64)> = (0..c.rows)
                .map(|j| (q.row(qi).iter().zip(c.row(j)).map(|(a, b)| a * b).sum::<f32>(), j as i64))
                .collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let want: Vec<i64> = all[..10].iter().map(|x| x.1).collect();
            assert_eq!(&hits.ids[qi * 10..qi * 10 + 10], want.as_slice(), "query {qi}");
        }
    }
}
