//! Keys and values of prompt prefixes kept across calls (a prefix KV cache,
//! as vLLM's automatic prefix caching and llama.cpp's prompt cache): a later
//! prompt that opens with a kept prefix starts from its keys and values
//! instead of running those positions again.
//!
//! A position's keys and values depend only on the tokens up to it, so any
//! leading part of an entry serves any prompt that opens with those tokens,
//! and the numbers are those of running the prompt whole (each matrix row is
//! summed alone: `tests/llama_formats.rs` checks it bit for bit). Entries are
//! keyed on token ids only: whatever changes the weights or the arithmetic
//! (merging an adapter, quantizing, the dense prefill copies) must
//! [`PrefixCache::clear`] it, which [`crate::Llama`]'s methods that do so
//! call.
//!
//! Memory is bounded by a byte budget (0: off); the least recently used
//! entries go first.

use candle_core::{Result, Tensor};

/// What the cache did so far (for logs, benchmarks and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prefixes looked up.
    pub lookups: u64,
    /// Lookups that found at least the minimum number of positions.
    pub hits: u64,
    /// Positions taken from the cache instead of being run.
    pub reused_tokens: u64,
    /// Entries dropped for the budget.
    pub evicted: u64,
    /// Entries kept now.
    pub entries: usize,
    /// Bytes of keys and values kept now.
    pub bytes: usize,
}

struct Entry {
    tokens: Vec<u32>,
    /// Per layer, keys and values of one row: (1, kv heads, tokens, head dim).
    kv: Vec<(Tensor, Tensor)>,
    bytes: usize,
    used: u64,
}

/// Prompt prefixes with their keys and values, least recently used dropped
/// first when over the budget.
pub struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    tick: u64,
    stats: PrefixStats,
}

fn common(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// A cache of at most `budget` bytes (0 keeps nothing).
    pub fn new(budget: usize) -> Self {
        Self { entries: Vec::new(), budget, tick: 0, stats: PrefixStats::default() }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Changes the budget, dropping entries to fit it.
    pub fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
        self.evict();
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats { entries: self.entries.len(), bytes: self.entries.iter().map(|e| e.bytes).sum(), ..self.stats }
    }

    /// Drops every entry (the weights or the arithmetic changed).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// How many leading positions of `tokens` an entry holds (0 below
    /// `min`), without counting a lookup.
    pub fn peek(&self, tokens: &[u32], min: usize) -> usize {
        let m = self.entries.iter().map(|e| common(&e.tokens, tokens)).max().unwrap_or(0);
        if m >= min { m } else { 0 }
    }

    /// The longest leading part of `tokens` an entry holds, if at least
    /// `min` positions: its length and the keys and values of those
    /// positions (views of the entry: never written, since a cache built on
    /// them grows into new buffers before it is appended to).
    pub fn lookup(&mut self, tokens: &[u32], min: usize) -> Result<Option<(usize, Vec<(Tensor, Tensor)>)>> {
        self.stats.lookups += 1;
        let best = self.entries.iter().enumerate().map(|(i, e)| (common(&e.tokens, tokens), i)).max_by_key(|&(m, i)| (m, std::cmp::Reverse(i)));
        let Some((m, i)) = best.filter(|&(m, _)| m >= min.max(1)) else {
            return Ok(None);
        };
        self.tick += 1;
        let e = &mut self.entries[i];
        e.used = self.tick;
        let kv = e.kv.iter().map(|(k, v)| Ok((k.narrow(2, 0, m)?, v.narrow(2, 0, m)?))).collect::<Result<Vec<_>>>()?;
        self.stats.hits += 1;
        self.stats.reused_tokens += m as u64;
        Ok(Some((m, kv)))
    }

    /// Keeps the keys and values of `tokens`: per layer (1, heads, ≥ n, d)
    /// with the first n = `tokens.len()` positions those of `tokens` (copied
    /// here). An entry that already covers them is only marked used; entries
    /// they cover are replaced.
    pub fn insert(&mut self, tokens: &[u32], kv: &[(Tensor, Tensor)]) -> Result<()> {
        if self.budget == 0 || tokens.is_empty() {
            return Ok(());
        }
        self.tick += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.tokens.len() >= tokens.len() && e.tokens[..tokens.len()] == *tokens) {
            e.used = self.tick;
            return Ok(());
        }
        let n = tokens.len();
        let kv = kv.iter().map(|(k, v)| Ok((k.narrow(2, 0, n)?.force_contiguous()?, v.narrow(2, 0, n)?.force_contiguous()?))).collect::<Result<Vec<_>>>()?;
        let bytes = kv.iter().map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()).sum();
        if bytes > self.budget {
            return Ok(());
        }
        self.entries.retain(|e| !(e.tokens.len() < n && tokens[..e.tokens.len()] == *e.tokens));
        self.entries.push(Entry { tokens: tokens.to_vec(), kv, bytes, used: self.tick });
        self.evict();
        Ok(())
    }

    fn evict(&mut self) {
        let mut total: usize = self.entries.iter().map(|e| e.bytes).sum();
        while total > self.budget {
            let Some(i) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.used).map(|(i, _)| i) else { break };
            total -= self.entries.swap_remove(i).bytes;
            self.stats.evicted += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two layers of (1, 1, n, 2) keys and values whose values are their positions.
    fn kv(n: usize) -> Vec<(Tensor, Tensor)> {
        let t = Tensor::arange(0f32, (n * 2) as f32, &Device::Cpu).unwrap().reshape((1, 1, n, 2)).unwrap();
        vec![(t.clone(), t.clone()), (t.clone(), t)]
    }

    #[test]
    fn longest_match_reuse_replacement_and_budget() {
        // 10 positions: 2 layers x (k + v) x 2 values x 4 bytes = 32 bytes a position.
        let mut c = PrefixCache::new(32 * 20);
        let a: Vec<u32> = (0..10).collect();
        c.insert(&a, &kv(12)).unwrap();
        assert_eq!(c.stats().bytes, 320, "only the entry's own positions are kept");
        // A prompt that opens with 6 of them and then differs.
        let b: Vec<u32> = (0..6).chain([99, 98]).collect();
        assert_eq!(c.peek(&b, 4), 6);
        assert_eq!(c.peek(&b, 7), 0);
        let (m, got) = c.lookup(&b, 4).unwrap().unwrap();
        assert_eq!(m, 6);
        assert_eq!(got[1].0.dims4().unwrap(), (1, 1, 6, 2));
        assert_eq!(got[1].0.flatten_all().unwrap().to_vec1::<f32>().unwrap(), (0..12).map(|x| x as f32).collect::<Vec<_>>());
        assert!(c.lookup(&[5, 6, 7], 1).unwrap().is_none());
        // A longer prompt replaces the entry it covers; a covered one adds nothing.
        let longer: Vec<u32> = (0..14).collect();
        c.insert(&longer, &kv(14)).unwrap();
        c.insert(&longer[..8], &kv(8)).unwrap();
        let s = c.stats();
        assert_eq!((s.entries, s.bytes, s.lookups, s.hits, s.reused_tokens), (1, 14 * 32, 2, 1, 6));
        // Over the budget, the least recently used goes.
        let other: Vec<u32> = (100..110).collect();
        c.insert(&other, &kv(10)).unwrap();
        assert_eq!(c.stats().entries, 1);
        assert_eq!(c.stats().evicted, 1);
        assert_eq!(c.peek(&other, 1), 10);
        assert_eq!(c.peek(&longer, 1), 0);
        // Nothing kept with no budget, or larger than the budget.
        let mut off = PrefixCache::new(0);
        off.insert(&a, &kv(10)).unwrap();
        assert_eq!(off.stats().entries, 0);
        c.set_budget(100);
        assert_eq!(c.stats().entries, 0);
        c.insert(&a, &kv(10)).unwrap();
        assert_eq!(c.stats().entries, 0);
    }
}
