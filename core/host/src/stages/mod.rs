//! The Reinforced-IR stages, in the order a round runs them: pseudo queries,
//! RLRF's preference data, RLGF's distillation data, training a model with a
//! Trainer plugin, and evaluation on a BEIR dataset.

pub mod queries;
pub mod rlrf;
pub mod rlgf;
pub mod train;
pub mod eval;
