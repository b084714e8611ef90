//! Constants of the Reinforced-IR method (DESIGN §1) that the host and the
//! plugins share, so that each has one source: a reward, a trainer and the
//! evaluation that disagree about them would train for one setting and test
//! another.

/// w: the query's share when a query embedding is mixed with its
/// augmentation's, `w·e(q) + (1−w)·e(P+a)` (the seed's 0.8/0.2).
pub const QUERY_WEIGHT: f64 = 0.8;

/// P: the prefix an augmentation is encoded with, on the corpus side.
pub const AUGMENTATION_PREFIX: &str = "Generate the topic about this passage: ";
