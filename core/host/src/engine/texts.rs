//! One's own texts for `rir encode`: read from jsonl (BEIR's layout: `_id`,
//! optional `title`, `text`), plain text (one per line) or stdin; embeddings
//! written as `.npy` (numpy's format 1.0, float32, C order) and jsonl.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use rir_sdk::Embeddings;
use serde::Deserialize;

/// What reading one's own texts can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TextsError {
    /// A file that cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file (`-` for stdin).
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A line that is not a usable text.
    #[error("{}:{line}: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A file with no texts.
    #[error("{}: no texts in it", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A host error on the way (writing the outputs).
    #[error(transparent)]
    Host(#[from] crate::HostError),
}

/// One text and its id (`_id`, else its line number).
#[derive(Debug, Clone, PartialEq)]
pub struct Text {
    /// `_id`, else the 1-based line number.
    pub id: String,
    /// The text.
    pub text: String,
}

#[derive(Deserialize)]
struct Row {
    #[serde(rename = "_id", default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    title: String,
    text: String,
}

/// Reads texts from `path` (`-`: stdin). A `.jsonl` / `.json` file, or any
/// input whose first non-blank line starts with `{`, is jsonl; anything
/// else has one text per line. Blank lines are skipped; ids default to the
/// line number. A document's `title` goes before its text, as BEIR encodes
/// it.
pub fn read(path: &Path) -> Result<Vec<Text>, TextsError> {
    let io = |source| TextsError::Io { path: path.to_owned(), source };
    let reader: Box<dyn BufRead> = if path == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(path).map_err(io)?))
    };
    let mut lines = Vec::new();
    for (i, bytes) in reader.split(b'\n').enumerate() {
        let line = crate::util::files::utf8_line(bytes.map_err(io)?).map_err(|reason| TextsError::Malformed { path: path.to_owned(), line: i + 1, reason })?;
        if !line.trim().is_empty() {
            lines.push((i + 1, line));
        }
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let jsonl = matches!(ext, "jsonl" | "json") || lines.first().is_some_and(|(_, l)| l.trim_start().starts_with('{'));
    let texts = if jsonl {
        lines
            .into_iter()
            .map(|(n, l)| {
                let r: Row = serde_json::from_str(&l).map_err(|e| TextsError::Malformed { path: path.to_owned(), line: n, reason: e.to_string() })?;
                let id = match r.id {
                    None => n.to_string(),
                    Some(serde_json::Value::String(s)) => s,
                    Some(v @ serde_json::Value::Number(_)) => v.to_string(),
                    Some(v) => {
                        return Err(TextsError::Malformed { path: path.to_owned(), line: n, reason: format!("_id must be a string or a number, not {v}") })
                    }
                };
                Ok(Text { id, text: format!("{} {}", r.title, r.text).trim().to_owned() })
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        lines.into_iter().map(|(n, l)| Text { id: n.to_string(), text: l.trim().to_owned() }).collect()
    };
    if texts.is_empty() {
        return Err(TextsError::Empty { path: path.to_owned() });
    }
    Ok(texts)
}

/// The bytes of an `.npy` file (format 1.0) holding `e` as float32 (rows, dim).
pub fn npy_bytes(e: &Embeddings) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}", e.rows, e.dim);
    // Magic (6) + version (2) + header length (2) + header, padded with
    // spaces and ended by a newline to a multiple of 64 bytes.
    let unpadded = 10 + dict.len() + 1;
    let header = format!("{dict}{}\n", " ".repeat(unpadded.next_multiple_of(64) - unpadded));
    let mut out = Vec::with_capacity(10 + header.len() + e.data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in &e.data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes `NAME.npy` and `NAME.jsonl` (`_id`, `text`, `embedding`, and the
/// `augmentation` when there is one) into `dir`; returns both paths.
pub fn write(dir: &Path, name: &str, texts: &[Text], e: &Embeddings, augmentations: Option<&[String]>) -> Result<[PathBuf; 2], TextsError> {
    crate::util::paths::ensure_dir(dir).map_err(|source| TextsError::Io { path: dir.to_owned(), source })?;
    let npy = dir.join(format!("{name}.npy"));
    crate::util::files::write_atomic(&npy, &npy_bytes(e))?;
    let jsonl = dir.join(format!("{name}.jsonl"));
    let mut buf = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        let mut row = serde_json::json!({"_id": t.id, "text": t.text, "embedding": e.row(i)});
        if let Some(a) = augmentations {
            row["augmentation"] = a[i].clone().into();
        }
        serde_json::to_writer(&mut buf, &row).expect("json values serialize");
        buf.write_all(b"\n").expect("writing to a Vec");
    }
    crate::util::files::write_atomic(&jsonl, &buf)?;
    Ok([npy, jsonl])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_padded_to_64_bytes() {
        let e = Embeddings::new(2, 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let b = npy_bytes(&e);
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        assert_eq!(b[10 + hlen - 1], b'\n');
        assert_eq!(b.len(), 10 + hlen + 24);
        assert_eq!(f32::from_le_bytes(b[10 + hlen..10 + hlen + 4].try_into().unwrap()), 1.0);
    }

    #[test]
    fn texts_are_read_from_jsonl_or_lines_with_errors_naming_the_line() {
        let dir = std::env::temp_dir().join(format!("rir-texts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("q.txt");
        std::fs::write(&p, "first query\n\n  second query \n").unwrap();
        assert_eq!(read(&p).unwrap(), vec![Text { id: "1".into(), text: "first query".into() }, Text { id: "3".into(), text: "second query".into() }]);
        let p = dir.join("d.jsonl");
        std::fs::write(&p, "{\"_id\": \"a\", \"title\": \"T\", \"text\": \"body\"}\n{\"_id\": 7, \"text\": \"x\"}\n{\"title\": \"no text\"}\n").unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:3:") && e.contains("text"), "{e}");
        std::fs::write(&p, "{\"_id\": \"a\", \"title\": \"T\", \"text\": \"body\"}\n{\"_id\": 7, \"text\": \"x\"}\n").unwrap();
        assert_eq!(read(&p).unwrap()[0].text, "T body");
        assert_eq!(read(&p).unwrap()[1].id, "7");
        let p = dir.join("latin1.txt");
        std::fs::write(&p, b"fine\n\xe9t\xe9\n").unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("latin1.txt:2: not UTF-8 (invalid byte at column 1)"), "{e}");
        let p = dir.join("empty.txt");
        std::fs::write(&p, "\n \n").unwrap();
        assert!(read(&p).unwrap_err().to_string().contains("no texts"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
