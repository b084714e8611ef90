//! The English analyzer of Lucene and pyserini (Anserini's
//! `DefaultEnglishAnalyzer`): StandardTokenizer (Unicode word boundaries),
//! EnglishPossessiveFilter, LowerCaseFilter, StopFilter over Lucene's English
//! stopwords, PorterStemFilter. Each step is a config choice so that other
//! settings (no stemming, no stopwords) are one key away.

use std::cell::RefCell;
use std::collections::HashMap;

use serde::Deserialize;
use unicode_segmentation::UnicodeSegmentation;

/// Lucene's `EnglishAnalyzer.ENGLISH_STOP_WORDS_SET` (what pyserini removes).
pub const LUCENE_STOPWORDS: [&str; 33] = [
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not", "of",
    "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was", "will", "with",
];

/// Lucene's StandardTokenizer splits longer tokens at this many characters.
const MAX_TOKEN_CHARS: usize = 255;

/// Which stemmer runs last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stemmer {
    /// Martin Porter's algorithm (Lucene's PorterStemFilter, pyserini's default).
    Porter,
    /// No stemming.
    None,
}

/// Which stopwords are dropped.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Stopwords {
    /// `"lucene"` (Lucene's 33 English stopwords) or `"none"`.
    Named(String),
    /// An explicit list (compared after lowercasing).
    List(Vec<String>),
}

/// A configured analyzer.
pub struct Analyzer {
    stemmer: Stemmer,
    stopwords: Vec<String>,
    lowercase: bool,
}

thread_local! {
    // Stemming dominates analysis time and a corpus has far fewer distinct
    // words than tokens: memoise per thread (bounded, cleared when full).
    static STEMS: RefCell<HashMap<String, String>> = RefCell::new(HashMap::new());
}

impl Analyzer {
    pub fn new(stemmer: Stemmer, stopwords: &Stopwords, lowercase: bool) -> Result<Self, String> {
        let mut list: Vec<String> = match stopwords {
            Stopwords::Named(n) if n == "lucene" => LUCENE_STOPWORDS.iter().map(|s| s.to_string()).collect(),
            Stopwords::Named(n) if n == "none" => Vec::new(),
            Stopwords::Named(n) => return Err(format!("stopwords = {n:?}: use \"lucene\", \"none\" or a list of words")),
            Stopwords::List(l) => l.iter().map(|w| if lowercase { w.to_lowercase() } else { w.clone() }).collect(),
        };
        list.sort();
        list.dedup();
        Ok(Self { stemmer, stopwords: list, lowercase })
    }

    /// A description of every setting that changes the tokens (part of the fingerprint).
    pub fn describe(&self) -> String {
        let stem = match self.stemmer {
            Stemmer::Porter => "porter",
            Stemmer::None => "none",
        };
        format!("uax29-possessive-lower={}-stop[{}]-{stem}", self.lowercase, self.stopwords.join(","))
    }

    /// The indexed terms of `text`, in order.
    pub fn analyze(&self, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for word in text.unicode_words() {
            // Lucene splits an over-long token into pieces of the maximum length.
            let chars: Vec<char> = word.chars().collect();
            for piece in chars.chunks(MAX_TOKEN_CHARS) {
                let mut t: String = piece.iter().collect();
                strip_possessive(&mut t);
                if self.lowercase {
                    t = lowercase(&t);
                }
                if t.is_empty() || self.stopwords.binary_search(&t).is_ok() {
                    continue;
                }
                if self.stemmer == Stemmer::Porter {
                    t = stem(t);
                }
                out.push(t);
            }
        }
        out
    }
}

/// EnglishPossessiveFilter: a trailing `'s` / `'S` (with ', ’ or ＇) goes.
fn strip_possessive(t: &mut String) {
    let mut it = t.chars().rev();
    if let (Some(s), Some(q)) = (it.next(), it.next()) {
        if (s == 's' || s == 'S') && matches!(q, '\'' | '\u{2019}' | '\u{FF07}') {
            let cut = t.len() - s.len_utf8() - q.len_utf8();
            t.truncate(cut);
        }
    }
}

/// Java's `Character.toLowerCase` is a one-to-one mapping per code point;
/// Rust's full mapping can expand a char (İ → i̇), so take its first char.
fn lowercase(t: &str) -> String {
    t.chars().map(|c| c.to_lowercase().next().unwrap_or(c)).collect()
}

fn stem(t: String) -> String {
    STEMS.with(|m| {
        let mut m = m.borrow_mut();
        if let Some(s) = m.get(&t) {
            return s.clone();
        }
        if m.len() > 1 << 20 {
            m.clear();
        }
        let s = porter_stemmer::stem(&t);
        m.insert(t, s.clone());
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lucene() -> Analyzer {
        Analyzer::new(Stemmer::Porter, &Stopwords::Named("lucene".into()), true).unwrap()
    }

    #[test]
    fn english_analyzer_matches_lucene() {
        // Expected tokens are what Lucene's EnglishAnalyzer chain gives
        // (StandardTokenizer keeps "U.S.A", "3.5" and "don't" whole).
        let a = lucene();
        assert_eq!(a.analyze("The Running dogs' owners are JOHN's friends"), ["run", "dog", "owner", "john", "friend"]);
        assert_eq!(a.analyze("Effects of 3.5 mg/kg on U.S.A. patients"), ["effect", "3.5", "mg", "kg", "u.s.a", "patient"]);
        assert_eq!(a.analyze("caresses ponies relational generalizations"), ["caress", "poni", "relat", "gener"]);
        assert_eq!(a.analyze("COVID-19 vaccination"), ["covid", "19", "vaccin"]);
    }

    #[test]
    fn stopwords_only_and_empty_give_no_terms() {
        let a = lucene();
        assert!(a.analyze("the and of it is").is_empty());
        assert!(a.analyze("").is_empty());
        assert!(a.analyze(" ... --- ").is_empty());
    }

    #[test]
    fn long_tokens_are_split_as_lucene_does() {
        let a = Analyzer::new(Stemmer::None, &Stopwords::Named("none".into()), true).unwrap();
        let t = a.analyze(&"x".repeat(600));
        assert_eq!(t.iter().map(String::len).collect::<Vec<_>>(), [255, 255, 90]);
    }

    #[test]
    fn settings_change_the_description() {
        let none = Analyzer::new(Stemmer::None, &Stopwords::List(vec!["The".into()]), true).unwrap();
        assert_ne!(none.describe(), lucene().describe());
        assert_eq!(none.analyze("The cats"), ["cats"]);
        assert!(Analyzer::new(Stemmer::Porter, &Stopwords::Named("english".into()), true).is_err());
    }
}
