//! The OpenAI Batch API's objects, as its clients read them: files, batches, and the lines
//! of output and error files.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::input::LineError;

/// A batch's status, with OpenAI's names and meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The input file is being checked.
    Validating,
    /// The input file was refused: see the batch's `errors`.
    Failed,
    /// Requests are being sent.
    InProgress,
    /// Every request is done; the output files are being written.
    Finalizing,
    /// Done: output and error files are ready.
    Completed,
    /// The completion window ended first; what finished is in the output.
    Expired,
    /// Cancel was asked; requests in flight finish.
    Cancelling,
    /// Cancelled; what finished is in the output.
    Cancelled,
}

impl Status {
    /// Whether nothing more will happen to the batch.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Failed | Status::Completed | Status::Expired | Status::Cancelled)
    }
}

/// Requests of a batch: all, answered well, and failed for good.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    /// Requests in the input file.
    pub total: u64,
    /// Requests answered (any HTTP status: see the output and error files).
    pub completed: u64,
    /// Requests that failed.
    pub failed: u64,
}

/// A list of errors (the input file's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errors {
    /// Always `list`.
    pub object: String,
    /// The errors.
    pub data: Vec<LineError>,
}

/// A batch, as `GET /v1/batches/{id}` returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// `batch_...`.
    pub id: String,
    /// Always `batch`.
    pub object: String,
    /// The path every request goes to.
    pub endpoint: String,
    /// Why the input file was refused.
    pub errors: Option<Errors>,
    /// The input file.
    pub input_file_id: String,
    /// `24h` and the like.
    pub completion_window: String,
    /// See [`Status`].
    pub status: Status,
    /// Output file (answers with a 2xx status).
    pub output_file_id: Option<String>,
    /// Error file (other answers, and failures).
    pub error_file_id: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub in_progress_at: Option<i64>,
    /// Unix seconds: the completion window's end.
    pub expires_at: Option<i64>,
    /// Unix seconds.
    pub finalizing_at: Option<i64>,
    /// Unix seconds.
    pub completed_at: Option<i64>,
    /// Unix seconds.
    pub failed_at: Option<i64>,
    /// Unix seconds.
    pub expired_at: Option<i64>,
    /// Unix seconds.
    pub cancelling_at: Option<i64>,
    /// Unix seconds.
    pub cancelled_at: Option<i64>,
    /// Requests of the batch.
    pub request_counts: RequestCounts,
    /// The caller's strings (at most 16).
    pub metadata: Option<BTreeMap<String, String>>,
}

impl Batch {
    /// A new batch, `validating`.
    pub fn new(
        id: String,
        endpoint: String,
        input_file_id: String,
        completion_window: String,
        metadata: Option<BTreeMap<String, String>>,
        now: i64,
        window_secs: i64,
    ) -> Batch {
        Batch {
            id,
            object: "batch".into(),
            endpoint,
            errors: None,
            input_file_id,
            completion_window,
            status: Status::Validating,
            output_file_id: None,
            error_file_id: None,
            created_at: now,
            in_progress_at: None,
            expires_at: Some(now.saturating_add(window_secs)),
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts::default(),
            metadata,
        }
    }

    /// Moves to `status`, stamping its time.
    pub fn set_status(&mut self, status: Status, now: i64) {
        self.status = status;
        let at = match status {
            Status::Validating => return,
            Status::Failed => &mut self.failed_at,
            Status::InProgress => &mut self.in_progress_at,
            Status::Finalizing => &mut self.finalizing_at,
            Status::Completed => &mut self.completed_at,
            Status::Expired => &mut self.expired_at,
            Status::Cancelling => &mut self.cancelling_at,
            Status::Cancelled => &mut self.cancelled_at,
        };
        at.get_or_insert(now);
    }
}

/// A file, as `GET /v1/files/{id}` returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileObject {
    /// `file-...`.
    pub id: String,
    /// Always `file`.
    pub object: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// The name it was uploaded with.
    pub filename: String,
    /// `batch` (uploads), `batch_output` (what batches write).
    pub purpose: String,
}

/// Parses a completion window (`24h`, `90m`, `3600s`, `2d`) into seconds, from one minute to
/// 30 days.
pub fn window_secs(text: &str) -> Result<i64, String> {
    let bad = || format!("`{text}` is not a completion window such as \"24h\" (a number and s, m, h or d)");
    let (n, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(bad()),
    };
    if !(60..=30 * 86_400).contains(&secs) {
        return Err(format!("`{text}`: a completion window is from 1 minute to 30 days"));
    }
    Ok(secs)
}

/// An output or error file's line for an answered request: the body as JSON when it is
/// JSON, else as a string.
pub fn answered_line(id: &str, custom_id: &str, status: u16, request_id: &str, body: &[u8]) -> String {
    let body: Value =
        serde_json::from_slice(body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
    json!({
        "id": id,
        "custom_id": custom_id,
        "response": { "status_code": status, "request_id": request_id, "body": body },
        "error": null,
    })
    .to_string()
}

/// An error file's line for a request that got no answer.
pub fn failed_line(id: &str, custom_id: &str, code: &str, message: &str) -> String {
    json!({
        "id": id,
        "custom_id": custom_id,
        "response": null,
        "error": { "code": code, "message": message },
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        assert_eq!(window_secs("24h"), Ok(86_400));
        assert_eq!(window_secs("90m"), Ok(5400));
        assert_eq!(window_secs("2d"), Ok(172_800));
        for bad in ["", "h", "24", "24x", "-1h", "10s", "31d", "99999999999999999999d"] {
            assert!(window_secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn status_times_are_stamped_once() {
        let mut b = Batch::new("b".into(), "/v1/embeddings".into(), "f".into(), "24h".into(), None, 100, 86_400);
        b.set_status(Status::InProgress, 101);
        b.set_status(Status::InProgress, 105);
        assert_eq!(b.in_progress_at, Some(101));
        assert_eq!(b.expires_at, Some(86_500));
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(v["status"], "in_progress");
        assert_eq!(v["request_counts"]["total"], 0);
        assert!(v["output_file_id"].is_null());
    }

    #[test]
    fn lines_carry_json_bodies_as_json() {
        let l: Value = serde_json::from_str(&answered_line("r", "a", 200, "q", br#"{"x":1}"#)).unwrap();
        assert_eq!(l["response"]["body"]["x"], 1);
        let l: Value = serde_json::from_str(&answered_line("r", "a", 502, "q", b"bad gateway")).unwrap();
        assert_eq!(l["response"]["body"], "bad gateway");
        let l: Value = serde_json::from_str(&failed_line("r", "a", "no_endpoint", "none")).unwrap();
        assert_eq!(l["error"]["code"], "no_endpoint");
    }
}
