//! Sorting ClickHouse failures: is the batch itself bad (retrying cannot help), or is
//! the server unreachable, busy or misconfigured (the same batch can succeed later)?
//! Unknown codes count as retryable: good data is never given up on a guess.

use std::sync::Arc;

use crate::batcher::BatcherStopped;
use crate::event::SinkKind;
use crate::sinks::{ClassifyError, ErrorClass, SinkError};

/// A failed INSERT, DDL or version query.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClickHouseError {
    /// The server refused the data itself (a data exception code): never retried.
    #[error("{0}")]
    Rejected(String),
    /// The server refused these events of the batch (their messageIds) and took the
    /// others (found by bisecting a refused group).
    #[error("{0}")]
    PartlyRejected(String, Arc<Vec<String>>),
    /// Unreachable, busy, misconfigured or an unknown code: retried later.
    #[error("{0}")]
    Unavailable(String),
    /// The INSERT did not finish within `insert_timeout_ms`.
    #[error("INSERT did not finish within {0} ms")]
    TimedOut(u128),
    /// The connection failed after the request began (not while connecting): the
    /// server may have taken the INSERT.
    #[error("{0}")]
    Interrupted(String),
    #[error("the clickhouse sink's batcher has stopped")]
    Stopped,
    /// The sink's settings cannot be used (found at start-up only).
    #[error("{0}")]
    Config(String),
}

impl ClassifyError for ClickHouseError {
    fn classify(&self) -> ErrorClass {
        match self {
            ClickHouseError::Rejected(_) | ClickHouseError::PartlyRejected(..) => ErrorClass::Rejected,
            ClickHouseError::Unavailable(_)
            | ClickHouseError::TimedOut(_)
            | ClickHouseError::Interrupted(_)
            | ClickHouseError::Config(_) => ErrorClass::Unavailable,
            ClickHouseError::Stopped => ErrorClass::Stopped,
        }
    }
}

impl ClickHouseError {
    /// Whether ClickHouse may have written the INSERT that failed so.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, ClickHouseError::TimedOut(_) | ClickHouseError::Interrupted(_))
    }
}

impl From<ClickHouseError> for SinkError {
    fn from(error: ClickHouseError) -> Self {
        match error {
            ClickHouseError::PartlyRejected(message, ids) => SinkError::Rejected {
                sink: SinkKind::ClickHouse.name(),
                message,
                only: Some(ids),
            },
            error => SinkError::classified(SinkKind::ClickHouse, &error),
        }
    }
}

impl From<BatcherStopped> for ClickHouseError {
    fn from(_: BatcherStopped) -> Self {
        ClickHouseError::Stopped
    }
}

/// Refusals of single rows by a rule of the table (a `throwIf` column, a CHECK
/// constraint): the other rows of the INSERT are fine, so a refused group is worth
/// halving to find the refused rows. Other refusals concern the body as a whole (a
/// schema that does not match): halving would read parts of it as rows of garbage.
pub const ROW_RULE_CODES: &[u32] = &[395, 469];

/// Server exception codes that mean "this data can never be inserted as it is".
const DATA_REJECTED_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    395, // FUNCTION_THROW_IF_VALUE_IS_NON_ZERO (a table's own data rule: throwIf)
    469, // VIOLATED_CONSTRAINT (a table's CHECK constraint)
    16,  // NO_SUCH_COLUMN_IN_TABLE
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    32,  // ATTEMPT_TO_READ_AFTER_EOF
    33,  // CANNOT_READ_ALL_DATA
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    43,  // ILLEGAL_TYPE_OF_ARGUMENT
    44,  // ILLEGAL_COLUMN
    47,  // UNKNOWN_IDENTIFIER
    53,  // TYPE_MISMATCH
    62,  // SYNTAX_ERROR
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    349, // CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
];

/// The exception code in a ClickHouse error text: `Code: 60. DB::Exception…`
/// (current) or `Code: 60, e.displayText() = …` (older servers).
pub fn exception_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + "Code: ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Turns a client error into one that knows whether to retry.
pub fn classify(error: clickhouse::error::Error) -> ClickHouseError {
    use clickhouse::error::Error;
    match error {
        Error::BadResponse(text) => match exception_code(&text) {
            Some(code) if DATA_REJECTED_CODES.contains(&code) => ClickHouseError::Rejected(first_line(&text)),
            _ => ClickHouseError::Unavailable(first_line(&text)),
        },
        // hyper names a failure to connect "(Connect)": nothing was sent then.
        Error::Network(error) if !error.to_string().contains("(Connect)") => {
            ClickHouseError::Interrupted(format!("network error: {error}"))
        }
        // The client's own send/end deadline (`insert_timeout_ms`).
        Error::TimedOut => ClickHouseError::Interrupted("timeout expired".into()),
        other => ClickHouseError::Unavailable(other.to_string()),
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").chars().take(500).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickhouse::error::Error;

    #[test]
    fn only_failures_after_the_request_began_leave_the_insert_in_doubt() {
        assert!(classify(Error::TimedOut).outcome_unknown());
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset by peer");
        assert!(classify(Error::Network(Box::new(reset))).outcome_unknown());
        let refused = std::io::Error::other("client error (Connect)");
        assert!(!classify(Error::Network(Box::new(refused))).outcome_unknown());
        let answered = classify(Error::BadResponse("Code: 252. DB::Exception: Too many parts".into()));
        assert!(
            !answered.outcome_unknown(),
            "the server answered: it did not take the INSERT"
        );
        assert!(ClickHouseError::TimedOut(10).outcome_unknown());
    }

    #[test]
    fn codes_are_read_from_old_and_new_formats() {
        assert_eq!(
            exception_code("Code: 60. DB::Exception: Table x doesn't exist"),
            Some(60)
        );
        assert_eq!(
            exception_code("Code: 16, e.displayText() = DB::Exception: No such column"),
            Some(16)
        );
        assert_eq!(exception_code("no code here"), None);
    }

    #[test]
    fn data_errors_are_permanent_and_the_rest_retryable() {
        let retryable = |error: ClickHouseError| SinkError::from(error).is_retryable();
        let permanent = classify(Error::BadResponse("Code: 53. DB::Exception: Type mismatch".into()));
        assert!(!retryable(permanent.clone()), "{permanent}");
        for text in [
            "Code: 252. DB::Exception: Too many parts",
            "Code: 60. DB::Exception: Table breakwater.events doesn't exist",
            "Code: 241. DB::Exception: Memory limit exceeded",
            "502 Bad Gateway",
        ] {
            assert!(retryable(classify(Error::BadResponse(text.into()))), "{text}");
        }
        assert!(retryable(classify(Error::TimedOut)));
    }
}
