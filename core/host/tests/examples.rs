//! The cargo examples run as a user would run them (`cargo test` builds
//! them first, so they cannot rot and their output is checked here).

mod common;

use common::*;

fn example(name: &str) -> std::process::Command {
    let dir = plugin_dir(); // target/<profile>, where the examples are built too
    let exe = dir.join("examples").join(name);
    assert!(exe.is_file(), "{} is not built (cargo test builds examples)", exe.display());
    let mut c = std::process::Command::new(exe);
    c.env("RIR_REGISTRY", root().join("registry.toml")).env("RIR_MIRROR", mirror());
    c
}

#[test]
fn zero_shot_prints_the_seeds_similarity_matrix() {
    let out = example("zero_shot").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // Two augmentation lines and a 2 × 2 matrix; the example itself checks
    // that each query's own document scores higher.
    assert_eq!(stdout.lines().filter(|l| l.contains(" augmented with ")).count(), 2, "{stdout}");
    let matrix = stdout.lines().last().unwrap();
    let values: Vec<f32> = matrix.trim_matches(|c| c == '[' || c == ']').split(|c| c == ',' || c == '[' || c == ']').filter_map(|v| v.trim().parse().ok()).collect();
    assert_eq!(values.len(), 4, "{matrix}");
    assert!(values.iter().all(|v| (-1.0..=1.0).contains(v)), "{matrix}");
}

#[test]
fn eval_scifact_reproduces_minilms_published_score() {
    let out = example("eval_scifact").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // all-MiniLM-L6-v2 on SciFact: MTEB's nDCG@10 0.6451 (pytrec_eval).
    let ndcg: f64 = stdout.lines().find_map(|l| l.strip_prefix("nDCG@10\t")).and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("{stdout}"));
    assert!((ndcg - 0.6451).abs() < 5e-4, "{stdout}");
    assert!(stdout.contains("run file: ") && stdout.contains("results: "), "{stdout}");
}

#[test]
fn an_experiment_built_in_code_plans_like_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = example("experiment_in_code").args(["scifact", "--dry-run"]).current_dir(tmp.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // One round: queries, the four training-data / training stages, and the four variants' evaluations.
    for label in ["scifact: queries", "round 1: rlrf-data", "round 1: rlrf-train", "round 1: rlgf-data", "round 1: rlgf-train", "eval base", "eval +RLRF", "eval +RLGF", "eval both"] {
        assert!(stdout.lines().any(|l| l.contains(label) && l.contains("to run")), "{label}: {stdout}");
    }
    assert!(tmp.path().join("runs/in-code").is_dir(), "runs go under ./runs/in-code");
}

#[test]
fn a_third_party_reward_loads_and_scores() {
    let lib = plugin_dir().join("examples").join(format!("{}third_party_reward{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX));
    assert!(lib.is_file(), "{} is not built (cargo test builds examples)", lib.display());
    let (_dir, host) = host_from(&format!("[plugins.overlap-reward]\nkinds = [\"reward\"]\nlibrary = {:?}\n", lib.display().to_string()));
    let host = host.unwrap();
    let p = host.load("overlap-reward").unwrap();
    assert!(p.validate(rir::Kind::Reward, rir_sdk::ConfigOf::Reward, "min_len = 0").is_err(), "its own config check runs");
    let reward = p.reward("").unwrap();
    let item = rir_sdk::RewardItem {
        query: "vitamin trial".into(),
        reference: "A randomized trial of vitamin D in older adults".into(),
        candidates: vec!["vitamin D randomized adults".into(), "football".into()],
    };
    let s = reward.score(&rir_sdk::RewardContext::default(), &[item]).unwrap();
    // Passage words of 4+ letters: randomized, trial, vitamin, older, adults (5).
    assert_eq!(s[0].baseline, Some(2.0 / 5.0));
    assert_eq!(s[0].scores, vec![3.0 / 5.0, 0.0]);
    assert_eq!(s[0].query_weight, Some(0.0));
}
